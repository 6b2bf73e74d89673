//! What a failed read or write of the node's files means, and what to do about it: a full
//! disk, a read-only mount or a permission problem is said as such; only real damage (SQLite's
//! CORRUPT and NOTADB) sends the administrator to a backup.
//!
//! Advice only: classifying never changes what failed or how the command exits.

use std::io;
use std::path::Path;

use rusqlite::ErrorCode;

/// What the administrator should understand from a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The device holding the file is full (ENOSPC, EDQUOT, SQLITE_FULL).
    NoSpace,
    /// The file system is mounted read-only (EROFS).
    ReadOnlyMount,
    /// The file or its directory may not be read or written by this user (EACCES, EPERM).
    PermissionDenied,
    /// SQLite may not write the database, and the file system gives no reason (a read-only
    /// connection, or root on a file whose mode says read-only).
    ReadOnly,
    /// Another process held the database lock past the busy timeout.
    Busy,
    /// The file's content is damaged (SQLITE_CORRUPT, SQLITE_NOTADB).
    Damaged,
    /// Anything else: the error says what it is; no advice is added.
    Other,
}

/// The fault behind an I/O error.
pub fn io_fault(e: &io::Error) -> Fault {
    match e.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => Fault::NoSpace,
        io::ErrorKind::ReadOnlyFilesystem => Fault::ReadOnlyMount,
        io::ErrorKind::PermissionDenied => Fault::PermissionDenied,
        _ => Fault::Other,
    }
}

/// The fault behind a SQLite error on the database `db`, and the file it concerns. SQLite
/// reports a file it may not write as READONLY or CANTOPEN whatever the reason, so those
/// are told apart by asking the file system about the database, its -wal and -shm files and
/// its directory.
pub fn sqlite_fault(e: &rusqlite::Error, db: &Path) -> (Fault, std::path::PathBuf) {
    let fault = match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => Fault::Damaged,
        Some(ErrorCode::DiskFull) => Fault::NoSpace,
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Fault::Busy,
        Some(ErrorCode::ReadOnly | ErrorCode::CannotOpen | ErrorCode::PermissionDenied) => {
            if let Some((file, err)) = first_unwritable(db) {
                let fault = io_fault(&err);
                if fault != Fault::Other {
                    return (fault, file);
                }
            }
            if e.sqlite_error_code() == Some(ErrorCode::ReadOnly) {
                Fault::ReadOnly
            } else {
                Fault::Other
            }
        }
        _ => Fault::Other,
    };
    (fault, db.to_path_buf())
}

/// The first of the database's files (and then its directory) this process may not both
/// read and write, with the reason.
fn first_unwritable(db: &Path) -> Option<(std::path::PathBuf, io::Error)> {
    let side = |suffix: &str| {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        std::path::PathBuf::from(name)
    };
    let dir = parent_dir(db).to_path_buf();
    [
        (db.to_path_buf(), libc::R_OK | libc::W_OK),
        (side("-wal"), libc::R_OK | libc::W_OK),
        (side("-shm"), libc::R_OK | libc::W_OK),
        (dir, libc::W_OK | libc::X_OK),
    ]
    .into_iter()
    .filter(|(path, _)| path.exists())
    .find_map(|(path, how)| access(&path, how).err().map(|e| (path, e)))
}

/// The directory `path` is in ("." for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// access(2): whether this process's real user may use `path` as `how` says.
fn access(path: &Path, how: libc::c_int) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a NUL-terminated path that outlives the call.
    if unsafe { libc::access(c_path.as_ptr(), how) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The advice to append to an error message (empty, or starting with "; ") for `fault` on
/// `file`.
pub fn advice(fault: Fault, file: &Path) -> String {
    let dir = parent_dir(file);
    match fault {
        Fault::NoSpace => format!(
            "; no space left on the device holding {}: free some space there and run the command \
             again (what failed was not stored; the files are not damaged)",
            dir.display()
        ),
        Fault::ReadOnlyMount => format!(
            "; the file system holding {} is mounted read-only: remount it read-write (the files \
             are not damaged)",
            dir.display()
        ),
        Fault::PermissionDenied => format!(
            "; permission denied for {} on {}{}: run communesync as the user that owns the data \
             directory, or give that user back its files (docs/operations.md, \"Install\")",
            current_user(),
            file.display(),
            owner_and_mode(file)
        ),
        Fault::ReadOnly => format!(
            "; {} cannot be written (read-only file or connection): check its mode and the \
             mount (the file is not damaged)",
            file.display()
        ),
        Fault::Busy => "; another process kept the database locked: try again".into(),
        Fault::Damaged => "; the file is damaged: run `communesync check` and restore it from a \
                           backup (docs/operations.md)"
            .into(),
        Fault::Other => String::new(),
    }
}

/// Advice for an I/O error on `path` (see [`advice`]).
pub fn io_advice(e: &io::Error, path: &Path) -> String {
    advice(io_fault(e), path)
}

/// Advice for a SQLite error on the database `db` (see [`advice`]).
pub fn sqlite_advice(e: &rusqlite::Error, db: &Path) -> String {
    let (fault, file) = sqlite_fault(e, db);
    advice(fault, &file)
}

/// " (owned by uid N, mode 0MMM)" for an existing file, else nothing.
fn owner_and_mode(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| {
            format!(
                " (owned by uid {}, mode {:04o})",
                m.uid(),
                m.mode() & 0o7777
            )
        })
        .unwrap_or_default()
}

/// This process's user as "user NAME (uid N)", or "uid N" when it has no name.
fn current_user() -> String {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buf` outlives every use of `pwd`.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc == 0 && !found.is_null() && !pwd.pw_name.is_null() {
        // SAFETY: getpwuid_r set pw_name to a NUL-terminated string inside `buf`.
        let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
        return format!("user {} (uid {uid})", name.to_string_lossy());
    }
    format!("uid {uid}")
}

/// `error` and each of its causes, joined by ": " (what a log line or a one-line message needs
/// when the error is not handed on as a source).
pub(crate) fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let more = e.to_string();
        // Some errors repeat their cause in their own text.
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::ffi;

    fn sqlite(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(ffi::Error::new(code), None)
    }

    #[test]
    fn only_damage_advises_a_restore() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("node.db");
        std::fs::write(&db, b"").unwrap();
        for (code, fault, words) in [
            (
                ffi::SQLITE_CORRUPT,
                Fault::Damaged,
                "restore it from a backup",
            ),
            (
                ffi::SQLITE_NOTADB,
                Fault::Damaged,
                "restore it from a backup",
            ),
            (
                ffi::SQLITE_FULL,
                Fault::NoSpace,
                "no space left on the device holding",
            ),
            (ffi::SQLITE_BUSY, Fault::Busy, "locked"),
            (ffi::SQLITE_IOERR, Fault::Other, ""),
            (ffi::SQLITE_CONSTRAINT, Fault::Other, ""),
        ] {
            let e = sqlite(code);
            assert_eq!(sqlite_fault(&e, &db).0, fault, "code {code}");
            let text = sqlite_advice(&e, &db);
            assert!(text.contains(words), "code {code}: {text}");
            assert_eq!(
                text.contains("backup"),
                fault == Fault::Damaged,
                "code {code}: {text}"
            );
        }
        for (kind, fault, words) in [
            (io::ErrorKind::StorageFull, Fault::NoSpace, "no space left"),
            (
                io::ErrorKind::QuotaExceeded,
                Fault::NoSpace,
                "no space left",
            ),
            (
                io::ErrorKind::ReadOnlyFilesystem,
                Fault::ReadOnlyMount,
                "mounted read-only",
            ),
            (
                io::ErrorKind::PermissionDenied,
                Fault::PermissionDenied,
                "permission denied for",
            ),
        ] {
            let e = io::Error::from(kind);
            assert_eq!(io_fault(&e), fault);
            let text = io_advice(&e, &db);
            assert!(text.contains(words) && !text.contains("backup"), "{text}");
        }
        assert!(io_advice(&io::Error::from_raw_os_error(libc::ENOSPC), &db)
            .contains(&dir.path().display().to_string()));
        assert!(io_advice(&io::Error::from_raw_os_error(libc::EACCES), &db).contains("(uid "));
    }

    /// A real SQLITE_READONLY: a write on a connection opened read-only.
    #[test]
    fn a_write_refused_as_read_only_is_not_called_damage() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("node.db");
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let ro =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        let e = ro.execute("INSERT INTO t VALUES (1)", []).unwrap_err();
        assert_eq!(e.sqlite_error_code(), Some(ErrorCode::ReadOnly));
        let text = sqlite_advice(&e, &db);
        assert!(
            text.contains("cannot be written") || text.contains("permission denied"),
            "{text}"
        );
        assert!(!text.contains("backup"), "{text}");
    }
}

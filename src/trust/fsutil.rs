//! Crash-safe file writes: temp file, fsync, rename, fsync of the directory; and renames and
//! directories that never replace or expose what they should not.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::{Result, TrustError};

/// Atomically replaces `path` with `bytes`, readable only by the owner (mode 0600 on unix).
/// For private keys and anything else that must never be world-readable.
pub fn write_secret_file(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    write_atomic(path.as_ref(), bytes, 0o600)
}

/// Atomically replaces `path` with `bytes` (mode 0644 on unix).
pub fn write_file_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    write_atomic(path.as_ref(), bytes, 0o644)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let io = |op, p: &Path| {
        let p = p.to_path_buf();
        move |source| TrustError::Io {
            op,
            path: p,
            source,
        }
    };
    let name = path.file_name().ok_or_else(|| TrustError::Io {
        op: "writing",
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
    })?;
    let dir = parent_dir(path);
    let tmp = temp_beside(path, name, "tmp");

    let result = (|| {
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        let mut f = opts.open(&tmp).map_err(io("creating", &tmp))?;
        f.write_all(bytes).map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("syncing", &tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io("renaming into", path))?;
        Ok(())
    })();
    if result.is_err() {
        // Best effort: a leftover temp file is harmless but untidy.
        let _ = fs::remove_file(&tmp);
        return result;
    }
    sync_dir(dir)
}

/// The directory `path` is in ("." for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// A hidden name beside `path` for a file being written, unique per writer so concurrent
/// writers never share one: `.NAME.TAG.PID.RANDOM`.
pub fn temp_beside(path: &Path, name: &std::ffi::OsStr, tag: &str) -> PathBuf {
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".{tag}.{}.{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    parent_dir(path).join(tmp_name)
}

/// Makes a rename in `dir` durable. Directories cannot be opened for sync on Windows.
fn sync_dir(dir: &Path) -> Result<()> {
    sync_dir_io(dir).map_err(|source| TrustError::Io {
        op: "syncing directory",
        path: dir.to_path_buf(),
        source,
    })
}

/// [`sync_dir`] for callers with their own error type.
pub fn sync_dir_io(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Renames `from` to `to`, failing with `AlreadyExists` if anything is at `to` (a symlink
/// included): atomically where the file system knows RENAME_NOREPLACE, else checked just
/// before the rename.
pub fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::ffi::OsStrExt;
        let c_path = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
        };
        let (c_from, c_to) = (c_path(from)?, c_path(to)?);
        // SAFETY: two NUL-terminated paths that outlive the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                c_from.as_ptr(),
                libc::AT_FDCWD,
                c_to.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if !matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
            return Err(err);
        }
    }
    if fs::symlink_metadata(to).is_ok() {
        return Err(io::ErrorKind::AlreadyExists.into());
    }
    fs::rename(from, to)
}

/// Creates `dir` (and missing parents) readable by the owner only (0700 on unix), whatever the
/// umask; a directory already there keeps its mode.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Opens a new file (never an existing one) readable and writable by the owner only (0600).
pub fn create_private_file(path: &Path) -> io::Result<fs::File> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replace_and_set_modes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key.pem");
        write_secret_file(&p, b"one").unwrap();
        write_secret_file(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let q = dir.path().join("cert.pem");
        write_file_atomic(&q, b"cert").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&p), 0o600);
            // umask may clear group/other bits, never add them.
            assert_eq!(mode(&q) & !0o644, 0);
            assert_ne!(mode(&q) & 0o600, 0);
        }
        // No temp files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
        assert!(matches!(
            write_file_atomic(dir.path().join("missing/x"), b"x"),
            Err(TrustError::Io { .. })
        ));
    }

    #[test]
    fn rename_no_replace_leaves_files_and_links_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("new"), dir.path().join("old"));
        fs::write(&from, b"new").unwrap();
        fs::write(&to, b"old").unwrap();
        let err = rename_no_replace(&from, &to).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&to).unwrap(), b"old");
        #[cfg(unix)]
        {
            let link = dir.path().join("link");
            std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
            let err = rename_no_replace(&from, &link).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
            assert!(fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink());
        }
        let fresh = dir.path().join("fresh");
        rename_no_replace(&from, &fresh).unwrap();
        assert_eq!(fs::read(&fresh).unwrap(), b"new");
        assert!(!from.exists());
    }

    #[test]
    fn private_files_and_directories_ignore_a_permissive_umask() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        create_private_dir(&sub).unwrap();
        let file = sub.join("f");
        drop(create_private_file(&file).unwrap());
        assert_eq!(
            create_private_file(&file).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&sub), 0o700);
            assert_eq!(mode(&file), 0o600);
        }
    }
}

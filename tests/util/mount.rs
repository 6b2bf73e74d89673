//! File systems of a test's own, for the disk-full, read-only and power-cut tests: each mounted
//! one is unmounted when its guard drops, also when the test fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::path_arg;

/// Runs a system tool; the error names it and what it said.
pub fn tool(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A tmpfs of `size` mounted on `point` (created), unmounted when dropped; None where this test
/// process may not mount (not root, or no CAP_SYS_ADMIN in a container).
pub struct Tmpfs {
    point: PathBuf,
}

impl Tmpfs {
    pub fn mount(point: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(point).unwrap();
        let options = format!("size={size},mode=0700");
        let mounted = tool(
            "mount",
            &["-t", "tmpfs", "-o", &options, "tmpfs", &path_arg(point)],
        )
        .is_ok();
        if !mounted {
            eprintln!("cannot mount a tmpfs here: the mount-based checks are skipped");
            return None;
        }
        Some(Tmpfs {
            point: point.to_path_buf(),
        })
    }

    pub fn remount_read_only(&self) {
        self.remount("remount,ro");
    }

    /// Space returns: the file system grows to `size`.
    pub fn grow(&self, size: &str) {
        self.remount(&format!("remount,size={size}"));
    }

    fn remount(&self, options: &str) {
        tool("mount", &["-o", options, &path_arg(&self.point)]).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = tool("umount", &["-l", &path_arg(&self.point)]);
    }
}

/// An ext4 image attached to a loop device and mounted; unmounted and detached when dropped.
pub struct Mounted {
    point: PathBuf,
    device: String,
}

impl Mounted {
    /// A new ext4 file system of `mib` MiB in `image`, mounted on `point` (created, emptied of
    /// `lost+found` so that `init` finds it empty).
    pub fn fresh(image: &Path, mib: u64, point: &Path) -> Result<Mounted, String> {
        let file = std::fs::File::create(image).map_err(|e| format!("{}: {e}", image.display()))?;
        file.set_len(mib << 20).map_err(|e| e.to_string())?;
        tool("mkfs.ext4", &["-q", "-F", &path_arg(image)])?;
        let mounted = Mounted::existing(image, point)?;
        std::fs::remove_dir(point.join("lost+found")).map_err(|e| e.to_string())?;
        Ok(mounted)
    }

    /// Mounts the ext4 file system in `image` on `point` (replaying its journal).
    pub fn existing(image: &Path, point: &Path) -> Result<Mounted, String> {
        std::fs::create_dir_all(point).map_err(|e| e.to_string())?;
        let device = tool("losetup", &["-f", "--show", &path_arg(image)])?;
        if let Err(e) = tool("mount", &["-t", "ext4", &device, &path_arg(point)]) {
            let _ = tool("losetup", &["-d", &device]);
            return Err(e);
        }
        Ok(Mounted {
            point: point.to_path_buf(),
            device,
        })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = tool("umount", &[&path_arg(&self.point)]);
        let _ = tool("losetup", &["-d", &self.device]);
    }
}

/// A frozen file system, thawed when dropped (also when a test fails while it is frozen).
pub struct Frozen(PathBuf);

impl Frozen {
    pub fn freeze(point: &Path) -> Result<Frozen, String> {
        tool("fsfreeze", &["-f", &path_arg(point)])?;
        Ok(Frozen(point.to_path_buf()))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = tool("fsfreeze", &["-u", &path_arg(&self.0)]);
    }
}

//! The filesystems PID 1 mounts before anything else runs.

use nix::mount::{mount, MsFlags};

use super::InitError;

struct Mount {
    fstype: &'static str,
    path: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

/// In order: /dev before /dev/pts.
const MOUNTS: &[Mount] = &[
    Mount {
        fstype: "proc",
        path: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        fstype: "sysfs",
        path: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        fstype: "devtmpfs",
        path: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Mount {
        fstype: "devpts",
        path: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("mode=0620,ptmxmode=0666"),
    },
    Mount {
        fstype: "tmpfs",
        path: "/tmp",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
    Mount {
        fstype: "tmpfs",
        path: "/run",
        flags: NOSUID_NODEV,
        data: Some("mode=0755"),
    },
];

/// Mounts everything in [`MOUNTS`]; one already mounted (EBUSY) is fine.
pub fn mount_all() -> Result<(), InitError> {
    for m in MOUNTS {
        std::fs::create_dir_all(m.path).map_err(|source| InitError::MountPoint {
            path: m.path,
            source,
        })?;
        match mount(Some(m.fstype), m.path, Some(m.fstype), m.flags, m.data) {
            Ok(()) | Err(nix::Error::EBUSY) => {}
            Err(source) => {
                return Err(InitError::Mount {
                    fstype: m.fstype,
                    path: m.path,
                    source,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_mounted_before_children() {
        let pos = |p: &str| MOUNTS.iter().position(|m| m.path == p).unwrap();
        assert!(pos("/dev") < pos("/dev/pts"));
        assert!(MOUNTS.iter().all(|m| m.path.starts_with('/')));
    }
}

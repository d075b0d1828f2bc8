//! cgroup v2 leaves for fork workers: one directory per live worker under a parent the
//! node owns, with the memory, cpu and pids controllers enabled, so one guest cannot take
//! the node's memory, CPU or process table from the others.
//!
//! The parent (default `/sys/fs/cgroup/cleave`) holds no process of its own, so it may
//! enable controllers for its children (cgroup v2's "no internal processes" rule); its
//! own parent must offer them. The host's root does; a privileged container's own
//! cgroup (a private cgroup namespace) does once the daemon has moved itself into a
//! child, `cleave-agent`, which it does when it finds itself at that root.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// The controllers every leaf gets.
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "{path} is not on a cgroup v2 file system (mount cgroup2 at /sys/fs/cgroup, or set \
         worker_cgroup_parent = \"\" to run workers without resource limits)"
    )]
    NotCgroup2 { path: PathBuf },
    #[error(
        "the {controller} controller is not available to {path} (its parent's \
         cgroup.subtree_control lacks it: give cleave a delegated cgroup that holds no \
         process, or set worker_cgroup_parent = \"\" to run workers without resource limits)"
    )]
    Controller {
        controller: &'static str,
        path: PathBuf,
    },
    #[error("{what} {path}: {error}")]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the worker cgroup {path} still has processes in it; end them first")]
    Busy { path: PathBuf },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |error| CgroupError::Io {
        what,
        path: path.to_path_buf(),
        error,
    }
}

/// The default parent of worker leaves.
pub const DEFAULT_PARENT: &str = "/sys/fs/cgroup/cleave";

/// What each worker's leaf allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafLimits {
    /// `memory.max`, bytes.
    pub memory_max: u64,
    /// `pids.max`: processes and threads.
    pub pids_max: u32,
    /// `cpu.max` as (quota µs, period µs); `None` is no limit.
    pub cpu_max: Option<(u64, u64)>,
}

impl LeafLimits {
    fn files(&self) -> [(&'static str, String); 3] {
        [
            ("memory.max", self.memory_max.to_string()),
            ("pids.max", self.pids_max.to_string()),
            (
                "cpu.max",
                match self.cpu_max {
                    Some((quota, period)) => format!("{quota} {period}"),
                    None => "max".into(),
                },
            ),
        ]
    }
}

/// A cgroup v2 directory whose children get the memory, cpu and pids controllers.
#[derive(Debug)]
pub struct CgroupParent {
    dir: PathBuf,
}

impl CgroupParent {
    /// Creates `dir` if missing and enables the controllers for its children.
    pub fn prepare(dir: &Path) -> Result<CgroupParent, CgroupError> {
        let above = dir.parent().ok_or_else(|| CgroupError::NotCgroup2 {
            path: dir.to_path_buf(),
        })?;
        if !is_cgroup2(above) {
            return Err(CgroupError::NotCgroup2 {
                path: above.to_path_buf(),
            });
        }
        let offered = read(&above.join("cgroup.controllers"))?;
        for c in CONTROLLERS {
            if !offered.split_whitespace().any(|o| o == c) {
                return Err(CgroupError::Controller {
                    controller: c,
                    path: above.to_path_buf(),
                });
            }
        }
        match enable(above) {
            Err(CgroupError::Controller { .. }) if in_own_namespace_root(above) => {
                // A container's own cgroup (privileged pods get a private cgroup
                // namespace): we sit in it, so it cannot hand controllers down. Move
                // what runs here into a child first, as a container's init does.
                evict_to(above, &above.join(AGENT_LEAF))?;
                enable(above)?;
            }
            r => r?,
        }
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io("creating the cgroup", dir)(e)),
        }
        enable(dir)?;
        Ok(CgroupParent {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new leaf `name` with `limits`. A leftover leaf of that name (a crashed node's)
    /// with no process in it is replaced.
    pub fn leaf(&self, name: &str, limits: &LeafLimits) -> Result<CgroupLeaf, CgroupError> {
        let path = self.dir.join(name);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                remove_leaf(&path)?;
                std::fs::create_dir(&path).map_err(io("creating the cgroup", &path))?;
            }
            Err(e) => return Err(io("creating the cgroup", &path)(e)),
        }
        let leaf = CgroupLeaf { path };
        for (file, value) in limits.files() {
            let p = leaf.path.join(file);
            std::fs::write(&p, &value).map_err(io("setting", &p))?;
        }
        // No swap: a guest's memory is bounded by memory.max, not pushed out to disk.
        let swap = leaf.path.join("memory.swap.max");
        if swap.exists() {
            std::fs::write(&swap, "0").map_err(io("setting", &swap))?;
        }
        Ok(leaf)
    }

    /// Removes empty leaves named `prefix*` (left by a node that is gone); a leaf with a
    /// process in it belongs to someone alive and stays. Returns how many went.
    pub fn reconcile(&self, prefix: &str) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        entries
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(prefix))
            })
            .filter(|e| std::fs::remove_dir(e.path()).is_ok())
            .count()
    }
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(io("reading", path))
}

/// `+memory +cpu +pids` in `dir`'s subtree_control (idempotent).
fn enable(dir: &Path) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.subtree_control");
    let on = read(&path)?;
    let missing: Vec<String> = CONTROLLERS
        .iter()
        .filter(|c| !on.split_whitespace().any(|o| o == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    std::fs::write(&path, missing.join(" ")).map_err(|error| {
        if error.raw_os_error() == Some(libc::EBUSY) {
            // Processes in `dir` itself: controllers cannot be handed down.
            CgroupError::Controller {
                controller: "memory",
                path: dir.to_path_buf(),
            }
        } else {
            io("enabling controllers in", &path)(error)
        }
    })
}

/// Where the daemon's own processes go when it must vacate its namespace's root.
const AGENT_LEAF: &str = "cleave-agent";

/// Whether `dir` is /sys/fs/cgroup and this process sits at the root of its cgroup
/// namespace (`0::/`): a container's cgroup, ours to arrange.
fn in_own_namespace_root(dir: &Path) -> bool {
    dir == Path::new("/sys/fs/cgroup")
        && std::fs::read_to_string("/proc/self/cgroup")
            .is_ok_and(|c| c.lines().any(|l| l == "0::/"))
}

/// Moves every process of `from` into `to` (created if missing).
fn evict_to(from: &Path, to: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(to) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("creating the cgroup", to)(e)),
    }
    let procs = read(&from.join("cgroup.procs"))?;
    let dest = to.join("cgroup.procs");
    for pid in procs.split_whitespace() {
        // A process that exited meanwhile is not an error.
        if let Err(e) = std::fs::write(&dest, pid) {
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(io("moving a process into", &dest)(e));
            }
        }
    }
    tracing::info!(to = %to.display(), "moved this container's processes into a child cgroup so workers can have leaves");
    Ok(())
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// Removes a leaf once nothing runs in it (killing whatever still does).
fn remove_leaf(path: &Path) -> Result<(), CgroupError> {
    match std::fs::remove_dir(path) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) if e.raw_os_error() != Some(libc::EBUSY) => {
            return Err(io("removing the cgroup", path)(e))
        }
        Err(_) => {}
    }
    // Busy: end what is left (cgroup.kill, Linux 5.14+) and wait briefly for the kernel
    // to let go of it.
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    for _ in 0..100 {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
    Err(CgroupError::Busy {
        path: path.to_path_buf(),
    })
}

/// One worker's cgroup; removed when dropped (after the worker is reaped).
#[derive(Debug)]
pub struct CgroupLeaf {
    path: PathBuf,
}

impl CgroupLeaf {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CgroupLeaf {
    fn drop(&mut self) {
        if let Err(e) = remove_leaf(&self.path) {
            tracing::warn!(error = %e, "removing a worker's cgroup");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_written_as_the_kernel_reads_them() {
        let l = LeafLimits {
            memory_max: 300 << 20,
            pids_max: 64,
            cpu_max: Some((50_000, 100_000)),
        };
        assert_eq!(
            l.files(),
            [
                ("memory.max", "314572800".to_string()),
                ("pids.max", "64".to_string()),
                ("cpu.max", "50000 100000".to_string()),
            ]
        );
        let unlimited = LeafLimits { cpu_max: None, ..l };
        assert_eq!(unlimited.files()[2].1, "max");
    }

    #[test]
    fn a_directory_that_is_not_cgroup2_is_refused_with_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        let e = CgroupParent::prepare(&dir.path().join("cleave")).unwrap_err();
        assert!(matches!(e, CgroupError::NotCgroup2 { .. }), "{e}");
        assert!(e.to_string().contains("worker_cgroup_parent"), "{e}");
    }
}

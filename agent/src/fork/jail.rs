//! The worker's jail: what a VMM escape in one fork lands in. Applied by the worker to
//! itself after it has everything it needs (the KVM fd, the template memfd, its runtime
//! directory, later the tap fd) and before the fork runs a single guest instruction:
//!
//! - its own mount namespace whose root is its runtime directory (empty but for its vsock
//!   socket): no other path on the node exists for it;
//! - its own network, IPC and UTS namespaces (its NIC's tap fd keeps working: the tap
//!   lives in the node's namespace, the fd is what the device uses);
//! - a uid and gid of its own (one per live worker, from the node's range), no
//!   supplementary groups, an empty capability bounding set, so no capabilities at all
//!   after the switch;
//! - `no_new_privs`, not dumpable (no ptrace or /proc/<pid>/mem from a sibling);
//! - rlimits: no core files, no files written, a bounded number of fds and threads.
//!
//! - a cgroup v2 leaf of its own (memory, cpu and pids limits), which the parent creates
//!   and moves it into before it is sent a template ([`WorkerCgroups`]);
//! - its own PID namespace, where it is PID 1 and alone (the parent starts it there:
//!   [`super::process`]);
//! - seccomp filters per thread ([`crate::vmm::seccomp`]), applied as the fork starts.

use std::path::Path;

use crate::host::cgroup::{CgroupError, CgroupLeaf, CgroupParent, LeafLimits};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{chdir, pivot_root, setgroups, setresgid, setresuid, Gid, Uid};

/// Who a jailed worker becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailIds {
    pub uid: u32,
    pub gid: u32,
}

impl JailIds {
    /// `UID:GID`, as the worker's `--jail` argument.
    pub fn parse(s: &str) -> Option<JailIds> {
        let (u, g) = s.split_once(':')?;
        let ids = JailIds {
            uid: u.parse().ok()?,
            gid: g.parse().ok()?,
        };
        // Never root, never the overflow id.
        (ids.uid != 0 && ids.gid != 0 && ids.uid != u32::MAX && ids.gid != u32::MAX).then_some(ids)
    }

    pub fn arg(&self) -> String {
        format!("{}:{}", self.uid, self.gid)
    }
}

/// The uids (and gids: the same numbers) a node's workers are given, one per live
/// worker, claimed node-wide with a lock file held for the worker's life (so a one-shot
/// `cleave run` and the daemon never hand out the same uid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailRange {
    pub lock_dir: std::path::PathBuf,
    pub first_uid: u32,
    pub count: u32,
}

/// Where worker uids start by default, and how many there are.
pub const DEFAULT_FIRST_UID: u32 = 900_000;
pub const DEFAULT_UIDS: u32 = 65_536;

impl JailRange {
    /// `count` ids from `first_uid`, locks under `<runtime base>/jail` — when this process
    /// can give workers another uid (it runs as root); `None` otherwise, and the workers
    /// run as this process's uid (logged).
    pub fn for_this_process(first_uid: u32, count: u32) -> Option<JailRange> {
        if !nix::unistd::geteuid().is_root() {
            tracing::warn!("not running as root: fork workers run unjailed, as this uid");
            return None;
        }
        Some(JailRange {
            lock_dir: crate::vmm::runtime_dir::RuntimeDir::base().join("jail"),
            first_uid,
            count,
        })
    }

    /// A free uid of the range, held until the lease is dropped.
    pub fn claim(&self, start: u32) -> Result<JailLease, JailRangeError> {
        let lease =
            crate::net::lease::claim(&self.lock_dir, self.count, start).map_err(|e| match e {
                crate::net::lease::LeaseError::Exhausted(n) => JailRangeError::Exhausted(n),
                e => JailRangeError::Lease(e),
            })?;
        let id = self.first_uid + lease.index();
        Ok(JailLease {
            ids: JailIds { uid: id, gid: id },
            _lease: lease,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JailRangeError {
    #[error("every one of the {0} worker uids is in use; end sandboxes or widen the range")]
    Exhausted(u32),
    #[error("claiming a worker uid: {0}")]
    Lease(crate::net::lease::LeaseError),
}

/// How a node's workers are confined beyond the seccomp filters every worker gets: a uid
/// of their own, and (where cgroup v2 is available) a cgroup leaf with limits.
#[derive(Debug, Clone)]
pub struct Jail {
    pub uids: JailRange,
    pub cgroups: Option<WorkerCgroups>,
}

/// Where worker cgroup leaves go and what they allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSettings {
    pub parent: std::path::PathBuf,
    pub pids_max: u32,
    pub cpu_max: Option<(u64, u64)>,
}

impl Default for CgroupSettings {
    fn default() -> Self {
        CgroupSettings {
            parent: crate::host::cgroup::DEFAULT_PARENT.into(),
            pids_max: DEFAULT_PIDS_MAX,
            cpu_max: None,
        }
    }
}

impl Jail {
    /// The jail for this process's workers: `None` when it cannot give them another uid
    /// (not root: logged). With `cgroups`, each worker also gets a leaf there; a parent
    /// that cannot be prepared is an error.
    pub fn for_node(
        first_uid: u32,
        count: u32,
        cgroups: Option<&CgroupSettings>,
    ) -> Result<Option<Jail>, CgroupError> {
        let Some(uids) = JailRange::for_this_process(first_uid, count) else {
            return Ok(None);
        };
        let cgroups = match cgroups {
            Some(c) => Some(WorkerCgroups {
                parent: std::sync::Arc::new(CgroupParent::prepare(&c.parent)?),
                pids_max: c.pids_max,
                cpu_max: c.cpu_max,
            }),
            None => None,
        };
        Ok(Some(Jail { uids, cgroups }))
    }

    /// [`for_node`](Self::for_node) with the default cgroup settings, or without cgroups
    /// (logged) where they are unavailable: for one-shot commands.
    pub fn best_effort() -> Option<Jail> {
        let settings = CgroupSettings::default();
        match Self::for_node(DEFAULT_FIRST_UID, DEFAULT_UIDS, Some(&settings)) {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(error = %e, "fork workers run without cgroup limits");
                Self::for_node(DEFAULT_FIRST_UID, DEFAULT_UIDS, None)
                    .ok()
                    .flatten()
            }
        }
    }
}

/// Each worker's cgroup leaf: `worker-<uid>` under `parent`.
#[derive(Debug, Clone)]
pub struct WorkerCgroups {
    pub parent: std::sync::Arc<CgroupParent>,
    pub pids_max: u32,
    /// `cpu.max` (quota µs, period µs); `None` is no limit.
    pub cpu_max: Option<(u64, u64)>,
}

/// What a worker may use beyond its guest's memory: its binary, heap, device buffers and
/// the kernel's accounted VM structures (page tables, vCPU state).
pub const WORKER_MEMORY_OVERHEAD: u64 = 64 << 20;

/// The leaves' name prefix.
pub const LEAF_PREFIX: &str = "worker-";

/// Most processes and threads a worker's cgroup may hold by default (main, event loop,
/// vCPUs).
pub const DEFAULT_PIDS_MAX: u32 = 64;

impl WorkerCgroups {
    /// Creates the leaf for the worker that will run as `ids` with a guest of
    /// `guest_bytes`.
    pub fn leaf_for(&self, ids: JailIds, guest_bytes: u64) -> Result<CgroupLeaf, CgroupError> {
        self.parent.leaf(
            &format!("{LEAF_PREFIX}{}", ids.uid),
            &LeafLimits {
                memory_max: guest_bytes.saturating_add(WORKER_MEMORY_OVERHEAD),
                pids_max: self.pids_max,
                cpu_max: self.cpu_max,
            },
        )
    }
}

/// A claimed uid/gid; dropping it frees them (after the worker is reaped).
#[derive(Debug)]
pub struct JailLease {
    ids: JailIds,
    _lease: crate::net::lease::SlotLease,
}

impl JailLease {
    pub fn ids(&self) -> JailIds {
        self.ids
    }
}

#[derive(Debug, thiserror::Error)]
#[error("entering the worker jail: {step}: {source}")]
pub struct JailError {
    step: &'static str,
    source: nix::Error,
}

fn step<T>(step: &'static str, r: nix::Result<T>) -> Result<T, JailError> {
    r.map_err(|source| JailError { step, source })
}

/// Most fds a jailed worker may hold (KVM, VM, vCPUs, eventfds, memfd, sockets, tap,
/// epoll: a few dozen).
const MAX_FDS: u64 = 256;
/// Threads count against the jail uid's process limit (main, event loop, vCPUs).
const MAX_THREADS: u64 = 64;

/// Jails the calling process (single-threaded: namespaces and credentials are per
/// thread until then) with `root` as its whole filesystem. `root` must be a directory
/// owned by `ids` (its runtime directory).
pub fn enter(ids: JailIds, root: &Path) -> Result<(), JailError> {
    // Read while /proc is still there.
    let last_cap = last_cap();
    step(
        "unshare(mount, net, ipc, uts)",
        unshare(
            CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWNET
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWUTS,
        ),
    )?;
    // Nothing mounted here propagates back to the node.
    step(
        "making every mount private",
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
    )?;
    // The runtime directory becomes the root: a bind onto itself makes it a mount point,
    // pivot_root(".", ".") stacks the old root under it, and a lazy unmount drops it.
    step(
        "binding the runtime directory",
        mount(
            Some(root),
            root,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        ),
    )?;
    step("chdir to the new root", chdir(root))?;
    step("pivot_root", pivot_root(".", "."))?;
    step(
        "unmounting the old root",
        umount2(".", MntFlags::MNT_DETACH),
    )?;
    step("chdir /", chdir("/"))?;

    step("setgroups([])", setgroups(&[]))?;
    let (uid, gid) = (Uid::from_raw(ids.uid), Gid::from_raw(ids.gid));
    step("setresgid", setresgid(gid, gid, gid))?;
    // The bounding set first (dropping needs CAP_SETPCAP, which the uid switch removes):
    // nothing exec'd later could regain a capability.
    for cap in 0..=last_cap {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            let e = nix::errno::Errno::last();
            // Caps this kernel does not know end the list.
            if e != nix::errno::Errno::EINVAL {
                return Err(JailError {
                    step: "dropping the capability bounding set",
                    source: e,
                });
            }
        }
    }
    // From uid 0 to a non-zero uid: the permitted, effective and ambient sets are cleared.
    step("setresuid", setresuid(uid, uid, uid))?;
    step("no_new_privs", nix::sys::prctl::set_no_new_privs())?;
    step("not dumpable", nix::sys::prctl::set_dumpable(false))?;
    for (what, r, n) in [
        ("RLIMIT_CORE", Resource::RLIMIT_CORE, 0),
        ("RLIMIT_FSIZE", Resource::RLIMIT_FSIZE, 0),
        ("RLIMIT_NOFILE", Resource::RLIMIT_NOFILE, MAX_FDS),
        ("RLIMIT_NPROC", Resource::RLIMIT_NPROC, MAX_THREADS),
    ] {
        step(what, setrlimit(r, n, n))?;
    }
    Ok(())
}

/// The highest capability number this kernel knows.
fn last_cap() -> libc::c_ulong {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jail_ids_are_parsed_and_root_is_refused() {
        assert_eq!(
            JailIds::parse("900000:900000"),
            Some(JailIds {
                uid: 900000,
                gid: 900000
            })
        );
        for bad in [
            "0:900000",
            "900000:0",
            "x:1",
            "1",
            "",
            "4294967295:1",
            "1:-1",
        ] {
            assert_eq!(JailIds::parse(bad), None, "{bad}");
        }
        let ids = JailIds { uid: 7, gid: 8 };
        assert_eq!(JailIds::parse(&ids.arg()), Some(ids));
    }
}

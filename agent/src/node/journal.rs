//! The node's journal: one small file per worker process it started, so a node agent that
//! was killed (`kill -9`, OOM, a crash) can find and end what it left behind on its next
//! start.
//!
//! Workers are not re-adopted: a worker's control socket is a socket pair whose other end
//! died with the old agent, and a worker ends its fork when that socket closes. A worker
//! still alive at reconcile is one that has not noticed yet (or hangs); it is killed.
//! Taps go with their last fd, firewall objects with their slot lease
//! ([`crate::net::NetNode::reconcile`]); what remains for the journal is processes and
//! their runtime directories.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("node journal {path}: {what}: {source}")]
pub struct JournalError {
    what: &'static str,
    path: PathBuf,
    source: io::Error,
}

/// One worker as the journal records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerEntry {
    pub pid: u32,
    /// `/proc/<pid>/stat`'s start time: a recycled pid is not mistaken for our worker.
    pub start_time: u64,
}

/// What reconcile found and removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    pub killed: usize,
    pub entries: usize,
    pub runtime_dirs: usize,
    /// Empty worker cgroup leaves removed.
    pub cgroups: usize,
}

pub struct Journal {
    dir: PathBuf,
}

/// The names a process we journal has: a worker's (`comm` is cut at 15 bytes), and a
/// template's zygote's.
const OUR_COMMS: [&str; 2] = ["cleave-fork-wor", crate::fork::zygote::ZYGOTE_COMM];

impl Journal {
    /// The journal under `state_dir` (created 0700).
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        let dir = state_dir.join("workers");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| JournalError {
                what: "creating",
                path: dir.clone(),
                source,
            })?;
        Ok(Journal { dir })
    }

    fn path(&self, pid: u32) -> PathBuf {
        self.dir.join(format!("{pid}.json"))
    }

    /// Records `pid` (written to a temporary file and renamed: never half an entry).
    pub fn record(&self, pid: u32) -> Result<(), JournalError> {
        let entry = WorkerEntry {
            pid,
            start_time: start_time(pid).unwrap_or(0),
        };
        let path = self.path(pid);
        let tmp = self.dir.join(format!(".{pid}.tmp"));
        let err = |what| {
            let path = path.clone();
            move |source| JournalError { what, path, source }
        };
        let body = serde_json::to_vec(&entry).map_err(|e| err("encoding")(io::Error::other(e)))?;
        let mut f = fs::File::create(&tmp).map_err(err("writing"))?;
        f.write_all(&body).map_err(err("writing"))?;
        fs::rename(&tmp, &path).map_err(err("renaming"))
    }

    /// Forgets `pid` (its worker was reaped).
    pub fn forget(&self, pid: u32) {
        let _ = fs::remove_file(self.path(pid));
    }

    /// Every entry, skipping (and removing) unreadable ones.
    pub fn entries(&self) -> Vec<WorkerEntry> {
        let Ok(dir) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in dir.flatten() {
            let path = e.path();
            let parsed = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<WorkerEntry>(&b).ok());
            match parsed {
                Some(w) => out.push(w),
                None => {
                    tracing::warn!(path = %path.display(), "removing an unreadable journal entry");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        out
    }

    /// Ends every worker a previous agent left (still alive, same start time, a cleave
    /// worker), waits until each is gone, removes the runtime directories of dead workers
    /// under `runtime_base`, and clears the journal.
    pub fn reconcile(&self, runtime_base: &Path) -> Reconciled {
        let mut r = Reconciled::default();
        let entries = self.entries();
        r.entries = entries.len();
        let mut waiting = Vec::new();
        for w in &entries {
            if is_our_worker(w) {
                tracing::warn!(pid = w.pid, "killing a worker a previous agent left");
                // SAFETY: kill(2) with a pid we checked is our worker (same start time).
                let _ = unsafe { libc::kill(w.pid as libc::pid_t, libc::SIGKILL) };
                waiting.push(w.clone());
                r.killed += 1;
            }
        }
        // A killed worker is reaped by its new parent (init); wait until it is gone so
        // its runtime directory can go too.
        let deadline = Instant::now() + Duration::from_secs(10);
        while waiting.iter().any(is_our_worker) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for w in &entries {
            self.forget(w.pid);
        }
        r.runtime_dirs = remove_dead_runtime_dirs(runtime_base);
        r
    }
}

use std::os::unix::fs::DirBuilderExt;

/// Field 22 of `/proc/<pid>/stat` (after the `(comm)` field, which may hold spaces).
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    after_comm.split(' ').nth(19)?.parse().ok()
}

fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

fn is_our_worker(w: &WorkerEntry) -> bool {
    // A zombie still has /proc entries; it is dead for our purposes.
    let alive = fs::read_to_string(format!("/proc/{}/stat", w.pid))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .is_some_and(|zombie| !zombie);
    alive
        && start_time(w.pid) == Some(w.start_time)
        && comm(w.pid).is_some_and(|c| OUR_COMMS.contains(&c.as_str()))
}

/// Removes `vm-<pid>-<random>` directories under `base` whose process is gone; returns
/// how many.
pub fn remove_dead_runtime_dirs(base: &Path) -> usize {
    let Ok(dir) = fs::read_dir(base) else {
        return 0;
    };
    let mut removed = 0;
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("vm-"))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if fs::remove_dir_all(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_forget_removes_them() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let me = std::process::id();
        j.record(me).unwrap();
        let e = j.entries();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].pid, me);
        assert_eq!(e[0].start_time, start_time(me).unwrap());
        j.forget(me);
        assert!(j.entries().is_empty());
    }

    #[test]
    fn reconcile_kills_only_workers_and_clears_dead_runtime_dirs() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(&d.path().join("state")).unwrap();
        // This test process is alive but not a worker: never killed.
        j.record(std::process::id()).unwrap();
        // A dead pid's entry is just forgotten.
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = dead.id();
        dead.wait().unwrap();
        j.record(dead_pid).unwrap();
        fs::write(j.dir.join("garbage.json"), b"{not json").unwrap();
        let base = d.path().join("run");
        fs::create_dir_all(base.join(format!("vm-{dead_pid}-00ff"))).unwrap();
        fs::create_dir_all(base.join(format!("vm-{}-00ff", std::process::id()))).unwrap();
        fs::create_dir_all(base.join("templates")).unwrap();
        let r = j.reconcile(&base);
        assert_eq!(r.killed, 0);
        assert_eq!(r.entries, 2);
        assert_eq!(r.runtime_dirs, 1);
        assert!(j.entries().is_empty());
        assert!(base.join("templates").exists());
        assert!(base
            .join(format!("vm-{}-00ff", std::process::id()))
            .exists());
    }
}

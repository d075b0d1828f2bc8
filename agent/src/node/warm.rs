//! Warm workers: worker processes that already hold a template and a prepared VM shell,
//! kept per template so a fork request only sends `go`. By default they are forked from
//! the template's [zygote](crate::fork::zygote), started on first use and again if it
//! dies; a node can have each exec'd instead ([`WorkerStart::Exec`]).

use crate::sync::lock;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::fork::jail::Jail;
use crate::fork::sandbox::WarmWorker;
use crate::fork::worker::{Encoded, WorkerError};
use crate::fork::zygote::Zygote;

use super::journal::Journal;

/// How a node starts its fork workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerStart {
    /// Forked from the template's zygote: a `clone3`, no exec, no decode (the fast path).
    /// Siblings share the zygote's address-space layout (docs/SECURITY.md).
    #[default]
    Zygote,
    /// Each exec'd and handed the template: ~1.5× the CPU per fork, but every worker's
    /// layout is randomised afresh.
    Exec,
}

pub struct WarmPool {
    exe: PathBuf,
    encoded: Encoded,
    jail: Option<Jail>,
    target: usize,
    start: WorkerStart,
    ready: Mutex<Vec<WarmWorker>>,
    zygote: Mutex<Option<Arc<Zygote>>>,
}

impl WarmPool {
    pub fn new(
        exe: PathBuf,
        encoded: Encoded,
        jail: Option<Jail>,
        target: usize,
        start: WorkerStart,
    ) -> WarmPool {
        WarmPool {
            exe,
            encoded,
            jail,
            target,
            start,
            ready: Mutex::new(Vec::new()),
            zygote: Mutex::new(None),
        }
    }

    /// A warm worker: one from the pool, or (pool empty) one started now.
    pub fn take(&self, journal: Option<&Journal>) -> Result<WarmWorker, WorkerError> {
        if let Some(w) = lock(&self.ready).pop() {
            return Ok(w);
        }
        self.start_one(journal)
    }

    fn start_one(&self, journal: Option<&Journal>) -> Result<WarmWorker, WorkerError> {
        if self.start == WorkerStart::Exec {
            let w = WarmWorker::new(&self.exe, &self.encoded, self.jail.as_ref())?;
            record(journal, w.pid());
            return Ok(w);
        }
        let zygote = self.zygote(journal)?;
        let w = match WarmWorker::forked(&zygote, self.jail.as_ref()) {
            Ok(w) => w,
            // The zygote died under this request: once more, from a new one.
            Err(_) if !zygote.is_alive() => {
                WarmWorker::forked(&*self.zygote(journal)?, self.jail.as_ref())?
            }
            Err(e) => return Err(e),
        };
        record(journal, w.pid());
        Ok(w)
    }

    /// The template's zygote, started now when there is none or the last one ended.
    fn zygote(&self, journal: Option<&Journal>) -> Result<Arc<Zygote>, WorkerError> {
        let mut slot = lock(&self.zygote);
        if let Some(z) = slot.as_ref() {
            if z.is_alive() {
                return Ok(z.clone());
            }
            tracing::warn!(
                pid = z.pid(),
                "the template's zygote ended; starting another"
            );
            if let Some(j) = journal {
                j.forget(z.pid());
            }
        }
        let z = Arc::new(Zygote::start(&self.exe, &self.encoded)?);
        record(journal, z.pid());
        *slot = Some(z.clone());
        Ok(z)
    }

    /// Starts workers until the pool holds its target; returns how many were started.
    pub fn refill(&self, journal: Option<&Journal>) -> Result<usize, WorkerError> {
        let mut started = 0;
        while self.depth() < self.target {
            let w = self.start_one(journal)?;
            lock(&self.ready).push(w);
            started += 1;
        }
        Ok(started)
    }

    /// The pid of the pool's zygote, while it has one.
    pub fn zygote_pid(&self) -> Option<u32> {
        lock(&self.zygote).as_ref().map(|z| z.pid())
    }

    pub fn depth(&self) -> usize {
        lock(&self.ready).len()
    }

    /// Ends every pooled worker (they have run nothing; closing their socket is enough)
    /// and the zygote (the next worker starts another).
    pub fn drain(&self, journal: Option<&Journal>) {
        if let Some(z) = lock(&self.zygote).take() {
            let pid = z.pid();
            drop(z);
            if let Some(j) = journal {
                j.forget(pid);
            }
        }
        let workers = std::mem::take(&mut *lock(&self.ready));
        for w in workers {
            let pid = w.pid();
            drop(w);
            if let Some(j) = journal {
                j.forget(pid);
            }
        }
    }
}

/// Journals a process we started (not fatal when it fails: the process still ends when
/// this one does).
fn record(journal: Option<&Journal>, pid: u32) {
    if let Some(j) = journal {
        if let Err(e) = j.record(pid) {
            tracing::warn!(error = %e, "journaling a worker");
        }
    }
}

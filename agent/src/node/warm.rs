//! Warm workers: worker processes that already hold a template and a prepared VM shell,
//! kept per template so a fork request only sends `go`.

use crate::sync::lock;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::fork::jail::Jail;
use crate::fork::sandbox::WarmWorker;
use crate::fork::worker::{Encoded, WorkerError};

use super::journal::Journal;

pub struct WarmPool {
    exe: PathBuf,
    encoded: Encoded,
    jail: Option<Jail>,
    target: usize,
    ready: Mutex<Vec<WarmWorker>>,
}

impl WarmPool {
    pub fn new(exe: PathBuf, encoded: Encoded, jail: Option<Jail>, target: usize) -> WarmPool {
        WarmPool {
            exe,
            encoded,
            jail,
            target,
            ready: Mutex::new(Vec::new()),
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
        let w = WarmWorker::new(&self.exe, &self.encoded, self.jail.as_ref())?;
        if let Some(j) = journal {
            if let Err(e) = j.record(w.pid()) {
                // Not fatal: the worker still ends when this process does.
                tracing::warn!(error = %e, "journaling a worker");
            }
        }
        Ok(w)
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

    pub fn depth(&self) -> usize {
        lock(&self.ready).len()
    }

    /// Ends every pooled worker (they have run nothing; closing their socket is enough).
    pub fn drain(&self, journal: Option<&Journal>) {
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

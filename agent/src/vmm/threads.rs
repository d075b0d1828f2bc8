//! A VM's threads, started before the VM runs: each one named, confined to its seccomp
//! filter and waiting for its work. A fork worker parks them while it prepares (off the
//! request path), so starting the fork costs a wake-up per thread instead of a clone, a
//! stack and a filter load: ~100 µs of the ~270 µs a pooled fork took inside its worker
//! (`fork_bench`, docs/PERFORMANCE.md).

use std::io;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::seccomp::{Filters, SeccompError, ThreadKind};
use super::vcpu::Vcpu;

/// The work a parked thread is given.
type Job<T> = Box<dyn FnOnce() -> T + Send>;

/// Why a thread could not be parked.
#[derive(Debug, thiserror::Error)]
pub enum ParkError {
    #[error("starting it: {0}")]
    Spawn(io::Error),
    #[error(transparent)]
    Confine(SeccompError),
    #[error("it ended before it was ready")]
    Ended,
}

/// A started thread waiting for one job. It has run its prelude (its confinement) when
/// [`spawn`](Self::spawn) returns, so a thread that could not confine itself is an error
/// there and never a thread that runs unconfined. Dropped without a job, it ends.
pub struct ParkedThread<T> {
    job: mpsc::SyncSender<Job<T>>,
    handle: JoinHandle<Option<T>>,
}

impl<T: Send + 'static> ParkedThread<T> {
    /// Starts a thread named `name` that runs `prelude` and then waits for its job.
    pub fn spawn(
        name: String,
        prelude: impl FnOnce() -> Result<(), SeccompError> + Send + 'static,
    ) -> Result<Self, ParkError> {
        let (job, jobs) = mpsc::sync_channel::<Job<T>>(1);
        let (ready, parked) = mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let confined = prelude();
                let ok = confined.is_ok();
                // The spawner waits for this answer; it cannot be gone.
                let _ = ready.send(confined);
                if !ok {
                    return None;
                }
                // No job (the VM was dropped unstarted): just end.
                jobs.recv().ok().map(|job| job())
            })
            .map_err(ParkError::Spawn)?;
        match parked.recv() {
            Ok(Ok(())) => Ok(Self { job, handle }),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(ParkError::Confine(e))
            }
            Err(_) => {
                let _ = handle.join();
                Err(ParkError::Ended)
            }
        }
    }

    /// Hands the thread its job; its handle yields the job's result (`None` if the thread
    /// ended without running it).
    pub fn run(self, job: impl FnOnce() -> T + Send + 'static) -> JoinHandle<Option<T>> {
        // The thread holds the receiver until it has a job, so this send cannot fail while
        // it lives; if it died (a panic in the prelude), the handle says so.
        let _ = self.job.send(Box::new(job));
        self.handle
    }
}

/// One parked thread per vCPU, and one for the device event loop when the VM will have
/// devices: what [`Vm::arm`](super::Vm::arm) readies the VM on.
pub struct VmThreads {
    pub(super) vcpus: Vec<ParkedThread<Vcpu>>,
    pub(super) events: Option<ParkedThread<()>>,
}

impl VmThreads {
    /// Parks `vcpus` vCPU threads (`vcpu0`, …) and, if `events`, the event loop's
    /// (`vm-events`), each confined to its kind's filter from `filters` when given.
    pub fn park(
        vcpus: u8,
        events: bool,
        filters: Option<&Arc<Filters>>,
    ) -> Result<VmThreads, ThreadError> {
        let prelude = |kind: ThreadKind| {
            let filters = filters.cloned();
            move || filters.map_or(Ok(()), |f| f.apply(kind))
        };
        let vcpus = (0..vcpus)
            .map(|index| {
                ParkedThread::spawn(format!("vcpu{index}"), prelude(ThreadKind::Vcpu))
                    .map_err(|source| ThreadError::Vcpu { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let events = match events {
            true => Some(
                ParkedThread::spawn("vm-events".into(), prelude(ThreadKind::Events))
                    .map_err(|source| ThreadError::Events { source })?,
            ),
            false => None,
        };
        Ok(VmThreads { vcpus, events })
    }
}

/// A VM thread that could not be parked.
#[derive(Debug, thiserror::Error)]
pub enum ThreadError {
    #[error("the thread for vCPU {index}: {source}{}", spawn_hint(source))]
    Vcpu { index: u8, source: ParkError },
    #[error("the device event loop's thread: {source}{}", spawn_hint(source))]
    Events { source: ParkError },
    #[error("the VM has devices but no thread was parked for its event loop")]
    NoEvents,
    #[error("the VM has {vcpus} vCPUs but {parked} parked vCPU threads")]
    Count { vcpus: usize, parked: usize },
}

/// The task-limit hint for a thread that could not be started.
fn spawn_hint(e: &ParkError) -> &'static str {
    match e {
        ParkError::Spawn(io) => crate::host::tasks_hint(io),
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_thread_runs_its_job_under_its_name() {
        let t = ParkedThread::spawn("parked-test".into(), || Ok(())).unwrap();
        let h = t.run(|| std::thread::current().name().map(str::to_owned));
        assert_eq!(h.join().unwrap(), Some(Some("parked-test".to_string())));
    }

    #[test]
    fn a_parked_thread_dropped_without_a_job_ends() {
        let ParkedThread { job, handle } =
            ParkedThread::<()>::spawn("parked-drop".into(), || Ok(())).unwrap();
        drop(job);
        assert_eq!(handle.join().unwrap(), None);
    }

    #[test]
    fn a_thread_that_cannot_confine_itself_is_an_error_and_never_runs_a_job() {
        let err = ParkedThread::<()>::spawn("parked-fail".into(), || {
            Err(SeccompError::Apply {
                kind: "vcpu",
                source: seccompiler::Error::EmptyFilter,
            })
        })
        .err()
        .expect("the prelude failed");
        assert!(matches!(err, ParkError::Confine(_)), "{err}");
    }

    #[test]
    fn park_names_one_thread_per_vcpu_and_the_event_loop_only_when_asked() {
        let t = VmThreads::park(2, false, None).unwrap();
        assert_eq!(t.vcpus.len(), 2);
        assert!(t.events.is_none());
        let names: Vec<_> = t
            .vcpus
            .iter()
            .map(|p| p.handle.thread().name().unwrap().to_string())
            .collect();
        assert_eq!(names, ["vcpu0", "vcpu1"]);
        let t = VmThreads::park(1, true, None).unwrap();
        assert_eq!(
            t.events.as_ref().unwrap().handle.thread().name(),
            Some("vm-events")
        );
    }
}

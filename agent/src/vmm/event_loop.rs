//! The VM's event loop: one thread that waits on every device fd (queue kicks, host
//! sockets, timers) and runs the device work, so vCPU threads only ever touch registers.
//!
//! It sleeps until an fd is ready, with no timeout: an idle fork's loop costs no wake-ups
//! (10,000 idle forks polling every 50 ms would be 200,000 wake-ups a second). Stopping
//! it writes an eventfd the loop also watches.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::threads::ParkedThread;

/// A device that the event loop drives.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Wakes the loop so it sees its stop flag.
struct Wake(Arc<EventFd>);

impl MutEventSubscriber for Wake {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.0.as_raw_fd(), EventSet::IN)) {
            tracing::error!(error = ?e, "event loop: cannot watch its stop eventfd");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }
}

pub struct EventLoop {
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<Option<()>>>,
}

impl EventLoop {
    /// Runs the loop, with `subscribers` registered, on `thread` (parked and confined
    /// ahead: [`ParkedThread`]).
    pub fn start_on(
        thread: ParkedThread<()>,
        subscribers: Vec<Subscriber>,
    ) -> std::io::Result<EventLoop> {
        let mut manager = EventManager::<Subscriber>::new()
            .map_err(|e| std::io::Error::other(format!("creating the event loop: {e:?}")))?;
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        manager.add_subscriber(Arc::new(Mutex::new(Wake(wake.clone()))));
        for s in subscribers {
            manager.add_subscriber(s);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread.run(move || {
            while !flag.load(Ordering::Acquire) {
                if let Err(e) = manager.run() {
                    tracing::error!(error = ?e, "event loop failed; devices stop");
                    return;
                }
            }
        });
        Ok(EventLoop {
            stop,
            wake,
            thread: Some(thread),
        })
    }

    /// Stops the loop and waits for its thread.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            if let Err(e) = self.wake.write(1) {
                // Without the wake-up the join below could wait forever.
                tracing::error!(error = %e, "event loop: cannot wake it to stop; leaving its thread");
                return;
            }
            let _ = t.join();
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_loop_is_woken_to_stop() {
        let thread = ParkedThread::spawn("events-test".into(), || Ok(())).unwrap();
        let mut l = EventLoop::start_on(thread, Vec::new()).unwrap();
        // Let it block in epoll_wait, which has no timeout: only the stop eventfd can end
        // that wait, so returning from `stop` at all is the proof.
        std::thread::sleep(std::time::Duration::from_millis(20));
        l.stop();
        assert!(l.thread.is_none());
    }
}

//! The VM's event loop: one thread that waits on every device fd (queue kicks, host
//! sockets, timers) and runs the device work, so vCPU threads only ever touch registers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

/// A device that the event loop drives.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// How long one wait may last before the loop checks whether it should stop.
const POLL_MS: i32 = 50;

pub struct EventLoop {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts the loop with `subscribers` registered. `confine`, if given, runs first on
    /// the loop's thread; when it returns false the loop does not run.
    pub fn start(
        subscribers: Vec<Subscriber>,
        confine: Option<impl FnOnce() -> bool + Send + 'static>,
    ) -> std::io::Result<EventLoop> {
        let mut manager = EventManager::<Subscriber>::new()
            .map_err(|e| std::io::Error::other(format!("creating the event loop: {e:?}")))?;
        for s in subscribers {
            manager.add_subscriber(s);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vm-events".into())
            .spawn(move || {
                if let Some(confine) = confine {
                    if !confine() {
                        return;
                    }
                }
                while !flag.load(Ordering::Acquire) {
                    if let Err(e) = manager.run_with_timeout(POLL_MS) {
                        tracing::error!(error = ?e, "event loop failed; devices stop");
                        return;
                    }
                }
            })?;
        Ok(EventLoop {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the loop and waits for its thread.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}

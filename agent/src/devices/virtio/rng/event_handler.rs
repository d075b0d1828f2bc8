//! How the VM's event loop wakes the entropy device: its queue kick and its budget timer.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::Rng;

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.queue_event().as_raw_fd(), self.timer.as_raw_fd()] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!(fd, error = ?e, "rng: cannot watch fd; the device will not work");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.timer.as_raw_fd() {
            self.on_timer();
        } else {
            let _ = self.queue_event().read();
            self.process();
        }
    }
}

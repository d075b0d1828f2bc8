//! How the VM's event loop wakes the network device: queue kicks (ioeventfds) and the tap.

use std::os::fd::{AsFd, AsRawFd};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{Net, RXQ, TXQ};

impl Net {
    /// Puts the tap in or out of epoll to match [`Net::wants_tap`].
    fn sync_tap_interest(&mut self, ops: &mut EventOps) {
        let want = self.wants_tap();
        if want == self.tap_watched {
            return;
        }
        let Some(fd) = self.tap.as_ref().map(|t| t.as_fd().as_raw_fd()) else {
            return;
        };
        let r = if want {
            ops.add(Events::new_raw(fd, EventSet::IN))
        } else {
            ops.remove(Events::empty_raw(fd))
        };
        match r {
            Ok(()) => self.tap_watched = want,
            Err(e) => {
                tracing::error!(fd, error = ?e, "net: cannot change the tap's epoll interest")
            }
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [
            self.queue_event(RXQ).as_raw_fd(),
            self.queue_event(TXQ).as_raw_fd(),
        ] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!(fd, error = ?e, "net: cannot watch fd; the device will not work");
            }
        }
        self.sync_tap_interest(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.queue_event(RXQ).as_raw_fd() {
            let _ = self.queue_event(RXQ).read();
            // New buffers: a starved frame can go now.
            self.rx_starved = false;
        } else if fd == self.queue_event(TXQ).as_raw_fd() {
            let _ = self.queue_event(TXQ).read();
            self.process_tx();
        }
        // Tap readable, or buffers arrived: either way try to fill them.
        self.process_rx();
        self.sync_tap_interest(ops);
    }
}

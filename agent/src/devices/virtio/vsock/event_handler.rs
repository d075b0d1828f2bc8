//! How the VM's event loop wakes the vsock device: queue kicks (ioeventfds), the Unix
//! listener and host streams, the end of the guest's run, and a tick for expiring
//! handshakes, armed only while one is under way.

use std::os::fd::AsRawFd;
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{Vsock, EVQ, RXQ, TXQ};

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            self.queue_event(RXQ).as_raw_fd(),
            self.queue_event(TXQ).as_raw_fd(),
            self.queue_event(EVQ).as_raw_fd(),
            self.muxer.listener().as_raw_fd(),
            self.timer.as_raw_fd(),
            self.guest_end.as_raw_fd(),
        ];
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!(fd, error = ?e, "vsock: cannot watch fd; the device will not work");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.queue_event(RXQ).as_raw_fd() {
            let _ = self.queue_event(RXQ).read();
            self.rx_starved = false;
        } else if fd == self.queue_event(TXQ).as_raw_fd() {
            let _ = self.queue_event(TXQ).read();
            self.process_tx();
        } else if fd == self.queue_event(EVQ).as_raw_fd() {
            let _ = self.queue_event(EVQ).read();
            self.process_event_queue();
        } else if fd == self.guest_end.as_raw_fd() {
            self.on_guest_end();
        } else if fd == self.timer.as_raw_fd() {
            if self.timer.take_expiry() {
                self.muxer.tick(Instant::now());
            }
        } else {
            self.muxer.handle_host_event(fd, events.event_set());
        }
        // Whatever happened may have produced packets for the guest or freed its credit.
        self.process_rx();
        let starved = self.rx_starved;
        self.muxer.sync_interest(ops, starved);
        self.sync_timer();
    }
}

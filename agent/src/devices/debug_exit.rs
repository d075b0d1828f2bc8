//! The debug-exit port (0xf4, as QEMU's `isa-debug-exit`): one byte written there ends the
//! VM with that byte as the guest's exit status. The guest agent uses it to report how it
//! ended before it resets the machine.

use super::GuestEnd;

pub const PORT: u16 = 0xf4;

/// Stateless: nothing to save.
#[derive(Debug, Default)]
pub struct DebugExit;

impl DebugExit {
    pub fn write(&mut self, data: &[u8]) -> Option<GuestEnd> {
        data.first().map(|&status| GuestEnd::Exited { status })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_byte_ends_the_guest_with_that_status() {
        assert_eq!(DebugExit.write(&[7]), Some(GuestEnd::Exited { status: 7 }));
        assert_eq!(DebugExit.write(&[]), None);
    }
}

//! Just enough of the i8042 keyboard controller for the guest's reset: with `reboot=k`,
//! Linux waits for the input buffer to be empty and writes the pulse-reset command 0xFE to
//! the command port. There is no keyboard.

use super::GuestEnd;

pub const DATA_PORT: u16 = 0x60;
pub const COMMAND_PORT: u16 = 0x64;
const CMD_RESET: u8 = 0xfe;

/// Stateless: nothing to save.
#[derive(Debug, Default)]
pub struct I8042;

impl I8042 {
    pub fn read(&mut self, _port: u16, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so the reset path never waits.
        data.fill(0);
    }

    pub fn write(&mut self, port: u16, data: &[u8]) -> Option<GuestEnd> {
        (port == COMMAND_PORT && data.first() == Some(&CMD_RESET)).then_some(GuestEnd::Reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulse_reset_on_the_command_port_resets() {
        assert_eq!(I8042.write(COMMAND_PORT, &[0xfe]), Some(GuestEnd::Reset));
        assert_eq!(I8042.write(DATA_PORT, &[0xfe]), None);
        assert_eq!(I8042.write(COMMAND_PORT, &[0xd1]), None);
        let mut status = [0xff];
        I8042.read(COMMAND_PORT, &mut status);
        assert_eq!(status, [0]);
    }
}

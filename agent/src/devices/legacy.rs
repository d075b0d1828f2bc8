//! The port-I/O devices of a PC that a microVM guest touches, and the dispatch from a port
//! number to the device that decodes it. Unclaimed reads float high (0xff), as on real
//! hardware; unclaimed writes are ignored.
//!
//! System control port B (0x61) reads as 0 here. A VM with the in-kernel PIT never asks
//! us (KVM answers it), but a fork has no PIT, and its guest reads the port for the
//! reason of an NMI: 0xff would report a parity and an I/O channel error that never
//! happened.

use super::debug_exit::{self, DebugExit};
use super::i8042::{self, I8042};
use super::serial::{self, Serial};
use super::GuestEnd;

/// System control port B: NMI reasons, PC speaker gate.
const SYSTEM_CONTROL_B: u16 = 0x61;

pub struct LegacyDevices {
    pub serial: Serial,
    i8042: I8042,
    debug_exit: DebugExit,
}

impl LegacyDevices {
    pub fn new(serial: Serial) -> Self {
        Self {
            serial,
            i8042: I8042,
            debug_exit: DebugExit,
        }
    }

    fn serial_offset(port: u16) -> Option<u8> {
        port.checked_sub(serial::COM1_BASE)
            .filter(|o| *o < serial::PORT_COUNT)
            .map(|o| o as u8)
    }

    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        if let Some(offset) = Self::serial_offset(port) {
            if let Some(first) = data.first_mut() {
                *first = self.serial.read(offset);
            }
            return;
        }
        match port {
            i8042::DATA_PORT | i8042::COMMAND_PORT => self.i8042.read(port, data),
            SYSTEM_CONTROL_B => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    /// Handles a write; `Some` when the write ends the guest.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> Option<GuestEnd> {
        if let Some(offset) = Self::serial_offset(port) {
            if let Some(&value) = data.first() {
                self.serial.write(offset, value);
            }
            return None;
        }
        match port {
            i8042::DATA_PORT | i8042::COMMAND_PORT => self.i8042.write(port, data),
            debug_exit::PORT => self.debug_exit.write(data),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::console::Console;

    fn devices() -> (Console, LegacyDevices) {
        let (console, writer) = Console::new(None, Some("hi"));
        let serial = Serial::new(Box::new(writer), None).unwrap();
        (console, LegacyDevices::new(serial))
    }

    #[test]
    fn port_b_reports_no_nmi_reason_and_other_ports_float_high() {
        let (_console, mut d) = devices();
        let mut b = [0xaa];
        d.pio_read(SYSTEM_CONTROL_B, &mut b);
        assert_eq!(b, [0]);
        d.pio_read(0x40, &mut b);
        assert_eq!(b, [0xff]);
        assert_eq!(d.pio_write(0x43, &[0x30]), None);
    }

    #[test]
    fn serial_transmit_reaches_the_console() {
        let (console, mut d) = devices();
        for b in b"hi there\n" {
            assert_eq!(d.pio_write(serial::COM1_BASE, &[*b]), None);
        }
        assert_eq!(console.tail(), "hi there\n");
    }

    #[test]
    fn unclaimed_ports_read_high_and_ignore_writes() {
        let (_, mut d) = devices();
        let mut data = [0u8; 4];
        d.pio_read(0x2f8, &mut data);
        assert_eq!(data, [0xff; 4]);
        assert_eq!(d.pio_write(0x80, &[1]), None);
        // A zero-length access (malformed) is harmless.
        d.pio_read(serial::COM1_BASE, &mut []);
        assert_eq!(d.pio_write(serial::COM1_BASE, &[]), None);
    }

    #[test]
    fn ending_ports_end_the_guest() {
        let (_, mut d) = devices();
        assert_eq!(d.pio_write(0x64, &[0xfe]), Some(GuestEnd::Reset));
        assert_eq!(
            d.pio_write(0xf4, &[3]),
            Some(GuestEnd::Exited { status: 3 })
        );
    }
}

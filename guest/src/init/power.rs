//! Ending the guest deliberately: report the status on the debug-exit port, then reset.
//! PID 1 must never simply exit (the kernel would panic).

use std::io::{Seek, SeekFrom, Write};

use crate::boot::DEBUG_EXIT_PORT;

/// Syncs, reports `status` to the VMM, and resets the machine. Never returns.
pub fn end_guest(status: u8) -> ! {
    nix::unistd::sync();
    if let Err(e) = report_status(status) {
        eprintln!("cleave-guest: could not report exit status {status}: {e}; resetting");
    }
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // reboot(2) only returns on error; nothing more to do than wait for the end.
    loop {
        nix::unistd::pause();
    }
}

/// One byte to the debug-exit port through /dev/port (no port-I/O privileges needed).
fn report_status(status: u8) -> std::io::Result<()> {
    let mut port = std::fs::OpenOptions::new().write(true).open("/dev/port")?;
    port.seek(SeekFrom::Start(DEBUG_EXIT_PORT))?;
    port.write_all(&[status])
}

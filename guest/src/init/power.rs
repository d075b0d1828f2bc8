//! Ending the guest deliberately: report the status on the debug-exit port, then reset.
//! PID 1 must never simply exit (the kernel would panic).

use crate::boot::DEBUG_EXIT_PORT;

/// Syncs, reports `status` to the VMM, and resets the machine. Never returns.
pub fn end_guest(status: u8) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // The tty driver sends console bytes to the UART asynchronously; without draining,
    // the last lines (the readiness line, a fatal error) die with the machine.
    let _ = nix::sys::termios::tcdrain(std::io::stdout());
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

/// One byte to the debug-exit port. A microVM kernel has no /dev/port (it needs ISA or
/// PCI), so PID 1 asks for the port and writes it itself.
fn report_status(status: u8) -> std::io::Result<()> {
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(DEBUG_EXIT_PORT, 1, 1) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: one byte to the port just granted; the VMM's debug-exit device takes it.
    // It touches no memory.
    unsafe {
        std::arch::asm!(
            "out dx, al",
            in("dx") DEBUG_EXIT_PORT as u16,
            in("al") status,
            options(nomem, nostack, preserves_flags)
        );
    }
    Ok(())
}

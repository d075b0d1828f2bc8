//! stdio on the console. The kernel opens /dev/console for PID 1 only if the initramfs
//! has the node; once devtmpfs is mounted we can always (re)open it.

use std::os::fd::AsRawFd;

/// Points fds 0, 1 and 2 at /dev/console if any of them is not open.
pub fn ensure_console() {
    // SAFETY: F_GETFD only asks whether the descriptor is open.
    let open = |fd: i32| unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1;
    if (0..=2).all(open) {
        return;
    }
    let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    for target in [0, 1, 2] {
        // SAFETY: dup2 onto the standard descriptors; `console` stays open for the call.
        unsafe { libc::dup2(console.as_raw_fd(), target) };
    }
}

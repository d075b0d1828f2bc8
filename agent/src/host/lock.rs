//! Advisory whole-file locks (`flock`). The kernel drops a lock when its holder's file
//! closes or its process dies, so a lock that can be taken says nobody alive holds it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Takes an exclusive lock on `file` without waiting: `Ok(false)` when another open file
/// holds it.
pub fn try_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: flock on an fd `file` owns for the duration of the call; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_closes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l");
        let a = File::create(&p).unwrap();
        assert!(try_exclusive(&a).unwrap());
        let b = File::open(&p).unwrap();
        assert!(!try_exclusive(&b).unwrap());
        drop(a);
        assert!(try_exclusive(&b).unwrap());
    }
}

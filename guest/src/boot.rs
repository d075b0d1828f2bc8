//! What the host and the guest agent agree on about boot: the readiness line the host
//! waits for, the kernel command-line flags the agent reads, and how the guest reports its
//! exit status.

/// The guest agent prints one line starting with this on the console once it is ready.
pub const READY_PREFIX: &str = "cleave-guest: ready";

/// `cleave.selftest=1`: print the readiness line, then end the guest with status 0.
pub const FLAG_SELFTEST: &str = "cleave.selftest";

/// `cleave.template=1`: this boot will be captured as a template, so the agent's reseed
/// gate starts closed (exec and files only after a successful reseed).
pub const FLAG_TEMPLATE: &str = "cleave.template";

/// `cleave.hostname=NAME`: the guest's hostname (default [`DEFAULT_HOSTNAME`]).
pub const FLAG_HOSTNAME: &str = "cleave.hostname";

pub const DEFAULT_HOSTNAME: &str = "cleave";

/// The vsock port the guest agent listens on (the host reaches it with
/// `CONNECT <port>` on the VM's hybrid-vsock socket).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The I/O port the guest writes its exit status to (the VMM's debug-exit device).
pub const DEBUG_EXIT_PORT: libc::c_ulong = 0xf4;

/// The value of `key=value` on a kernel command line (the last one wins, as in the kernel).
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .rev()
        .filter_map(|arg| arg.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Whether a boolean flag is on (`key=1`, `key=on`, `key=true`, `key=yes`).
pub fn cmdline_flag(cmdline: &str, key: &str) -> bool {
    matches!(
        cmdline_value(cmdline, key),
        Some("1" | "on" | "true" | "yes")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_values_and_flags() {
        let c = "console=ttyS0 cleave.selftest=1 cleave.hostname=a cleave.hostname=b quiet";
        assert_eq!(cmdline_value(c, FLAG_HOSTNAME), Some("b"));
        assert!(cmdline_flag(c, FLAG_SELFTEST));
        assert!(!cmdline_flag("cleave.selftest=0", FLAG_SELFTEST));
        assert!(!cmdline_flag("xcleave.selftest=1", FLAG_SELFTEST));
        assert_eq!(cmdline_value("quiet", "quiet"), None);
    }
}

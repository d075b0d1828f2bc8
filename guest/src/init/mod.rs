//! PID-1 duties: the filesystems every process expects, stdio on the console, the
//! hostname, and ending the guest deliberately (a PID 1 that exits panics the kernel).

pub mod mounts;
pub mod power;
pub mod stdio;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("creating mount point {path}: {source}")]
    MountPoint {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("mounting {fstype} on {path}: {source}")]
    Mount {
        fstype: &'static str,
        path: &'static str,
        source: nix::Error,
    },
    #[error("setting the hostname to {name:?}: {source}")]
    Hostname { name: String, source: nix::Error },
    #[error("reading the kernel command line: {0}")]
    Cmdline(std::io::Error),
}

/// Sets the hostname; names the kernel would reject are refused with the reason.
pub fn set_hostname(name: &str) -> Result<(), InitError> {
    nix::unistd::sethostname(name).map_err(|source| InitError::Hostname {
        name: name.to_owned(),
        source,
    })
}

/// Milliseconds since the guest kernel booted.
pub fn uptime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

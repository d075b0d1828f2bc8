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

/// Total RAM the guest kernel manages, in MiB (from /proc/meminfo).
pub fn mem_total_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_total_kib(&meminfo).map(|kib| kib / 1024)
}

fn parse_mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mem_total() {
        let m = "MemFree: 1 kB\nMemTotal:      246384 kB\n";
        assert_eq!(parse_mem_total_kib(m), Some(246384));
        assert_eq!(parse_mem_total_kib("MemTotal: lots"), None);
    }
}

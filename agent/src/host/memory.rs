//! What a process, and the host, use in memory: the figures the fork benchmarks report
//! (unique memory per idle fork) and a node agent would account per sandbox.

use std::io;

/// One process's memory from `/proc/<pid>/smaps_rollup`, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcessMemory {
    /// `Private_Dirty`: pages only this process has written. For a fork this is its own
    /// heap and stacks plus the guest pages it copied on write: what it costs on its own.
    pub private_dirty_kib: u64,
    /// `Private_Clean`: unwritten pages only this process maps. For a lone fork these are
    /// the worker binary's and the template's pages that no sibling maps yet: page cache,
    /// paid once however many forks share it, not a copy.
    pub private_clean_kib: u64,
    /// Proportional set size: private pages plus each shared page divided by its sharers.
    pub pss_kib: u64,
}

impl ProcessMemory {
    pub fn of(pid: u32) -> io::Result<Self> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
        Ok(Self::parse(&text))
    }

    /// The sum over several processes (the forks of one measurement).
    pub fn total(pids: impl IntoIterator<Item = u32>) -> io::Result<Self> {
        pids.into_iter().try_fold(Self::default(), |sum, pid| {
            let m = Self::of(pid)?;
            Ok(Self {
                private_dirty_kib: sum.private_dirty_kib + m.private_dirty_kib,
                private_clean_kib: sum.private_clean_kib + m.private_clean_kib,
                pss_kib: sum.pss_kib + m.pss_kib,
            })
        })
    }

    fn parse(text: &str) -> Self {
        Self {
            private_dirty_kib: kib_field(text, "Private_Dirty:"),
            private_clean_kib: kib_field(text, "Private_Clean:"),
            pss_kib: kib_field(text, "Pss:"),
        }
    }
}

/// `MemAvailable` from `/proc/meminfo`, in KiB.
pub fn available_kib() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    if !text.lines().any(|l| l.starts_with("MemAvailable:")) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "/proc/meminfo has no MemAvailable line",
        ));
    }
    Ok(kib_field(&text, "MemAvailable:"))
}

/// The number after `name` on its line (`Name:   1234 kB`); 0 when absent.
fn kib_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollup_fields_add_up() {
        let text = "55d0-7ffd ---p 00000000 00:00 0  [rollup]\n\
                    Rss:                5000 kB\n\
                    Pss:                3000 kB\n\
                    Pss_Dirty:          1000 kB\n\
                    Private_Clean:       200 kB\n\
                    Private_Dirty:      1300 kB\n";
        let m = ProcessMemory::parse(text);
        assert_eq!(m.private_dirty_kib, 1300);
        assert_eq!(m.private_clean_kib, 200);
        assert_eq!(m.pss_kib, 3000);
    }

    #[test]
    fn this_process_and_the_host_have_figures() {
        let me = ProcessMemory::of(std::process::id()).unwrap();
        assert!(me.private_dirty_kib > 0 && me.pss_kib > 0, "{me:?}");
        assert!(available_kib().unwrap() > 0);
        let pid = std::process::id();
        let two = ProcessMemory::total([pid, pid]).unwrap();
        assert!(two.pss_kib > me.pss_kib, "{two:?} vs one {me:?}");
        assert_eq!(ProcessMemory::total([]).unwrap(), ProcessMemory::default());
        assert!(
            ProcessMemory::total([pid, u32::MAX]).is_err(),
            "a missing process is an error"
        );
    }
}

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
    Ok(HostMemory::read()?.available)
}

/// Where the host's memory is, from `/proc/meminfo` (KiB): the kernel's own parts that a
/// VM and its process add to, so a per-fork figure can be split by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostMemory {
    pub available: u64,
    /// Anonymous pages of every process (workers' heaps and stacks, guest pages copied).
    pub anon: u64,
    /// Kernel stacks: 16 KiB per thread, the kernel's own threads included.
    pub kernel_stack: u64,
    /// Page tables of every process.
    pub page_tables: u64,
    /// Slab that cannot be reclaimed (KVM's VM and vCPU objects, tasks, sockets, files).
    pub slab_unreclaimable: u64,
    /// Slab that can be (dentries and inodes: debugfs makes a directory per VM).
    pub slab_reclaimable: u64,
    /// vmalloc'd memory (large KVM structures).
    pub vmalloc: u64,
    /// Per-CPU allocations.
    pub percpu: u64,
}

impl HostMemory {
    pub fn read() -> io::Result<Self> {
        let text = std::fs::read_to_string("/proc/meminfo")?;
        if !text.lines().any(|l| l.starts_with("MemAvailable:")) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "/proc/meminfo has no MemAvailable line",
            ));
        }
        Ok(Self::parse(&text))
    }

    fn parse(text: &str) -> Self {
        Self {
            available: kib_field(text, "MemAvailable:"),
            anon: kib_field(text, "AnonPages:"),
            kernel_stack: kib_field(text, "KernelStack:"),
            page_tables: kib_field(text, "PageTables:"),
            slab_unreclaimable: kib_field(text, "SUnreclaim:"),
            slab_reclaimable: kib_field(text, "SReclaimable:"),
            vmalloc: kib_field(text, "VmallocUsed:"),
            percpu: kib_field(text, "Percpu:"),
        }
    }

    /// Every figure but `available`, named, in a fixed order (a table's columns).
    pub fn parts(&self) -> [(&'static str, u64); 7] {
        [
            ("anon", self.anon),
            ("kernel stacks", self.kernel_stack),
            ("page tables", self.page_tables),
            ("slab (unreclaimable)", self.slab_unreclaimable),
            ("slab (reclaimable)", self.slab_reclaimable),
            ("vmalloc", self.vmalloc),
            ("per-CPU", self.percpu),
        ]
    }
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
    fn meminfo_parts_are_read_by_name() {
        let text = "MemTotal: 100 kB\nMemAvailable: 90 kB\nAnonPages: 7 kB\n\
                    KernelStack: 16 kB\nPageTables: 4 kB\nSReclaimable: 3 kB\n\
                    SUnreclaim: 5 kB\nVmallocUsed: 8 kB\nPercpu: 2 kB\n";
        let m = HostMemory::parse(text);
        assert_eq!(m.available, 90);
        assert_eq!(m.parts().map(|(_, v)| v), [7, 16, 4, 5, 3, 8, 2]);
        assert_eq!(m.parts()[1], ("kernel stacks", 16));
        // A kernel without a field reads as 0 for it, not as an error.
        let bare = HostMemory::parse("MemAvailable: 1 kB\n");
        assert_eq!(bare.parts().map(|(_, v)| v), [0; 7]);
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

//! Facts about the host this agent runs on.

pub mod cgroup;
pub mod entropy;
pub mod fingerprint;
pub mod kvm;
pub mod lock;
pub mod memory;
pub mod paths;
pub mod sched;

/// The log filter every cleave process uses: `RUST_LOG`, else `default`; and never the
/// rust-vmm queue crate's own lines, which a guest can trigger on every queue access
/// (ours go through `LogLimit`).
pub fn log_filter(default: &str) -> tracing_subscriber::EnvFilter {
    let f = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    match "virtio_queue=off".parse() {
        Ok(d) => f.add_directive(d),
        Err(_) => f,
    }
}

/// This process's pid as the node sees it. A jailed worker is PID 1 of its own PID
/// namespace, but the /proc it can still read (before its jail) is the node's, and names
/// it by its node pid; directories and reports carry that one.
pub fn node_pid() -> u32 {
    std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(std::process::id)
}

/// What to add to an error whose cause is `e` when starting a process or thread: EAGAIN
/// there means the host (`kernel.pid_max`, `kernel.threads-max`) or a cgroup (`pids.max`)
/// has no task left, which the bare "Resource temporarily unavailable" does not say.
pub fn tasks_hint(e: &std::io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::EAGAIN) {
        " (no task left: each running fork takes 3 — its worker, its vCPU thread and KVM's \
         kvm-nx-lpage-recovery thread, plus one per extra vCPU and one for a device event \
         loop; raise kernel.pid_max, or the cgroup's pids.max; see images/node/README.md)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_eagain_gets_the_task_limit_hint() {
        let again = std::io::Error::from_raw_os_error(libc::EAGAIN);
        assert!(super::tasks_hint(&again).contains("kernel.pid_max"));
        let other = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(super::tasks_hint(&other), "");
    }

    #[test]
    fn outside_a_pid_namespace_the_node_pid_is_the_pid() {
        assert_eq!(super::node_pid(), std::process::id());
    }

    #[test]
    fn the_queue_crates_lines_are_always_filtered_out() {
        let f = super::log_filter("trace").to_string();
        assert!(f.contains("virtio_queue=off"), "{f}");
    }
}

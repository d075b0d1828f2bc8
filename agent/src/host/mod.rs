//! Facts about the host this agent runs on.

pub mod cgroup;
pub mod entropy;
pub mod fingerprint;
pub mod kvm;
pub mod lock;
pub mod memory;
pub mod paths;

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

#[cfg(test)]
mod tests {
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

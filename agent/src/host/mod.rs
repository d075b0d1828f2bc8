//! Facts about the host this agent runs on.

pub mod cgroup;
pub mod entropy;
pub mod fingerprint;
pub mod kvm;
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_queue_crates_lines_are_always_filtered_out() {
        let f = super::log_filter("trace").to_string();
        assert!(f.contains("virtio_queue=off"), "{f}");
    }
}

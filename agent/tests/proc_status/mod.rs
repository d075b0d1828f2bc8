//! Reading a process's `/proc/<pid>/status`, for tests that check how a worker runs.

/// The value of `key` in `pid`'s status file (empty when the key is absent).
pub fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

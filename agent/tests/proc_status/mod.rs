//! Reading a process's `/proc/<pid>/status` and `stat`, for tests that check how a worker
//! runs.
#![allow(dead_code)]

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

/// `pid`'s name (`comm`) and parent, from /proc/<pid>/stat (`None` once it is gone).
pub fn name_and_parent(pid: u32) -> Option<(String, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let parent = stat.get(close + 2..)?.split(' ').nth(1)?.parse().ok()?;
    Some((stat[open + 1..close].to_string(), parent))
}

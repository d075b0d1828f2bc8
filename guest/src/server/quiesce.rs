//! `quiesce`: the last request before a template is captured.
//!
//! Every fork resumes from the template's memory, so whatever runs in the template at
//! capture runs in every fork with the template's random state already in its own memory
//! (a reseed rekeys the kernel CRNG, not a process's userspace RNG). So the template must
//! be quiet: only the agent runs, and the gate is closed so each fork has to pass its own
//! reseed. The gate closes first and stays closed whatever the outcome.

use std::fs;

/// A process other than PID 1 and the kernel's threads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserProcess {
    pub pid: i32,
    pub comm: String,
}

/// The user processes in `/proc`, other than PID 1 (the agent, with its threads).
pub fn user_processes() -> std::io::Result<Vec<UserProcess>> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // A process may end while we look; gone is quiet.
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some(p) = parse_stat(pid, &stat).filter(|p| p.is_user()) {
            found.push(p.process);
        }
    }
    Ok(found)
}

struct Stat {
    process: UserProcess,
    ppid: i32,
}

impl Stat {
    /// Not PID 1, not kthreadd (2) and not one of its children (kernel threads).
    fn is_user(&self) -> bool {
        self.process.pid > 2 && self.ppid != 2
    }
}

/// `pid (comm) state ppid ...`; comm may hold spaces and parentheses, so it runs to the
/// last `)`.
fn parse_stat(pid: i32, stat: &str) -> Option<Stat> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let mut rest = stat.get(close + 1..)?.split_ascii_whitespace();
    let _state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some(Stat {
        process: UserProcess { pid, comm },
        ppid,
    })
}

/// The error text for processes that keep a template from being captured.
pub fn describe(procs: &[UserProcess]) -> String {
    let list: Vec<String> = procs
        .iter()
        .take(8)
        .map(|p| format!("{} ({})", p.pid, p.comm))
        .collect();
    let more = procs.len().saturating_sub(list.len());
    format!(
        "{} process(es) besides the agent still run: {}{}; end them before capturing the \
         template (a process running at capture would run in every fork with the \
         template's random state)",
        procs.len(),
        list.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_comm_with_spaces_and_parentheses() {
        let s = parse_stat(42, "42 (a (b) c) S 7 42 42 0 -1").unwrap();
        assert_eq!(s.process.comm, "a (b) c");
        assert_eq!(s.ppid, 7);
        assert!(s.is_user());
    }

    #[test]
    fn kernel_threads_and_init_are_not_user_processes() {
        assert!(!parse_stat(1, "1 (init) S 0 1 1").unwrap().is_user());
        assert!(!parse_stat(2, "2 (kthreadd) S 0 0 0").unwrap().is_user());
        assert!(!parse_stat(9, "9 (kworker/0:1) I 2 0 0").unwrap().is_user());
    }

    #[test]
    fn malformed_stat_lines_are_skipped() {
        assert!(parse_stat(3, "").is_none());
        assert!(parse_stat(3, "3 (x").is_none());
        assert!(parse_stat(3, "3 (x) S notanumber").is_none());
    }

    #[test]
    fn describe_names_the_processes() {
        let p = vec![UserProcess {
            pid: 7,
            comm: "sleep".into(),
        }];
        let d = describe(&p);
        assert!(d.starts_with("1 process(es)"), "{d}");
        assert!(d.contains("7 (sleep)"), "{d}");
    }
}

//! The daemon's configuration file (TOML). Every key is optional and has a safe default;
//! an unknown key is an error (a typo must not silently leave a limit at its default).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::fork::jail::CgroupSettings;
use crate::node::{NodeLimits, WorkerStart};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Peer uids (SO_PEERCRED on the Unix socket) allowed operator calls.
    pub allowed_uids: Vec<u32>,
    pub max_sandboxes: usize,
    pub memory_budget_mib: u64,
    /// Forks in one create request.
    pub max_per_request: u32,
    /// A sandbox created without a TTL lives this long.
    pub default_ttl_secs: u64,
    /// The longest TTL a request may ask for.
    pub max_ttl_secs: u64,
    pub max_execs_per_sandbox: u32,
    /// API requests per second per caller (a burst of twice as many is allowed).
    pub requests_per_second: u32,
    /// Journal, lock and daemon-owned files.
    pub state_dir: PathBuf,
    /// Warm workers kept per loaded template.
    pub warm_workers: usize,
    pub gate_timeout_ms: u64,
    /// The largest gRPC message accepted or sent.
    pub max_message_bytes: usize,
    /// The largest file read or written through the API.
    pub max_file_bytes: u64,
    /// Create (if missing) and load the `default` template at start.
    pub default_template: bool,
    pub default_template_mem_mib: u64,
    /// Fork workers run as uids (and gids) `jail_first_uid ..+ jail_uids`, one per live
    /// worker (warm ones included).
    pub jail_first_uid: u32,
    pub jail_uids: u32,
    /// Where each worker's cgroup v2 leaf goes; "" runs workers without cgroup limits.
    pub worker_cgroup_parent: String,
    /// `pids.max` of each worker's leaf (its threads count).
    pub worker_pids_max: u32,
    /// `cpu.max` of each worker's leaf: "max", or "QUOTA PERIOD" in microseconds.
    pub worker_cpu_max: String,
    /// How fork workers start: "zygote" (forked from the template's zygote, the fast
    /// path; siblings share its address-space layout) or "exec" (each exec'd afresh:
    /// ~1.5× the CPU per fork, every worker's layout randomised on its own).
    pub worker_start: WorkerStart,
    pub network: Option<NetworkConfig>,
    pub tls: Option<TlsConfig>,
}

/// Sandbox networking; without this section sandboxes have no network and a request with
/// a policy is refused.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// The interface egress is masqueraded out of (default: the default route's).
    pub uplink: Option<String>,
    /// Upstream resolvers (default: the host's /etc/resolv.conf).
    #[serde(default)]
    pub dns_upstream: Vec<SocketAddr>,
    /// Network slots built ahead.
    #[serde(default)]
    pub pool: usize,
}

/// An optional TCP listener; it requires client certificates signed by `client_ca`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Required: there is no TLS listener without client authentication.
    pub client_ca: Option<PathBuf>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            allowed_uids: vec![0],
            max_sandboxes: 256,
            memory_budget_mib: 64 * 1024,
            max_per_request: 64,
            default_ttl_secs: 3600,
            max_ttl_secs: 24 * 3600,
            max_execs_per_sandbox: 16,
            requests_per_second: 100,
            state_dir: crate::vmm::runtime_dir::RuntimeDir::base().join("daemon"),
            warm_workers: 4,
            gate_timeout_ms: 10_000,
            max_message_bytes: 1 << 20,
            max_file_bytes: 64 << 20,
            default_template: true,
            default_template_mem_mib: 256,
            jail_first_uid: crate::fork::jail::DEFAULT_FIRST_UID,
            jail_uids: crate::fork::jail::DEFAULT_UIDS,
            worker_cgroup_parent: crate::host::cgroup::DEFAULT_PARENT.into(),
            worker_pids_max: crate::fork::jail::DEFAULT_PIDS_MAX,
            worker_cpu_max: "max".into(),
            worker_start: WorkerStart::Zygote,
            network: None,
            tls: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // `error`, not `source`: shown once, in the message (the CLI prints error chains).
    #[error("reading the config {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the config {path} is not valid: {why}")]
    Invalid { path: PathBuf, why: String },
}

impl DaemonConfig {
    pub fn load(path: &Path) -> Result<DaemonConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(&text).map_err(|why| ConfigError::Invalid {
            path: path.to_path_buf(),
            why,
        })
    }

    /// Parses and checks a config; the error names the key and what is allowed.
    pub fn parse(text: &str) -> Result<DaemonConfig, String> {
        let c: DaemonConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<(), String> {
        let positive = [
            ("max_sandboxes", self.max_sandboxes as u64),
            ("memory_budget_mib", self.memory_budget_mib),
            ("max_per_request", u64::from(self.max_per_request)),
            ("default_ttl_secs", self.default_ttl_secs),
            ("max_ttl_secs", self.max_ttl_secs),
            (
                "max_execs_per_sandbox",
                u64::from(self.max_execs_per_sandbox),
            ),
            ("requests_per_second", u64::from(self.requests_per_second)),
            ("gate_timeout_ms", self.gate_timeout_ms),
            ("max_file_bytes", self.max_file_bytes),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{key} must be at least 1"));
        }
        if self.default_ttl_secs > self.max_ttl_secs {
            return Err(format!(
                "default_ttl_secs ({}) is longer than max_ttl_secs ({})",
                self.default_ttl_secs, self.max_ttl_secs
            ));
        }
        if !(64 << 10..=64 << 20).contains(&self.max_message_bytes) {
            return Err("max_message_bytes must be from 65536 to 67108864".into());
        }
        if self.jail_first_uid == 0
            || u64::from(self.jail_first_uid) + u64::from(self.jail_uids) > u64::from(u32::MAX)
            || (self.jail_uids as usize) < self.max_sandboxes + self.warm_workers
        {
            return Err(format!(
                "jail_first_uid/jail_uids: the worker uids must be above 0 and below \
                 4294967295, at least max_sandboxes + warm_workers of them ({})",
                self.max_sandboxes + self.warm_workers
            ));
        }
        parse_cpu_max(&self.worker_cpu_max)?;
        if self.worker_pids_max < 8 {
            return Err(format!(
                "worker_pids_max ({}) must be at least 8: a worker runs a thread per vCPU \
                 beside its own",
                self.worker_pids_max
            ));
        }
        if !self.worker_cgroup_parent.is_empty()
            && !Path::new(&self.worker_cgroup_parent).starts_with("/sys/fs/cgroup/")
        {
            return Err(format!(
                "worker_cgroup_parent {:?} must be a directory under /sys/fs/cgroup/, or \"\" \
                 for no cgroup limits",
                self.worker_cgroup_parent
            ));
        }
        if self.allowed_uids.is_empty() {
            return Err("allowed_uids is empty: no one could create a sandbox".into());
        }
        if let Some(tls) = &self.tls {
            if tls.client_ca.is_none() {
                return Err(
                    "[tls] has no client_ca: the TCP listener requires client certificates \
                     (mutual TLS); name the CA that signs them, or remove [tls]"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// The workers' cgroup leaves, unless `worker_cgroup_parent` is "".
    pub fn cgroup_settings(&self) -> Option<CgroupSettings> {
        (!self.worker_cgroup_parent.is_empty()).then(|| CgroupSettings {
            parent: PathBuf::from(&self.worker_cgroup_parent),
            pids_max: self.worker_pids_max,
            cpu_max: parse_cpu_max(&self.worker_cpu_max).ok().flatten(),
        })
    }

    pub fn limits(&self) -> NodeLimits {
        NodeLimits {
            max_sandboxes: self.max_sandboxes,
            memory_budget_mib: self.memory_budget_mib,
            max_per_request: self.max_per_request,
            default_ttl: Some(Duration::from_secs(self.default_ttl_secs)),
            max_ttl: Some(Duration::from_secs(self.max_ttl_secs)),
        }
    }
}

/// `cpu.max` as the kernel takes it: "max" (`None`) or "QUOTA PERIOD" in microseconds.
fn parse_cpu_max(s: &str) -> Result<Option<(u64, u64)>, String> {
    let bad = || {
        format!(
            "worker_cpu_max {s:?} is not \"max\" or \"QUOTA PERIOD\" (microseconds, quota \
             at least 1000, period 1000 to 1000000; \"50000 100000\" is half a CPU)"
        )
    };
    if s.trim() == "max" {
        return Ok(None);
    }
    let mut parts = s.split_whitespace().map(str::parse::<u64>);
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Ok(q)), Some(Ok(p)), None) if q >= 1000 && (1000..=1_000_000).contains(&p) => {
            Ok(Some((q, p)))
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_defaults() {
        assert_eq!(DaemonConfig::parse("").unwrap(), DaemonConfig::default());
    }

    #[test]
    fn the_daemonset_config_map_parses() {
        let yaml = include_str!("../../../images/deploy/daemonset.yaml");
        let start = yaml.find("cleave.toml: |").unwrap();
        let body: String = yaml[start..]
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
            .map(|l| format!("{}\n", l.trim_start()))
            .collect();
        let c = DaemonConfig::parse(&body).unwrap();
        assert_eq!(c.allowed_uids, [0]);
        assert_eq!(c.worker_start, WorkerStart::Zygote);
    }

    #[test]
    fn workers_start_from_the_zygote_unless_exec_is_asked_for() {
        assert_eq!(DaemonConfig::default().worker_start, WorkerStart::Zygote);
        let c = DaemonConfig::parse("worker_start = \"exec\"").unwrap();
        assert_eq!(c.worker_start, WorkerStart::Exec);
    }

    #[test]
    fn cpu_max_is_read_as_the_kernel_takes_it() {
        assert_eq!(parse_cpu_max("max"), Ok(None));
        assert_eq!(parse_cpu_max("50000 100000"), Ok(Some((50_000, 100_000))));
        for bad in ["", "50000", "50000 100000 1", "x 100000", "50000 10"] {
            assert!(parse_cpu_max(bad).is_err(), "{bad:?}");
        }
        let c = DaemonConfig::parse("worker_cpu_max = \"200000 100000\"").unwrap();
        assert_eq!(
            c.cgroup_settings().unwrap().cpu_max,
            Some((200_000, 100_000))
        );
        let off = DaemonConfig::parse("worker_cgroup_parent = \"\"").unwrap();
        assert_eq!(off.cgroup_settings(), None);
    }

    #[test]
    fn bad_configs_are_refused_with_the_key_named() {
        let cases = [
            ("max_sandboxs = 3", "unknown field"),
            ("max_sandboxes = 0", "max_sandboxes must be at least 1"),
            ("max_sandboxes = \"many\"", "invalid type"),
            (
                "default_ttl_secs = 10\nmax_ttl_secs = 5",
                "longer than max_ttl_secs",
            ),
            ("allowed_uids = []", "allowed_uids is empty"),
            ("max_message_bytes = 10", "max_message_bytes"),
            (
                "[tls]\nlisten = \"127.0.0.1:9000\"\ncert = \"c\"\nkey = \"k\"",
                "requires client certificates",
            ),
            ("[network]\npool = 4\nbogus = 1", "unknown field"),
            ("worker_cpu_max = \"half\"", "worker_cpu_max"),
            ("worker_cpu_max = \"10 100000\"", "worker_cpu_max"),
            ("worker_pids_max = 2", "worker_pids_max"),
            ("worker_cgroup_parent = \"/tmp/x\"", "under /sys/fs/cgroup/"),
            (
                "worker_start = \"fork\"",
                "unknown variant `fork`, expected `zygote` or `exec`",
            ),
        ];
        for (text, want) in cases {
            let e = DaemonConfig::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}

//! Applying a guest's network identity: `lo` up, the NIC's addresses and default routes
//! (over rtnetlink), then `/etc/resolv.conf`. Only after the reseed gate, and only what
//! the host sent (the decoder validated it).

use std::io::Write;
use std::path::Path;

use crate::netconf::{self, InterfacePlan, Link};
use crate::protocol::NetworkConfig;

/// The resolver file the guest's libc and busybox read.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Applies `cfg` to this guest. The error names the step that failed.
pub fn apply(cfg: &NetworkConfig) -> Result<(), String> {
    let mut plan = InterfacePlan {
        addresses: vec![(cfg.ipv4.addr.into(), cfg.ipv4.prefix)],
        gateways: vec![cfg.ipv4.gateway.into()],
        loopback_up: true,
    };
    if let Some(v6) = &cfg.ipv6 {
        plan.addresses.push((v6.addr.into(), v6.prefix));
        plan.gateways.push(v6.gateway.into());
    }
    netconf::apply(&Link::Mac(cfg.mac), &plan).map_err(|e| e.to_string())?;
    write_resolv_conf(Path::new(RESOLV_CONF), cfg)
        .map_err(|e| format!("writing {RESOLV_CONF}: {e}"))
}

/// The text of `resolv.conf` for `cfg`.
pub fn resolv_conf(cfg: &NetworkConfig) -> String {
    let mut s = String::from("# written by cleave-guest from the host's network configuration\n");
    for ns in &cfg.nameservers {
        s.push_str(&format!("nameserver {ns}\n"));
    }
    s
}

/// Writes `resolv.conf` whole (a new file renamed over the old one).
pub fn write_resolv_conf(path: &Path, cfg: &NetworkConfig) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("cleave-tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(resolv_conf(cfg).as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Ipv4Iface;

    #[test]
    fn resolv_conf_lists_each_resolver() {
        let cfg = NetworkConfig {
            mac: [2, 0, 0, 0, 0, 2],
            ipv4: Ipv4Iface {
                addr: "10.0.0.2".parse().unwrap(),
                prefix: 30,
                gateway: "10.0.0.1".parse().unwrap(),
            },
            ipv6: None,
            nameservers: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("etc/resolv.conf");
        write_resolv_conf(&p, &cfg).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.contains("nameserver 10.0.0.1\nnameserver fd00::1\n"),
            "{text}"
        );
    }
}

//! Where sandbox egress leaves the node, and IP forwarding.
//!
//! Egress is masqueraded out of the uplink: `--uplink IFACE`, or else the interface of the
//! IPv4 default route. Forwarding must be on for a tap's packets to be routed at all; when
//! it is off it is turned on, and that is logged (it is a node-wide setting).

use std::path::Path;

/// The interface of the IPv4 default route in `/proc/net/route` text, if there is one.
pub fn default_route_iface(route_table: &str) -> Option<String> {
    route_table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        let (iface, dest, mask) = (f.first()?, f.get(1)?, f.get(7)?);
        (*dest == "00000000" && *mask == "00000000").then(|| iface.to_string())
    })
}

/// The default route's interface on this host (its current network namespace).
pub fn detect() -> Option<String> {
    std::fs::read_to_string("/proc/net/route")
        .ok()
        .and_then(|t| default_route_iface(&t))
}

#[derive(Debug, thiserror::Error)]
#[error("enabling IP forwarding ({path}): {source}; sandboxes cannot reach anything without it")]
pub struct ForwardingError {
    path: String,
    source: std::io::Error,
}

/// Turns IPv4 and IPv6 forwarding on where it is off (logged: it is node-wide).
pub fn ensure_forwarding() -> Result<(), ForwardingError> {
    for path in [
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ] {
        let p = Path::new(path);
        let on = std::fs::read_to_string(p).map(|v| v.trim() == "1");
        match on {
            Ok(true) => {}
            // No IPv6 in this kernel: nothing to forward.
            Err(_) if path.contains("ipv6") && !p.exists() => {}
            _ => {
                std::fs::write(p, "1").map_err(|source| ForwardingError {
                    path: path.to_string(),
                    source,
                })?;
                tracing::warn!(
                    setting = path,
                    "IP forwarding was off; turned it on for sandbox egress"
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_default_route() {
        let t =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth1\t0010A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                 eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_route_iface(t).as_deref(), Some("eth0"));
        assert_eq!(default_route_iface("Iface\tDestination\n"), None);
    }
}

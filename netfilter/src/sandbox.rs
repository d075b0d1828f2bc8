//! The validated description of one sandbox's network, which `apply` turns
//! into nftables objects. Constructors check everything, so a
//! [`SandboxNet`] that exists is one the kernel will accept.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::error::InvalidInput;
use crate::names::{SandboxId, TapName};

/// Most allow rules one sandbox may carry.
pub const MAX_ALLOW_RULES: usize = 64;
/// Most elements of one allow set (a rule with ports is two: TCP and UDP).
pub const MAX_ALLOW_ELEMS: usize = 2 * MAX_ALLOW_RULES;

fn invalid(msg: impl Into<String>) -> InvalidInput {
    InvalidInput::Net(msg.into())
}

/// A unicast Ethernet address (not multicast, not all-zero).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    /// Validates `bytes` as a unicast, non-zero MAC.
    pub fn new(bytes: [u8; 6]) -> Result<Self, InvalidInput> {
        if bytes == [0; 6] {
            return Err(invalid("guest MAC must not be 00:00:00:00:00:00"));
        }
        if bytes[0] & 1 != 0 {
            return Err(invalid(format!(
                "guest MAC {} is multicast",
                MacAddr(bytes)
            )));
        }
        Ok(MacAddr(bytes))
    }

    /// The six bytes.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl std::str::FromStr for MacAddr {
    type Err = InvalidInput;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let p = parts
                .next()
                .ok_or_else(|| invalid(format!("MAC {s:?} has fewer than 6 bytes")))?;
            if p.len() != 2 {
                return Err(invalid(format!(
                    "MAC {s:?}: byte {p:?} is not two hex digits"
                )));
            }
            *byte = u8::from_str_radix(p, 16)
                .map_err(|_| invalid(format!("MAC {s:?}: byte {p:?} is not hex")))?;
        }
        if parts.next().is_some() {
            return Err(invalid(format!("MAC {s:?} has more than 6 bytes")));
        }
        MacAddr::new(out)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An inclusive, non-empty range of TCP/UDP destination ports (1..=65535).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// `first..=last`; port 0 is not a destination.
    pub fn new(first: u16, last: u16) -> Result<Self, InvalidInput> {
        if first == 0 || first > last {
            return Err(invalid(format!(
                "port range {first}-{last} must satisfy 1 <= first <= last"
            )));
        }
        Ok(PortRange { first, last })
    }

    /// A single port.
    pub fn single(port: u16) -> Result<Self, InvalidInput> {
        PortRange::new(port, port)
    }

    /// First port.
    pub fn first(&self) -> u16 {
        self.first
    }

    /// Last port (inclusive).
    pub fn last(&self) -> u16 {
        self.last
    }
}

/// Destinations a sandbox may reach without a DNS pin: a CIDR, and
/// optionally only these TCP/UDP ports (otherwise every protocol and port).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AllowRule {
    net: IpNet,
    ports: Option<PortRange>,
}

impl AllowRule {
    /// Whether the two rules allow some destination in common (same family, addresses
    /// overlap, and their ports overlap or one has none). The kernel's interval sets
    /// refuse overlapping ranges, so a policy must not hold two such rules: merge them.
    pub fn overlaps(&self, other: &AllowRule) -> bool {
        let (a, b) = (self.net, other.net);
        let same_family = a.addr().is_ipv4() == b.addr().is_ipv4();
        let addrs = same_family && (a.contains(&b.network()) || b.contains(&a.network()));
        let ports = match (self.ports, other.ports) {
            (Some(x), Some(y)) => x.first() <= y.last() && y.first() <= x.last(),
            _ => true,
        };
        addrs && ports
    }

    /// Allows `net` (host bits are cleared), on `ports` if given.
    pub fn new(net: IpNet, ports: Option<PortRange>) -> Self {
        AllowRule {
            net: net.trunc(),
            ports,
        }
    }

    /// The destination network.
    pub fn net(&self) -> IpNet {
        self.net
    }

    /// The allowed ports, `None` for all.
    pub fn ports(&self) -> Option<PortRange> {
        self.ports
    }
}

/// Checks a policy's rules: at most [`MAX_ALLOW_RULES`], no two overlapping.
pub fn check_allow(rules: &[AllowRule]) -> Result<(), InvalidInput> {
    if rules.len() > MAX_ALLOW_RULES {
        return Err(invalid(format!(
            "{} allow rules, at most {MAX_ALLOW_RULES}",
            rules.len()
        )));
    }
    for (i, a) in rules.iter().enumerate() {
        if let Some(b) = rules[i + 1..].iter().find(|b| a.overlaps(b)) {
            let show = |r: &AllowRule| match r.ports() {
                Some(p) => format!("{} ports {}-{}", r.net(), p.first(), p.last()),
                None => format!("{} (all ports)", r.net()),
            };
            return Err(invalid(format!(
                "allow rules {} and {} overlap; merge them into one",
                show(a),
                show(b)
            )));
        }
    }
    Ok(())
}

/// What a sandbox may do on the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NetMode {
    /// Egress only to allow CIDRs and DNS pins; DNS to its resolver only.
    #[default]
    Confined,
    /// No network at all: every packet from the tap is counted and dropped
    /// (DNS included).
    Blocked,
}

/// The host interface that NATed sandbox traffic leaves through.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Uplink(TapName);

impl Uplink {
    /// Validates the uplink interface name.
    pub fn new(ifname: impl Into<String>) -> Result<Self, InvalidInput> {
        TapName::new(ifname).map(Uplink)
    }

    /// The interface name.
    pub fn ifname(&self) -> &TapName {
        &self.0
    }
}

/// One sandbox's network: identity, addresses, policy.
///
/// Built with [`SandboxNet::new`] and the `with_*` methods, each of which
/// validates, so an existing value is always consistent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxNet {
    id: SandboxId,
    tap: TapName,
    guest_mac: MacAddr,
    guest_ipv4: Ipv4Addr,
    host_ipv4: Ipv4Addr,
    ipv6: Option<(Ipv6Addr, Ipv6Addr)>,
    allow: Vec<AllowRule>,
    mode: NetMode,
    nat: Option<Uplink>,
}

fn check_unicast(what: &str, ip: IpAddr) -> Result<(), InvalidInput> {
    let bad = match ip {
        IpAddr::V4(a) => a.is_unspecified() || a.is_broadcast() || a.is_multicast(),
        IpAddr::V6(a) => {
            a.is_unspecified()
                || a.is_multicast()
                || a.is_loopback()
                || (a.segments()[0] & 0xffc0) == 0xfe80
        }
    };
    if bad {
        return Err(invalid(format!(
            "{what} {ip} must be a unicast, routable address"
        )));
    }
    Ok(())
}

impl SandboxNet {
    /// A confined sandbox with IPv4 only, no allow rules and no NAT.
    ///
    /// `host_ipv4` is the host side of the tap, where the sandbox's DNS
    /// resolver listens.
    pub fn new(
        id: SandboxId,
        tap: TapName,
        guest_mac: MacAddr,
        guest_ipv4: Ipv4Addr,
        host_ipv4: Ipv4Addr,
    ) -> Result<Self, InvalidInput> {
        check_unicast("guest IPv4", guest_ipv4.into())?;
        check_unicast("host IPv4", host_ipv4.into())?;
        if guest_ipv4.is_loopback() || host_ipv4.is_loopback() {
            return Err(invalid("tap addresses must not be loopback"));
        }
        if guest_ipv4 == host_ipv4 {
            return Err(invalid(format!(
                "guest and host IPv4 are both {guest_ipv4}"
            )));
        }
        Ok(SandboxNet {
            id,
            tap,
            guest_mac,
            guest_ipv4,
            host_ipv4,
            ipv6: None,
            allow: Vec::new(),
            mode: NetMode::Confined,
            nat: None,
        })
    }

    /// Gives the sandbox IPv6: its own address and the host's (resolver)
    /// address on the tap. Link-local addresses are rejected.
    pub fn with_ipv6(mut self, guest: Ipv6Addr, host: Ipv6Addr) -> Result<Self, InvalidInput> {
        check_unicast("guest IPv6", guest.into())?;
        check_unicast("host IPv6", host.into())?;
        if guest == host {
            return Err(invalid(format!("guest and host IPv6 are both {guest}")));
        }
        self.ipv6 = Some((guest, host));
        Ok(self)
    }

    /// Adds allow rules (at most [`MAX_ALLOW_RULES`] in total).
    pub fn with_allow(
        mut self,
        rules: impl IntoIterator<Item = AllowRule>,
    ) -> Result<Self, InvalidInput> {
        self.allow.extend(rules);
        check_allow(&self.allow)?;
        Ok(self)
    }

    /// Sets the mode.
    pub fn with_mode(mut self, mode: NetMode) -> Self {
        self.mode = mode;
        self
    }

    /// Masquerades the sandbox's traffic leaving through `uplink`.
    pub fn with_nat(mut self, uplink: Uplink) -> Result<Self, InvalidInput> {
        if uplink.ifname() == &self.tap {
            return Err(invalid(format!(
                "NAT uplink {} is the sandbox's own tap",
                self.tap
            )));
        }
        self.nat = Some(uplink);
        Ok(self)
    }

    /// The sandbox id.
    pub fn id(&self) -> &SandboxId {
        &self.id
    }
    /// The tap the sandbox's traffic arrives on.
    pub fn tap(&self) -> &TapName {
        &self.tap
    }
    /// The guest's MAC.
    pub fn guest_mac(&self) -> MacAddr {
        self.guest_mac
    }
    /// The guest's IPv4 address.
    pub fn guest_ipv4(&self) -> Ipv4Addr {
        self.guest_ipv4
    }
    /// The host's IPv4 address on the tap (the resolver).
    pub fn host_ipv4(&self) -> Ipv4Addr {
        self.host_ipv4
    }
    /// The guest's IPv6 address, if it has IPv6.
    pub fn guest_ipv6(&self) -> Option<Ipv6Addr> {
        self.ipv6.map(|(g, _)| g)
    }
    /// The host's IPv6 address on the tap, if the sandbox has IPv6.
    pub fn host_ipv6(&self) -> Option<Ipv6Addr> {
        self.ipv6.map(|(_, h)| h)
    }
    /// The allow rules.
    pub fn allow(&self) -> &[AllowRule] {
        &self.allow
    }
    /// The mode.
    pub fn mode(&self) -> NetMode {
        self.mode
    }
    /// The NAT uplink, if NAT is on.
    pub fn nat(&self) -> Option<&Uplink> {
        self.nat.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> SandboxNet {
        SandboxNet::new(
            SandboxId::new("sb").unwrap(),
            TapName::new("tap0").unwrap(),
            "02:00:00:00:00:01".parse().unwrap(),
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 1),
        )
        .unwrap()
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            "02:aa:bb:cc:dd:0f".parse::<MacAddr>().unwrap().octets(),
            [2, 0xaa, 0xbb, 0xcc, 0xdd, 0x0f]
        );
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "0g:00:00:00:00:01",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "2:0:0:0:0:1",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn port_ranges() {
        assert!(PortRange::new(0, 10).is_err());
        assert!(PortRange::new(20, 10).is_err());
        assert_eq!(PortRange::single(443).unwrap().last(), 443);
    }

    #[test]
    fn rejects_inconsistent_addresses() {
        let id = SandboxId::new("sb").unwrap();
        let tap = TapName::new("tap0").unwrap();
        let mac: MacAddr = "02:00:00:00:00:01".parse().unwrap();
        let a = Ipv4Addr::new(10, 0, 0, 2);
        for (g, h) in [
            (a, a),
            (Ipv4Addr::UNSPECIFIED, a),
            (a, Ipv4Addr::BROADCAST),
            (Ipv4Addr::new(224, 0, 0, 1), a),
            (Ipv4Addr::LOCALHOST, a),
        ] {
            assert!(
                SandboxNet::new(id.clone(), tap.clone(), mac, g, h).is_err(),
                "{g} {h}"
            );
        }
        let v6: Ipv6Addr = "fd00::2".parse().unwrap();
        assert!(base().with_ipv6(v6, v6).is_err());
        assert!(base()
            .with_ipv6("fe80::2".parse().unwrap(), "fd00::1".parse().unwrap())
            .is_err());
        assert!(base().with_ipv6(v6, "fd00::1".parse().unwrap()).is_ok());
    }

    #[test]
    fn overlapping_allow_rules_are_refused_with_both_named() {
        let r = |net: &str, p: Option<(u16, u16)>| {
            AllowRule::new(
                net.parse().unwrap(),
                p.map(|(a, b)| PortRange::new(a, b).unwrap()),
            )
        };
        let e = base()
            .with_allow([
                r("10.0.0.0/8", Some((80, 80))),
                r("10.1.0.0/16", Some((70, 90))),
            ])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("10.0.0.0/8 ports 80-80") && e.contains("10.1.0.0/16"),
            "{e}"
        );
        assert!(base()
            .with_allow([r("10.0.0.0/8", None), r("10.2.3.0/24", Some((443, 443)))])
            .is_err());
        // Disjoint addresses, disjoint ports, or different families do not overlap.
        assert!(base()
            .with_allow([
                r("10.0.0.0/16", Some((80, 80))),
                r("10.1.0.0/16", Some((80, 80))),
                r("10.0.0.0/16", Some((443, 443))),
                r("fd00::/8", None),
            ])
            .is_ok());
    }

    #[test]
    fn bounds_allow_rules_and_nat() {
        let rule = AllowRule::new("10.1.2.3/16".parse().unwrap(), None);
        assert_eq!(rule.net().to_string(), "10.1.0.0/16");
        let many = (0..=MAX_ALLOW_RULES as u32).map(|i| {
            AllowRule::new(
                format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap(),
                None,
            )
        });
        assert!(base().with_allow(many).is_err());
        assert!(
            base().with_allow([rule.clone(), rule.clone()]).is_err(),
            "duplicates overlap"
        );
        assert!(base().with_nat(Uplink::new("tap0").unwrap()).is_err());
        assert!(base().with_nat(Uplink::new("eth0").unwrap()).is_ok());
    }
}

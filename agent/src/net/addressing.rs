//! The node's sandbox address range and what each slot gets from it.
//!
//! Slot `i` owns the IPv4 /30 at `range + 4i` (host `.1`, guest `.2`) and the IPv6 /126 at
//! the same offset in the node's ULA /64 (host `::…1`, guest `::…2`), and its tap is
//! `cl<i>`. The host address is the guest's gateway and its DNS resolver.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// The default IPv4 range for sandboxes: 16,384 slots.
pub const DEFAULT_RANGE_V4: &str = "10.231.0.0/16";
/// The default IPv6 range (a ULA /64).
pub const DEFAULT_RANGE_V6: &str = "fd63:6c65:6176::/64";
/// Tap names are `cl` and the slot number.
pub const TAP_PREFIX: &str = "cl";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RangeError {
    #[error("sandbox range {0}: a prefix longer than /30 holds no slot; use e.g. /16")]
    TooSmall(Ipv4Net),
    #[error("sandbox IPv6 range {0}: use a /64 to /120 (each slot takes a /126)")]
    V6Size(Ipv6Net),
}

/// Where sandbox addresses come from on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeRange {
    v4: Ipv4Net,
    v6: Ipv6Net,
}

impl Default for NodeRange {
    fn default() -> Self {
        NodeRange::new(
            DEFAULT_RANGE_V4.parse().expect("valid default"),
            DEFAULT_RANGE_V6.parse().expect("valid default"),
        )
        .expect("the default range is valid")
    }
}

impl NodeRange {
    pub fn new(v4: Ipv4Net, v6: Ipv6Net) -> Result<Self, RangeError> {
        let (v4, v6) = (v4.trunc(), v6.trunc());
        if v4.prefix_len() > 30 {
            return Err(RangeError::TooSmall(v4));
        }
        if !(64..=120).contains(&v6.prefix_len()) {
            return Err(RangeError::V6Size(v6));
        }
        Ok(NodeRange { v4, v6 })
    }

    pub fn v4(&self) -> Ipv4Net {
        self.v4
    }

    /// How many slots the range holds (IPv4 bounds it; IPv6 always has more room).
    pub fn slots(&self) -> u32 {
        let v4 = 1u64 << (32 - u32::from(self.v4.prefix_len()) - 2);
        let v6 = 1u128 << (128 - u32::from(self.v6.prefix_len()) - 2).min(32);
        // Tap names are at most 15 characters; `cl` + 13 digits never runs out.
        u32::try_from(v4.min(v6 as u64)).unwrap_or(u32::MAX)
    }

    /// Slot `index`'s addresses; `None` outside the range.
    pub fn slot(&self, index: u32) -> Option<SlotAddrs> {
        if index >= self.slots() {
            return None;
        }
        let base4 = u32::from(self.v4.network()) + index * 4;
        let base6 = u128::from(self.v6.network()) + u128::from(index) * 4;
        Some(SlotAddrs {
            index,
            tap: format!("{TAP_PREFIX}{index}"),
            host4: Ipv4Addr::from(base4 + 1),
            guest4: Ipv4Addr::from(base4 + 2),
            host6: Ipv6Addr::from(base6 + 1),
            guest6: Ipv6Addr::from(base6 + 2),
        })
    }

    /// The slot a tap name belongs to, if it is one of ours.
    pub fn index_of_tap(tap: &str) -> Option<u32> {
        let digits = tap.strip_prefix(TAP_PREFIX)?;
        if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
            return None;
        }
        digits.parse().ok()
    }
}

/// What one slot holds besides its chains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotAddrs {
    pub index: u32,
    pub tap: String,
    pub host4: Ipv4Addr,
    pub guest4: Ipv4Addr,
    pub host6: Ipv6Addr,
    pub guest6: Ipv6Addr,
}

/// The IPv4 prefix of a slot's point-to-point link.
pub const PREFIX4: u8 = 30;
/// The IPv6 prefix of a slot's link.
pub const PREFIX6: u8 = 126;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_disjoint_quads() {
        let r = NodeRange::default();
        assert_eq!(r.slots(), 16_384);
        let s0 = r.slot(0).unwrap();
        assert_eq!(
            (s0.host4, s0.guest4),
            ("10.231.0.1".parse().unwrap(), "10.231.0.2".parse().unwrap())
        );
        assert_eq!(s0.tap, "cl0");
        let s5 = r.slot(5).unwrap();
        assert_eq!(s5.guest4, "10.231.0.22".parse::<Ipv4Addr>().unwrap());
        assert_eq!(s5.guest6, "fd63:6c65:6176::16".parse::<Ipv6Addr>().unwrap());
        let last = r.slot(r.slots() - 1).unwrap();
        assert_eq!(last.guest4, "10.231.255.254".parse::<Ipv4Addr>().unwrap());
        assert!(r.slot(r.slots()).is_none());
        assert!(last.tap.len() <= 15);
    }

    #[test]
    fn tap_names_map_back_to_slots() {
        assert_eq!(NodeRange::index_of_tap("cl17"), Some(17));
        for bad in ["cl", "cl017", "eth0", "clx", "cl-1"] {
            assert_eq!(NodeRange::index_of_tap(bad), None, "{bad}");
        }
    }

    #[test]
    fn ranges_too_small_are_refused() {
        let v6 = DEFAULT_RANGE_V6.parse().unwrap();
        assert!(NodeRange::new("10.0.0.0/31".parse().unwrap(), v6).is_err());
        assert!(
            NodeRange::new("10.0.0.0/30".parse().unwrap(), v6)
                .unwrap()
                .slots()
                == 1
        );
        assert!(NodeRange::new(
            "10.0.0.0/16".parse().unwrap(),
            "fd00::/127".parse().unwrap()
        )
        .is_err());
    }
}

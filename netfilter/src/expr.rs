//! A small, pure description of nftables rule expressions. The plan is built
//! from these (and unit-tested as data); `nl::encode` is the only place that
//! turns them into libnftnl objects.

/// nftables registers. Single matches use the 16-byte `REG_1` like `nft`
/// does; concatenations need the 4-byte registers so fields sit back to back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reg {
    Verdict,
    R1,
    /// 4-byte register `NFT_REG32_00 + n`.
    R32(u32),
}

impl Reg {
    pub(crate) fn raw(self) -> u32 {
        match self {
            Reg::Verdict => libc::NFT_REG_VERDICT as u32,
            Reg::R1 => libc::NFT_REG_1 as u32,
            Reg::R32(n) => libc::NFT_REG32_00 as u32 + n,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetaKey {
    NfProto,
    L4Proto,
    IifType,
    OifName,
    IifName,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Base {
    Link,
    Network,
    Transport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Eq,
    Neq,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Accept,
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Expr {
    Meta {
        key: MetaKey,
        dreg: Reg,
    },
    Payload {
        base: Base,
        offset: u32,
        len: u32,
        dreg: Reg,
    },
    Cmp {
        sreg: Reg,
        op: CmpOp,
        data: Vec<u8>,
    },
    /// `dreg = (sreg & mask) ^ 0`.
    Mask {
        reg: Reg,
        mask: Vec<u8>,
    },
    CtState {
        dreg: Reg,
    },
    /// Set membership (`dreg: None`) or map lookup (`dreg: Some`).
    Lookup {
        set: String,
        sreg: Reg,
        dreg: Option<Reg>,
    },
    /// Update the named counter object.
    Counter {
        name: String,
    },
    Masquerade,
    Verdict(Verdict),
}

/// Builds the expression list of one rule, in `nft` reading order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct RuleExprs(pub(crate) Vec<Expr>);

pub(crate) const NFPROTO_IPV4: u8 = libc::NFPROTO_IPV4 as u8;
pub(crate) const NFPROTO_IPV6: u8 = libc::NFPROTO_IPV6 as u8;
pub(crate) const IPPROTO_TCP: u8 = libc::IPPROTO_TCP as u8;
pub(crate) const IPPROTO_UDP: u8 = libc::IPPROTO_UDP as u8;
pub(crate) const IPPROTO_ICMPV6: u8 = libc::IPPROTO_ICMPV6 as u8;
const ARPHRD_ETHER: u16 = 1;
const CT_INVALID: u32 = 1;
const CT_ESTABLISHED: u32 = 1 << 1;
const CT_RELATED: u32 = 1 << 2;

/// Where an address field sits in the network header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AddrField {
    Src,
    Dst,
}

impl RuleExprs {
    pub(crate) fn new() -> Self {
        RuleExprs(Vec::new())
    }

    fn push(mut self, e: Expr) -> Self {
        self.0.push(e);
        self
    }

    fn cmp(self, op: CmpOp, data: Vec<u8>) -> Self {
        self.push(Expr::Cmp {
            sreg: Reg::R1,
            op,
            data,
        })
    }

    /// `meta nfproto ipv4|ipv6`
    pub(crate) fn nfproto(self, proto: u8) -> Self {
        self.push(Expr::Meta {
            key: MetaKey::NfProto,
            dreg: Reg::R1,
        })
        .cmp(CmpOp::Eq, vec![proto])
    }

    /// `meta l4proto tcp|udp|...`
    pub(crate) fn l4proto(self, proto: u8) -> Self {
        self.push(Expr::Meta {
            key: MetaKey::L4Proto,
            dreg: Reg::R1,
        })
        .cmp(CmpOp::Eq, vec![proto])
    }

    /// `meta iiftype != ether`
    pub(crate) fn iiftype_not_ether(self) -> Self {
        self.push(Expr::Meta {
            key: MetaKey::IifType,
            dreg: Reg::R1,
        })
        .cmp(CmpOp::Neq, ARPHRD_ETHER.to_ne_bytes().to_vec())
    }

    /// `oifname "<name>"`
    pub(crate) fn oifname(self, key: [u8; 16]) -> Self {
        self.push(Expr::Meta {
            key: MetaKey::OifName,
            dreg: Reg::R1,
        })
        .cmp(CmpOp::Eq, key.to_vec())
    }

    /// `ether saddr != <mac>`, with the `meta iiftype ether` guard `nft`
    /// itself adds (so `nft list` prints it as `ether saddr`).
    pub(crate) fn ether_saddr_not(self, mac: [u8; 6]) -> Self {
        self.push(Expr::Meta {
            key: MetaKey::IifType,
            dreg: Reg::R1,
        })
        .cmp(CmpOp::Eq, ARPHRD_ETHER.to_ne_bytes().to_vec())
        .push(Expr::Payload {
            base: Base::Link,
            offset: 6,
            len: 6,
            dreg: Reg::R1,
        })
        .cmp(CmpOp::Neq, mac.to_vec())
    }

    fn load_addr(self, v6: bool, field: AddrField, dreg: Reg) -> Self {
        let (offset, len) = match (v6, field) {
            (false, AddrField::Src) => (12, 4),
            (false, AddrField::Dst) => (16, 4),
            (true, AddrField::Src) => (8, 16),
            (true, AddrField::Dst) => (24, 16),
        };
        self.push(Expr::Payload {
            base: Base::Network,
            offset,
            len,
            dreg,
        })
    }

    /// `ip[6] saddr|daddr ==|!= <addr>` for a full address.
    pub(crate) fn addr(self, field: AddrField, op: CmpOp, addr: &[u8]) -> Self {
        self.load_addr(addr.len() == 16, field, Reg::R1)
            .cmp(op, addr.to_vec())
    }

    /// `ip[6] daddr <net>/<prefix>`: masks only when the prefix is partial.
    pub(crate) fn daddr_in(self, net: &[u8], prefix: u8) -> Self {
        let bits = net.len() * 8;
        let this = self.load_addr(net.len() == 16, AddrField::Dst, Reg::R1);
        let this = if (prefix as usize) < bits {
            let mask: Vec<u8> = (0..net.len())
                .map(|i| {
                    let keep = (prefix as usize).saturating_sub(i * 8).min(8);
                    (0xffu16 << (8 - keep)) as u8
                })
                .collect();
            this.push(Expr::Mask { reg: Reg::R1, mask })
        } else {
            this
        };
        this.cmp(CmpOp::Eq, net.to_vec())
    }

    /// `th dport <op> <port>` (caller has matched the L4 protocol).
    pub(crate) fn dport(self, op: CmpOp, port: u16) -> Self {
        let this = self.push(Expr::Payload {
            base: Base::Transport,
            offset: 2,
            len: 2,
            dreg: Reg::R1,
        });
        this.cmp(op, port.to_be_bytes().to_vec())
    }

    /// `icmpv6 type <t>` (caller has matched l4proto icmpv6).
    pub(crate) fn icmpv6_type(self, t: u8) -> Self {
        self.push(Expr::Payload {
            base: Base::Transport,
            offset: 0,
            len: 1,
            dreg: Reg::R1,
        })
        .cmp(CmpOp::Eq, vec![t])
    }

    /// `ip6 hoplimit 255`: on-link only (RFC 4861 §7.1).
    pub(crate) fn hoplimit_255(self) -> Self {
        self.push(Expr::Payload {
            base: Base::Network,
            offset: 7,
            len: 1,
            dreg: Reg::R1,
        })
        .cmp(CmpOp::Eq, vec![255])
    }

    fn ct_state_any(self, bits: u32, op: CmpOp) -> Self {
        self.push(Expr::CtState { dreg: Reg::R1 })
            .push(Expr::Mask {
                reg: Reg::R1,
                mask: bits.to_ne_bytes().to_vec(),
            })
            .cmp(op, 0u32.to_ne_bytes().to_vec())
    }

    /// `ct state invalid`
    pub(crate) fn ct_invalid(self) -> Self {
        self.ct_state_any(CT_INVALID, CmpOp::Neq)
    }

    /// `ct state established,related`
    pub(crate) fn ct_established(self) -> Self {
        self.ct_state_any(CT_ESTABLISHED | CT_RELATED, CmpOp::Neq)
    }

    /// `ip[6] daddr . th dport @set` (caller has matched nfproto and l4proto).
    pub(crate) fn daddr_dport_in(self, v6: bool, set: &str) -> Self {
        // Address fills R32(0..4), the port goes right after it.
        let port_reg = if v6 { Reg::R32(4) } else { Reg::R32(1) };
        self.load_addr(v6, AddrField::Dst, Reg::R32(0))
            .dport_then_lookup(port_reg, set)
    }

    /// `th dport` into `port_reg`, then a lookup of the key built from R32(0) on.
    fn dport_then_lookup(self, port_reg: Reg, set: &str) -> Self {
        self.push(Expr::Payload {
            base: Base::Transport,
            offset: 2,
            len: 2,
            dreg: port_reg,
        })
        .push(Expr::Lookup {
            set: set.to_string(),
            sreg: Reg::R32(0),
            dreg: None,
        })
    }

    /// `ip[6] daddr . meta l4proto . th dport @set` (caller has matched nfproto). A packet
    /// without a transport header to read never matches.
    pub(crate) fn daddr_proto_dport_in(self, v6: bool, set: &str) -> Self {
        // Address fills R32(0..4), then one register each for protocol and port.
        let (proto_reg, port_reg) = if v6 {
            (Reg::R32(4), Reg::R32(5))
        } else {
            (Reg::R32(1), Reg::R32(2))
        };
        self.load_addr(v6, AddrField::Dst, Reg::R32(0))
            .push(Expr::Meta {
                key: MetaKey::L4Proto,
                dreg: proto_reg,
            })
            .dport_then_lookup(port_reg, set)
    }

    /// `iifname vmap @map`
    pub(crate) fn iifname_vmap(self, map: &str) -> Self {
        self.ifname_vmap(MetaKey::IifName, map)
    }

    /// `oifname vmap @map`
    pub(crate) fn oifname_vmap(self, map: &str) -> Self {
        self.ifname_vmap(MetaKey::OifName, map)
    }

    fn ifname_vmap(self, key: MetaKey, map: &str) -> Self {
        self.push(Expr::Meta { key, dreg: Reg::R1 })
            .push(Expr::Lookup {
                set: map.to_string(),
                sreg: Reg::R1,
                dreg: Some(Reg::Verdict),
            })
    }

    /// `ip[6] saddr vmap @map`
    pub(crate) fn saddr_vmap(self, v6: bool, map: &str) -> Self {
        self.load_addr(v6, AddrField::Src, Reg::R1)
            .push(Expr::Lookup {
                set: map.to_string(),
                sreg: Reg::R1,
                dreg: Some(Reg::Verdict),
            })
    }

    /// `counter name "<name>"`
    pub(crate) fn counter(self, name: &str) -> Self {
        self.push(Expr::Counter {
            name: name.to_string(),
        })
    }

    pub(crate) fn masquerade(self) -> Self {
        self.push(Expr::Masquerade)
    }

    pub(crate) fn accept(self) -> Self {
        self.push(Expr::Verdict(Verdict::Accept))
    }

    pub(crate) fn drop(self) -> Self {
        self.push(Expr::Verdict(Verdict::Drop))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_of(e: &RuleExprs) -> Option<Vec<u8>> {
        e.0.iter().find_map(|x| match x {
            Expr::Mask { mask, .. } => Some(mask.clone()),
            _ => None,
        })
    }

    #[test]
    fn cidr_masks() {
        let r = RuleExprs::new().daddr_in(&[169, 254, 0, 0], 16);
        assert_eq!(mask_of(&r), Some(vec![255, 255, 0, 0]));
        let r = RuleExprs::new().daddr_in(&[10, 0, 0, 0], 9);
        assert_eq!(mask_of(&r), Some(vec![255, 128, 0, 0]));
        let r = RuleExprs::new().daddr_in(&[10, 0, 0, 1], 32);
        assert_eq!(mask_of(&r), None, "a host match needs no mask");
        let r = RuleExprs::new().daddr_in(&[0; 4], 0);
        assert_eq!(mask_of(&r), Some(vec![0, 0, 0, 0]));
        let mut v6 = [0u8; 16];
        v6[0] = 0xfd;
        let r = RuleExprs::new().daddr_in(&v6, 12);
        let mut want = vec![0u8; 16];
        want[0] = 0xff;
        want[1] = 0xf0;
        assert_eq!(mask_of(&r), Some(want));
    }

    #[test]
    fn concat_lookup_uses_adjacent_registers() {
        let r = RuleExprs::new().daddr_dport_in(false, "pin4-t");
        assert_eq!(
            r.0,
            vec![
                Expr::Payload {
                    base: Base::Network,
                    offset: 16,
                    len: 4,
                    dreg: Reg::R32(0)
                },
                Expr::Payload {
                    base: Base::Transport,
                    offset: 2,
                    len: 2,
                    dreg: Reg::R32(1)
                },
                Expr::Lookup {
                    set: "pin4-t".into(),
                    sreg: Reg::R32(0),
                    dreg: None
                },
            ]
        );
        let r = RuleExprs::new().daddr_dport_in(true, "pin6-t");
        assert_eq!(
            r.0[1],
            Expr::Payload {
                base: Base::Transport,
                offset: 2,
                len: 2,
                dreg: Reg::R32(4)
            }
        );
        assert_eq!(Reg::R32(4).raw(), libc::NFT_REG32_04 as u32);
    }

    #[test]
    fn ports_are_big_endian() {
        let r = RuleExprs::new().dport(CmpOp::Eq, 53);
        assert_eq!(
            r.0[1],
            Expr::Cmp {
                sreg: Reg::R1,
                op: CmpOp::Eq,
                data: vec![0, 53]
            }
        );
    }
}

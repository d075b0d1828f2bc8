//! What goes into each netlink batch, as plain data.
//!
//! Like Mullvad's firewall, the whole state change for one call is computed
//! here by one function and then sent as one batch; nothing is applied rule
//! by rule. This module is pure (no sockets), so batch construction is
//! unit-tested.

use std::net::{IpAddr, Ipv6Addr};

use crate::expr::{
    AddrField, CmpOp, RuleExprs, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, NFPROTO_IPV4,
    NFPROTO_IPV6,
};
use crate::names::{base, owner_comment, ObjectKind, ObjectNames, SandboxId, TapName, TABLE};
use crate::sandbox::{AllowRule, NetMode, SandboxNet};

/// Cloud metadata endpoints, dropped even when an allow CIDR covers them.
pub(crate) const METADATA_V4: ([u8; 4], u8) = ([169, 254, 0, 0], 16);
/// AWS's IPv6 metadata endpoint `fd00:ec2::254`.
pub(crate) const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// The data type of a set key, as `nft` numbers them (so `nft list` prints
/// them by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyType {
    IfName,
    Ipv4,
    Ipv6,
    Ipv4Port,
    Ipv6Port,
    /// `ipv4_addr . inet_proto . inet_service` (the allow sets).
    Ipv4ProtoPort,
    /// `ipv6_addr . inet_proto . inet_service`.
    Ipv6ProtoPort,
}

impl KeyType {
    const TYPE_IPADDR: u32 = 7;
    const TYPE_IP6ADDR: u32 = 8;
    const TYPE_INET_PROTO: u32 = 12;
    const TYPE_INET_SERVICE: u32 = 13;
    const TYPE_IFNAME: u32 = 41;
    /// nft packs concatenated types 6 bits per field.
    const TYPE_BITS: u32 = 6;

    pub(crate) fn nft_type(self) -> u32 {
        match self {
            KeyType::IfName => Self::TYPE_IFNAME,
            KeyType::Ipv4 => Self::TYPE_IPADDR,
            KeyType::Ipv6 => Self::TYPE_IP6ADDR,
            KeyType::Ipv4Port => (Self::TYPE_IPADDR << Self::TYPE_BITS) | Self::TYPE_INET_SERVICE,
            KeyType::Ipv6Port => (Self::TYPE_IP6ADDR << Self::TYPE_BITS) | Self::TYPE_INET_SERVICE,
            KeyType::Ipv4ProtoPort => {
                (((Self::TYPE_IPADDR << Self::TYPE_BITS) | Self::TYPE_INET_PROTO)
                    << Self::TYPE_BITS)
                    | Self::TYPE_INET_SERVICE
            }
            KeyType::Ipv6ProtoPort => {
                (((Self::TYPE_IP6ADDR << Self::TYPE_BITS) | Self::TYPE_INET_PROTO)
                    << Self::TYPE_BITS)
                    | Self::TYPE_INET_SERVICE
            }
        }
    }

    /// The length of each field of a concatenated key, unpadded (what the kernel's
    /// interval-concatenation backend needs to know); empty for plain keys.
    pub(crate) fn concat_fields(self) -> &'static [u8] {
        match self {
            KeyType::Ipv4ProtoPort => &[4, 1, 2],
            KeyType::Ipv6ProtoPort => &[16, 1, 2],
            _ => &[],
        }
    }

    /// Key length in bytes; concatenated fields are each padded to 4 bytes.
    pub(crate) fn len(self) -> u32 {
        match self {
            KeyType::IfName => 16,
            KeyType::Ipv4 => 4,
            KeyType::Ipv6 => 16,
            KeyType::Ipv4Port => 8,
            KeyType::Ipv6Port => 20,
            KeyType::Ipv4ProtoPort => 12,
            KeyType::Ipv6ProtoPort => 24,
        }
    }
}

/// A base-chain hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BaseHook {
    /// filter, hook forward, priority filter (0).
    Forward,
    /// filter, hook input, priority filter (0).
    Input,
    /// nat, hook postrouting, priority srcnat (100).
    Postrouting,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChainSpec {
    pub name: String,
    pub hook: Option<BaseHook>,
    pub comment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SetSpec {
    pub name: String,
    pub key: KeyType,
    /// A `: verdict` map rather than a plain set.
    pub verdict_map: bool,
    /// `flags timeout`: elements expire.
    pub timeout: bool,
    /// `size N`: the kernel refuses elements beyond this many.
    pub size: Option<u32>,
    /// `flags interval` (with a concatenated key: ranges in every field).
    pub interval: bool,
    pub comment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuleSpec {
    pub chain: String,
    pub exprs: RuleExprs,
    pub comment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Elem {
    pub key: Vec<u8>,
    /// For interval sets: the range's last key.
    pub key_end: Option<Vec<u8>>,
    /// For verdict maps: `goto <chain>`.
    pub goto: Option<String>,
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ElemsSpec {
    pub set: String,
    pub key: KeyType,
    pub verdict_map: bool,
    pub elems: Vec<Elem>,
    /// Fail if an element exists (used for dispatch entries: one tap, one
    /// sandbox). Pins are not exclusive: re-pinning refreshes the timeout.
    pub exclusive: bool,
}

/// One netlink message of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    AddTable {
        comment: String,
    },
    AddChain(ChainSpec),
    AddSet(SetSpec),
    AddCounter {
        name: String,
        comment: String,
    },
    AddRule(RuleSpec),
    AddElems(ElemsSpec),
    DelElems(ElemsSpec),
    /// Removes every element of a set.
    FlushSet(String),
    DelChain(String),
    DelSet(String),
    DelCounter(String),
}

impl Op {
    /// `nft`-like wording of this step, for error messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            Op::AddTable { .. } => format!("add table inet {TABLE}"),
            Op::AddChain(c) => format!("add chain inet {TABLE} {}", c.name),
            Op::AddSet(s) => format!("add {} inet {TABLE} {}", set_word(s.verdict_map), s.name),
            Op::AddCounter { name, .. } => format!("add counter inet {TABLE} {name}"),
            Op::AddRule(r) => format!(
                "add rule inet {TABLE} {}{}",
                r.chain,
                r.comment
                    .as_ref()
                    .map(|c| format!(" (comment \"{c}\")"))
                    .unwrap_or_default()
            ),
            Op::AddElems(e) => format!(
                "add element inet {TABLE} {} ({} elements)",
                e.set,
                e.elems.len()
            ),
            Op::DelElems(e) => format!(
                "delete element inet {TABLE} {} ({} elements)",
                e.set,
                e.elems.len()
            ),
            Op::FlushSet(n) => format!("flush set inet {TABLE} {n}"),
            Op::DelChain(n) => format!("delete chain inet {TABLE} {n}"),
            Op::DelSet(n) => format!("delete set inet {TABLE} {n}"),
            Op::DelCounter(n) => format!("delete counter inet {TABLE} {n}"),
        }
    }
}

fn set_word(map: bool) -> &'static str {
    if map {
        "map"
    } else {
        "set"
    }
}

/// The shared objects, created once: the table, the dispatch maps and the
/// base chains, each with its one dispatch rule.
pub(crate) fn base_plan() -> Vec<Op> {
    let map = |name: &str, key, comment: &str| {
        Op::AddSet(SetSpec {
            name: name.into(),
            key,
            verdict_map: true,
            timeout: false,
            size: None,
            interval: false,
            comment: Some(comment.into()),
        })
    };
    let chain = |name: &str, hook, comment: &str| {
        Op::AddChain(ChainSpec {
            name: name.into(),
            hook: Some(hook),
            comment: Some(comment.into()),
        })
    };
    let rule = |chain: &str, exprs, comment: &str| {
        Op::AddRule(RuleSpec {
            chain: chain.into(),
            exprs,
            comment: Some(comment.into()),
        })
    };
    vec![
        Op::AddTable {
            comment: "cleave sandboxes; managed by cleave-agent, do not edit".into(),
        },
        map(base::FWD_MAP, KeyType::IfName, "tap -> its forward chain"),
        map(base::IN_MAP, KeyType::IfName, "tap -> its input chain"),
        map(base::TO_MAP, KeyType::IfName, "tap -> its inbound chain"),
        map(
            base::NAT4_MAP,
            KeyType::Ipv4,
            "NATed guest IPv4 -> its nat chain",
        ),
        map(
            base::NAT6_MAP,
            KeyType::Ipv6,
            "NATed guest IPv6 -> its nat chain",
        ),
        chain(
            base::FORWARD,
            BaseHook::Forward,
            "sandbox taps dispatch to their own chain; other traffic untouched",
        ),
        chain(
            base::INPUT,
            BaseHook::Input,
            "sandbox taps dispatch to their own chain; other traffic untouched",
        ),
        chain(
            base::POSTROUTING,
            BaseHook::Postrouting,
            "NAT for sandboxes that have it",
        ),
        rule(
            base::FORWARD,
            RuleExprs::new().iifname_vmap(base::FWD_MAP),
            "dispatch by tap",
        ),
        rule(
            base::FORWARD,
            RuleExprs::new().oifname_vmap(base::TO_MAP),
            "dispatch into a tap",
        ),
        rule(
            base::INPUT,
            RuleExprs::new().iifname_vmap(base::IN_MAP),
            "dispatch by tap",
        ),
        rule(
            base::POSTROUTING,
            RuleExprs::new()
                .nfproto(NFPROTO_IPV4)
                .saddr_vmap(false, base::NAT4_MAP),
            "dispatch by guest address",
        ),
        rule(
            base::POSTROUTING,
            RuleExprs::new()
                .nfproto(NFPROTO_IPV6)
                .saddr_vmap(true, base::NAT6_MAP),
            "dispatch by guest address",
        ),
    ]
}

/// Every kernel object one sandbox owns. Computed from a [`SandboxNet`] at
/// apply time, or discovered from the kernel's table after a restart;
/// teardown removes exactly this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Footprint {
    pub tap: TapName,
    pub owner: Option<SandboxId>,
    pub chains: Vec<String>,
    pub sets: Vec<String>,
    pub counters: Vec<String>,
    /// Dispatch map entries: (map, key type, key).
    pub elems: Vec<(&'static str, KeyType, Vec<u8>)>,
}

impl Footprint {
    pub(crate) fn of(net: &SandboxNet) -> Footprint {
        let n = ObjectNames::new(net.tap());
        let mut chains = vec![
            n.name(ObjectKind::ForwardChain),
            n.name(ObjectKind::InputChain),
            n.name(ObjectKind::ToGuestChain),
        ];
        let key = net.tap().ifname_key().to_vec();
        let mut elems = vec![
            (base::FWD_MAP, KeyType::IfName, key.clone()),
            (base::IN_MAP, KeyType::IfName, key.clone()),
            (base::TO_MAP, KeyType::IfName, key),
        ];
        if net.nat().is_some() {
            chains.push(n.name(ObjectKind::NatChain));
            elems.push((
                base::NAT4_MAP,
                KeyType::Ipv4,
                net.guest_ipv4().octets().to_vec(),
            ));
            if let Some(g6) = net.guest_ipv6() {
                elems.push((base::NAT6_MAP, KeyType::Ipv6, g6.octets().to_vec()));
            }
        }
        Footprint {
            tap: net.tap().clone(),
            owner: Some(net.id().clone()),
            chains,
            sets: vec![
                n.name(ObjectKind::Pin4Set),
                n.name(ObjectKind::Pin6Set),
                n.name(ObjectKind::Allow4Set),
                n.name(ObjectKind::Allow6Set),
            ],
            counters: vec![
                n.name(ObjectKind::ForwardDropCounter),
                n.name(ObjectKind::InputDropCounter),
            ],
            elems,
        }
    }

    /// Number of kernel objects (for logs and leftover counts).
    pub(crate) fn object_count(&self) -> usize {
        self.chains.len() + self.sets.len() + self.counters.len() + self.elems.len()
    }
}

fn rule(chain: &str, comment: Option<&str>, exprs: RuleExprs) -> Op {
    Op::AddRule(RuleSpec {
        chain: chain.to_string(),
        exprs,
        comment: comment.map(str::to_string),
    })
}

/// Rules shared by the forward and input chains: drop what is invalid or
/// not from this guest's own MAC and addresses.
fn anti_spoof(chain: &str, net: &SandboxNet) -> Vec<Op> {
    let mut ops = vec![
        rule(chain, Some("invalid"), RuleExprs::new().ct_invalid().drop()),
        rule(
            chain,
            Some("no L2 header, cannot check MAC"),
            RuleExprs::new().iiftype_not_ether().drop(),
        ),
        rule(
            chain,
            Some("spoofed MAC"),
            RuleExprs::new()
                .ether_saddr_not(net.guest_mac().octets())
                .drop(),
        ),
        rule(
            chain,
            Some("spoofed IPv4 source"),
            RuleExprs::new()
                .nfproto(NFPROTO_IPV4)
                .addr(AddrField::Src, CmpOp::Neq, &net.guest_ipv4().octets())
                .drop(),
        ),
    ];
    ops.push(match net.guest_ipv6() {
        Some(g6) => rule(
            chain,
            Some("spoofed IPv6 source"),
            RuleExprs::new()
                .nfproto(NFPROTO_IPV6)
                .addr(AddrField::Src, CmpOp::Neq, &g6.octets())
                .drop(),
        ),
        None => rule(
            chain,
            Some("sandbox has no IPv6"),
            RuleExprs::new().nfproto(NFPROTO_IPV6).drop(),
        ),
    });
    ops
}

/// The policy's lookups: one per family, into the tap's allow sets. The policy itself is
/// elements of those sets ([`policy_plan`]), so changing it never adds a rule.
fn allow_rules(chain: &str, n: &ObjectNames) -> Vec<Op> {
    [
        (false, NFPROTO_IPV4, n.name(ObjectKind::Allow4Set)),
        (true, NFPROTO_IPV6, n.name(ObjectKind::Allow6Set)),
    ]
    .into_iter()
    .map(|(v6, proto, set)| {
        rule(
            chain,
            Some("policy"),
            RuleExprs::new()
                .nfproto(proto)
                .daddr_proto_dport_in(v6, &set)
                .accept(),
        )
    })
    .collect()
}

/// `addr . proto . port` with each field padded to 4 bytes, as the registers hold it.
fn allow_key(addr: &[u8], proto: u8, port: u16) -> Vec<u8> {
    let mut k = addr.to_vec();
    k.extend_from_slice(&[proto, 0, 0, 0]);
    k.extend_from_slice(&port.to_be_bytes());
    k.extend_from_slice(&[0, 0]);
    k
}

/// The interval elements of one allow rule: every protocol and port of the network, or
/// TCP and UDP on its port range.
pub(crate) fn allow_elems(rule: &AllowRule) -> (bool, Vec<Elem>) {
    let net = rule.net();
    let (v6, first, last) = match (net.network(), net.broadcast()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (false, a.octets().to_vec(), b.octets().to_vec()),
        (IpAddr::V6(a), IpAddr::V6(b)) => (true, a.octets().to_vec(), b.octets().to_vec()),
        _ => unreachable!("a network and its last address share a family"),
    };
    let ranges: Vec<(u8, u8, u16, u16)> = match rule.ports() {
        None => vec![(0, 255, 0, 65535)],
        Some(p) => [IPPROTO_TCP, IPPROTO_UDP]
            .into_iter()
            .map(|l4| (l4, l4, p.first(), p.last()))
            .collect(),
    };
    let elems = ranges
        .into_iter()
        .map(|(p0, p1, d0, d1)| Elem {
            key: allow_key(&first, p0, d0),
            key_end: Some(allow_key(&last, p1, d1)),
            goto: None,
            timeout_ms: None,
        })
        .collect();
    (v6, elems)
}

/// Puts a policy into a tap's allow sets: both flushed, then the new elements, in one
/// batch (the old policy holds until the new one is whole).
pub(crate) fn policy_plan(tap: &TapName, rules: &[AllowRule]) -> Vec<Op> {
    let n = ObjectNames::new(tap);
    let mut ops = vec![
        Op::FlushSet(n.name(ObjectKind::Allow4Set)),
        Op::FlushSet(n.name(ObjectKind::Allow6Set)),
    ];
    ops.extend(allow_elem_ops(&n, rules));
    ops
}

fn allow_elem_ops(n: &ObjectNames, rules: &[AllowRule]) -> Vec<Op> {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for r in rules {
        let (is_v6, elems) = allow_elems(r);
        if is_v6 {
            v6.extend(elems)
        } else {
            v4.extend(elems)
        }
    }
    add_elem_ops(
        n,
        [
            (v4, ObjectKind::Allow4Set, KeyType::Ipv4ProtoPort),
            (v6, ObjectKind::Allow6Set, KeyType::Ipv6ProtoPort),
        ],
        true,
    )
}

/// Adds each list of elements to its set, in messages of at most [`MAX_ELEMS_PER_MSG`].
fn add_elem_ops(
    n: &ObjectNames,
    lists: [(Vec<Elem>, ObjectKind, KeyType); 2],
    exclusive: bool,
) -> Vec<Op> {
    let mut ops = Vec::new();
    for (elems, kind, key) in lists {
        for chunk in elems.chunks(MAX_ELEMS_PER_MSG) {
            ops.push(Op::AddElems(ElemsSpec {
                set: n.name(kind),
                key,
                verdict_map: false,
                elems: chunk.to_vec(),
                exclusive,
            }));
        }
    }
    ops
}

/// Returns a tap's sets to empty (policy and pins) so its slot can serve another sandbox.
pub(crate) fn release_plan(tap: &TapName) -> Vec<Op> {
    let n = ObjectNames::new(tap);
    [
        ObjectKind::Allow4Set,
        ObjectKind::Allow6Set,
        ObjectKind::Pin4Set,
        ObjectKind::Pin6Set,
    ]
    .into_iter()
    .map(|k| Op::FlushSet(n.name(k)))
    .collect()
}

fn forward_rules(net: &SandboxNet, n: &ObjectNames) -> Vec<Op> {
    let chain = n.name(ObjectKind::ForwardChain);
    let drop_counter = n.name(ObjectKind::ForwardDropCounter);
    let count_drop = |comment| {
        rule(
            &chain,
            Some(comment),
            RuleExprs::new().counter(&drop_counter).drop(),
        )
    };
    if net.mode() == NetMode::Blocked {
        return vec![count_drop("blocked: no network")];
    }
    let mut ops = anti_spoof(&chain, net);
    ops.push(rule(
        &chain,
        Some("replies and established flows"),
        RuleExprs::new().ct_established().accept(),
    ));
    ops.push(rule(
        &chain,
        Some("metadata endpoint"),
        RuleExprs::new()
            .nfproto(NFPROTO_IPV4)
            .daddr_in(&METADATA_V4.0, METADATA_V4.1)
            .counter(&drop_counter)
            .drop(),
    ));
    ops.push(rule(
        &chain,
        Some("metadata endpoint"),
        RuleExprs::new()
            .nfproto(NFPROTO_IPV6)
            .addr(AddrField::Dst, CmpOp::Eq, &METADATA_V6.octets())
            .counter(&drop_counter)
            .drop(),
    ));
    ops.extend(allow_rules(&chain, n));
    for (v6, proto, set) in [
        (false, NFPROTO_IPV4, n.name(ObjectKind::Pin4Set)),
        (true, NFPROTO_IPV6, n.name(ObjectKind::Pin6Set)),
    ] {
        for l4 in [IPPROTO_TCP, IPPROTO_UDP] {
            ops.push(rule(
                &chain,
                Some("DNS pins"),
                RuleExprs::new()
                    .nfproto(proto)
                    .l4proto(l4)
                    .daddr_dport_in(v6, &set)
                    .accept(),
            ));
        }
    }
    ops.push(count_drop("everything else"));
    ops
}

fn input_rules(net: &SandboxNet, n: &ObjectNames) -> Vec<Op> {
    let chain = n.name(ObjectKind::InputChain);
    let drop_counter = n.name(ObjectKind::InputDropCounter);
    let count_drop = |comment| {
        rule(
            &chain,
            Some(comment),
            RuleExprs::new().counter(&drop_counter).drop(),
        )
    };
    if net.mode() == NetMode::Blocked {
        return vec![count_drop("blocked: no network")];
    }
    let mut ops = anti_spoof(&chain, net);
    let mut resolvers = vec![(NFPROTO_IPV4, net.host_ipv4().octets().to_vec())];
    if let Some(h6) = net.host_ipv6() {
        // Without neighbour discovery the guest cannot reach the host on IPv6.
        for t in [135u8, 136] {
            ops.push(rule(
                &chain,
                Some("IPv6 neighbour discovery"),
                RuleExprs::new()
                    .nfproto(NFPROTO_IPV6)
                    .l4proto(IPPROTO_ICMPV6)
                    .hoplimit_255()
                    .icmpv6_type(t)
                    .accept(),
            ));
        }
        resolvers.push((NFPROTO_IPV6, h6.octets().to_vec()));
    }
    for (proto, addr) in resolvers {
        for l4 in [IPPROTO_UDP, IPPROTO_TCP] {
            ops.push(rule(
                &chain,
                Some("DNS to its resolver"),
                RuleExprs::new()
                    .nfproto(proto)
                    .addr(AddrField::Dst, CmpOp::Eq, &addr)
                    .l4proto(l4)
                    .dport(CmpOp::Eq, 53)
                    .accept(),
            ));
        }
    }
    ops.push(count_drop("everything else to the host"));
    ops
}

/// Into the tap: only what answers the guest's own flows; nothing from outside can open
/// a connection to a guest.
fn to_guest_rules(net: &SandboxNet, n: &ObjectNames) -> Vec<Op> {
    let chain = n.name(ObjectKind::ToGuestChain);
    let mut ops = Vec::new();
    if net.mode() != NetMode::Blocked {
        ops.push(rule(
            &chain,
            Some("replies to the guest's own flows"),
            RuleExprs::new().ct_established().accept(),
        ));
    }
    ops.push(rule(
        &chain,
        Some("nothing else gets in"),
        RuleExprs::new().drop(),
    ));
    ops
}

/// Everything one sandbox needs, in an order the kernel accepts within one
/// transaction: sets and counters before the rules that use them, chains
/// before their rules, dispatch entries last.
pub(crate) fn apply_plan(net: &SandboxNet) -> Vec<Op> {
    let n = ObjectNames::new(net.tap());
    let id = net.id();
    let tap = net.tap();
    let fp = Footprint::of(net);
    let mut ops = Vec::with_capacity(40);
    for (kind, key, what) in [
        (
            ObjectKind::Pin4Set,
            KeyType::Ipv4Port,
            "DNS pins, IPv4 address . port",
        ),
        (
            ObjectKind::Pin6Set,
            KeyType::Ipv6Port,
            "DNS pins, IPv6 address . port",
        ),
    ] {
        ops.push(Op::AddSet(SetSpec {
            name: n.name(kind),
            key,
            verdict_map: false,
            timeout: true,
            size: Some(crate::firewall::MAX_PINS_PER_SET),
            interval: false,
            comment: Some(owner_comment(id, tap, what)),
        }));
    }
    for (kind, key, what) in [
        (
            ObjectKind::Allow4Set,
            KeyType::Ipv4ProtoPort,
            "policy, IPv4 address . protocol . port ranges",
        ),
        (
            ObjectKind::Allow6Set,
            KeyType::Ipv6ProtoPort,
            "policy, IPv6 address . protocol . port ranges",
        ),
    ] {
        ops.push(Op::AddSet(SetSpec {
            name: n.name(kind),
            key,
            verdict_map: false,
            timeout: false,
            size: Some(crate::sandbox::MAX_ALLOW_ELEMS as u32),
            interval: true,
            comment: Some(owner_comment(id, tap, what)),
        }));
    }
    for (kind, what) in [
        (ObjectKind::ForwardDropCounter, "egress drops"),
        (ObjectKind::InputDropCounter, "drops to the host"),
    ] {
        ops.push(Op::AddCounter {
            name: n.name(kind),
            comment: owner_comment(id, tap, what),
        });
    }
    let chain = |kind, what| {
        Op::AddChain(ChainSpec {
            name: n.name(kind),
            hook: None,
            comment: Some(owner_comment(id, tap, what)),
        })
    };
    ops.push(chain(ObjectKind::ForwardChain, "egress policy"));
    ops.push(chain(ObjectKind::InputChain, "access to the host"));
    ops.push(chain(ObjectKind::ToGuestChain, "traffic into the guest"));
    ops.extend(forward_rules(net, &n));
    ops.extend(input_rules(net, &n));
    ops.extend(to_guest_rules(net, &n));
    if let Some(uplink) = net.nat() {
        let nat_chain = n.name(ObjectKind::NatChain);
        ops.push(chain(ObjectKind::NatChain, "NAT"));
        ops.push(rule(
            &nat_chain,
            Some("masquerade via uplink"),
            RuleExprs::new()
                .oifname(uplink.ifname().ifname_key())
                .masquerade(),
        ));
    }
    for (map, key, k) in fp.elems {
        let target = match map {
            base::FWD_MAP => n.name(ObjectKind::ForwardChain),
            base::IN_MAP => n.name(ObjectKind::InputChain),
            base::TO_MAP => n.name(ObjectKind::ToGuestChain),
            _ => n.name(ObjectKind::NatChain),
        };
        ops.push(Op::AddElems(ElemsSpec {
            set: map.to_string(),
            key,
            verdict_map: true,
            elems: vec![Elem {
                key: k,
                key_end: None,
                goto: Some(target),
                timeout_ms: None,
            }],
            exclusive: true,
        }));
    }
    ops.extend(allow_elem_ops(&n, net.allow()));
    ops
}

/// Removes a footprint: dispatch entries first (they reference the chains),
/// then the chains (the kernel deletes their rules, releasing the sets and
/// counters), then sets and counters.
pub(crate) fn teardown_plan(fp: &Footprint) -> Vec<Op> {
    let mut ops = Vec::new();
    for (map, key, k) in &fp.elems {
        ops.push(Op::DelElems(ElemsSpec {
            set: map.to_string(),
            key: *key,
            verdict_map: true,
            elems: vec![Elem {
                key: k.clone(),
                key_end: None,
                goto: None,
                timeout_ms: None,
            }],
            exclusive: false,
        }));
    }
    ops.extend(fp.chains.iter().cloned().map(Op::DelChain));
    ops.extend(fp.sets.iter().cloned().map(Op::DelSet));
    ops.extend(fp.counters.iter().cloned().map(Op::DelCounter));
    ops
}

/// Pin key: address then port, each padded to 4 bytes as the registers hold
/// them.
pub(crate) fn pin_key(addr: IpAddr, port: u16) -> (KeyType, Vec<u8>) {
    let mut key = match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    key.extend_from_slice(&port.to_be_bytes());
    key.extend_from_slice(&[0, 0]);
    let kt = if addr.is_ipv4() {
        KeyType::Ipv4Port
    } else {
        KeyType::Ipv6Port
    };
    (kt, key)
}

/// Most elements one NEWSETELEM message carries. The element list is one netlink
/// attribute whose length is 16 bits: far below that, so a batch of any allowed size is
/// split into messages the kernel reads whole (the batch stays one transaction).
pub(crate) const MAX_ELEMS_PER_MSG: usize = 128;

/// Adds pins to a sandbox's two sets, in messages of at most [`MAX_ELEMS_PER_MSG`].
pub(crate) fn pin_plan(tap: &TapName, pins: &[(IpAddr, u16)], timeout_ms: u64) -> Vec<Op> {
    let n = ObjectNames::new(tap);
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for &(addr, port) in pins {
        let (_, key) = pin_key(addr, port);
        let e = Elem {
            key,
            key_end: None,
            goto: None,
            timeout_ms: Some(timeout_ms),
        };
        if addr.is_ipv4() {
            v4.push(e)
        } else {
            v6.push(e)
        }
    }
    // Pins are not exclusive: pinning a pair again refreshes its timeout.
    add_elem_ops(
        &n,
        [
            (v4, ObjectKind::Pin4Set, KeyType::Ipv4Port),
            (v6, ObjectKind::Pin6Set, KeyType::Ipv6Port),
        ],
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expr::{Expr, Verdict};
    use crate::sandbox::{AllowRule, MacAddr, PortRange, Uplink};
    use std::net::Ipv4Addr;

    fn net() -> SandboxNet {
        SandboxNet::new(
            SandboxId::new("sb-1").unwrap(),
            TapName::new("tap0").unwrap(),
            MacAddr::new([2, 0, 0, 0, 0, 1]).unwrap(),
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 1),
        )
        .unwrap()
    }

    fn rules_of<'a>(ops: &'a [Op], chain: &str) -> Vec<&'a RuleSpec> {
        ops.iter()
            .filter_map(|o| match o {
                Op::AddRule(r) if r.chain == chain => Some(r),
                _ => None,
            })
            .collect()
    }

    fn comments(rules: &[&RuleSpec]) -> Vec<String> {
        rules.iter().map(|r| r.comment.clone().unwrap()).collect()
    }

    #[test]
    fn forward_chain_order_matches_policy() {
        let n = net()
            .with_allow([AllowRule::new("169.254.0.0/16".parse().unwrap(), None)])
            .unwrap();
        let ops = apply_plan(&n);
        let fwd = rules_of(&ops, "fwd-tap0");
        assert_eq!(
            comments(&fwd),
            [
                "invalid",
                "no L2 header, cannot check MAC",
                "spoofed MAC",
                "spoofed IPv4 source",
                "sandbox has no IPv6",
                "replies and established flows",
                "metadata endpoint",
                "metadata endpoint",
                "policy",
                "policy",
                "DNS pins",
                "DNS pins",
                "DNS pins",
                "DNS pins",
                "everything else",
            ]
        );
        let last = &fwd.last().unwrap().exprs.0;
        assert_eq!(
            last[..],
            [
                Expr::Counter {
                    name: "fwd-drop-tap0".into()
                },
                Expr::Verdict(Verdict::Drop)
            ]
        );
    }

    #[test]
    fn input_chain_allows_only_dns_to_resolver() {
        let n = net()
            .with_ipv6("fd00::2".parse().unwrap(), "fd00::1".parse().unwrap())
            .unwrap();
        let ops = apply_plan(&n);
        let inp = rules_of(&ops, "in-tap0");
        let c = comments(&inp);
        assert_eq!(c.iter().filter(|c| *c == "DNS to its resolver").count(), 4);
        assert_eq!(c.last().unwrap(), "everything else to the host");
        assert_eq!(c[4], "spoofed IPv6 source");
        // every accept in the input chain carries dport 53 or is ND
        for r in &inp {
            if r.exprs.0.last() == Some(&Expr::Verdict(Verdict::Accept)) {
                let dns =
                    r.exprs.0.iter().any(
                        |e| matches!(e, Expr::Cmp { data, .. } if data == &53u16.to_be_bytes()),
                    );
                assert!(dns || r.comment.as_deref() == Some("IPv6 neighbour discovery"));
            }
        }
    }

    #[test]
    fn objects_precede_their_users() {
        let n = net().with_nat(Uplink::new("eth0").unwrap()).unwrap();
        let ops = apply_plan(&n);
        let pos = |pred: &dyn Fn(&Op) -> bool| ops.iter().position(pred).unwrap();
        let first_rule = pos(&|o| matches!(o, Op::AddRule(_)));
        let last_obj = ops
            .iter()
            .rposition(|o| matches!(o, Op::AddSet(_) | Op::AddCounter { .. } | Op::AddChain(_)))
            .unwrap();
        let nat_chain = pos(&|o| matches!(o, Op::AddChain(c) if c.name == "nat-tap0"));
        let nat_rule = pos(&|o| matches!(o, Op::AddRule(r) if r.chain == "nat-tap0"));
        let first_elem = pos(&|o| matches!(o, Op::AddElems(_)));
        assert!(nat_chain < nat_rule);
        assert!(ops[..first_rule]
            .iter()
            .all(|o| !matches!(o, Op::AddElems(_))));
        assert!(last_obj < first_elem);
        assert!(ops[first_elem..]
            .iter()
            .all(|o| matches!(o, Op::AddElems(e) if e.exclusive)));
        // four dispatch entries: fwd, in, to, nat4
        assert_eq!(ops.len() - first_elem, 4);
    }

    #[test]
    fn blocked_mode_drops_everything() {
        let ops = apply_plan(&net().with_mode(NetMode::Blocked));
        for chain in ["fwd-tap0", "in-tap0", "to-tap0"] {
            let r = rules_of(&ops, chain);
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].exprs.0.last(), Some(&Expr::Verdict(Verdict::Drop)));
        }
    }

    #[test]
    fn policy_is_elements_not_rules() {
        let with = |rules: Vec<AllowRule>| apply_plan(&net().with_allow(rules).unwrap());
        let none = with(vec![]);
        let some = with(vec![
            AllowRule::new(
                "203.0.113.0/24".parse().unwrap(),
                Some(PortRange::new(8000, 8080).unwrap()),
            ),
            AllowRule::new("198.51.100.7/32".parse().unwrap(), None),
        ]);
        // The same rules whatever the policy: it lives in the allow sets.
        assert_eq!(rules_of(&none, "fwd-tap0"), rules_of(&some, "fwd-tap0"));
        let elems: Vec<&Elem> = some
            .iter()
            .filter_map(|o| match o {
                Op::AddElems(e) if e.set == "allow4-tap0" => Some(&e.elems),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(
            elems.len(),
            3,
            "TCP and UDP for the ported rule, one for the other"
        );
        // addr . proto . port, padded: 203.0.113.0 . tcp . 8000 to 203.0.113.255 . tcp . 8080
        assert_eq!(
            elems[0].key,
            vec![203, 0, 113, 0, 6, 0, 0, 0, 0x1f, 0x40, 0, 0]
        );
        assert_eq!(
            elems[0].key_end.as_deref(),
            Some(&[203, 0, 113, 255, 6, 0, 0, 0, 0x1f, 0x90, 0, 0][..])
        );
        assert_eq!(elems[1].key[4], 17);
        // No ports: every protocol and port of the one address.
        assert_eq!(elems[2].key, vec![198, 51, 100, 7, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            elems[2].key_end.as_deref(),
            Some(&[198, 51, 100, 7, 255, 0, 0, 0, 0xff, 0xff, 0, 0][..])
        );
        // Changing it later is a flush and elements, nothing else.
        let later = policy_plan(&TapName::new("tap0").unwrap(), &[]);
        assert!(later
            .iter()
            .all(|o| matches!(o, Op::FlushSet(_) | Op::AddElems(_))));
        assert_eq!(later.len(), 2);
    }

    #[test]
    fn teardown_reverses_apply() {
        let n = net()
            .with_ipv6("fd00::2".parse().unwrap(), "fd00::1".parse().unwrap())
            .unwrap()
            .with_nat(Uplink::new("eth0").unwrap())
            .unwrap();
        let fp = Footprint::of(&n);
        assert_eq!(fp.object_count(), 4 + 4 + 2 + 5);
        let ops = teardown_plan(&fp);
        let kinds: Vec<_> = ops
            .iter()
            .map(|o| match o {
                Op::DelElems(_) => 0,
                Op::DelChain(_) => 1,
                Op::DelSet(_) => 2,
                Op::DelCounter(_) => 3,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert!(kinds.windows(2).all(|w| w[0] <= w[1]), "{kinds:?}");
        assert_eq!(ops.len(), fp.object_count());
        let added: Vec<_> = apply_plan(&n)
            .into_iter()
            .filter_map(|o| match o {
                Op::AddSet(s) => Some(s.name),
                Op::AddChain(c) => Some(c.name),
                Op::AddCounter { name, .. } => Some(name),
                _ => None,
            })
            .collect();
        for name in added {
            assert!(
                ops.iter().any(|o| matches!(o,
                Op::DelSet(n) | Op::DelChain(n) | Op::DelCounter(n) if *n == name)),
                "{name}"
            );
        }
    }

    #[test]
    fn pins_split_by_family() {
        let tap = TapName::new("tap0").unwrap();
        let pins = [
            ("192.0.2.1".parse().unwrap(), 443),
            ("2001:db8::1".parse().unwrap(), 443),
            ("192.0.2.2".parse().unwrap(), 80),
        ];
        let ops = pin_plan(&tap, &pins, 1500);
        assert_eq!(ops.len(), 2);
        let Op::AddElems(v4) = &ops[0] else { panic!() };
        assert_eq!(v4.set, "pin4-tap0");
        assert_eq!(v4.elems.len(), 2);
        assert_eq!(v4.elems[0].key, vec![192, 0, 2, 1, 1, 187, 0, 0]);
        assert_eq!(v4.elems[0].timeout_ms, Some(1500));
        let Op::AddElems(v6) = &ops[1] else { panic!() };
        assert_eq!(v6.set, "pin6-tap0");
        assert_eq!(v6.elems[0].key.len(), KeyType::Ipv6Port.len() as usize);
        assert!(pin_plan(&tap, &[], 1).is_empty());
    }

    #[test]
    fn key_types_match_nft() {
        // nft's numbering: ipv4_addr . inet_service
        assert_eq!(KeyType::Ipv4Port.nft_type(), 461);
        assert_eq!(KeyType::Ipv6Port.nft_type(), 525);
    }
}

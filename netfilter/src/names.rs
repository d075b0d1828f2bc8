//! Validated identifiers and the nftables object names derived from them.
//!
//! Every name that reaches the kernel is built here from a [`TapName`], so a
//! reader of `nft list table inet cleave` can tell which sandbox owns an
//! object, and [`ObjectNames::parse`] can map a kernel object back to its
//! tap after a crash.

use std::fmt;

use crate::error::InvalidInput;

/// Longest interface name Linux accepts (`IFNAMSIZ` - 1).
pub const MAX_TAP_LEN: usize = 15;
/// Longest sandbox id; keeps object comments under libnftnl's 128-byte limit.
pub const MAX_ID_LEN: usize = 64;

/// A sandbox's identity as the agent knows it: 1 to 64 characters of
/// `[A-Za-z0-9_.-]`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxId(String);

impl SandboxId {
    /// Validates `id`.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidInput> {
        let id = id.into();
        check_name("sandbox id", &id, MAX_ID_LEN, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
        })?;
        Ok(SandboxId(id))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A host interface name (the sandbox's tap, or a NAT uplink): 1 to 15
/// characters of `[A-Za-z0-9_-]`, starting with a letter or digit.
///
/// Stricter than the kernel (which allows almost any byte) so that derived
/// object names and comments stay unambiguous.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TapName(String);

impl TapName {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidInput> {
        let name = name.into();
        check_name("interface name", &name, MAX_TAP_LEN, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '-')
        })?;
        Ok(TapName(name))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as the kernel compares it: `IFNAMSIZ` bytes, zero padded.
    pub(crate) fn ifname_key(&self) -> [u8; 16] {
        let mut key = [0u8; 16];
        key[..self.0.len()].copy_from_slice(self.0.as_bytes());
        key
    }
}

impl fmt::Display for TapName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn check_name(
    what: &'static str,
    s: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
) -> Result<(), InvalidInput> {
    if s.is_empty() || s.len() > max {
        return Err(InvalidInput::Name {
            what,
            value: s.escape_debug().to_string(),
            reason: format!("must be 1 to {max} characters long"),
        });
    }
    if !s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric()) {
        return Err(InvalidInput::Name {
            what,
            value: s.escape_debug().to_string(),
            reason: "must start with a letter or digit".into(),
        });
    }
    if let Some(bad) = s.chars().find(|&c| !allowed(c)) {
        return Err(InvalidInput::Name {
            what,
            value: s.escape_debug().to_string(),
            reason: format!("character {:?} is not allowed", bad),
        });
    }
    Ok(())
}

/// The table every cleave object lives in (family `inet`).
pub const TABLE: &str = "cleave";

/// Names of the shared objects created once per table. They contain no `-`,
/// so they never parse as per-sandbox objects.
pub mod base {
    /// Base chain on the forward hook.
    pub const FORWARD: &str = "forward";
    /// Base chain on the input hook.
    pub const INPUT: &str = "input";
    /// NAT base chain on the postrouting hook.
    pub const POSTROUTING: &str = "postrouting";
    /// `ifname : verdict` map from a tap to its forward chain.
    pub const FWD_MAP: &str = "fwd_taps";
    /// `ifname : verdict` map from a tap to its input chain.
    pub const IN_MAP: &str = "in_taps";
    /// `ifname : verdict` map from a tap (as output interface) to its inbound chain.
    pub const TO_MAP: &str = "to_taps";
    /// `ipv4_addr : verdict` map from a guest address to its NAT chain.
    pub const NAT4_MAP: &str = "nat4_guests";
    /// `ipv6_addr : verdict` map from a guest address to its NAT chain.
    pub const NAT6_MAP: &str = "nat6_guests";
}

/// The kind of a per-sandbox object, with the name prefix it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    /// Chain `fwd-<tap>`.
    ForwardChain,
    /// Chain `in-<tap>`.
    InputChain,
    /// Chain `nat-<tap>`.
    NatChain,
    /// Chain `to-<tap>`: forwarded traffic into the tap.
    ToGuestChain,
    /// Set `pin4-<tap>`.
    Pin4Set,
    /// Set `pin6-<tap>`.
    Pin6Set,
    /// Interval set `allow4-<tap>`: the policy's IPv4 destinations.
    Allow4Set,
    /// Interval set `allow6-<tap>`: the policy's IPv6 destinations.
    Allow6Set,
    /// Counter `fwd-drop-<tap>`.
    ForwardDropCounter,
    /// Counter `in-drop-<tap>`.
    InputDropCounter,
}

impl ObjectKind {
    const CHAINS: [ObjectKind; 4] = [
        Self::ForwardChain,
        Self::InputChain,
        Self::NatChain,
        Self::ToGuestChain,
    ];
    const SETS: [ObjectKind; 4] = [
        Self::Pin4Set,
        Self::Pin6Set,
        Self::Allow4Set,
        Self::Allow6Set,
    ];
    const COUNTERS: [ObjectKind; 2] = [Self::ForwardDropCounter, Self::InputDropCounter];

    fn prefix(self) -> &'static str {
        match self {
            Self::ForwardChain => "fwd-",
            Self::InputChain => "in-",
            Self::NatChain => "nat-",
            Self::ToGuestChain => "to-",
            Self::Pin4Set => "pin4-",
            Self::Pin6Set => "pin6-",
            Self::Allow4Set => "allow4-",
            Self::Allow6Set => "allow6-",
            Self::ForwardDropCounter => "fwd-drop-",
            Self::InputDropCounter => "in-drop-",
        }
    }
}

/// The kernel object type a name is looked up among.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespace {
    /// Chains.
    Chain,
    /// Sets and maps.
    Set,
    /// Stateful objects (counters).
    Counter,
}

/// All object names of one sandbox, derived from its tap name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectNames {
    tap: TapName,
}

impl ObjectNames {
    /// Names for the sandbox on `tap`.
    pub fn new(tap: &TapName) -> Self {
        ObjectNames { tap: tap.clone() }
    }

    /// The name of `kind` for this tap (at most 24 bytes).
    pub fn name(&self, kind: ObjectKind) -> String {
        format!("{}{}", kind.prefix(), self.tap)
    }

    /// Maps a kernel object name back to (kind, tap), or `None` for names
    /// that are not per-sandbox objects (the shared base objects).
    pub fn parse(ns: Namespace, name: &str) -> Option<(ObjectKind, TapName)> {
        let kinds: &[ObjectKind] = match ns {
            Namespace::Chain => &ObjectKind::CHAINS,
            Namespace::Set => &ObjectKind::SETS,
            Namespace::Counter => &ObjectKind::COUNTERS,
        };
        kinds.iter().find_map(|&kind| {
            let tap = name.strip_prefix(kind.prefix())?;
            TapName::new(tap).ok().map(|tap| (kind, tap))
        })
    }
}

/// The comment on a sandbox's forward chain. It is the one place the kernel
/// records which sandbox owns a tap, so [`parse_owner`] can find dead
/// sandboxes after a crash.
pub(crate) fn owner_comment(id: &SandboxId, tap: &TapName, what: &str) -> String {
    format!("cleave sandbox {id} (tap {tap}): {what}")
}

/// Inverse of [`owner_comment`].
pub(crate) fn parse_owner(comment: &str) -> Option<SandboxId> {
    let rest = comment.strip_prefix("cleave sandbox ")?;
    let (id, _) = rest.split_once(" (tap ")?;
    SandboxId::new(id).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_typical_names() {
        for ok in ["tap0", "ctap-12", "a", "x_y-z", "123456789012345"] {
            assert!(TapName::new(ok).is_ok(), "{ok}");
        }
        for ok in ["sb-1", "0f3a.9", "sandbox_A.b-c"] {
            assert!(SandboxId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_names() {
        let long_tap = "a".repeat(16);
        for bad in [
            "", "-tap", "_x", "tap 0", "tap/0", "tap.0", "täp", &long_tap, "a\0b",
        ] {
            assert!(TapName::new(bad).is_err(), "{bad:?}");
        }
        let long_id = "a".repeat(65);
        for bad in ["", ".x", "a b", "a(b", "a\"b", "a\nb", &long_id] {
            assert!(SandboxId::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn error_names_the_problem() {
        let err = TapName::new("tap/0").unwrap_err().to_string();
        assert!(
            err.contains("interface name") && err.contains("'/'"),
            "{err}"
        );
    }

    #[test]
    fn derived_names_round_trip() {
        let tap = TapName::new("ctap7").unwrap();
        let names = ObjectNames::new(&tap);
        assert_eq!(names.name(ObjectKind::ForwardChain), "fwd-ctap7");
        assert_eq!(names.name(ObjectKind::ForwardDropCounter), "fwd-drop-ctap7");
        assert_eq!(names.name(ObjectKind::Pin6Set), "pin6-ctap7");
        for (ns, kind) in [
            (Namespace::Chain, ObjectKind::ForwardChain),
            (Namespace::Chain, ObjectKind::InputChain),
            (Namespace::Chain, ObjectKind::NatChain),
            (Namespace::Chain, ObjectKind::ToGuestChain),
            (Namespace::Set, ObjectKind::Pin4Set),
            (Namespace::Set, ObjectKind::Pin6Set),
            (Namespace::Set, ObjectKind::Allow4Set),
            (Namespace::Set, ObjectKind::Allow6Set),
            (Namespace::Counter, ObjectKind::ForwardDropCounter),
            (Namespace::Counter, ObjectKind::InputDropCounter),
        ] {
            assert_eq!(
                ObjectNames::parse(ns, &names.name(kind)),
                Some((kind, tap.clone()))
            );
        }
    }

    #[test]
    fn base_objects_are_not_sandbox_objects() {
        for n in [base::FORWARD, base::INPUT, base::POSTROUTING] {
            assert_eq!(ObjectNames::parse(Namespace::Chain, n), None);
        }
        for n in [
            base::FWD_MAP,
            base::IN_MAP,
            base::TO_MAP,
            base::NAT4_MAP,
            base::NAT6_MAP,
        ] {
            assert_eq!(ObjectNames::parse(Namespace::Set, n), None);
        }
    }

    #[test]
    fn owner_comment_round_trips() {
        let id = SandboxId::new("sb-1.x").unwrap();
        let tap = TapName::new("tap0").unwrap();
        let c = owner_comment(&id, &tap, "forward policy");
        assert_eq!(parse_owner(&c), Some(id));
        assert_eq!(parse_owner("something else"), None);
    }

    #[test]
    fn longest_names_fit_comment_limit() {
        let id = SandboxId::new("a".repeat(MAX_ID_LEN)).unwrap();
        let tap = TapName::new("t".repeat(MAX_TAP_LEN)).unwrap();
        assert!(owner_comment(&id, &tap, "forward: egress policy").len() < 127);
        let n = ObjectNames::new(&tap).name(ObjectKind::ForwardDropCounter);
        assert!(n.len() <= 24);
    }

    proptest! {
        #[test]
        fn tap_validator_matches_spec(s in "\\PC{0,20}") {
            let spec = !s.is_empty()
                && s.len() <= MAX_TAP_LEN
                && s.starts_with(|c: char| c.is_ascii_alphanumeric())
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            prop_assert_eq!(TapName::new(s.clone()).is_ok(), spec);
        }

        #[test]
        fn valid_taps_round_trip_through_every_kind(s in "[A-Za-z0-9][A-Za-z0-9_-]{0,14}") {
            let tap = TapName::new(s).unwrap();
            let names = ObjectNames::new(&tap);
            for (ns, kind) in [
                (Namespace::Chain, ObjectKind::ForwardChain),
                (Namespace::Chain, ObjectKind::InputChain),
                (Namespace::Chain, ObjectKind::NatChain),
                (Namespace::Set, ObjectKind::Pin4Set),
                (Namespace::Set, ObjectKind::Pin6Set),
                (Namespace::Counter, ObjectKind::ForwardDropCounter),
                (Namespace::Counter, ObjectKind::InputDropCounter),
            ] {
                let name = names.name(kind);
                prop_assert!(name.len() <= 24);
                prop_assert_eq!(ObjectNames::parse(ns, &name), Some((kind, tap.clone())));
            }
        }

        #[test]
        fn id_validator_matches_spec(s in "\\PC{0,70}") {
            let spec = !s.is_empty()
                && s.len() <= MAX_ID_LEN
                && s.starts_with(|c: char| c.is_ascii_alphanumeric())
                && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            prop_assert_eq!(SandboxId::new(s.clone()).is_ok(), spec);
        }
    }
}

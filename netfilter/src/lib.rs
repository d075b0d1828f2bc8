//! Per-sandbox nftables rules for cleave, programmed over netlink with
//! `nftnl` + `mnl` (never by spawning `nft`).
//!
//! # Layout
//!
//! One table, `inet cleave`:
//!
//! * base chains `forward` and `input` (filter, priority 0, policy accept)
//!   each hold one rule, `iifname vmap @fwd_taps` / `@in_taps`, that sends a
//!   sandbox tap's packets to that tap's own chain. Per-packet cost does not
//!   grow with the number of sandboxes; other interfaces are untouched.
//! * `postrouting` (nat, priority 100) dispatches NATed guests by source
//!   address through `@nat4_guests` / `@nat6_guests` to `nat-<tap>`, which
//!   masquerades out of the sandbox's uplink.
//! * per sandbox, named after its tap: chains `fwd-<tap>`, `in-<tap>`
//!   (and `nat-<tap>`), sets `pin4-<tap>` (`ipv4_addr . inet_service`) and
//!   `pin6-<tap>` (`ipv6_addr . inet_service`), both `flags timeout`, and
//!   counters `fwd-drop-<tap>`, `in-drop-<tap>`. Each carries a comment
//!   naming the sandbox; the owner is read back from it by
//!   [`Firewall::reconcile`].
//!
//! `fwd-<tap>`: drop `ct state invalid`; drop anything not from the guest's
//! MAC and addresses; accept established/related; drop metadata endpoints
//! (169.254.0.0/16, fd00:ec2::254); accept allow CIDRs; accept pinned
//! (address, port) pairs; count and drop the rest. `in-<tap>`: the same
//! anti-spoofing, IPv6 neighbour discovery, udp/tcp 53 to the sandbox's
//! resolver address, count and drop the rest. [`NetMode::Blocked`] makes both
//! chains a single count-and-drop.
//!
//! # API
//!
//! ```no_run
//! use std::time::Duration;
//! use cleave_netfilter::{Firewall, SandboxId, SandboxNet, TapName};
//!
//! let fw = Firewall::open()?; // in the current thread's network namespace
//! let id = SandboxId::new("sb-1")?;
//! let net = SandboxNet::new(
//!     id.clone(),
//!     TapName::new("ctap1")?,
//!     "02:00:00:00:00:01".parse()?,
//!     "10.0.0.2".parse()?,
//!     "10.0.0.1".parse()?,
//! )?;
//! fw.apply(&net)?; // one batch: everything or nothing
//! fw.pin(&id, "192.0.2.7".parse()?, 443, Duration::from_secs(60))?;
//! let c = fw.counters(&id)?;
//! println!("{} packets dropped", c.forward_dropped.packets);
//! fw.teardown(&id)?; // one batch: every object of the sandbox
//! fw.reconcile(&[])?; // after a crash: remove what dead sandboxes left
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! * [`Firewall::open`]` -> Result<Firewall, NetfilterError>`
//! * [`Firewall::apply`]`(&SandboxNet) -> Result<(), _>`
//! * [`Firewall::pin`]`(&SandboxId, IpAddr, u16, Duration) -> Result<(), _>`
//! * [`Firewall::pin_many`]`(&SandboxId, &[(IpAddr, u16)], Duration) -> Result<(), _>`
//! * [`Firewall::teardown`]`(&SandboxId) -> Result<bool, _>`
//! * [`Firewall::reconcile`]`(&[SandboxId]) -> Result<Vec<Leftover>, _>`
//! * [`Firewall::counters`]`(&SandboxId) -> Result<SandboxCounters, _>`
//! * [`Firewall::list`]`() -> Result<Vec<(SandboxId, TapName)>, _>`
//!
//! `Firewall` is `Send + Sync`; it stays bound to the network namespace of
//! the thread that opened it. Every error names the operation, the sandbox
//! and, for kernel rejections, the exact step (`add set inet cleave
//! pin4-ctap1`) and errno.
//!
//! With the `testutil` feature, [`testutil`] provides network-namespace
//! helpers for tests.

#![deny(missing_docs)]

mod discover;
mod error;
mod expr;
mod firewall;
mod names;
mod nl;
mod plan;
mod sandbox;

#[cfg(feature = "testutil")]
pub mod testutil;

pub use error::{InvalidInput, NetfilterError, Operation};
pub use firewall::{
    Counter, Firewall, Leftover, SandboxCounters, MAX_PINS_PER_CALL, MAX_PINS_PER_SET, MAX_PIN_TTL,
};
pub use names::{base, SandboxId, TapName, MAX_ID_LEN, MAX_TAP_LEN, TABLE};
pub use sandbox::{
    check_allow, AllowRule, MacAddr, NetMode, PortRange, SandboxNet, Uplink, MAX_ALLOW_ELEMS,
    MAX_ALLOW_RULES,
};

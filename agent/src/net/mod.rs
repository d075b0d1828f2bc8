//! Sandbox networking on the host: each sandbox with a policy gets a *slot* — its own tap,
//! a /30 and an IPv6 /126 from the node's range, per-tap nftables chains and sets, and a
//! DNS proxy listener on the tap's host address — and its guest is told its identity after
//! the reseed gate. A sandbox without a policy gets no slot: its NIC is unplugged.
//!
//! - [`addressing`]: the node range and what slot `i` holds (tap name, addresses).
//! - [`lease`]: claiming a slot index node-wide (a lock held for the sandbox's life).
//! - [`policy`]: the egress policy as a user writes it (`--allow`, `--allow-cidr`).
//! - [`uplink`]: where masqueraded egress leaves, and IP forwarding.
//! - [`conntrack`]: forgetting a released address's flows.
//! - [`node`]: the node-wide parts (firewall handle, DNS proxy, its runtime, the slot
//!   pool), and reconciling what dead sandboxes left.
//! - [`slot`]: a slot built ahead of time: tap, host addresses, chains and empty sets.
//! - [`pool`]: ready slots, so a sandbox only adds its policy (set elements) and DNS.
//! - [`sandbox`]: one sandbox's network, set up whole or not at all, released on drop.

pub mod addressing;
pub mod conntrack;
pub mod lease;
pub mod node;
pub mod policy;
pub mod pool;
pub mod sandbox;
pub mod slot;
pub mod uplink;

pub use addressing::{NodeRange, SlotAddrs};
pub use node::{NetNode, NetOptions};
pub use policy::EgressPolicy;
pub use sandbox::SandboxNetwork;

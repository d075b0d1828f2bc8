//! Shared test helpers: a fake authoritative upstream, a stub client and a
//! recording pinner.

pub mod client;
pub mod fake_upstream;
pub mod pinner;

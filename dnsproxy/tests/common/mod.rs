//! Shared test helpers: a fake authoritative upstream, a stub client, a
//! recording pinner and an nftables set reader.

pub mod client;
pub mod fake_upstream;
pub mod nft;
pub mod pinner;

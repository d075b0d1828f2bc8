//! Netlink: encoding plans into libnftnl batches, the socket, and dumps.

pub(crate) mod dump;
pub(crate) mod encode;
pub(crate) mod socket;

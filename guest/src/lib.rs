//! cleave-guest: the guest agent (PID 1 in the guest) and the host–guest
//! wire protocol that the node agent shares.

pub mod boot;
pub mod exec_as;
pub mod init;
pub mod netconf;
pub mod protocol;
pub mod reseed;
pub mod server;
pub mod sync;

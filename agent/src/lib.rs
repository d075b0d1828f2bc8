//! cleave-agent: the node agent. Our own VMM ([`vmm`]) and its devices ([`devices`]),
//! guest images and their digest pins ([`image`]), facts about the host ([`host`]), and the
//! `cleave` command line ([`cli`]).

pub mod cli;
pub mod daemon;
pub mod devices;
pub mod fork;
pub mod host;
pub mod image;
pub mod net;
pub mod node;
pub mod rig;
pub mod sync;
pub mod vmm;

//! cleave's per-sandbox DNS proxy.

pub mod pin_filter;
pub mod policy;

//! Errors. Each one says what was being done and for which sandbox.

use std::io;

use crate::names::SandboxId;

/// A sandbox description or name that was rejected before anything reached
/// the kernel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    /// A name failed validation.
    #[error("invalid {what} {value:?}: {reason}")]
    Name {
        /// What kind of name (sandbox id, interface name).
        what: &'static str,
        /// The rejected value, escaped.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// Any other invalid field of a sandbox description.
    #[error("invalid sandbox network: {0}")]
    Net(String),
}

/// What a [`Firewall`](crate::Firewall) call was doing when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Opening the netlink socket or creating the base table.
    Open,
    /// `apply`.
    Apply,
    /// `pin` / `pin_many`.
    Pin,
    /// `set_policy`.
    Policy,
    /// `release`.
    Release,
    /// `teardown`.
    Teardown,
    /// `reconcile`.
    Reconcile,
    /// `counters`.
    Counters,
    /// Reading the table to find a sandbox's objects.
    Discover,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operation::Open => "open firewall",
            Operation::Apply => "apply",
            Operation::Pin => "pin",
            Operation::Policy => "set policy",
            Operation::Release => "release",
            Operation::Teardown => "teardown",
            Operation::Reconcile => "reconcile",
            Operation::Counters => "read counters",
            Operation::Discover => "discover sandbox objects",
        })
    }
}

fn for_sandbox(s: &Option<SandboxId>) -> String {
    match s {
        Some(id) => format!(" for sandbox {id}"),
        None => String::new(),
    }
}

/// Errors from this crate.
#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    /// The input was rejected before reaching the kernel.
    #[error("{op}{}: {source}", for_sandbox(.sandbox))]
    Invalid {
        /// What was being done.
        op: Operation,
        /// Which sandbox, if any.
        sandbox: Option<SandboxId>,
        /// Why.
        #[source]
        source: InvalidInput,
    },
    /// The kernel rejected one message of a batch; the whole batch was
    /// rolled back, so no partial state is left.
    #[error("{op}{}: kernel rejected `{step}`: {source} (whole batch rolled back){hint}", for_sandbox(.sandbox))]
    Rejected {
        /// What was being done.
        op: Operation,
        /// Which sandbox, if any.
        sandbox: Option<SandboxId>,
        /// The message the kernel rejected, e.g. `add set inet cleave pin4-tap0`.
        step: String,
        /// How to fix it, when known (starts with "; ").
        hint: &'static str,
        /// The kernel's errno.
        #[source]
        source: io::Error,
    },
    /// Talking to netlink failed (socket, send, receive, parse).
    #[error("{op}{}: netlink {what}: {source}", for_sandbox(.sandbox))]
    Netlink {
        /// What was being done.
        op: Operation,
        /// Which sandbox, if any.
        sandbox: Option<SandboxId>,
        /// Which netlink step failed.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The sandbox has no objects in the table.
    #[error("{op} for sandbox {sandbox}: no such sandbox in table inet cleave (was it applied?)")]
    UnknownSandbox {
        /// What was being done.
        op: Operation,
        /// The sandbox.
        sandbox: SandboxId,
    },
    /// The sandbox is already applied; tear it down first.
    #[error("apply for sandbox {sandbox}: already applied (on tap {tap}); tear it down first")]
    AlreadyApplied {
        /// The sandbox.
        sandbox: SandboxId,
        /// Its tap.
        tap: String,
    },
}

impl NetfilterError {
    /// The kernel errno behind this error, if there is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            NetfilterError::Rejected { source, .. } | NetfilterError::Netlink { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }
}

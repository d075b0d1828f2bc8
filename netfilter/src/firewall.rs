//! [`Firewall`]: the public handle. Each call computes one plan, sends it as
//! one netlink batch and checks every acknowledgement.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::discover::discover;
use crate::error::{InvalidInput, NetfilterError, Operation};
use crate::names::{ObjectKind, ObjectNames, SandboxId, TapName};
use crate::nl::dump;
use crate::nl::encode::encode;
use crate::nl::socket::{BatchError, Netlink};
use crate::plan::{self, Footprint, Op};
use crate::sandbox::SandboxNet;

/// Most pins one `pin_many` call may carry (keeps the batch one datagram).
pub const MAX_PINS_PER_CALL: usize = 1024;
/// Most pins a sandbox's set holds per family (`size` of each pin set): a guest cannot
/// make the kernel hold more. Pinning into a full set fails (`ENFILE`), so the answer
/// that needed it is refused, never sent unpinned.
pub const MAX_PINS_PER_SET: u32 = 4096;
/// Pins live at most this long; longer TTLs are clamped (DNS TTLs can be
/// up to 68 years).
pub const MAX_PIN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Packet and byte counts of one counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counter {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted.
    pub bytes: u64,
}

/// A sandbox's counters, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SandboxCounters {
    /// Packets from the guest dropped by its forward chain (egress not
    /// allowed or pinned, metadata endpoints, blocked mode).
    pub forward_dropped: Counter,
    /// Packets from the guest to host-local addresses dropped by its input
    /// chain (anything but DNS to its resolver).
    pub input_dropped: Counter,
}

/// The objects of one dead sandbox that [`Firewall::reconcile`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// The owner recorded in the kernel, if readable.
    pub sandbox: Option<SandboxId>,
    /// The tap its objects were named after.
    pub tap: TapName,
    /// How many kernel objects (chains, sets, counters, map entries) went.
    pub objects: usize,
}

struct Inner {
    nl: Netlink,
    /// Footprints this handle knows; the kernel stays the source of truth
    /// and is re-read when a sandbox is not here.
    known: HashMap<SandboxId, Footprint>,
}

/// A netlink handle on `table inet cleave` in one network namespace.
///
/// The namespace is the one of the thread that called [`Firewall::open`];
/// the handle stays bound to it wherever it is used from later. `Firewall`
/// is `Send + Sync`: calls are serialised internally, one batch at a time.
pub struct Firewall {
    inner: Mutex<Inner>,
}

fn batch_error(
    op: Operation,
    sandbox: Option<&SandboxId>,
    ops: &[Op],
    e: BatchError,
) -> NetfilterError {
    let sandbox = sandbox.cloned();
    match e {
        BatchError::Rejected { index, err, ext } => {
            let mut step = index
                .and_then(|i| ops.get(i))
                .map(Op::describe)
                .unwrap_or_else(|| "the batch as a whole".into());
            if let Some(t) = ext {
                step.push_str(&format!(" [kernel: {t}]"));
            }
            let hint = match (op, err.raw_os_error()) {
                (Operation::Apply, Some(libc::EEXIST)) => {
                    "; the tap already has objects: another sandbox uses it, or they are \
                     leftovers (run reconcile)"
                }
                (_, Some(libc::EPERM)) => "; needs CAP_NET_ADMIN in this network namespace",
                _ => "",
            };
            NetfilterError::Rejected {
                op,
                sandbox,
                step,
                hint,
                source: err,
            }
        }
        BatchError::Io(what, source) => NetfilterError::Netlink {
            op,
            sandbox,
            what,
            source,
        },
    }
}

fn run(
    inner: &mut Inner,
    op: Operation,
    sandbox: Option<&SandboxId>,
    ops: &[Op],
) -> Result<(), NetfilterError> {
    let enc = encode(ops).map_err(|msg| NetfilterError::Invalid {
        op,
        sandbox: sandbox.cloned(),
        source: InvalidInput::Net(msg),
    })?;
    inner
        .nl
        .run_batch(&enc)
        .map_err(|e| batch_error(op, sandbox, ops, e))
}

impl Inner {
    fn discover(&mut self, op: Operation) -> Result<Vec<Footprint>, NetfilterError> {
        discover(&mut self.nl).map_err(|source| NetfilterError::Netlink {
            op,
            sandbox: None,
            what: "read table inet cleave",
            source,
        })
    }

    /// Refreshes the cache from the kernel and returns the sandbox's
    /// footprint, if it has one.
    fn rediscover(
        &mut self,
        op: Operation,
        sandbox: &SandboxId,
    ) -> Result<Option<Footprint>, NetfilterError> {
        for fp in self.discover(op)? {
            if let Some(owner) = fp.owner.clone() {
                self.known.entry(owner).or_insert(fp);
            }
        }
        Ok(self.known.get(sandbox).cloned())
    }

    fn lookup(&mut self, op: Operation, sandbox: &SandboxId) -> Result<Footprint, NetfilterError> {
        if let Some(fp) = self.known.get(sandbox) {
            return Ok(fp.clone());
        }
        self.rediscover(op, sandbox)?
            .ok_or_else(|| NetfilterError::UnknownSandbox {
                op,
                sandbox: sandbox.clone(),
            })
    }
}

fn is_enoent(e: &NetfilterError) -> bool {
    matches!(e, NetfilterError::Rejected { .. }) && e.raw_os_error() == Some(libc::ENOENT)
}

impl Firewall {
    /// Opens a netlink socket in the calling thread's network namespace and
    /// creates the base layout (table, dispatch maps, base chains) if it is
    /// not there yet.
    pub fn open() -> Result<Firewall, NetfilterError> {
        let nl = Netlink::open().map_err(|(what, source)| NetfilterError::Netlink {
            op: Operation::Open,
            sandbox: None,
            what,
            source,
        })?;
        let mut inner = Inner {
            nl,
            known: HashMap::new(),
        };
        let exists =
            dump::table_exists(&mut inner.nl).map_err(|source| NetfilterError::Netlink {
                op: Operation::Open,
                sandbox: None,
                what: "look up table inet cleave",
                source,
            })?;
        if !exists {
            let ops = plan::base_plan();
            match run(&mut inner, Operation::Open, None, &ops) {
                Ok(()) => tracing::info!("created table inet cleave"),
                // Another handle created it between our check and our batch.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Firewall {
            inner: Mutex::new(inner),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The kernel holds the real state; a panic elsewhere leaves nothing
        // half-done in `Inner` that would make it unsafe to go on.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Installs the sandbox's chains, sets, counters and dispatch entries in
    /// one batch: all of it or, on error, none of it.
    ///
    /// Fails if this handle already applied the sandbox, or if the kernel
    /// already has objects for its tap (another sandbox on the same tap, or
    /// a leftover: call [`reconcile`](Self::reconcile) after a restart).
    pub fn apply(&self, net: &SandboxNet) -> Result<(), NetfilterError> {
        let mut inner = self.lock();
        if let Some(fp) = inner.known.get(net.id()) {
            return Err(NetfilterError::AlreadyApplied {
                sandbox: net.id().clone(),
                tap: fp.tap.to_string(),
            });
        }
        let ops = plan::apply_plan(net);
        run(&mut inner, Operation::Apply, Some(net.id()), &ops)?;
        inner.known.insert(net.id().clone(), Footprint::of(net));
        tracing::debug!(sandbox = %net.id(), tap = %net.tap(), "applied sandbox chains");
        Ok(())
    }

    /// Lets the sandbox reach `addr`:`port` (TCP and UDP) for `ttl`.
    /// Equivalent to [`pin_many`](Self::pin_many) with one pin.
    pub fn pin(
        &self,
        sandbox: &SandboxId,
        addr: IpAddr,
        port: u16,
        ttl: Duration,
    ) -> Result<(), NetfilterError> {
        self.pin_many(sandbox, &[(addr, port)], ttl)
    }

    /// Adds (address, port) pins to the sandbox's sets in one batch, each
    /// expiring after `ttl` (at least 1 ms; clamped to [`MAX_PIN_TTL`]).
    /// Pinning an existing pair again resets its timeout to `ttl`.
    /// Connections opened while a pin existed outlive it (conntrack).
    pub fn pin_many(
        &self,
        sandbox: &SandboxId,
        pins: &[(IpAddr, u16)],
        ttl: Duration,
    ) -> Result<(), NetfilterError> {
        let invalid = |msg: String| NetfilterError::Invalid {
            op: Operation::Pin,
            sandbox: Some(sandbox.clone()),
            source: InvalidInput::Net(msg),
        };
        if pins.len() > MAX_PINS_PER_CALL {
            return Err(invalid(format!(
                "{} pins in one call, at most {MAX_PINS_PER_CALL}",
                pins.len()
            )));
        }
        if let Some((addr, _)) = pins.iter().find(|(_, port)| *port == 0) {
            return Err(invalid(format!("pin {addr} port 0")));
        }
        if ttl < Duration::from_millis(1) {
            return Err(invalid(format!("pin ttl {ttl:?} is under 1 ms")));
        }
        if pins.is_empty() {
            return Ok(());
        }
        let ms = ttl.min(MAX_PIN_TTL).as_millis() as u64;
        let mut inner = self.lock();
        let was_cached = inner.known.contains_key(sandbox);
        let fp = inner.lookup(Operation::Pin, sandbox)?;
        let ops = plan::pin_plan(&fp.tap, pins, ms);
        match run(&mut inner, Operation::Pin, Some(sandbox), &ops) {
            // Our cached tap is stale (torn down by another handle): look
            // the sandbox up again once.
            Err(e) if was_cached && is_enoent(&e) => {
                inner.known.remove(sandbox);
                let fp = inner.lookup(Operation::Pin, sandbox)?;
                let ops = plan::pin_plan(&fp.tap, pins, ms);
                run(&mut inner, Operation::Pin, Some(sandbox), &ops)
            }
            r => r,
        }
    }

    /// Replaces the sandbox's policy (its allow CIDRs and ports) in one batch: set
    /// elements only, no rule is added, so the cost does not grow with the number of
    /// sandboxes. The old policy holds until the new one is in whole.
    pub fn set_policy(
        &self,
        sandbox: &SandboxId,
        rules: &[crate::sandbox::AllowRule],
    ) -> Result<(), NetfilterError> {
        crate::sandbox::check_allow(rules).map_err(|source| NetfilterError::Invalid {
            op: Operation::Policy,
            sandbox: Some(sandbox.clone()),
            source,
        })?;
        let mut inner = self.lock();
        let fp = inner.lookup(Operation::Policy, sandbox)?;
        let ops = plan::policy_plan(&fp.tap, rules);
        run(&mut inner, Operation::Policy, Some(sandbox), &ops)
    }

    /// Empties the sandbox's policy and pin sets in one batch: its chains stay, allowing
    /// nothing, ready for the next sandbox on the same slot.
    pub fn release(&self, sandbox: &SandboxId) -> Result<(), NetfilterError> {
        let mut inner = self.lock();
        let fp = inner.lookup(Operation::Release, sandbox)?;
        let ops = plan::release_plan(&fp.tap);
        run(&mut inner, Operation::Release, Some(sandbox), &ops)
    }

    /// Removes every object of the sandbox (chains, both pin sets, counters,
    /// dispatch and NAT entries) in one batch. Returns `false` if the
    /// sandbox had nothing in the table.
    pub fn teardown(&self, sandbox: &SandboxId) -> Result<bool, NetfilterError> {
        let mut inner = self.lock();
        let cached = inner.known.remove(sandbox);
        let fp = match cached.clone() {
            Some(fp) => fp,
            None => match inner.rediscover(Operation::Teardown, sandbox)? {
                Some(fp) => fp,
                None => return Ok(false),
            },
        };
        let ops = plan::teardown_plan(&fp);
        let r = match run(&mut inner, Operation::Teardown, Some(sandbox), &ops) {
            // The cache disagreed with the kernel: tear down what is there.
            Err(e) if cached.is_some() && is_enoent(&e) => {
                match inner.rediscover(Operation::Teardown, sandbox)? {
                    Some(fp) => run(
                        &mut inner,
                        Operation::Teardown,
                        Some(sandbox),
                        &plan::teardown_plan(&fp),
                    ),
                    None => Ok(()),
                }
            }
            r => r,
        };
        inner.known.remove(sandbox);
        r?;
        tracing::debug!(sandbox = %sandbox, tap = %fp.tap, "tore down sandbox chains");
        Ok(true)
    }

    /// Removes the objects of every sandbox not in `live`, as found in the
    /// kernel's table (the caller may remember nothing, e.g. after a crash),
    /// one batch per dead sandbox. Objects whose owner cannot be read are
    /// removed too. Afterwards this handle knows exactly the live sandboxes.
    pub fn reconcile(&self, live: &[SandboxId]) -> Result<Vec<Leftover>, NetfilterError> {
        let mut inner = self.lock();
        let found = inner.discover(Operation::Reconcile)?;
        inner.known.clear();
        let mut removed = Vec::new();
        for fp in found {
            if let Some(owner) = fp.owner.as_ref().filter(|o| live.contains(o)) {
                if !inner.known.contains_key(owner) {
                    inner.known.insert(owner.clone(), fp);
                    continue;
                }
            }
            let ops = plan::teardown_plan(&fp);
            run(&mut inner, Operation::Reconcile, fp.owner.as_ref(), &ops)?;
            tracing::info!(
                sandbox = ?fp.owner.as_ref().map(|o| o.to_string()),
                tap = %fp.tap,
                objects = fp.object_count(),
                "removed leftover sandbox chains"
            );
            removed.push(Leftover {
                sandbox: fp.owner.clone(),
                tap: fp.tap.clone(),
                objects: fp.object_count(),
            });
        }
        Ok(removed)
    }

    /// Reads the sandbox's drop counters.
    pub fn counters(&self, sandbox: &SandboxId) -> Result<SandboxCounters, NetfilterError> {
        let mut inner = self.lock();
        let fp = inner.lookup(Operation::Counters, sandbox)?;
        let names = ObjectNames::new(&fp.tap);
        let mut read = |kind| {
            dump::counter(&mut inner.nl, &names.name(kind))
                .map(|v| Counter {
                    packets: v.packets,
                    bytes: v.bytes,
                })
                .map_err(|source| NetfilterError::Netlink {
                    op: Operation::Counters,
                    sandbox: Some(sandbox.clone()),
                    what: "read counter",
                    source,
                })
        };
        Ok(SandboxCounters {
            forward_dropped: read(ObjectKind::ForwardDropCounter)?,
            input_dropped: read(ObjectKind::InputDropCounter)?,
        })
    }

    /// The sandboxes that have objects in the table, with their taps, as
    /// the kernel has them (sorted by tap).
    pub fn list(&self) -> Result<Vec<(SandboxId, TapName)>, NetfilterError> {
        let mut inner = self.lock();
        Ok(inner
            .discover(Operation::Discover)?
            .into_iter()
            .filter_map(|fp| fp.owner.map(|o| (o, fp.tap)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn firewall_is_send_and_sync() {
        assert_send_sync::<Firewall>();
    }
}

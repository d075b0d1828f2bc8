//! The node: templates, warm pools, networking and every live sandbox, with their
//! lifecycle. `cleave daemon` serves it over its API and `cleave run --forks` drives it
//! directly; neither holds orchestration of its own.
//!
//! - [`boot`]: what every boot checks first (machine shape, KVM, image pins).
//! - [`templates`]: creating templates and finding one to fork.
//! - [`warm`]: worker processes with a template loaded and a VM shell prepared.
//! - [`credential`]: sandbox ids and per-sandbox tokens (only their hashes are kept).
//! - [`journal`]: the worker processes this node started, for reconcile after a crash.

pub mod boot;
pub mod credential;
pub mod exec;
pub mod journal;
pub mod templates;
pub mod warm;

use crate::sync::lock;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cleave_dnsproxy::StatsSnapshot;
use cleave_guest::protocol::Client;

use self::credential::{Credential, SandboxId, Token};
use self::journal::{Journal, JournalError, Reconciled};
use self::templates::{unix_now, CreatedTemplate, ImageResolver, TemplateSpec, TemplateWorkers};
use self::warm::WarmPool;
pub use self::warm::WorkerStart;
use crate::fork::jail::Jail;
use crate::fork::sandbox::{worker_exe, ForkError, Sandbox};
use crate::fork::store::{StoreError, TemplateMeta, TemplateName, TemplateStore};
use crate::fork::worker::{describe_end, Encoded};
use crate::image::rootfs::ExecDefaults;
use crate::net::{EgressPolicy, NetNode, NetOptions, SandboxNetwork};
use crate::vmm::runtime_dir::RuntimeDir;

/// What a node may hold at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLimits {
    /// Live sandboxes.
    pub max_sandboxes: usize,
    /// The sum of live sandboxes' guest memory sizes (what they may come to use).
    pub memory_budget_mib: u64,
    /// Forks in one create request.
    pub max_per_request: u32,
    /// A sandbox's lifetime when its request names none; `None`: until deleted.
    pub default_ttl: Option<Duration>,
    /// The longest lifetime a request may ask for.
    pub max_ttl: Option<Duration>,
}

impl NodeLimits {
    /// No limit but the request size (`cleave run --forks`: the caller is the owner).
    pub fn unlimited() -> Self {
        NodeLimits {
            max_sandboxes: usize::MAX,
            memory_budget_mib: u64::MAX,
            max_per_request: 1024,
            default_ttl: None,
            max_ttl: None,
        }
    }
}

pub struct NodeOptions {
    pub store: TemplateStore,
    /// Sandbox networking; `None`: a request with a policy is refused.
    pub net: Option<NetOptions>,
    pub limits: NodeLimits,
    /// A fork whose reseed is not confirmed within this is destroyed.
    pub gate_timeout: Duration,
    /// Warm workers kept per loaded template (0: each fork starts its worker on demand).
    pub warm_workers: usize,
    /// Where the journal lives; `None`: no journal (a one-shot command).
    pub state_dir: Option<PathBuf>,
    /// The `cleave-fork-worker` binary; `None`: the one beside this executable.
    pub worker_exe: Option<PathBuf>,
    /// How workers are jailed (uids, and cgroup leaves where available); `None`: they run
    /// unjailed, as this process's uid (tests and benchmarks of the unjailed path, or a
    /// node not running as root). Seccomp and the parent's fd hygiene apply either way.
    pub jail: Option<Jail>,
    /// How workers start: from the template's zygote (the default) or each exec'd.
    pub worker_start: WorkerStart,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Template(#[from] StoreError),
    #[error(
        "limit reached: {live} sandboxes are alive and {asked} more were asked for; this node \
         allows {max} (delete some, or raise max_sandboxes in the daemon's config)"
    )]
    TooManySandboxes {
        live: usize,
        asked: usize,
        max: usize,
    },
    #[error(
        "limit reached: {asked} MiB more of guest memory would make {total} MiB; this node's \
         budget is {budget} MiB (delete some sandboxes, or raise memory_budget_mib)"
    )]
    MemoryBudget { asked: u64, total: u64, budget: u64 },
    #[error("no sandbox {0} (`cleave sandbox ls` lists them)")]
    NotFound(SandboxId),
    #[error("template {name} has {live} live sandbox(es); delete them first")]
    TemplateInUse { name: TemplateName, live: usize },
    #[error("this node has no sandbox networking, so a network policy cannot be honoured: {0}")]
    NoNetwork(String),
    #[error("{0}")]
    Fork(#[from] ForkError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

/// What to create.
#[derive(Debug, Clone)]
pub struct SandboxRequest {
    pub template: TemplateName,
    pub count: u32,
    /// `None`: the node's default.
    pub ttl: Option<Duration>,
    /// `None` or empty: no network at all.
    pub policy: Option<EgressPolicy>,
    /// Any failed fork destroys every fork of the request.
    pub all_or_nothing: bool,
}

/// A fork that did not become a sandbox, and why.
#[derive(Debug, Clone)]
pub struct ForkFailure {
    pub message: String,
    /// The reseed gate's reason when the gate refused the fork.
    pub gate_reason: Option<&'static str>,
}

/// A sandbox just created, with its token (returned to its creator once).
pub struct Created {
    pub sandbox: Arc<LiveSandbox>,
    pub token: Token,
}

impl std::fmt::Debug for Created {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token stays out of every log line and assertion message.
        f.debug_struct("Created")
            .field("sandbox", &self.sandbox.id)
            .field("token", &self.token)
            .finish()
    }
}

pub type ForkOutcome = Result<Created, ForkFailure>;

/// A live sandbox.
pub struct LiveSandbox {
    pub id: SandboxId,
    pub template: TemplateName,
    pub mem_mib: u64,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds; `None`: until deleted.
    pub expires: Option<u64>,
    pub ip: Option<Ipv4Addr>,
    /// Request → reseeded (and configured, with a network).
    pub fork_time: Duration,
    /// Building its network, before the fork resumed.
    pub net_time: Option<Duration>,
    /// Of `fork_time`: the guest applying its network identity.
    pub identity_time: Option<Duration>,
    pub reseeded: bool,
    /// Its image's exec defaults (environment, working directory, user).
    pub defaults: Arc<ExecDefaults>,
    credential: Credential,
    client: Arc<Client>,
    worker_pid: u32,
    sandbox: Mutex<Option<Sandbox>>,
    execs: AtomicU32,
}

impl LiveSandbox {
    /// Its worker process's pid (as the node sees it).
    pub fn worker_pid(&self) -> u32 {
        self.worker_pid
    }

    /// The guest agent's connection (fails with `Closed` once the sandbox is destroyed).
    pub fn client(&self) -> Arc<Client> {
        self.client.clone()
    }

    pub fn active_execs(&self) -> u32 {
        self.execs.load(Ordering::Acquire)
    }

    /// Counts an exec in, unless `max` are running already.
    pub fn begin_exec(self: &Arc<Self>, max: u32) -> Option<ExecSlot> {
        self.execs
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ExecSlot(self.clone()))
    }
}

/// One running exec; counted out when dropped.
pub struct ExecSlot(Arc<LiveSandbox>);

impl Drop for ExecSlot {
    fn drop(&mut self) {
        self.0.execs.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A template loaded for forking, with its warm pool.
pub struct Forkable {
    pub meta: TemplateMeta,
    /// `meta.defaults`, shared by every sandbox of the template (not copied per fork).
    defaults: Arc<ExecDefaults>,
    pool: WarmPool,
}

#[derive(Default)]
struct Live {
    sandboxes: BTreeMap<SandboxId, Arc<LiveSandbox>>,
    /// Admitted by a request still forking.
    reserved: usize,
    reserved_mib: u64,
}

impl Live {
    fn mib(&self) -> u64 {
        self.sandboxes.values().map(|s| s.mem_mib).sum::<u64>() + self.reserved_mib
    }
}

/// The node.
pub struct Node {
    options: NodeOptions,
    exe: PathBuf,
    net: Option<NetNode>,
    journal: Option<Journal>,
    templates: Mutex<BTreeMap<TemplateName, Arc<Forkable>>>,
    live: Mutex<Live>,
    /// Wakes the refill thread; `true` once it must stop.
    refill: Arc<(Mutex<bool>, Condvar)>,
    refill_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    closed: AtomicBool,
    reconciled: Reconciled,
    /// DNS counters of destroyed sandboxes (so node-wide totals never go down).
    retired_dns: Mutex<StatsSnapshot>,
}

impl Node {
    /// Opens the node: ends what a previous agent left (journal, runtime directories,
    /// firewall objects of dead slots), opens networking, and starts the thread that keeps
    /// the warm pools full.
    pub fn open(options: NodeOptions) -> Result<Arc<Node>, NodeError> {
        let exe = match &options.worker_exe {
            Some(p) => p.clone(),
            None => worker_exe()?,
        };
        let journal = options
            .state_dir
            .as_deref()
            .map(Journal::open)
            .transpose()?;
        let reconciled = match &journal {
            Some(j) => {
                let mut r = j.reconcile(&RuntimeDir::base());
                // After the leftover workers are gone: their leaves are empty now (another
                // cleave's live workers keep theirs).
                if let Some(c) = options.jail.as_ref().and_then(|j| j.cgroups.as_ref()) {
                    r.cgroups = c.parent.reconcile(crate::fork::jail::LEAF_PREFIX);
                }
                if r != Reconciled::default() {
                    tracing::info!(
                        killed = r.killed,
                        entries = r.entries,
                        runtime_dirs = r.runtime_dirs,
                        cgroups = r.cgroups,
                        "reconciled what a previous agent left"
                    );
                }
                r
            }
            None => Reconciled::default(),
        };
        let net = match &options.net {
            Some(o) => Some(
                NetNode::open(o.clone())
                    .map_err(|e| anyhow::anyhow!(e).context("setting up sandbox networking"))?,
            ),
            None => None,
        };
        let node = Arc::new(Node {
            options,
            exe,
            net,
            journal,
            templates: Mutex::new(BTreeMap::new()),
            live: Mutex::new(Live::default()),
            refill: Arc::new((Mutex::new(false), Condvar::new())),
            refill_thread: Mutex::new(None),
            closed: AtomicBool::new(false),
            reconciled,
            retired_dns: Mutex::new(StatsSnapshot::default()),
        });
        let wants_refill =
            node.options.warm_workers > 0 || node.options.net.as_ref().is_some_and(|n| n.pool > 0);
        if wants_refill {
            let weak = Arc::downgrade(&node);
            let signal = node.refill.clone();
            let handle = std::thread::Builder::new()
                .name("cleave-refill".into())
                .spawn(move || refill_loop(weak, signal))
                .map_err(|e| anyhow::anyhow!("starting the pool refill thread: {e}"))?;
            *lock(&node.refill_thread) = Some(handle);
        }
        Ok(node)
    }

    pub fn store(&self) -> &TemplateStore {
        &self.options.store
    }

    pub fn limits(&self) -> &NodeLimits {
        &self.options.limits
    }

    pub fn net(&self) -> Option<&NetNode> {
        self.net.as_ref()
    }

    /// What reconcile at open found.
    pub fn reconciled(&self) -> &Reconciled {
        &self.reconciled
    }

    /// Where this node's templates boot: its worker binary, under its jail.
    fn template_workers(&self) -> TemplateWorkers<'_> {
        TemplateWorkers {
            exe: &self.exe,
            jail: self.options.jail.as_ref(),
        }
    }

    /// Creates and saves a template (refused when the name is taken).
    pub fn create_template(
        &self,
        spec: &TemplateSpec,
        image: impl ImageResolver,
    ) -> Result<CreatedTemplate, NodeError> {
        let created = templates::create(&self.options.store, spec, image, self.template_workers())?;
        self.wake_refill();
        Ok(created)
    }

    /// `spec.name`, loaded when it exists (and checked for this host), else created from
    /// `image`; see [`templates::ensure`].
    pub fn ensure_template(
        &self,
        spec: &TemplateSpec,
        shape_given: (bool, bool),
        image: impl ImageResolver,
    ) -> Result<(Arc<Forkable>, bool), NodeError> {
        if let Some(f) = lock(&self.templates).get(&spec.name) {
            return Ok((f.clone(), false));
        }
        let (template, meta, created) = templates::ensure(
            &self.options.store,
            spec,
            shape_given,
            image,
            self.template_workers(),
        )?;
        Ok((self.load_template(template, meta)?, created))
    }

    /// The template `name`, loaded for forking (once; later calls share it).
    pub fn forkable(&self, name: &TemplateName) -> Result<Arc<Forkable>, NodeError> {
        if let Some(f) = lock(&self.templates).get(name) {
            return Ok(f.clone());
        }
        let (template, meta) = self.options.store.load(name)?;
        self.load_template(template, meta)
    }

    /// Makes a template the caller has already loaded (or just created) forkable here.
    pub fn load_template(
        &self,
        template: crate::fork::Template,
        meta: TemplateMeta,
    ) -> Result<Arc<Forkable>, NodeError> {
        let encoded = Encoded::new(&template).map_err(ForkError::from)?;
        let f = Arc::new(Forkable {
            defaults: Arc::new(meta.defaults.clone()),
            pool: WarmPool::new(
                self.exe.clone(),
                encoded,
                self.options.jail.clone(),
                self.options.warm_workers,
                self.options.worker_start,
            ),
            meta,
        });
        let f = lock(&self.templates)
            .entry(f.meta.name.clone())
            .or_insert(f)
            .clone();
        self.wake_refill();
        Ok(f)
    }

    /// Every template in the store.
    pub fn list_templates(&self) -> Result<Vec<TemplateMeta>, NodeError> {
        Ok(self.options.store.list()?)
    }

    /// Removes a template no live sandbox uses (its warm workers end).
    pub fn remove_template(&self, name: &TemplateName) -> Result<(), NodeError> {
        let live = lock(&self.live)
            .sandboxes
            .values()
            .filter(|s| &s.template == name)
            .count();
        if live > 0 {
            return Err(NodeError::TemplateInUse {
                name: name.clone(),
                live,
            });
        }
        self.options.store.remove(name)?;
        if let Some(f) = lock(&self.templates).remove(name) {
            f.pool.drain(self.journal.as_ref());
        }
        Ok(())
    }

    /// Warm workers ready, per loaded template.
    pub fn pool_depths(&self) -> Vec<(TemplateName, usize)> {
        lock(&self.templates)
            .iter()
            .map(|(n, f)| (n.clone(), f.pool.depth()))
            .collect()
    }

    /// Creates `req.count` sandboxes. Admission (limits, template, policy) is checked for
    /// the whole request before anything starts, and an error then changes nothing; after
    /// that every fork has its own outcome.
    pub fn create_sandboxes(&self, req: &SandboxRequest) -> Result<Vec<ForkOutcome>, NodeError> {
        let limits = &self.options.limits;
        if req.count == 0 || req.count > limits.max_per_request {
            return Err(NodeError::BadRequest(format!(
                "count {} is out of range: ask for 1 to {} sandboxes per request",
                req.count, limits.max_per_request
            )));
        }
        let ttl = match (req.ttl, limits.max_ttl) {
            (Some(t), Some(max)) if t > max => {
                return Err(NodeError::BadRequest(format!(
                    "ttl {} s is longer than this node allows ({} s)",
                    t.as_secs(),
                    max.as_secs()
                )))
            }
            (Some(t), _) if t.is_zero() => {
                return Err(NodeError::BadRequest("ttl must be at least 1 s".into()))
            }
            (Some(t), _) => Some(t),
            (None, _) => limits.default_ttl,
        };
        let policy = req.policy.as_ref().filter(|p| !p.is_empty());
        let net = match (policy, &self.net) {
            (Some(_), None) => {
                return Err(NodeError::NoNetwork(
                    "start the node with networking (the daemon's [network] config), or ask \
                     for no policy"
                        .into(),
                ))
            }
            (Some(p), Some(n)) => Some((p, n)),
            (None, _) => None,
        };
        let forkable = self.forkable(&req.template)?;
        let n = req.count as usize;
        let mib = forkable.meta.mem_mib.saturating_mul(u64::from(req.count));
        {
            let mut live = lock(&self.live);
            let alive = live.sandboxes.len() + live.reserved;
            if alive.saturating_add(n) > limits.max_sandboxes {
                return Err(NodeError::TooManySandboxes {
                    live: alive,
                    asked: n,
                    max: limits.max_sandboxes,
                });
            }
            let total = live.mib().saturating_add(mib);
            if total > limits.memory_budget_mib {
                return Err(NodeError::MemoryBudget {
                    asked: mib,
                    total,
                    budget: limits.memory_budget_mib,
                });
            }
            live.reserved += n;
            live.reserved_mib += mib;
        }
        let outcomes: Vec<ForkOutcome> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|_| s.spawn(|| self.fork_one(&forkable, net, ttl)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(ForkFailure {
                            message: "the fork's thread panicked".into(),
                            gate_reason: None,
                        })
                    })
                })
                .collect()
        });
        let mut outcomes = outcomes;
        {
            let mut live = lock(&self.live);
            live.reserved -= n;
            live.reserved_mib -= mib;
            for c in outcomes.iter().flatten() {
                live.sandboxes
                    .insert(c.sandbox.id.clone(), c.sandbox.clone());
            }
        }
        self.wake_refill();
        if req.all_or_nothing && outcomes.iter().any(Result::is_err) {
            let failed = outcomes.iter().filter(|o| o.is_err()).count();
            for o in &mut outcomes {
                if let Ok(c) = o {
                    let id = c.sandbox.id.clone();
                    let _ = self.destroy(&id);
                    *o = Err(ForkFailure {
                        message: format!(
                            "destroyed: {failed} other fork(s) of this all-or-nothing request \
                             failed"
                        ),
                        gate_reason: None,
                    });
                }
            }
        }
        Ok(outcomes)
    }

    fn fork_one(
        &self,
        forkable: &Forkable,
        net: Option<(&EgressPolicy, &NetNode)>,
        ttl: Option<Duration>,
    ) -> ForkOutcome {
        let fail = |message: String| ForkFailure {
            message,
            gate_reason: None,
        };
        let id = SandboxId::random().map_err(|e| fail(format!("reading host entropy: {e}")))?;
        let token = Token::random().map_err(|e| fail(format!("reading host entropy: {e}")))?;
        let warm = forkable
            .pool
            .take(self.journal.as_ref())
            .map_err(|e| fail(e.to_string()))?;
        // Journaled when it was started (warm pool): nothing to write on the request path.
        let pid = warm.pid();
        let forget = || {
            if let Some(j) = &self.journal {
                j.forget(pid);
            }
        };
        let t = Instant::now();
        let network = match net {
            Some((policy, node)) => match SandboxNetwork::create(node, id.as_str(), policy) {
                Ok(n) => Some(n),
                Err(e) => {
                    drop(warm);
                    forget();
                    return Err(fail(format!("creating the sandbox's network: {e}")));
                }
            },
            None => None,
        };
        let net_time = network.as_ref().map(|_| t.elapsed());
        let sandbox = match Sandbox::start(warm, self.options.gate_timeout, network) {
            Ok(s) => s,
            Err(e) => {
                forget();
                let gate_reason = e.gate_reason();
                return Err(ForkFailure {
                    message: format!("{:#}", anyhow::Error::new(e)),
                    gate_reason,
                });
            }
        };
        let now = unix_now();
        let live = LiveSandbox {
            id,
            template: forkable.meta.name.clone(),
            mem_mib: forkable.meta.mem_mib,
            created: now,
            expires: ttl.map(|t| now.saturating_add(t.as_secs())),
            ip: sandbox.guest_ip(),
            fork_time: sandbox.fork_time(),
            net_time,
            identity_time: sandbox.identity_time(),
            reseeded: sandbox.reseed_reply().reseeded,
            defaults: forkable.defaults.clone(),
            credential: token.credential(),
            client: sandbox.shared_client(),
            worker_pid: pid,
            sandbox: Mutex::new(Some(sandbox)),
            execs: AtomicU32::new(0),
        };
        tracing::info!(sandbox = %live.id, template = %live.template, fork_ms = live.fork_time.as_secs_f64() * 1e3, "sandbox created");
        Ok(Created {
            sandbox: Arc::new(live),
            token,
        })
    }

    /// Every live sandbox, by id.
    pub fn list(&self) -> Vec<Arc<LiveSandbox>> {
        lock(&self.live).sandboxes.values().cloned().collect()
    }

    pub fn get(&self, id: &SandboxId) -> Result<Arc<LiveSandbox>, NodeError> {
        lock(&self.live)
            .sandboxes
            .get(id)
            .cloned()
            .ok_or_else(|| NodeError::NotFound(id.clone()))
    }

    /// The sandbox `id` if `token` is its token. An unknown sandbox and a wrong token
    /// are the same `None`, reached by the same constant-time comparison.
    pub fn authorize(&self, id: &SandboxId, token: &str) -> Option<Arc<LiveSandbox>> {
        let found = lock(&self.live).sandboxes.get(id).cloned();
        let accepted = match &found {
            Some(s) => s.credential.accepts(token),
            None => {
                // The same work as a real comparison, and the same answer as a wrong token.
                let _ = Credential::nothing().accepts(token);
                false
            }
        };
        found.filter(|_| accepted)
    }

    /// Destroys a sandbox: its VM and worker, then its network; nothing of it is left.
    pub fn destroy(&self, id: &SandboxId) -> Result<(), NodeError> {
        let s = lock(&self.live)
            .sandboxes
            .remove(id)
            .ok_or_else(|| NodeError::NotFound(id.clone()))?;
        self.end(&s);
        self.wake_refill();
        Ok(())
    }

    fn end(&self, s: &LiveSandbox) {
        let sandbox = lock(&s.sandbox).take();
        if let Some(sb) = sandbox {
            if let Some(st) = sb.network().and_then(SandboxNetwork::dns_stats) {
                *lock(&self.retired_dns) += st;
            }
            if let Err(e) = sb.destroy() {
                tracing::warn!(sandbox = %s.id, error = %e, "destroying a sandbox");
            }
        }
        if let Some(j) = &self.journal {
            j.forget(s.worker_pid);
        }
        tracing::info!(sandbox = %s.id, "sandbox destroyed");
    }

    /// Destroys every sandbox whose lifetime is over; returns their ids.
    pub fn reap_expired(&self) -> Vec<SandboxId> {
        let now = unix_now();
        let due: Vec<Arc<LiveSandbox>> = {
            let mut live = lock(&self.live);
            let ids: Vec<SandboxId> = live
                .sandboxes
                .values()
                .filter(|s| s.expires.is_some_and(|e| e <= now))
                .map(|s| s.id.clone())
                .collect();
            ids.iter()
                .filter_map(|id| live.sandboxes.remove(id))
                .collect()
        };
        for s in &due {
            tracing::info!(sandbox = %s.id, "sandbox reached the end of its ttl");
            self.end(s);
        }
        if !due.is_empty() {
            self.wake_refill();
        }
        due.into_iter().map(|s| s.id.clone()).collect()
    }

    /// Destroys every sandbox whose worker process ended on its own; returns their ids
    /// and why each ended (also in the node log).
    pub fn reap_lost(&self) -> Vec<(SandboxId, String)> {
        let mut lost = Vec::new();
        for s in self.list() {
            // A sandbox busy being destroyed is skipped: it is going anyway.
            let Ok(mut guard) = s.sandbox.try_lock() else {
                continue;
            };
            let Some(status) = guard.as_mut().and_then(Sandbox::worker_ended) else {
                continue;
            };
            drop(guard);
            let why = describe_end(&status).unwrap_or_else(|| "exited".into());
            if lock(&self.live).sandboxes.remove(&s.id).is_some() {
                tracing::warn!(sandbox = %s.id, pid = s.worker_pid, reason = %why, "sandbox lost: its worker ended");
                self.end(&s);
                lost.push((s.id.clone(), why));
            }
        }
        if !lost.is_empty() {
            self.wake_refill();
        }
        lost
    }

    /// DNS proxy counters over every sandbox this node has run.
    pub fn dns_stats(&self) -> StatsSnapshot {
        let mut total = *lock(&self.retired_dns);
        for s in self.list() {
            if let Some(st) = lock(&s.sandbox)
                .as_ref()
                .and_then(|sb| sb.network().and_then(SandboxNetwork::dns_stats))
            {
                total += st;
            }
        }
        total
    }

    /// Whether every loaded template's pool (and the network pool) is at its target.
    pub fn pools_warm(&self) -> bool {
        let templates_warm = lock(&self.templates)
            .values()
            .all(|f| f.pool.depth() >= self.options.warm_workers);
        let net_warm = match (&self.net, &self.options.net) {
            (Some(n), Some(o)) => n.pool_depth() >= o.pool,
            _ => true,
        };
        templates_warm && net_warm
    }

    fn wake_refill(&self) {
        self.refill.1.notify_all();
    }

    /// Destroys every sandbox (in parallel), stops the refill thread and ends the warm
    /// workers. Idempotent.
    pub fn shutdown(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        *lock(&self.refill.0) = true;
        self.wake_refill();
        if let Some(h) = lock(&self.refill_thread).take() {
            let _ = h.join();
        }
        let all: Vec<Arc<LiveSandbox>> = std::mem::take(&mut lock(&self.live).sandboxes)
            .into_values()
            .collect();
        std::thread::scope(|s| {
            for sb in &all {
                s.spawn(|| self.end(sb));
            }
        });
        for f in lock(&self.templates).values() {
            f.pool.drain(self.journal.as_ref());
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Keeps the warm pools and the network slot pool at their targets, off the request
/// path, until told to stop.
fn refill_loop(node: std::sync::Weak<Node>, signal: Arc<(Mutex<bool>, Condvar)>) {
    loop {
        {
            let Some(node) = node.upgrade() else { return };
            let pools: Vec<Arc<Forkable>> = lock(&node.templates).values().cloned().collect();
            for f in pools {
                if *lock(&signal.0) {
                    return;
                }
                if let Err(e) = f.pool.refill(node.journal.as_ref()) {
                    tracing::warn!(template = %f.meta.name, error = %e, "refilling the warm pool");
                }
            }
            if let Some(net) = &node.net {
                if let Err(e) = net.fill_pool() {
                    tracing::warn!(error = %e, "refilling the network slot pool");
                }
            }
        }
        let stop = lock(&signal.0);
        if *stop {
            return;
        }
        let (stop, _) = signal
            .1
            .wait_timeout(stop, Duration::from_secs(1))
            .unwrap_or_else(|p| p.into_inner());
        if *stop {
            return;
        }
    }
}

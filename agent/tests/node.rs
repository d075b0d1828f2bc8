//! The node's admission: a create request beyond a limit (sandboxes, memory budget,
//! request size, TTL), with a policy on a node without networking, or for an unknown
//! template is refused whole, naming the limit, before any worker starts; a reservation
//! is released whatever the forks did. A tiny hand-made template (no guest agent) is
//! enough: every check here happens before, or regardless of, a guest answering.

mod tiny_template;

use std::time::Duration;

use cleave_agent::fork::state::STATE_FORMAT;
use cleave_agent::fork::store::{TemplateMeta, TemplateName, TemplateStore};
use cleave_agent::host::fingerprint::HostFingerprint;
use cleave_agent::net::EgressPolicy;
use cleave_agent::node::{Node, NodeError, NodeLimits, NodeOptions, SandboxRequest, WorkerStart};

mod proc_status;
use proc_status::status_field;

/// A 32 MiB template of the tiny guest, saved as `name` in `store`.
fn tiny_template(store: &TemplateStore, name: &str) {
    let template = tiny_template::capture();
    let meta = TemplateMeta {
        name: name.parse().unwrap(),
        created: 0,
        mem_mib: tiny_template::MEM_MIB,
        vcpus: 1,
        kernel_sha256: "none".into(),
        initrd_sha256: "none".into(),
        cmdline: String::new(),
        warmup: None,
        format: STATE_FORMAT,
        host: Some(HostFingerprint::current().unwrap().clone()),
        image: None,
        defaults: Default::default(),
    };
    store.save(&template, &meta).unwrap();
}

fn node(store: TemplateStore, limits: NodeLimits) -> std::sync::Arc<Node> {
    Node::open(NodeOptions {
        store,
        net: None,
        limits,
        gate_timeout: Duration::from_secs(2),
        warm_workers: 0,
        state_dir: None,
        worker_exe: Some(env!("CARGO_BIN_EXE_cleave-fork-worker").into()),
        jail: None,
        worker_start: Default::default(),
    })
    .unwrap()
}

fn req(count: u32) -> SandboxRequest {
    SandboxRequest {
        template: "tiny".parse::<TemplateName>().unwrap(),
        count,
        ttl: None,
        policy: None,
        all_or_nothing: false,
    }
}

#[test]
fn requests_beyond_a_limit_are_refused_whole_and_reservations_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = TemplateStore::at(dir.path().join("templates"));
    tiny_template(&store, "tiny");
    let limits = NodeLimits {
        max_sandboxes: 2,
        memory_budget_mib: 48,
        max_per_request: 4,
        default_ttl: Some(Duration::from_secs(60)),
        max_ttl: Some(Duration::from_secs(120)),
    };
    let node = node(store, limits);

    let e = node.create_sandboxes(&req(3)).unwrap_err();
    assert!(
        matches!(
            e,
            NodeError::TooManySandboxes {
                live: 0,
                asked: 3,
                max: 2
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("max_sandboxes"), "{e}");
    // 2 × 32 MiB > 48 MiB.
    let e = node.create_sandboxes(&req(2)).unwrap_err();
    assert!(
        matches!(e, NodeError::MemoryBudget { asked: 64, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("memory_budget_mib"), "{e}");
    for (r, want) in [
        (req(0), "1 to 4"),
        (req(5), "1 to 4"),
        (
            SandboxRequest {
                ttl: Some(Duration::from_secs(121)),
                ..req(1)
            },
            "longer than this node allows",
        ),
        (
            SandboxRequest {
                ttl: Some(Duration::ZERO),
                ..req(1)
            },
            "at least 1 s",
        ),
    ] {
        let e = node.create_sandboxes(&r).unwrap_err();
        assert!(
            matches!(e, NodeError::BadRequest(_)) && e.to_string().contains(want),
            "{e}"
        );
    }
    let policy = EgressPolicy::parse(&["example.com".into()], &[]).unwrap();
    let e = node
        .create_sandboxes(&SandboxRequest {
            policy: Some(policy),
            ..req(1)
        })
        .unwrap_err();
    assert!(matches!(e, NodeError::NoNetwork(_)), "{e}");
    let e = node
        .create_sandboxes(&SandboxRequest {
            template: "nosuch".parse().unwrap(),
            ..req(1)
        })
        .unwrap_err();
    assert!(e.to_string().contains("no template named nosuch"), "{e}");

    // Admitted: the fork itself fails (the tiny guest has no agent to reach), reported
    // per fork; nothing stays reserved or alive, so the same request is admitted again.
    for _ in 0..2 {
        let outcomes = node.create_sandboxes(&req(1)).unwrap();
        assert_eq!(outcomes.len(), 1);
        let f = outcomes
            .into_iter()
            .next()
            .unwrap()
            .expect_err("no agent: no sandbox");
        assert!(f.message.contains("no vsock device"), "{}", f.message);
        assert!(node.list().is_empty());
    }
    node.shutdown();
}

#[test]
fn an_unknown_or_malformed_sandbox_is_never_authorised() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(
        TemplateStore::at(dir.path().join("templates")),
        NodeLimits::unlimited(),
    );
    let id = "sb-0123456789abcdef".parse().unwrap();
    assert!(node.authorize(&id, &"ab".repeat(32)).is_none());
    assert!(node.authorize(&id, "").is_none());
    assert!(matches!(node.destroy(&id), Err(NodeError::NotFound(_))));
    assert!(node.reap_expired().is_empty());
}

#[test]
fn a_jailed_worker_has_its_own_uid_no_privileges_and_its_own_namespaces() {
    use cleave_agent::fork::jail::{Jail, JailRange};
    use cleave_agent::fork::sandbox::WarmWorker;
    use cleave_agent::fork::worker::Encoded;
    use cleave_agent::fork::zygote::Zygote;

    let _one = one_zygote_test_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let store = TemplateStore::at(dir.path().join("templates"));
    tiny_template(&store, "tiny");
    let (template, _) = store.load(&"tiny".parse().unwrap()).unwrap();
    let encoded = Encoded::new(&template).unwrap();
    // cgroup leaves are checked in the rig (this host may have cgroup v1).
    let range = Jail {
        uids: JailRange {
            lock_dir: dir.path().join("jail"),
            first_uid: 910_000,
            count: 4,
        },
        cgroups: None,
    };
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_cleave-fork-worker"));
    // An exec'd worker, and one forked from a zygote, are jailed alike.
    jailed_alike(|| WarmWorker::new(exe, &encoded, Some(&range)).unwrap());
    let zygote = Zygote::start(exe, &encoded).unwrap();
    jailed_alike(|| WarmWorker::forked(&zygote, Some(&range)).unwrap());
}

fn jailed_alike(start: impl Fn() -> cleave_agent::fork::sandbox::WarmWorker) {
    use cleave_agent::vmm::runtime_dir::RuntimeDir;
    use std::os::unix::fs::MetadataExt;

    let a = start();
    let b = start();
    let (pa, pb) = (a.pid(), b.pid());
    assert_eq!(status_field(pa, "Uid"), "910000\t910000\t910000\t910000");
    assert_eq!(status_field(pa, "Gid"), "910000\t910000\t910000\t910000");
    assert_eq!(
        status_field(pb, "Uid"),
        "910001\t910001\t910001\t910001",
        "one uid per worker"
    );
    assert_eq!(status_field(pa, "Groups"), "");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pa, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(pa, "NoNewPrivs"), "1");
    // Not dumpable: its /proc files belong to root, not to its uid (no sibling can
    // ptrace it or read its memory).
    let mem = std::fs::metadata(format!("/proc/{pa}/mem")).unwrap();
    assert_eq!(mem.uid(), 0);
    for ns in ["mnt", "net", "ipc", "uts", "pid"] {
        let theirs = std::fs::read_link(format!("/proc/{pa}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace");
    }
    // Its root is its runtime directory: owned by its uid, 0700, nothing else in it.
    let rundir = std::fs::read_dir(RuntimeDir::base())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("vm-{pa}-")))
        })
        .expect("the worker's runtime directory");
    let m = std::fs::metadata(&rundir).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (910_000, 0o700));
    let limits = std::fs::read_to_string(format!("/proc/{pa}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max core file size") && l.contains(" 0 ")),
        "{limits}"
    );
    // Ended: its directory is removed by the parent and its uid is free again.
    drop(a);
    assert!(!rundir.exists());
    let c = start();
    assert_eq!(
        status_field(c.pid(), "Uid"),
        "910000\t910000\t910000\t910000"
    );
    drop((b, c));
}

/// Tests that start zygotes run one at a time: they count this process's zygotes.
static ZYGOTES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_zygote_test_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ZYGOTES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Our children named `comm`.
fn children_named(comm: &str) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| proc_status::name_and_parent(pid) == Some((comm.to_string(), me)))
        .collect()
}

/// A warm pool of 2 for a tiny template (in a store under the returned directory), its
/// workers started as `start` says.
fn tiny_pool(start: WorkerStart) -> (cleave_agent::node::warm::WarmPool, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = TemplateStore::at(dir.path().join("templates"));
    tiny_template(&store, "tiny");
    let (template, _) = store.load(&"tiny".parse().unwrap()).unwrap();
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_cleave-fork-worker"));
    let encoded = cleave_agent::fork::worker::Encoded::new(&template).unwrap();
    let pool = cleave_agent::node::warm::WarmPool::new(exe, encoded, None, 2, start);
    (pool, dir)
}

#[test]
fn the_warm_pool_starts_a_new_zygote_when_its_zygote_dies_and_drain_ends_it() {
    let _one = one_zygote_test_at_a_time();
    let (pool, _dir) = tiny_pool(WorkerStart::Zygote);
    assert_eq!(pool.refill(None).unwrap(), 2);
    // Other tests of this binary run nodes, with zygotes of their own, at the same time:
    // the pool says which zygote is its own.
    let first = pool.zygote_pid().expect("the pool started its zygote");
    assert_eq!(
        proc_status::name_and_parent(first),
        Some(("cleave-zygote".to_string(), std::process::id()))
    );
    // SAFETY: kill(2) on our own child, no memory involved.
    let killed = unsafe { libc::kill(first as libc::pid_t, libc::SIGKILL) };
    assert_eq!(killed, 0);
    // Its workers are ours and stay; the next one comes from a new zygote.
    let kept: Vec<_> = (0..2).map(|_| pool.take(None).unwrap()).collect();
    let next = pool.take(None).unwrap();
    let second = pool.zygote_pid().expect("a new zygote");
    assert_ne!(second, first, "the dead zygote was not replaced");
    assert!(children_named("cleave-zygote").contains(&second));
    for w in kept.iter().chain([&next]) {
        assert!(std::path::Path::new(&format!("/proc/{}", w.pid())).exists());
    }
    drop((kept, next));
    pool.drain(None);
    assert_eq!(pool.zygote_pid(), None);
    assert!(
        !children_named("cleave-zygote").contains(&second),
        "drain left the zygote"
    );
}

#[test]
fn a_pool_set_to_exec_starts_every_worker_afresh_and_no_zygote() {
    let _one = one_zygote_test_at_a_time();
    let (pool, _dir) = tiny_pool(WorkerStart::Exec);
    assert_eq!(pool.refill(None).unwrap(), 2);
    let extra = pool.take(None).unwrap();
    let extra2 = pool.take(None).unwrap();
    let extra3 = pool.take(None).unwrap();
    // (Other tests of this binary run nodes, with zygotes, at the same time: ask the pool.)
    assert_eq!(pool.zygote_pid(), None, "the pool started a zygote");
    let workers = children_named("cleave-fork-wor");
    for w in [&extra, &extra2, &extra3] {
        assert!(workers.contains(&w.pid()), "{} is not our worker", w.pid());
        // Exec'd: its command line is the worker binary's own, not a zygote's (a zygote's
        // children keep the zygote's, `--zygote` included).
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", w.pid())).unwrap();
        assert!(!String::from_utf8_lossy(&cmdline).contains("--zygote"));
    }
    drop((extra, extra2, extra3));
    pool.drain(None);
}

//! The daemon's API against the library it serves, side by side in one run (needs a KVM
//! that runs Linux guests: directly, or in the rig via scripts/kvm-or-rig):
//! - create → ready: `Node::create_sandboxes` vs `CreateSandboxes` over the Unix socket;
//! - exec round trip of `true`: the guest connection directly vs `Exec` over the API;
//! - sandboxes created (and destroyed) per second, 4 callers at once, both paths.
//!
//! Both paths use the same template and the same warm-pool depth.
//! `cargo run --release -p cleave-agent --example api_bench -- [--runs N] [--secs S]`
//! (with the cleave binary beside it: target/release/cleave).

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cleave_agent::daemon::api::pb::{
    self, exec_client::ExecClient, sandboxes_client::SandboxesClient,
};
use cleave_agent::daemon::client;
use cleave_agent::fork::store::{TemplateName, TemplateStore};
use cleave_agent::node::boot::default_image;
use cleave_agent::node::templates::TemplateSpec;
use cleave_agent::node::{Node, NodeLimits, NodeOptions, SandboxRequest};
use cleave_guest::protocol::ExecRequest;

const WARM: usize = 2;

fn pct(xs: &mut [f64], p: f64) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn request() -> SandboxRequest {
    SandboxRequest {
        template: TemplateName::default_name(),
        count: 1,
        ttl: None,
        policy: None,
        all_or_nothing: false,
    }
}

struct Row {
    what: &'static str,
    lib: (f64, f64),
    api: (f64, f64),
}

fn main() -> anyhow::Result<()> {
    let runs = arg("--runs", 20) as usize;
    let secs = arg("--secs", 15);
    let dir = tempfile::tempdir()?;
    // SAFETY: set before any thread exists.
    unsafe { std::env::set_var("XDG_RUNTIME_DIR", dir.path()) };

    // The library path.
    let node = Node::open(NodeOptions {
        store: TemplateStore::default_location(),
        net: None,
        limits: NodeLimits::unlimited(),
        gate_timeout: Duration::from_secs(30),
        warm_workers: WARM,
        state_dir: None,
    })?;
    let spec = TemplateSpec::new(TemplateName::default_name());
    node.ensure_template(&spec, (false, false), default_image)?;
    let wait_warm = |node: &Node| {
        while !node.pools_warm() {
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let (mut lib_create, mut lib_exec) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        wait_warm(&node);
        let t = Instant::now();
        let mut o = node.create_sandboxes(&request())?;
        let s = o
            .pop()
            .unwrap()
            .map_err(|f| anyhow::anyhow!(f.message))?
            .sandbox;
        lib_create.push(t.elapsed().as_secs_f64() * 1e3);
        let c = s.client();
        let t = Instant::now();
        c.exec_collect(ExecRequest::new(["true"]), None)?;
        lib_exec.push(t.elapsed().as_secs_f64() * 1e3);
        node.destroy(&s.id)?;
    }
    let lib_rate = {
        let done = AtomicU64::new(0);
        let end = Instant::now() + Duration::from_secs(secs);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    while Instant::now() < end {
                        if let Ok(mut o) = node.create_sandboxes(&request()) {
                            if let Some(Ok(c)) = o.pop() {
                                let _ = node.destroy(&c.sandbox.id);
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        done.load(Ordering::Relaxed) as f64 / secs as f64
    };
    node.shutdown();
    drop(node);

    // The API path: the daemon on the same template.
    let exe = std::env::current_exe()?;
    let cleave = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("cleave"))
        .expect("target/<profile>/cleave");
    let cfg = dir.path().join("cleave.toml");
    std::fs::write(
        &cfg,
        format!("warm_workers = {WARM}\nrequests_per_second = 100000\nmax_sandboxes = 64\n"),
    )?;
    let mut daemon: Child = Command::new(cleave)
        .args(["daemon", "--metrics-listen", "127.0.0.1:19464", "--config"])
        .arg(&cfg)
        .stderr(Stdio::null())
        .spawn()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let sock = dir.path().join("cleave/cleave.sock");
        let ready = || async {
            let Ok(mut s) = tokio::net::TcpStream::connect("127.0.0.1:19464").await else {
                return false;
            };
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").await;
            let mut b = String::new();
            let _ = s.read_to_string(&mut b).await;
            b.contains("\r\n\r\nready")
        };
        while !ready().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ch = client::connect(&sock).await?;
        let mut sb = SandboxesClient::new(ch.clone());
        let mut ex = ExecClient::new(ch.clone());
        let (mut api_create, mut api_exec) = (Vec::new(), Vec::new());
        let create = pb::CreateSandboxesRequest {
            template: String::new(),
            count: 1,
            ttl_secs: 0,
            network: None,
            all_or_nothing: false,
        };
        for _ in 0..runs {
            while !ready().await {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let t = Instant::now();
            let r = sb.create_sandboxes(create.clone()).await?.into_inner();
            api_create.push(t.elapsed().as_secs_f64() * 1e3);
            let Some(pb::fork_result::Result::Created(c)) = r.results[0].result.clone() else {
                anyhow::bail!("a fork failed: {:?}", r.results[0]);
            };
            let id = c.sandbox.unwrap().id;
            let start = pb::ExecInput {
                input: Some(pb::exec_input::Input::Start(pb::ExecStart {
                    sandbox_id: id.clone(),
                    argv: vec!["true".into()],
                    ..Default::default()
                })),
            };
            let t = Instant::now();
            let req = client::with_token(
                tonic::Request::new(tokio_stream::iter(vec![start])),
                &c.token,
            )?;
            let mut out = ex.exec(req).await?.into_inner();
            while out.message().await?.is_some() {}
            api_exec.push(t.elapsed().as_secs_f64() * 1e3);
            sb.delete_sandbox(pb::DeleteSandboxRequest { id }).await?;
        }
        let done = Arc::new(AtomicU64::new(0));
        let end = Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (mut sb, done, create) = (sb.clone(), done.clone(), create.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < end {
                    if let Ok(r) = sb.create_sandboxes(create.clone()).await {
                        if let Some(pb::fork_result::Result::Created(c)) =
                            r.into_inner().results[0].result.clone()
                        {
                            let id = c.sandbox.unwrap().id;
                            let _ = sb.delete_sandbox(pb::DeleteSandboxRequest { id }).await;
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let api_rate = done.load(Ordering::Relaxed) as f64 / secs as f64;
        Ok::<_, anyhow::Error>((api_create, api_exec, api_rate))
    });
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let _ = daemon.wait();
    let (mut api_create, mut api_exec, api_rate) = result?;
    let rows = [
        Row {
            what: "create → ready (ms)",
            lib: (pct(&mut lib_create, 0.5), pct(&mut lib_create, 0.99)),
            api: (pct(&mut api_create, 0.5), pct(&mut api_create, 0.99)),
        },
        Row {
            what: "exec `true` round trip (ms)",
            lib: (pct(&mut lib_exec, 0.5), pct(&mut lib_exec, 0.99)),
            api: (pct(&mut api_exec, 0.5), pct(&mut api_exec, 0.99)),
        },
    ];
    println!("| what | library p50 | library p99 | API p50 | API p99 | API / library (p50) |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2}× |",
            r.what,
            r.lib.0,
            r.lib.1,
            r.api.0,
            r.api.1,
            r.api.0 / r.lib.0
        );
    }
    println!(
        "| sandboxes created + destroyed per second (4 callers, {secs} s) | {lib_rate:.1} | | {api_rate:.1} | | {:.2}× |",
        api_rate / lib_rate.max(f64::MIN_POSITIVE)
    );
    println!("\n{runs} runs per row; warm pool depth {WARM} on both paths.");
    Ok(())
}

//! The daemon's API against the library it serves, side by side in one run (needs a KVM
//! that runs Linux guests: directly, or in the rig via scripts/kvm-or-rig):
//! - create → ready: `Node::create_sandboxes` vs `CreateSandboxes` over the Unix socket;
//! - exec round trip of `true`: the guest connection directly vs `Exec` over the API;
//! - sandboxes created and destroyed per second, 4 callers at once, both paths.
//!
//! Both paths use the same template and the same warm-pool depth, and run interleaved
//! (library, API, library, API, …) so that neither gets a warmer machine.
//! `cargo build --release -p cleave-agent --bins --example api_bench &&
//!  target/release/examples/api_bench [--runs N] [--secs S]`

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cleave_agent::daemon::api::pb::{
    self, exec_client::ExecClient, sandboxes_client::SandboxesClient,
};
use cleave_agent::daemon::client;
use cleave_agent::fork::store::{TemplateName, TemplateStore};
use cleave_agent::node::boot::resolve_image;
use cleave_agent::node::templates::TemplateSpec;
use cleave_agent::node::{Node, NodeLimits, NodeOptions, SandboxRequest};
use cleave_guest::protocol::ExecRequest;
use tonic::transport::Channel;

const WARM: usize = 2;
const METRICS: &str = "127.0.0.1:19464";

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

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The library path: one fork → ready, `true`, destroy. Returns (create ms, exec ms).
fn lib_once(node: &Node) -> anyhow::Result<(f64, f64)> {
    while !node.pools_warm() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    let s = node
        .create_sandboxes(&lib_request())?
        .pop()
        .unwrap()
        .map_err(|f| anyhow::anyhow!(f.message))?
        .sandbox;
    let create = ms(t);
    let t = Instant::now();
    s.client().exec_collect(ExecRequest::new(["true"]), None)?;
    let exec = ms(t);
    node.destroy(&s.id)?;
    Ok((create, exec))
}

fn lib_request() -> SandboxRequest {
    SandboxRequest {
        template: TemplateName::default_name(),
        count: 1,
        ttl: None,
        policy: None,
        all_or_nothing: false,
    }
}

fn api_request() -> pb::CreateSandboxesRequest {
    pb::CreateSandboxesRequest {
        template: String::new(),
        count: 1,
        ttl_secs: 0,
        network: None,
        all_or_nothing: false,
    }
}

async fn ready() -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(METRICS).await else {
        return false;
    };
    let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").await;
    let mut b = String::new();
    let _ = s.read_to_string(&mut b).await;
    b.contains("\r\n\r\nready")
}

/// The API path: the same steps through the daemon.
async fn api_once(ch: &Channel) -> anyhow::Result<(f64, f64)> {
    let (mut sb, mut ex) = (
        SandboxesClient::new(ch.clone()),
        ExecClient::new(ch.clone()),
    );
    while !ready().await {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    let r = sb.create_sandboxes(api_request()).await?.into_inner();
    let create = ms(t);
    let Some(pb::fork_result::Result::Created(c)) = r.results[0].result.clone() else {
        anyhow::bail!("a fork failed: {:?}", r.results[0]);
    };
    let id = c.sandbox.unwrap_or_default().id;
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
    let exec = ms(t);
    sb.delete_sandbox(pb::DeleteSandboxRequest { id }).await?;
    Ok((create, exec))
}

fn lib_rate(node: &Node, secs: u64) -> u64 {
    let done = AtomicU64::new(0);
    let end = Instant::now() + Duration::from_secs(secs);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                while Instant::now() < end {
                    if let Ok(mut o) = node.create_sandboxes(&lib_request()) {
                        if let Some(Ok(c)) = o.pop() {
                            let _ = node.destroy(&c.sandbox.id);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    done.load(Ordering::Relaxed)
}

async fn api_rate(ch: &Channel, secs: u64) -> u64 {
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (mut sb, done) = (SandboxesClient::new(ch.clone()), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let Ok(r) = sb.create_sandboxes(api_request()).await else {
                    continue;
                };
                if let Some(pb::fork_result::Result::Created(c)) =
                    r.into_inner().results[0].result.clone()
                {
                    let id = c.sandbox.unwrap_or_default().id;
                    let _ = sb.delete_sandbox(pb::DeleteSandboxRequest { id }).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    done.load(Ordering::Relaxed)
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let runs = arg("--runs", 20) as usize;
    let secs = arg("--secs", 16);
    let dir = tempfile::tempdir()?;
    // SAFETY: set before any thread exists.
    unsafe { std::env::set_var("XDG_RUNTIME_DIR", dir.path()) };
    // target/<profile>/: the binaries beside examples/.
    let target_dir = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .expect("target/<profile>/examples/api_bench")
        .to_path_buf();

    let node = Node::open(NodeOptions {
        store: TemplateStore::default_location(),
        net: None,
        limits: NodeLimits::unlimited(),
        gate_timeout: Duration::from_secs(30),
        warm_workers: WARM,
        state_dir: None,
        worker_exe: Some(target_dir.join("cleave-fork-worker")),
        jail: cleave_agent::fork::jail::Jail::best_effort(),
        worker_start: Default::default(),
    })?;
    // The template first (the daemon then loads the same one).
    let spec = TemplateSpec::new(TemplateName::default_name());
    node.ensure_template(&spec, (false, false), resolve_image)?;
    eprintln!("api_bench: template ready; starting the daemon");
    let cfg = dir.path().join("cleave.toml");
    std::fs::write(
        &cfg,
        format!("warm_workers = {WARM}\nrequests_per_second = 100000\nmax_sandboxes = 64\n"),
    )?;
    let _daemon = Daemon(
        Command::new(target_dir.join("cleave"))
            .args(["daemon", "--metrics-listen", METRICS, "--config"])
            .arg(&cfg)
            .stderr(Stdio::null())
            .spawn()?,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let ch = rt.block_on(async {
        while !ready().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        client::connect(&dir.path().join("cleave/cleave.sock")).await
    })?;

    eprintln!("api_bench: daemon ready; {runs} interleaved runs");
    let (mut lc, mut le, mut ac, mut ae) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (c, e) = lib_once(&node)?;
        lc.push(c);
        le.push(e);
        let (c, e) = rt.block_on(api_once(&ch))?;
        ac.push(c);
        ae.push(e);
    }
    eprintln!("api_bench: rates, {secs} s per path");
    let (mut lib_done, mut api_done) = (0, 0);
    for _ in 0..2 {
        lib_done += lib_rate(&node, secs / 2);
        api_done += rt.block_on(api_rate(&ch, secs / 2));
    }
    let (lib_rate, api_rate) = (lib_done as f64 / secs as f64, api_done as f64 / secs as f64);
    node.shutdown();

    println!("| what | library p50 | library p99 | API p50 | API p99 | API / library (p50) |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (what, l, a) in [
        ("create → ready (ms)", &mut lc, &mut ac),
        ("exec `true` round trip (ms)", &mut le, &mut ae),
    ] {
        let (l50, l99, a50, a99) = (pct(l, 0.5), pct(l, 0.99), pct(a, 0.5), pct(a, 0.99));
        println!(
            "| {what} | {l50:.2} | {l99:.2} | {a50:.2} | {a99:.2} | {:.2}× |",
            a50 / l50
        );
    }
    println!(
        "| sandboxes created + destroyed per second (4 callers, {secs} s) | {lib_rate:.1} | | \
         {api_rate:.1} | | {:.2}× |",
        api_rate / lib_rate.max(f64::MIN_POSITIVE)
    );
    println!("\n{runs} runs per row, interleaved; warm pool depth {WARM} on both paths.");
    Ok(())
}

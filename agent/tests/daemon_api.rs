//! The daemon's API refuses bad input with a clear status and changes nothing: unknown or
//! malformed names and ids, missing and wrong tokens, counts and TTLs beyond the limits,
//! oversized messages, callers that are not operators, callers over the rate limit. No
//! guest is needed for any of it (the rig tests run real sandboxes: tests/tests/daemon.rs),
//! so this runs on any host, against a real `cleave daemon` process.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cleave_agent::daemon::api::pb::{
    self, exec_client::ExecClient, sandboxes_client::SandboxesClient,
    templates_client::TemplatesClient,
};
use cleave_agent::daemon::client;
use tonic::Code;

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start(config: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let cfg = dir.path().join("cleave.toml");
        std::fs::write(
            &cfg,
            // No cgroup leaves: these tests must run on cgroup v1 hosts too (the rig's
            // daemon test checks the leaves; one test below checks the refusal).
            format!(
                "default_template = false\nwarm_workers = 0\nworker_cgroup_parent = \"\"\n{config}"
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cleave"))
            .args(["daemon", "--config"])
            .arg(&cfg)
            .arg("--audit-log")
            .arg(dir.path().join("audit.jsonl"))
            .env("XDG_RUNTIME_DIR", dir.path())
            .env("CLEAVE_IMAGES", dir.path().join("images"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let d = Daemon { child, dir };
        let t = Instant::now();
        while !d.socket().exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("cleave/cleave.sock")
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn create(template: &str, count: u32) -> pb::CreateSandboxesRequest {
    pb::CreateSandboxesRequest {
        template: template.into(),
        count,
        ttl_secs: 0,
        network: None,
        all_or_nothing: false,
    }
}

async fn expect_err<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    needle: &str,
) {
    let s = r.expect_err("the daemon accepted bad input");
    assert_eq!(s.code(), code, "{s:?}");
    assert!(
        s.message().contains(needle),
        "{needle:?} not in {:?}",
        s.message()
    );
}

#[test]
fn bad_requests_get_clear_statuses_and_change_nothing() {
    let d = Daemon::start("max_per_request = 8\nmax_ttl_secs = 60\ndefault_ttl_secs = 30\n");
    runtime().block_on(async {
        let ch = client::connect(&d.socket()).await.unwrap();
        let mut sb = SandboxesClient::new(ch.clone());
        let mut tp = TemplatesClient::new(ch.clone());
        let mut ex = ExecClient::new(ch.clone());

        expect_err(
            sb.create_sandboxes(create("nosuch", 1)).await,
            Code::NotFound,
            "no template nosuch",
        )
        .await;
        expect_err(
            sb.create_sandboxes(create("../etc", 1)).await,
            Code::InvalidArgument,
            "not a valid template name",
        )
        .await;
        expect_err(
            sb.create_sandboxes(create("default", 9)).await,
            Code::InvalidArgument,
            "1 to 8",
        )
        .await;
        let mut long = create("default", 1);
        long.ttl_secs = 61;
        expect_err(
            sb.create_sandboxes(long).await,
            Code::InvalidArgument,
            "longer than this node allows",
        )
        .await;
        let mut bad_policy = create("default", 1);
        bad_policy.network = Some(pb::EgressPolicy {
            allow: vec!["exa mple.test".into()],
            allow_cidr: vec![],
        });
        expect_err(
            sb.create_sandboxes(bad_policy).await,
            Code::InvalidArgument,
            "network policy",
        )
        .await;
        let mut no_net = create("default", 1);
        no_net.network = Some(pb::EgressPolicy {
            allow: vec!["example.com".into()],
            allow_cidr: vec![],
        });
        expect_err(
            sb.create_sandboxes(no_net).await,
            Code::FailedPrecondition,
            "no sandbox networking",
        )
        .await;
        // Over the message size limit (1 MiB): refused by the transport, nothing parsed.
        let mut huge = create("default", 1);
        huge.network = Some(pb::EgressPolicy {
            allow: vec!["a".repeat(2 << 20)],
            allow_cidr: vec![],
        });
        assert!(sb.create_sandboxes(huge).await.is_err());

        expect_err(
            sb.get_sandbox(pb::GetSandboxRequest {
                id: "x".repeat(5000),
            })
            .await,
            Code::InvalidArgument,
            "is not a sandbox id",
        )
        .await;
        expect_err(
            sb.get_sandbox(pb::GetSandboxRequest {
                id: "sb-0123456789abcdef".into(),
            })
            .await,
            Code::NotFound,
            "no sandbox",
        )
        .await;
        expect_err(
            sb.delete_sandbox(pb::DeleteSandboxRequest {
                id: "sb-0123456789abcdef".into(),
            })
            .await,
            Code::NotFound,
            "no sandbox",
        )
        .await;
        let from_image = |image: &str| pb::CreateTemplateRequest {
            name: "t".into(),
            image: image.into(),
            ..Default::default()
        };
        expect_err(
            tp.create_template(from_image("../x")).await,
            Code::InvalidArgument,
            "not a valid image name",
        )
        .await;
        expect_err(
            tp.create_template(from_image("nosuch")).await,
            Code::NotFound,
            "cleave image build",
        )
        .await;
        expect_err(
            tp.delete_template(pb::DeleteTemplateRequest {
                name: "nosuch".into(),
            })
            .await,
            Code::NotFound,
            "no template",
        )
        .await;

        // Exec: no token, a token for nothing, a first message that is not `start`.
        let start = |id: &str| pb::ExecInput {
            input: Some(pb::exec_input::Input::Start(pb::ExecStart {
                sandbox_id: id.into(),
                argv: vec!["true".into()],
                ..Default::default()
            })),
        };
        let r = ex
            .exec(tokio_stream::iter(vec![start("sb-0123456789abcdef")]))
            .await;
        expect_err(r, Code::Unauthenticated, "CLEAVE_TOKEN").await;
        let req = client::with_token(
            tonic::Request::new(tokio_stream::iter(vec![start("sb-0123456789abcdef")])),
            &"ab".repeat(32),
        )
        .unwrap();
        expect_err(
            ex.exec(req).await,
            Code::PermissionDenied,
            "does not grant access",
        )
        .await;
        let stdin_first = pb::ExecInput {
            input: Some(pb::exec_input::Input::Stdin(b"x".to_vec())),
        };
        let req = client::with_token(
            tonic::Request::new(tokio_stream::iter(vec![stdin_first])),
            "t",
        )
        .unwrap();
        expect_err(ex.exec(req).await, Code::InvalidArgument, "must be `start`").await;

        // Nothing was created, and the daemon still answers.
        let live = sb
            .list_sandboxes(pb::ListSandboxesRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(live.sandboxes.is_empty());
    });
    // Every mutating request was audited with its result; no line is about a success.
    let audit = d.audit();
    let creates: Vec<_> = audit
        .iter()
        .filter(|j| j["action"] == "sandbox.create")
        .collect();
    assert!(creates.len() >= 6, "{audit:?}");
    assert!(
        audit
            .iter()
            .all(|j| j["result"] != "ok" && j["caller"] == "uid:0"),
        "{audit:?}"
    );
    assert!(audit
        .iter()
        .any(|j| j["action"] == "exec" && j["result"] == "unauthenticated"));
}

#[test]
fn only_allowed_uids_make_operator_calls_and_the_socket_is_private() {
    let d = Daemon::start("allowed_uids = [0]\n");
    let sock = d.socket();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dir_mode = std::fs::metadata(sock.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
    let as_nobody = |sock: &Path| {
        Command::new(env!("CARGO_BIN_EXE_cleave"))
            .args(["sandbox", "ls", "--socket"])
            .arg(sock)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    // First barrier: the socket's mode.
    let out = as_nobody(&sock);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("connecting to the cleave daemon"), "{err}");
    // Second barrier, with the first one opened on purpose: the peer's uid.
    for p in [d.dir.path(), sock.parent().unwrap()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&sock);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("uid 65534 may not make operator calls"),
        "{err}"
    );
}

#[test]
fn a_caller_over_the_rate_limit_is_refused_and_a_second_daemon_is_not_started() {
    let d = Daemon::start("requests_per_second = 1\n");
    runtime().block_on(async {
        let mut sb = SandboxesClient::new(client::connect(&d.socket()).await.unwrap());
        let mut codes = Vec::new();
        for _ in 0..4 {
            codes.push(match sb.list_sandboxes(pb::ListSandboxesRequest {}).await {
                Ok(_) => Code::Ok,
                Err(s) => {
                    assert!(s.message().contains("rate limit"), "{s:?}");
                    s.code()
                }
            });
        }
        assert_eq!(
            codes[..2],
            [Code::Ok, Code::Ok],
            "a burst of twice the rate"
        );
        assert!(codes[2..].contains(&Code::ResourceExhausted), "{codes:?}");
    });
    // The same state directory: refused, the first daemon untouched.
    let out = Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args(["daemon", "--socket"])
        .arg(d.dir.path().join("other.sock"))
        .env("XDG_RUNTIME_DIR", d.dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another cleave daemon"), "{err}");
    assert!(d.socket().exists());
    // A bad config is refused before anything starts.
    let cfg = d.dir.path().join("bad.toml");
    std::fs::write(&cfg, "max_sandboxs = 3\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args(["daemon", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown field"),
        "{err}"
    );
    // Worker cgroups that cannot be prepared stop the daemon before it serves (fail
    // closed), with the way out named.
    let cfg = d.dir.path().join("no-cgroup.toml");
    std::fs::write(
        &cfg,
        "default_template = false\nworker_cgroup_parent = \"/sys/fs/cgroup/not-mounted/cleave\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args(["daemon", "--config"])
        .arg(&cfg)
        .env("XDG_RUNTIME_DIR", d.dir.path().join("other"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("worker cgroups")
            && err.contains("worker_cgroup_parent = \"\""),
        "{err}"
    );
}

/// A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (openssl).
fn make_pki(dir: &Path) {
    let script = r#"
set -e
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=cleave-test-ca 2>/dev/null
for who in server client; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout $who.key -out $who.csr -subj /CN=$who 2>/dev/null
done
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > server.ext
printf 'extendedKeyUsage=clientAuth\n' > client.ext
for who in server client; do
  openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $who.pem -days 1 -extfile $who.ext 2>/dev/null
done
"#;
    let st = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(st.success(), "openssl failed");
}

#[test]
fn the_tcp_listener_requires_a_client_certificate() {
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path());
    let p = |f: &str| pki.path().join(f).display().to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = Daemon::start(&format!(
        "[tls]\nlisten = \"127.0.0.1:{port}\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
        p("server.pem"),
        p("server.key"),
        p("ca.pem")
    ));
    let read = |f: &str| std::fs::read(pki.path().join(f)).unwrap();
    runtime().block_on(async {
        use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
        let addr = format!("https://127.0.0.1:{port}");
        let t = Instant::now();
        let tls = |with_cert: bool| {
            let c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("ca.pem")));
            if with_cert {
                c.identity(Identity::from_pem(read("client.pem"), read("client.key")))
            } else {
                c
            }
        };
        // With a client certificate the CA signed: an operator.
        let ch = loop {
            match Channel::from_shared(addr.clone())
                .unwrap()
                .tls_config(tls(true))
                .unwrap()
                .connect()
                .await
            {
                Ok(ch) => break ch,
                Err(e) => {
                    assert!(t.elapsed() < Duration::from_secs(10), "{e:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let mut sb = SandboxesClient::new(ch);
        sb.list_sandboxes(pb::ListSandboxesRequest {})
            .await
            .unwrap();
        let e = sb
            .delete_sandbox(pb::DeleteSandboxRequest {
                id: "sb-0123456789abcdef".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            Code::NotFound,
            "an operator call, authorised: {e:?}"
        );
        // Without one: no call gets through.
        let refused = match Channel::from_shared(addr.clone())
            .unwrap()
            .tls_config(tls(false))
            .unwrap()
            .connect()
            .await
        {
            Err(_) => true,
            Ok(ch) => SandboxesClient::new(ch)
                .list_sandboxes(pb::ListSandboxesRequest {})
                .await
                .is_err(),
        };
        assert!(refused, "a client without a certificate was served");
    });
    // The audit line names the certificate (by its hash), not a uid.
    let audit = d.audit();
    assert!(
        audit.iter().any(|j| j["action"] == "sandbox.delete"
            && j["caller"].as_str().is_some_and(|c| c.starts_with("cert:"))),
        "{audit:?}"
    );
}

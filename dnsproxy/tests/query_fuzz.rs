//! Fuzz-style property test of the query path: random bytes, and valid
//! queries with random corruption, fed to a sandbox handler never panic, and
//! whatever comes back is a well-formed DNS message.

mod common;

use cleave_dnsproxy::handler::{SandboxHandler, Transport, TtlBounds};
use cleave_dnsproxy::upstream::{Upstream, UpstreamConfig};
use cleave_dnsproxy::{Policy, PolicySpec};
use common::client::query_bytes;
use common::fake_upstream::FakeUpstream;
use common::pinner::RecordingPinner;
use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

struct Rig {
    rt: tokio::runtime::Runtime,
    handler: SandboxHandler,
    _up: FakeUpstream,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let up = FakeUpstream::start(IpAddr::V4(Ipv4Addr::LOCALHOST));
        up.a("a.example.com", "8.8.8.8", 60);
        up.a("b.example.com", "10.0.0.1", 60);
        let upstream = Upstream::new(UpstreamConfig {
            servers: vec![up.addr()],
            timeout: Duration::from_millis(100),
            attempts: 1,
        });
        let policy = Policy::load(&PolicySpec {
            names: vec!["*.example.com".into(), "a".into()],
            ..PolicySpec::default()
        })
        .unwrap();
        let handler = SandboxHandler::new(
            "fuzz",
            policy,
            Arc::new(RecordingPinner::default()),
            Arc::new(upstream),
            TtlBounds {
                min: Duration::from_secs(1),
                max: Duration::from_secs(60),
            },
            16,
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Rig {
            rt,
            handler,
            _up: up,
        }
    })
}

fn run(bytes: &[u8]) {
    let r = rig();
    for transport in [Transport::Udp, Transport::Tcp] {
        if let Some(reply) = r.rt.block_on(r.handler.handle(bytes, transport)) {
            Message::from_vec(&reply).expect("reply must parse");
            if transport == Transport::Udp {
                assert!(reply.len() <= 1232);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1500)) {
        run(&bytes);
    }

    #[test]
    fn corrupted_queries_never_panic(
        which in 0usize..3,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let name = ["a.example.com.", "b.example.com.", "a."][which];
        let (_, mut bytes) = query_bytes(name, RecordType::A);
        for (i, v) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= v;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        run(&bytes);
    }
}

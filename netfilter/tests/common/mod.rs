//! Test rig: a "router" namespace that holds the table, one namespace per
//! guest (linked to the router by a veth whose router end plays the tap),
//! and a "remote" namespace with the servers. Nothing is routed out of the
//! machine: the only interfaces are the veths created here.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use cleave_netfilter::testutil::{veth, NetNs};
use cleave_netfilter::{Firewall, SandboxId, SandboxNet, TapName};
use serde_json::Value;

/// Successful connects take microseconds here; a blocked one must time out.
pub const BLOCKED: Duration = Duration::from_millis(600);
pub const OK: Duration = Duration::from_secs(5);

pub const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const REMOTE_OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
pub const REMOTE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 2);
pub const ROUTER_UPLINK: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
pub const ALLOWED_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);

pub struct Guest {
    pub ns: NetNs,
    pub tap: String,
    pub id: SandboxId,
    pub ip4: Ipv4Addr,
    pub gw4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub gw6: Ipv6Addr,
    pub mac: String,
}

impl Guest {
    /// The sandbox description for this guest (confined, v4 + v6).
    pub fn net(&self) -> SandboxNet {
        SandboxNet::new(
            self.id.clone(),
            TapName::new(&self.tap).unwrap(),
            self.mac.parse().unwrap(),
            self.ip4,
            self.gw4,
        )
        .unwrap()
        .with_ipv6(self.ip6, self.gw6)
        .unwrap()
    }
}

pub struct Lab {
    // Field order is drop order: firewall socket first, namespaces last.
    pub fw: Firewall,
    pub guests: Vec<Guest>,
    pub remote: NetNs,
    pub router: NetNs,
}

impl Lab {
    /// A router with `n` guests and a remote. The table is created (by
    /// `Firewall::open`) but no sandbox is applied.
    pub fn new(tag: &str, n: u8) -> Lab {
        let router = NetNs::new(&format!("{tag}-r")).unwrap();
        let remote = NetNs::new(&format!("{tag}-x")).unwrap();
        router.sysctl("net/ipv4/ip_forward", "1").unwrap();
        router.sysctl("net/ipv6/conf/all/forwarding", "1").unwrap();
        veth(&router, "up0", &remote, "eth0").unwrap();
        router
            .ip(&["addr", "add", "198.51.100.1/24", "dev", "up0"])
            .unwrap();
        router
            .ip(&["addr", "add", "fd00:100::1/64", "dev", "up0", "nodad"])
            .unwrap();
        for a in ["198.51.100.2/24", "198.51.100.3/24"] {
            remote.ip(&["addr", "add", a, "dev", "eth0"]).unwrap();
        }
        remote
            .ip(&["addr", "add", "fd00:100::2/64", "dev", "eth0", "nodad"])
            .unwrap();
        for a in ["169.254.169.254/32", "203.0.113.5/32"] {
            remote.ip(&["addr", "add", a, "dev", "lo"]).unwrap();
        }
        remote
            .ip(&["route", "add", "default", "via", "198.51.100.1"])
            .unwrap();
        remote
            .ip(&["-6", "route", "add", "default", "via", "fd00:100::1"])
            .unwrap();
        for net in ["169.254.169.254/32", "203.0.113.0/24"] {
            router
                .ip(&["route", "add", net, "via", "198.51.100.2"])
                .unwrap();
        }
        let mut guests = Vec::new();
        for i in 1..=n {
            let ns = NetNs::new(&format!("{tag}-g{i}")).unwrap();
            let tap = format!("tap{i}");
            let mac = format!("02:00:00:00:{i:02x}:02");
            veth(&router, &tap, &ns, "eth0").unwrap();
            ns.ip(&["link", "set", "eth0", "address", &mac]).unwrap();
            let g = Guest {
                ns,
                tap: tap.clone(),
                id: SandboxId::new(format!("sb-{i}")).unwrap(),
                ip4: Ipv4Addr::new(10, 200, i, 2),
                gw4: Ipv4Addr::new(10, 200, i, 1),
                ip6: Ipv6Addr::new(0xfd00, i.into(), 0, 0, 0, 0, 0, 2),
                gw6: Ipv6Addr::new(0xfd00, i.into(), 0, 0, 0, 0, 0, 1),
                mac,
            };
            router
                .ip(&["addr", "add", &format!("{}/24", g.gw4), "dev", &tap])
                .unwrap();
            router
                .ip(&[
                    "addr",
                    "add",
                    &format!("{}/64", g.gw6),
                    "dev",
                    &tap,
                    "nodad",
                ])
                .unwrap();
            g.ns.ip(&["addr", "add", &format!("{}/24", g.ip4), "dev", "eth0"])
                .unwrap();
            g.ns.ip(&[
                "addr",
                "add",
                &format!("{}/64", g.ip6),
                "dev",
                "eth0",
                "nodad",
            ])
            .unwrap();
            g.ns.ip(&["route", "add", "default", "via", &g.gw4.to_string()])
                .unwrap();
            g.ns.ip(&["-6", "route", "add", "default", "via", &g.gw6.to_string()])
                .unwrap();
            guests.push(g);
        }
        let fw = router.run(Firewall::open).unwrap().unwrap();
        Lab {
            fw,
            guests,
            remote,
            router,
        }
    }

    pub fn g(&self, i: usize) -> &Guest {
        &self.guests[i]
    }
}

/// A server thread that stops (and is joined) on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP server in `ns` that echoes every connection.
pub fn tcp_echo(ns: &NetNs, addr: SocketAddr) -> Server {
    let l = ns.run(|| TcpListener::bind(addr)).unwrap().unwrap();
    l.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let thread = std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut c, _)) => {
                    c.set_nonblocking(false).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 512];
                        while let Ok(n) = c.read(&mut buf) {
                            if n == 0 || c.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    Server {
        stop,
        thread: Some(thread),
        addr,
    }
}

/// A UDP server in `ns` that echoes every datagram.
pub fn udp_echo(ns: &NetNs, addr: SocketAddr) -> Server {
    let sock = ns.run(|| UdpSocket::bind(addr)).unwrap().unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while !s.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], peer);
            }
        }
    });
    Server {
        stop,
        thread: Some(thread),
        addr,
    }
}

/// Connects from inside `ns`; `None` if the connection does not complete
/// within `timeout`.
pub fn connect(ns: &NetNs, dst: SocketAddr, timeout: Duration) -> Option<TcpStream> {
    ns.run(|| TcpStream::connect_timeout(&dst, timeout).ok())
        .unwrap()
}

/// Sends a line over `s` and checks it comes back.
pub fn echoes(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(OK)).unwrap();
    let msg = b"cleave-ping";
    if s.write_all(msg).is_err() {
        return false;
    }
    let mut buf = [0u8; 11];
    s.read_exact(&mut buf).is_ok() && &buf == msg
}

/// TCP connect + echo from inside `ns` within the given timeout.
pub fn tcp_ok(ns: &NetNs, dst: SocketAddr, timeout: Duration) -> bool {
    connect(ns, dst, timeout).is_some_and(|mut s| echoes(&mut s))
}

/// A UDP datagram from `src` (port 0 = any) to `dst` gets its echo back
/// within `timeout`.
pub fn udp_ok(ns: &NetNs, src: IpAddr, dst: SocketAddr, timeout: Duration) -> bool {
    ns.run(|| {
        let s = UdpSocket::bind(SocketAddr::new(src, 0)).unwrap();
        s.set_read_timeout(Some(timeout)).unwrap();
        s.send_to(b"q", dst).unwrap();
        let mut buf = [0u8; 8];
        matches!(s.recv_from(&mut buf), Ok((1, from)) if from == dst)
    })
    .unwrap()
}

pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// `nft -j list ruleset` inside `ns`, as the list of objects.
pub fn ruleset(ns: &NetNs) -> Vec<Value> {
    let out = ns.exec_ok("nft", &["-j", "list", "ruleset"]).unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["nftables"].as_array().unwrap().clone()
}

/// Counts of what is in `table inet cleave`.
#[derive(Debug, Default, PartialEq, Eq, Clone)]
pub struct Census {
    pub chains: Vec<String>,
    pub sets: Vec<String>,
    pub counters: Vec<String>,
    pub rules: usize,
    /// (map, key, target chain)
    pub map_entries: Vec<(String, String, String)>,
    pub set_elements: usize,
}

impl Census {
    /// Per-sandbox objects: everything but the 8 base objects, the 5 base
    /// rules, and with map entries and pinned elements counted.
    pub fn sandbox_objects(&self) -> usize {
        self.chains.len() - 3 + self.sets.len() - 5 + self.counters.len() + self.map_entries.len()
    }
}

fn elem_key(e: &Value) -> String {
    match e {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn census(ns: &NetNs) -> Census {
    let mut c = Census::default();
    for obj in ruleset(ns) {
        let (kind, body) = obj.as_object().unwrap().iter().next().unwrap();
        if body.get("table").and_then(Value::as_str) != Some("cleave") {
            continue;
        }
        let name = body["name"].as_str().map(str::to_string);
        match kind.as_str() {
            "chain" => c.chains.push(name.unwrap()),
            "counter" => c.counters.push(name.unwrap()),
            "rule" => c.rules += 1,
            "set" | "map" => {
                let name = name.unwrap();
                for e in body
                    .get("elem")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if kind == "map" {
                        let (k, v) = (&e[0], &e[1]);
                        let target = v["goto"]["target"].as_str().unwrap_or("?").to_string();
                        c.map_entries.push((name.clone(), elem_key(k), target));
                    } else {
                        c.set_elements += 1;
                    }
                }
                c.sets.push(name);
            }
            _ => {}
        }
    }
    c.chains.sort();
    c.sets.sort();
    c.counters.sort();
    c.map_entries.sort();
    c
}

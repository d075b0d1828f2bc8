//! The vsock device fed directly by a fake guest driver: normal traffic both ways, and
//! every kind of hostile input the issue names (malformed chains, out-of-range addresses,
//! oversized and truncated packets, unknown ops, floods). The device must drop the packet
//! or reset that connection, and never panic, hang or grow without bound.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use cleave_agent::devices::virtio::vsock::csm::CONN_BUF_SIZE;
use cleave_agent::devices::virtio::vsock::device::{EVQ, RXQ, TXQ};
use cleave_agent::devices::virtio::vsock::unix::{
    port_path, MAX_CONNECTIONS, MAX_CONTROL_PACKETS, MAX_PENDING_CONNECTS,
};
use cleave_agent::devices::virtio::VirtioDevice;
use support::*;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress};

fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// Writes a header at `addr` in guest memory.
fn put_hdr(h: &Harness, addr: u64, hdr: Hdr) {
    h.mem.write_slice(&hdr.bytes(), GuestAddress(addr)).unwrap();
}

fn counts(h: &Harness) -> cleave_agent::devices::virtio::vsock::device::VsockCounts {
    h.lock().counts()
}

fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

// ---- normal operation ----------------------------------------------------------------

#[test]
fn config_space_is_the_guest_cid() {
    let h = Harness::inactive();
    let dev = h.lock();
    let mut b = [0u8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), GUEST_CID);
    let mut b = [0xffu8; 4];
    dev.read_config(6, &mut b);
    assert_eq!(b, [0, 0, 0, 0], "beyond the config space reads zero");
    let mut b = [0xffu8; 4];
    dev.read_config(u64::MAX - 1, &mut b);
    assert_eq!(b, [0; 4], "no overflow at the end of the address space");
}

#[test]
fn host_initiated_connection_carries_bytes_both_ways() {
    let mut h = Harness::new();
    let (mut host, local) = h.host_connect(1024);
    let mut line = [0u8; 64];
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = host.read(&mut line).unwrap();
    assert_eq!(
        std::str::from_utf8(&line[..n]).unwrap(),
        format!("OK {local}\n")
    );

    // Host → guest.
    host.write_all(b"hello guest").unwrap();
    h.pump();
    h.give_rx(4, 4096);
    let pkts = h.recv();
    let data: Vec<u8> = pkts
        .iter()
        .filter(|(p, _)| p.op == OP_RW)
        .flat_map(|(_, d)| d.clone())
        .collect();
    assert_eq!(data, b"hello guest");
    let rw = pkts.iter().find(|(p, _)| p.op == OP_RW).unwrap().0;
    assert_eq!((rw.src_cid, rw.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!((rw.src_port, rw.dst_port), (local, 1024));
    assert_eq!(rw.buf_alloc, CONN_BUF_SIZE);

    // Guest → host.
    let mut hdr = Hdr::guest(OP_RW, 1024, local);
    hdr.len = 11;
    h.send(hdr, b"hello host!");
    assert_eq!(read_exact_timeout(&mut host, 11), b"hello host!");
    assert_eq!(h.lock().muxer().connection_count(), 1);

    // Host closes: the guest hears SHUTDOWN(send); the guest's close ends it with a RST.
    drop(host);
    h.pump();
    h.give_rx(2, 4096);
    let pkts = h.recv();
    assert!(
        pkts.iter()
            .any(|(p, _)| p.op == OP_SHUTDOWN && p.flags == 2),
        "{pkts:?}"
    );
    let mut shut = Hdr::guest(OP_SHUTDOWN, 1024, local);
    shut.flags = 3;
    h.send(shut, &[]);
    h.give_rx(2, 4096);
    assert!(h.recv().iter().any(|(p, _)| p.op == OP_RST));
    assert_eq!(h.lock().muxer().connection_count(), 0);
}

#[test]
fn host_connect_to_a_port_without_listener_is_closed() {
    let mut h = Harness::new();
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.write_all(b"CONNECT 9999\n").unwrap();
    h.pump();
    h.give_rx(1, 4096);
    let req = h
        .recv()
        .into_iter()
        .find(|(p, _)| p.op == OP_REQUEST)
        .unwrap()
        .0;
    // The guest kernel answers a connect to a closed port with RST.
    h.send(Hdr::guest(OP_RST, 9999, req.src_port), &[]);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 16];
    assert_eq!(s.read(&mut b).unwrap(), 0, "closed without OK");
}

#[test]
fn bad_connect_lines_are_closed() {
    let mut h = Harness::new();
    for line in [
        &b"CONNECT x\n"[..],
        b"HELLO 1\n",
        b"CONNECT 99999999999\n",
        &[b'A'; 100][..],
    ] {
        let mut s = UnixStream::connect(&h.uds).unwrap();
        s.write_all(line).unwrap();
        h.pump();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 16];
        assert_eq!(
            s.read(&mut b).unwrap_or(0),
            0,
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
    assert_eq!(h.lock().muxer().connection_count(), 0);
    assert_eq!(h.lock().muxer().pending_count(), 0);
}

#[test]
fn guest_initiated_connection_reaches_socket_underscore_port() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(port_path(&h.uds, 5000)).unwrap();
    h.send(Hdr::guest(OP_REQUEST, 777, 5000), &[]);
    h.give_rx(1, 4096);
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RESPONSE);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (5000, 777));
    let (mut s, _) = listener.accept().unwrap();
    let mut hdr = Hdr::guest(OP_RW, 777, 5000);
    hdr.len = 3;
    h.send(hdr, b"abc");
    assert_eq!(read_exact_timeout(&mut s, 3), b"abc");

    // Nothing listens on 5001: reset.
    h.send(Hdr::guest(OP_REQUEST, 778, 5001), &[]);
    h.give_rx(1, 4096);
    let pkts = h.recv();
    assert_eq!(pkts[0].0.op, OP_RST);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (5001, 778));
}

#[test]
fn host_to_guest_stops_at_the_guest_credit() {
    let mut h = Harness::new();
    let (mut host, local) = h.host_connect(1024);
    let _ = read_exact_timeout(&mut host, format!("OK {local}\n").len());
    // The guest advertised a 1000-byte window in its RESPONSE? It advertised 256 KiB in
    // Hdr::guest; shrink it with a credit update.
    let mut upd = Hdr::guest(OP_CREDIT_UPDATE, 1024, local);
    upd.buf_alloc = 1000;
    h.send(upd, &[]);
    host.write_all(&[9u8; 5000]).unwrap();
    h.pump();
    h.give_rx(10, 4096);
    let got: usize = h.recv().iter().map(|(p, _)| p.len as usize).sum();
    assert_eq!(got, 1000, "never more than the guest's buf_alloc in flight");
    // The guest consumed it all: 1000 more.
    let mut upd = Hdr::guest(OP_CREDIT_UPDATE, 1024, local);
    upd.buf_alloc = 1000;
    upd.fwd_cnt = 1000;
    h.send(upd, &[]);
    h.give_rx(10, 4096);
    let got: usize = h.recv().iter().map(|(p, _)| p.len as usize).sum();
    assert_eq!(got, 1000);
}

#[test]
fn a_single_descriptor_rx_buffer_gets_at_most_our_packet_size() {
    let mut h = Harness::new();
    let (mut host, local) = h.host_connect(1024);
    let _ = read_exact_timeout(&mut host, format!("OK {local}\n").len());
    host.write_all(&[7u8; 200 * 1024]).unwrap();
    h.pump();
    // One writable descriptor for header and data, 1 MiB long (Linux >= 6.2 drivers may
    // do this): virtio-vsock does not apply its data-size limit to such a buffer.
    let head = h.rx.push(&[(0x80_0000, 1 << 20, true)]);
    h.kick(RXQ);
    let used = h.rx.used();
    let (_, len) = used
        .iter()
        .find(|(id, _)| *id == u32::from(head))
        .expect("the buffer was used");
    assert!(
        *len as usize <= HDR + 64 * 1024,
        "{len} bytes in one packet: more than the device's maximum"
    );
}

#[test]
fn credit_request_gets_a_credit_update() {
    let mut h = Harness::new();
    let (_host, local) = h.host_connect(1024);
    h.send(Hdr::guest(OP_CREDIT_REQUEST, 1024, local), &[]);
    h.give_rx(2, 4096);
    let pkts = h.recv();
    let upd = pkts
        .iter()
        .find(|(p, _)| p.op == OP_CREDIT_UPDATE)
        .unwrap()
        .0;
    assert_eq!(upd.buf_alloc, CONN_BUF_SIZE);
}

#[test]
fn transport_reset_event_reaches_the_guest_and_closes_host_streams() {
    let mut h = Harness::new();
    let (mut host, local) = h.host_connect(1024);
    let _ = read_exact_timeout(&mut host, format!("OK {local}\n").len());
    let ev_buf = 0xf0_0000;
    h.mem
        .write_obj(0xffff_ffffu32, GuestAddress(ev_buf))
        .unwrap();
    let head = h.ev.push(&[(ev_buf, 8, true)]);
    h.kick(EVQ);
    h.lock().send_transport_reset();
    h.pump();
    assert_eq!(h.ev.used(), vec![(u32::from(head), 4)]);
    let id: u32 = h.mem.read_obj(GuestAddress(ev_buf)).unwrap();
    assert_eq!(id, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
    assert_eq!(h.lock().muxer().connection_count(), 0);
    let mut b = [0u8; 4];
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(host.read(&mut b).unwrap(), 0, "host stream closed");
}

/// The host end of `host` reads end-of-stream (not a timeout): the device closed it.
fn assert_closed(host: &mut UnixStream, why: &str) {
    let mut b = [0u8; 64];
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    loop {
        match host.read(&mut b) {
            Ok(0) => return,
            Ok(_) => continue, // the OK line, or data sent before the end
            // Closed with our CONNECT line unread: the kernel answers with a reset.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("{why}: the host stream is still open ({e})"),
        }
    }
}

#[test]
fn an_established_connection_arms_no_timer() {
    let mut h = Harness::new();
    assert!(!h.lock().timer_armed(), "an idle device sleeps");
    let mut s = UnixStream::connect(&h.uds).unwrap();
    h.pump();
    assert!(
        h.lock().timer_armed(),
        "a handshake under way has a deadline"
    );
    s.write_all(b"CONNECT 1024\n").unwrap();
    h.pump();
    h.give_rx(1, 4096);
    let pkts = h.recv();
    let (req, _) = pkts.iter().find(|(p, _)| p.op == OP_REQUEST).unwrap();
    let local = req.src_port;
    h.send(Hdr::guest(OP_RESPONSE, 1024, local), &[]);
    assert!(
        !h.lock().timer_armed(),
        "established: nothing to expire, no wake-ups"
    );
}

#[test]
fn a_device_reset_closes_host_streams_without_waiting_for_a_tick() {
    let mut h = Harness::new();
    let (mut host, _) = h.host_connect(1024);
    // What a dying guest's kernel does on its vCPU thread (virtio shutdown: status 0).
    h.lock().reset();
    h.pump();
    assert_closed(&mut host, "after the guest reset the device");
}

#[test]
fn the_guests_end_closes_host_streams_and_refuses_new_ones() {
    use cleave_agent::devices::GuestEnd;
    use cleave_agent::vmm::control::RunControl;
    let mut h = Harness::new();
    let (mut host, _) = h.host_connect(1024);
    let run = RunControl::default();
    run.wake_on_guest_end(h.lock().end_event().unwrap());
    // A guest that dies without resetting its devices (a panic, a triple fault).
    run.end(GuestEnd::TripleFault);
    h.pump();
    assert_closed(&mut host, "after the guest's end");
    let mut late = UnixStream::connect(&h.uds).unwrap();
    late.write_all(b"CONNECT 1024\n").unwrap();
    h.pump();
    assert_closed(&mut late, "a connect after the guest's end");
    assert_eq!(h.lock().muxer().connection_count(), 0);
}

#[test]
fn transport_reset_waits_for_an_event_buffer() {
    let mut h = Harness::new();
    h.lock().send_transport_reset();
    assert!(h.ev.used().is_empty());
    let head = h.ev.push(&[(0xf0_0000, 4, true)]);
    h.kick(EVQ);
    assert_eq!(h.ev.used(), vec![(u32::from(head), 4)]);
}

// ---- hostile input -------------------------------------------------------------------

/// Queues `raw` as one TX chain, kicks, and checks the chain was consumed and dropped.
fn assert_dropped(h: &mut Harness, raw_chain: &[RawDescriptor]) {
    let before = counts(h);
    let head = h.tx.push_raw(raw_chain);
    h.kick(TXQ);
    let used = h.tx.used();
    assert_eq!(used, vec![(u32::from(head), 0)], "the chain is returned");
    let after = counts(h);
    assert_eq!(
        after.tx_dropped,
        before.tx_dropped + 1,
        "counted as dropped"
    );
    assert_eq!(after.tx_packets, before.tx_packets);
}

#[test]
fn malformed_tx_chains_are_dropped() {
    let mut h = Harness::new();
    let a = 0x20_0000;
    let mut rw = Hdr::guest(OP_RW, 1, 2);
    rw.len = 100;
    put_hdr(&h, a, rw);
    let ok = Hdr::guest(OP_REQUEST, 1, 2);
    put_hdr(&h, a + 0x1000, ok);
    let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
        ("write-only header", vec![raw(a + 0x1000, 44, F_WRITE, 0)]),
        (
            "header shorter than 44 bytes",
            vec![raw(a + 0x1000, 43, 0, 0)],
        ),
        (
            "header outside guest memory",
            vec![raw(MEM_SIZE as u64 - 20, 44, 0, 0)],
        ),
        (
            "header at the top of the address space",
            vec![raw(u64::MAX - 10, 44, 0, 0)],
        ),
        ("RW without its data descriptor", vec![raw(a, 44, 0, 0)]),
        (
            "RW data shorter than len (truncated)",
            vec![raw(a, 44, F_NEXT, 1), raw(a + 0x800, 10, 0, 0)],
        ),
        (
            "RW data outside guest memory",
            vec![raw(a, 44, F_NEXT, 1), raw(MEM_SIZE as u64 - 50, 100, 0, 0)],
        ),
        (
            "RW data write-only",
            vec![raw(a, 44, F_NEXT, 1), raw(a + 0x800, 100, F_WRITE, 0)],
        ),
        (
            "next index beyond the queue",
            vec![raw(a, 44, F_NEXT, QSIZE + 5)],
        ),
    ];
    for (what, chain) in cases {
        eprintln!("case: {what}");
        assert_dropped(&mut h, &chain);
    }
    // Still serving: a good packet afterwards works.
    h.send(Hdr::guest(OP_REQUEST, 10, 11), &[]);
    h.give_rx(1, 4096);
    assert_eq!(h.recv().len(), 1, "answered (RST: nothing listens)");
}

#[test]
fn oversized_packets_are_dropped() {
    let mut h = Harness::new();
    let a = 0x20_0000;
    let mut hdr = Hdr::guest(OP_RW, 1, 2);
    hdr.len = 64 * 1024 + 1;
    put_hdr(&h, a, hdr);
    assert_dropped(
        &mut h,
        &[raw(a, 44, F_NEXT, 1), raw(0x30_0000, 64 * 1024 + 1, 0, 0)],
    );
    hdr.len = u32::MAX;
    put_hdr(&h, a, hdr);
    assert_dropped(&mut h, &[raw(a, 44, F_NEXT, 1), raw(0x30_0000, 4096, 0, 0)]);
}

#[test]
fn a_descriptor_loop_does_not_hang() {
    let mut h = Harness::new();
    let a = 0x20_0000;
    let mut hdr = Hdr::guest(OP_RW, 1, 2);
    hdr.len = 10;
    put_hdr(&h, a, hdr);
    // head -> 1 -> 1 -> 1 ... (points at itself)
    let head =
        h.tx.push_raw(&[raw(a, 44, F_NEXT, 1), raw(a + 0x800, 4, F_NEXT, 1)]);
    h.kick(TXQ);
    assert_eq!(h.tx.used(), vec![(u32::from(head), 0)]);
}

#[test]
fn a_lying_avail_index_stops_the_device_instead_of_spinning() {
    let mut h = Harness::new();
    // The driver claims 40000 new buffers in a 256-entry queue.
    h.tx.set_avail_idx(40000);
    h.lock().queue_events()[TXQ].write(1).unwrap();
    // One turn of the loop handles the kick; a device that re-armed itself for the
    // "buffers left" would keep the loop busy (the harness's pump would hide that).
    let mut turns = 0;
    while h.em.run_with_timeout(20).unwrap() > 0 {
        turns += 1;
        assert!(turns < 5, "the device keeps re-arming itself");
    }
    assert!(h.lock().is_broken());
    // Stopped means stopped: a new kick is not processed either.
    h.kick(TXQ);
    assert!(h.lock().is_broken());
    // An avail entry naming a descriptor beyond the table: dropped, the device goes on.
    let mut h = Harness::new();
    h.tx.publish(QSIZE + 3);
    h.kick(TXQ);
    assert!(!h.lock().is_broken());
    h.send(Hdr::guest(OP_REQUEST, 10, 11), &[]);
}

#[test]
fn wrong_cids_are_dropped() {
    let mut h = Harness::new();
    let mut spoofed = Hdr::guest(OP_REQUEST, 1, 2);
    spoofed.src_cid = 7;
    let before = counts(&h);
    h.send(spoofed, &[]);
    let mut elsewhere = Hdr::guest(OP_REQUEST, 1, 2);
    elsewhere.dst_cid = 4;
    h.send(elsewhere, &[]);
    assert_eq!(counts(&h).tx_dropped, before.tx_dropped + 2);
    h.give_rx(4, 4096);
    assert!(h.recv().is_empty(), "nobody is answered");
}

#[test]
fn unknown_ops_bad_types_and_data_on_control_ops_are_reset() {
    let mut h = Harness::new();
    let mut unknown = Hdr::guest(99, 40, 41);
    unknown.op = 99;
    h.send(unknown, &[]);
    let mut dgram = Hdr::guest(OP_REQUEST, 42, 43);
    dgram.type_ = 2;
    h.send(dgram, &[]);
    let mut req_with_data = Hdr::guest(OP_REQUEST, 44, 45);
    req_with_data.len = 3;
    h.send(req_with_data, b"xyz");
    assert_eq!(counts(&h).tx_refused, 3);
    h.give_rx(8, 4096);
    let pkts = h.recv();
    let rsts: Vec<(u32, u32)> = pkts
        .iter()
        .filter(|(p, _)| p.op == OP_RST)
        .map(|(p, _)| (p.src_port, p.dst_port))
        .collect();
    assert_eq!(rsts, vec![(41, 40), (43, 42), (45, 44)]);
}

#[test]
fn data_for_an_unknown_connection_is_reset_and_a_reset_is_not_answered() {
    let mut h = Harness::new();
    let mut rw = Hdr::guest(OP_RW, 50, 51);
    rw.len = 2;
    h.send(rw, b"hi");
    h.send(Hdr::guest(OP_RST, 52, 53), &[]);
    h.give_rx(4, 4096);
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RST);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (51, 50));
}

#[test]
fn sending_beyond_credit_resets_the_connection() {
    let mut h = Harness::new();
    let (host, local) = h.host_connect(1024);
    // The host never reads: its socket buffer fills, then our window.
    let chunk = vec![1u8; 64 * 1024];
    let mut sent = 0usize;
    let mut reset = false;
    for _ in 0..200 {
        let mut hdr = Hdr::guest(OP_RW, 1024, local);
        hdr.len = chunk.len() as u32;
        h.send(hdr, &chunk);
        sent += chunk.len();
        if h.lock().muxer().connection_count() == 0 {
            reset = true;
            break;
        }
    }
    assert!(
        reset,
        "a guest ignoring credit is reset (sent {sent} bytes)"
    );
    h.give_rx(8, 4096);
    assert!(h.recv().iter().any(|(p, _)| p.op == OP_RST));
    drop(host);
}

#[test]
fn bad_rx_buffers_are_returned_empty() {
    let mut h = Harness::new();
    h.send(Hdr::guest(OP_REQUEST, 60, 61), &[]); // produces a RST for the guest
                                                 // Read-only RX buffer, then one outside memory, then a good one.
    let bad1 = h.rx.push_raw(&[raw(0x90_0000, 44, 0, 0)]);
    let bad2 =
        h.rx.push_raw(&[raw(MEM_SIZE as u64 + 0x1000, 44, F_WRITE, 0)]);
    h.kick(cleave_agent::devices::virtio::vsock::device::RXQ);
    let used = h.rx.used();
    assert!(used.contains(&(u32::from(bad1), 0)), "{used:?}");
    assert!(used.contains(&(u32::from(bad2), 0)), "{used:?}");
    h.give_rx(1, 4096);
    assert_eq!(
        h.recv()[0].0.op,
        OP_RST,
        "the packet survived the bad buffers"
    );
}

#[test]
fn control_packets_are_bounded_when_the_guest_takes_none() {
    let mut h = Harness::new();
    // Thousands of packets each asking for a RST, and no RX buffers.
    for round in 0..80 {
        for i in 0..100u32 {
            let mut rw = Hdr::guest(OP_RW, round * 1000 + i, 9);
            rw.len = 1;
            h.queue_tx(rw, b"x");
        }
        h.kick(TXQ);
        let _ = h.tx.used();
    }
    let q = h.lock().muxer().control_queue_len();
    assert!(q <= MAX_CONTROL_PACKETS, "{q} queued");
    assert_eq!(q, MAX_CONTROL_PACKETS.min(8000));
}

#[test]
fn guest_connection_flood_is_capped() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(port_path(&h.uds, 6000)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut accepted = Vec::new();
    let total = MAX_CONNECTIONS as u32 + 50;
    let mut answered = 0usize;
    for batch in 0..(total / 100 + 1) {
        for i in 0..100u32 {
            let port = batch * 100 + i;
            if port >= total {
                break;
            }
            h.queue_tx(Hdr::guest(OP_REQUEST, 10_000 + port, 6000), &[]);
        }
        h.kick(TXQ);
        let _ = h.tx.used();
        while let Ok((s, _)) = listener.accept() {
            accepted.push(s);
        }
        h.give_rx(100 - h.rx_outstanding(), 64);
        answered += h.recv().len();
    }
    while answered < total as usize {
        h.give_rx(100 - h.rx_outstanding(), 64);
        let got = h.recv().len();
        if got == 0 {
            break;
        }
        answered += got;
    }
    let conns = h.lock().muxer().connection_count();
    assert!(conns <= MAX_CONNECTIONS, "{conns} connections");
    assert_eq!(
        answered, total as usize,
        "every request got RESPONSE or RST"
    );
}

#[test]
fn host_handshake_flood_is_capped() {
    let mut h = Harness::new();
    let mut streams = Vec::new();
    for _ in 0..(MAX_PENDING_CONNECTS + 40) {
        streams.push(UnixStream::connect(&h.uds).unwrap());
        h.pump();
    }
    assert!(h.lock().muxer().pending_count() <= MAX_PENDING_CONNECTS);
    // The extra ones were closed.
    let closed = streams
        .iter_mut()
        .filter_map(|s| {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut b = [0u8; 1];
            matches!(s.read(&mut b), Ok(0)).then_some(())
        })
        .count();
    assert!(closed >= 40, "{closed} closed");
}

#[test]
fn an_inactive_device_ignores_kicks() {
    let mut h = Harness::inactive();
    h.queue_tx(Hdr::guest(OP_REQUEST, 1, 2), &[]);
    h.kick(TXQ);
    assert!(h.tx.used().is_empty());
    assert_eq!(counts(&h).tx_packets, 0);
}

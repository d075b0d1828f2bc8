//! The rig console protocol (see images/rig/init): the console carries the
//! command's bytes unchanged plus two marker lines holding a per-run nonce,
//!   `@@cleave-rig-start:<nonce>@@\n`             the command starts now
//!   `\n@@cleave-rig-exit:<nonce>:<status>@@`     the command ended
//! The relay passes everything else through, strips the markers (also when a
//! read splits one), and drops what follows the exit marker (power-off noise).

use std::io::Write;

/// What the relay saw in a chunk of console bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The rig finished booting and the command started.
    Started,
    /// The command (or, before `Started`, the rig itself) ended with this status.
    Exited(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Booting,
    Running,
    Done,
}

enum Scan {
    /// No marker can start here.
    No,
    /// A marker may start here; more bytes are needed to tell.
    Partial,
    /// A whole marker of this many bytes.
    Start(usize),
    Exit(i32),
}

/// Longest status text we accept ("-2147483648"); anything longer is output.
const MAX_STATUS_LEN: usize = 11;

pub struct Relay {
    start: Vec<u8>,
    exit_prefix: Vec<u8>,
    pending: Vec<u8>,
    phase: Phase,
}

impl Relay {
    pub fn new(nonce: &str) -> Self {
        Self {
            start: format!("@@cleave-rig-start:{nonce}@@\n").into_bytes(),
            exit_prefix: format!("\n@@cleave-rig-exit:{nonce}:").into_bytes(),
            pending: Vec::new(),
            phase: Phase::Booting,
        }
    }

    /// Feeds console bytes; writes the command's output to `out` and returns
    /// the markers seen, in order.
    pub fn feed(&mut self, data: &[u8], out: &mut dyn Write) -> std::io::Result<Vec<Event>> {
        let mut events = Vec::new();
        if self.phase == Phase::Done {
            return Ok(events);
        }
        self.pending.extend_from_slice(data);
        let mut i = 0;
        let mut flushed = 0;
        while i < self.pending.len() {
            match self.scan(&self.pending[i..]) {
                Scan::No => i += 1,
                Scan::Partial => break,
                Scan::Start(len) => {
                    out.write_all(&self.pending[flushed..i])?;
                    i += len;
                    flushed = i;
                    self.phase = Phase::Running;
                    events.push(Event::Started);
                }
                Scan::Exit(status) => {
                    out.write_all(&self.pending[flushed..i])?;
                    self.pending.clear();
                    self.phase = Phase::Done;
                    events.push(Event::Exited(status));
                    out.flush()?;
                    return Ok(events);
                }
            }
        }
        out.write_all(&self.pending[flushed..i])?;
        out.flush()?;
        self.pending.drain(..i);
        Ok(events)
    }

    /// Bytes held back because they might begin a marker; the caller writes
    /// them out if the console ends without one.
    pub fn take_unfinished(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }

    fn scan(&self, rest: &[u8]) -> Scan {
        if self.phase == Phase::Booting {
            match prefix_match(rest, &self.start) {
                Some(true) => return Scan::Start(self.start.len()),
                Some(false) => return Scan::Partial,
                None => {}
            }
        }
        match prefix_match(rest, &self.exit_prefix) {
            None => Scan::No,
            Some(false) => Scan::Partial,
            Some(true) => self.scan_status(&rest[self.exit_prefix.len()..]),
        }
    }

    /// After the exit prefix: `[-]digits@@`.
    fn scan_status(&self, tail: &[u8]) -> Scan {
        let sign = usize::from(tail.first() == Some(&b'-'));
        let digits = tail[sign..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        let text_len = sign + digits;
        if text_len > MAX_STATUS_LEN {
            return Scan::No;
        }
        let after = &tail[text_len..];
        if after.is_empty() {
            return Scan::Partial;
        }
        if digits == 0 {
            return Scan::No;
        }
        match prefix_match(after, b"@@") {
            None => Scan::No,
            Some(false) => Scan::Partial,
            Some(true) => {
                // Digits only, at most 11 characters: parses unless out of range.
                let text = std::str::from_utf8(&tail[..text_len]).unwrap_or("");
                match text.parse::<i32>() {
                    Ok(status) => Scan::Exit(status),
                    Err(_) => Scan::No,
                }
            }
        }
    }
}

/// `Some(true)`: `rest` starts with `marker`; `Some(false)`: `rest` is a
/// proper prefix of it; `None`: neither.
fn prefix_match(rest: &[u8], marker: &[u8]) -> Option<bool> {
    let n = rest.len().min(marker.len());
    if rest[..n] != marker[..n] {
        None
    } else {
        Some(n == marker.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: &str = "0123abcd";

    fn console(status: &str, output: &str) -> Vec<u8> {
        format!(
            "boot noise\n@@cleave-rig-start:{NONCE}@@\n{output}\n@@cleave-rig-exit:{NONCE}:{status}@@\n[  5.1] reboot: Power down\r\n"
        )
        .into_bytes()
    }

    /// Feeds `bytes` in chunks of `chunk` bytes; returns output and events.
    fn run(bytes: &[u8], chunk: usize) -> (Vec<u8>, Vec<Event>) {
        let mut relay = Relay::new(NONCE);
        let mut out = Vec::new();
        let mut events = Vec::new();
        for piece in bytes.chunks(chunk) {
            events.extend(relay.feed(piece, &mut out).unwrap());
        }
        out.extend(relay.take_unfinished());
        (out, events)
    }

    #[test]
    fn strips_markers_and_reports_status() {
        let (out, events) = run(&console("3", "hi\nno-newline"), 4096);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "boot noise\nhi\nno-newline"
        );
        assert_eq!(events, vec![Event::Started, Event::Exited(3)]);
    }

    #[test]
    fn markers_split_at_every_byte_boundary() {
        let bytes = console("42", "a@@b\n\nc");
        for chunk in 1..bytes.len() {
            let (out, events) = run(&bytes, chunk);
            assert_eq!(out, b"boot noise\na@@b\n\nc", "chunk size {chunk}");
            assert_eq!(
                events,
                vec![Event::Started, Event::Exited(42)],
                "chunk size {chunk}"
            );
        }
    }

    #[test]
    fn output_ending_in_newline_is_kept_exactly() {
        let (out, events) = run(&console("0", "line\n"), 7);
        assert_eq!(out, b"boot noise\nline\n");
        assert_eq!(events, vec![Event::Started, Event::Exited(0)]);
    }

    #[test]
    fn markers_with_another_nonce_are_plain_output() {
        let fake = "@@cleave-rig-exit:ffff:0@@\n\n@@cleave-rig-exit:ffff:1@@";
        let (out, events) = run(&console("5", fake), 3);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("boot noise\n{fake}")
        );
        assert_eq!(events, vec![Event::Started, Event::Exited(5)]);
    }

    #[test]
    fn start_marker_after_start_is_plain_output() {
        let again = format!("@@cleave-rig-start:{NONCE}@@\n");
        let (out, _) = run(&console("0", &again), 5);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("boot noise\n{again}")
        );
    }

    #[test]
    fn malformed_status_is_plain_output() {
        for bad in ["", "x", "1x", "99999999999999", "-"] {
            let text = format!("\n@@cleave-rig-exit:{NONCE}:{bad}@@ tail");
            let (out, events) = run(text.as_bytes(), 2);
            assert_eq!(String::from_utf8(out).unwrap(), text, "status {bad:?}");
            assert!(events.is_empty(), "status {bad:?}");
        }
    }

    #[test]
    fn failure_before_start_is_reported() {
        let text =
            format!("cleave-rig: error: insmod kvm failed\n\n@@cleave-rig-exit:{NONCE}:125@@\n");
        let (out, events) = run(text.as_bytes(), 1);
        assert_eq!(out, b"cleave-rig: error: insmod kvm failed\n");
        assert_eq!(events, vec![Event::Exited(125)]);
    }

    #[test]
    fn negative_status_parses() {
        let (_, events) = run(&console("-1", ""), 9);
        assert_eq!(events, vec![Event::Started, Event::Exited(-1)]);
    }

    #[test]
    fn unfinished_prefix_is_returned_when_console_ends() {
        let mut relay = Relay::new(NONCE);
        let mut out = Vec::new();
        relay.feed(b"tail\n@@cleave-ri", &mut out).unwrap();
        assert_eq!(out, b"tail");
        assert_eq!(relay.take_unfinished(), b"\n@@cleave-ri");
    }
}

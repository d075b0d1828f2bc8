//! The host side of the guest console: echoes what the guest prints (optionally), keeps a
//! bounded tail for error reports, and lets the host wait for a line with a given prefix
//! (the guest agent's readiness line). The guest writes here, so every buffer is bounded.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How much of the console is kept for error reports.
pub const TAIL_BYTES: usize = 64 * 1024;
/// Longest line the watcher looks at; longer lines are cut.
pub const MAX_LINE: usize = 4096;

#[derive(Default)]
struct State {
    tail: VecDeque<u8>,
    line: Vec<u8>,
    found: Option<(Instant, String)>,
}

struct Shared {
    prefix: Option<Vec<u8>>,
    state: Mutex<State>,
    seen: Condvar,
}

/// Host handle: wait for the watched line, read the tail.
#[derive(Clone)]
pub struct Console(Arc<Shared>);

/// Guest side: what the UART writes into.
pub struct ConsoleWriter {
    shared: Arc<Shared>,
    echo: Option<Box<dyn Write + Send>>,
}

impl Console {
    /// A console that echoes to `echo` (if any) and watches for a line starting with `prefix`.
    pub fn new(
        echo: Option<Box<dyn Write + Send>>,
        prefix: Option<&str>,
    ) -> (Console, ConsoleWriter) {
        let shared = Arc::new(Shared {
            prefix: prefix.map(|p| p.as_bytes().to_vec()),
            state: Mutex::new(State::default()),
            seen: Condvar::new(),
        });
        (Console(shared.clone()), ConsoleWriter { shared, echo })
    }

    /// Waits up to `timeout` for the watched line; returns when it was seen and the line.
    pub fn wait_for_line(&self, timeout: Duration) -> Option<(Instant, String)> {
        let state = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        let (state, _) = self
            .0
            .seen
            .wait_timeout_while(state, timeout, |s| s.found.is_none())
            .unwrap_or_else(|e| e.into_inner());
        state.found.clone()
    }

    /// The last [`TAIL_BYTES`] of console output, lossily decoded.
    pub fn tail(&self) -> String {
        let state = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        let bytes: Vec<u8> = state.tail.iter().copied().collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(echo) = self.echo.as_mut() {
            // Echo failures (a closed pipe) must not stop the guest; the tail still has it.
            let _ = echo.write_all(buf);
        }
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        for &b in buf {
            if state.tail.len() == TAIL_BYTES {
                state.tail.pop_front();
            }
            state.tail.push_back(b);
            match b {
                b'\n' => {
                    let line = std::mem::take(&mut state.line);
                    if state.found.is_none() {
                        if let Some(prefix) = &self.shared.prefix {
                            let text = line.strip_suffix(b"\r").unwrap_or(&line);
                            if text.starts_with(prefix) {
                                let text = String::from_utf8_lossy(text).into_owned();
                                state.found = Some((Instant::now(), text));
                                self.shared.seen.notify_all();
                            }
                        }
                    }
                }
                _ if state.line.len() < MAX_LINE => state.line.push(b),
                _ => {}
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(echo) = self.echo.as_mut() {
            let _ = echo.flush();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_watched_line_written_byte_by_byte() {
        let (console, mut w) = Console::new(None, Some("ready"));
        for b in b"boot noise\r\nready v1\r\nmore\n" {
            w.write_all(&[*b]).unwrap();
        }
        let (_, line) = console.wait_for_line(Duration::from_millis(10)).unwrap();
        assert_eq!(line, "ready v1");
    }

    #[test]
    fn times_out_without_the_line() {
        let (console, mut w) = Console::new(None, Some("ready"));
        w.write_all(b"not-ready\nalmost ready").unwrap();
        assert!(console.wait_for_line(Duration::from_millis(10)).is_none());
    }

    #[test]
    fn tail_and_line_buffers_are_bounded() {
        let (console, mut w) = Console::new(None, Some("x"));
        let flood = vec![b'a'; TAIL_BYTES * 3];
        w.write_all(&flood).unwrap();
        assert_eq!(console.tail().len(), TAIL_BYTES);
        assert!(console.0.state.lock().unwrap().line.len() <= MAX_LINE);
    }
}

//! Rate-limited warnings: a hostile guest can provoke the same complaint millions of times a
//! second, and the node log must not become the resource it exhausts.

use std::time::{Duration, Instant};

/// At most [`LogLimit::BURST`] warnings per [`LogLimit::PERIOD`]; the rest are counted
/// and the count is reported with the next warning that gets through.
#[derive(Debug)]
pub struct LogLimit {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl LogLimit {
    pub const BURST: u32 = 10;
    pub const PERIOD: Duration = Duration::from_secs(10);

    pub fn new() -> Self {
        LogLimit {
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Logs `what` as a warning unless the budget is spent. Returns whether it was logged.
    pub fn warn(&mut self, what: std::fmt::Arguments<'_>) -> bool {
        let now = Instant::now();
        match self.window_start {
            Some(s) if now.duration_since(s) < Self::PERIOD => {}
            _ => {
                self.window_start = Some(now);
                self.in_window = 0;
            }
        }
        if self.in_window >= Self::BURST {
            self.suppressed += 1;
            return false;
        }
        self.in_window += 1;
        if self.suppressed > 0 {
            tracing::warn!(suppressed = self.suppressed, "{what}");
            self.suppressed = 0;
        } else {
            tracing::warn!("{what}");
        }
        true
    }

    /// How many warnings were dropped since the last one logged.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_burst() {
        let mut l = LogLimit::new();
        let logged = (0..1000)
            .filter(|i| l.warn(format_args!("bad {i}")))
            .count();
        assert_eq!(logged, LogLimit::BURST as usize);
        assert_eq!(l.suppressed(), 1000 - u64::from(LogLimit::BURST));
    }
}

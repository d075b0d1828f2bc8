//! The audit log: one JSON line per mutating request — when, who, what, on which sandbox,
//! how it ended and how long it took. Nothing secret is ever passed in (tokens are not
//! part of any field), and every field is bounded.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub struct AuditLog {
    file: Option<Mutex<File>>,
}

/// One audited request.
#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    pub time: String,
    pub caller: &'a str,
    pub action: &'static str,
    /// The sandbox(es) or template the request was about.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sandboxes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// `ok`, or the gRPC code's name.
    pub result: &'static str,
    pub duration_ms: f64,
}

impl AuditLog {
    /// Appends to `path` (created 0600); `None`: audit lines go to the node log instead.
    pub fn open(path: Option<&Path>) -> std::io::Result<AuditLog> {
        let file = match path {
            Some(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                Some(Mutex::new(
                    OpenOptions::new()
                        .create(true)
                        .append(true)
                        .mode(0o600)
                        .open(p)?,
                ))
            }
            None => None,
        };
        Ok(AuditLog { file })
    }

    pub fn write(&self, record: &AuditRecord<'_>) {
        let Ok(mut line) = serde_json::to_string(record) else {
            return;
        };
        match &self.file {
            Some(f) => {
                line.push('\n');
                let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = f.write_all(line.as_bytes()) {
                    tracing::error!(error = %e, "writing the audit log");
                }
            }
            None => tracing::info!(target: "audit", "{line}"),
        }
    }
}

/// `time` as RFC 3339 UTC with milliseconds.
pub fn rfc3339(time: SystemTime) -> String {
    let d = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_705_200_123);
        assert_eq!(rfc3339(t), "2026-11-26T15:00:00.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn lines_are_appended_as_json() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("audit/audit.jsonl");
        let log = AuditLog::open(Some(&path)).unwrap();
        for action in ["sandbox.create", "sandbox.delete"] {
            log.write(&AuditRecord {
                time: rfc3339(SystemTime::now()),
                caller: "uid:0",
                action,
                sandboxes: vec!["sb-0123456789abcdef".into()],
                template: None,
                result: "ok",
                duration_ms: 1.5,
            });
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["action"], "sandbox.delete");
        assert_eq!(lines[0]["sandboxes"][0], "sb-0123456789abcdef");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

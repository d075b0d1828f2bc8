//! The per-run directory and the shell script the rig's init runs through
//! `chroot /host /bin/sh <script>`: cd to the caller's directory, export its
//! environment, exec its argv. Everything is single-quoted, so any bytes
//! (spaces, quotes, non-UTF-8) reach the command unchanged.

use std::ffi::OsStr;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::error::RigError;
use super::RigCommand;

/// Host directories the rig replaces with its own filesystems: a path under
/// them is not what the command would see inside.
const HIDDEN_IN_RIG: &[&str] = &["/run", "/proc", "/sys", "/dev"];

/// Scratch directories the rig replaces with its own tmpfs, but from which it
/// re-exposes (read-only, at the same path) the directories a command needs,
/// so that e.g. a checkout under /tmp runs there too.
const SCRATCH: &[&str] = &["/tmp", "/var/tmp"];

/// The directory the rig must re-expose for `path` to be visible: the
/// top-level entry under a scratch directory (`/tmp/ci/x/y` → `/tmp/ci`).
pub fn exposed_dir(path: &Path) -> Option<PathBuf> {
    SCRATCH.iter().find_map(|scratch| {
        let rest = path.strip_prefix(scratch).ok()?;
        let first = rest.components().next()?;
        Some(Path::new(scratch).join(first))
    })
}

/// Every directory [`exposed_dir`] asks for among `paths`, once each.
pub fn exposed_dirs<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = paths.into_iter().filter_map(exposed_dir).collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// Quotes `arg` for a POSIX shell: `'...'`, with each `'` written as `'\''`.
pub fn shell_quote(arg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(arg.len() + 2);
    out.push(b'\'');
    for &b in arg {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Fails if the rig would not see `path` as the host does.
pub fn check_visible(what: &str, path: &Path) -> Result<(), RigError> {
    if !path.is_absolute() {
        return Err(RigError::BadCommand(format!(
            "the {what} {} is not an absolute path",
            path.display()
        )));
    }
    if SCRATCH.iter().any(|s| path == Path::new(s)) {
        return Err(RigError::BadCommand(format!(
            "the {what} {} is the rig's own scratch directory; use a directory inside it or elsewhere",
            path.display()
        )));
    }
    if let Some(hidden) = HIDDEN_IN_RIG.iter().find(|h| path.starts_with(h)) {
        return Err(RigError::BadCommand(format!(
            "the {what} {} is under {hidden}, which the rig replaces with its own (the host's root is shared, but not {hidden}); use a path elsewhere",
            path.display()
        )));
    }
    Ok(())
}

/// The script text for `cmd`.
pub fn render(cmd: &RigCommand) -> Result<Vec<u8>, RigError> {
    let Some(program) = cmd.argv.first() else {
        return Err(RigError::BadCommand("the command is empty".into()));
    };
    if program.is_empty() {
        return Err(RigError::BadCommand("the program name is empty".into()));
    }
    check_visible("working directory", &cmd.cwd)?;
    if program.as_bytes().starts_with(b"/") {
        check_visible("program", Path::new(program))?;
    }
    let has_nul = |s: &OsStr| s.as_bytes().contains(&0);
    if cmd.argv.iter().any(|a| has_nul(a)) || cmd.env.iter().any(|(_, v)| v.contains('\0')) {
        return Err(RigError::BadCommand(
            "an argument or value holds a NUL byte".into(),
        ));
    }

    let mut s = Vec::new();
    s.extend_from_slice(
        b"# written by cleave rig; run by the rig's init as: chroot /host /bin/sh <this file>\n",
    );
    s.extend_from_slice(b"cd ");
    s.extend(shell_quote(cmd.cwd.as_os_str().as_bytes()));
    s.extend_from_slice(b" || exit 125\n");
    for (name, value) in &cmd.env {
        if !is_env_name(name) {
            return Err(RigError::BadCommand(format!(
                "{name:?} is not a valid environment variable name"
            )));
        }
        s.extend_from_slice(format!("export {name}=").as_bytes());
        s.extend(shell_quote(value.as_bytes()));
        s.push(b'\n');
    }
    s.extend_from_slice(b"exec");
    for arg in &cmd.argv {
        s.push(b' ');
        s.extend(shell_quote(arg.as_bytes()));
    }
    s.push(b'\n');
    Ok(s)
}

/// `$CACHE/rig/runs/<id>/`, removed when dropped (whatever happened).
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    pub fn create(runs: &Path, id: &str) -> Result<Self, RigError> {
        let path = runs.join(id);
        let err = |source| RigError::RunDir {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(runs).map_err(err)?;
        std::fs::create_dir(&path).map_err(err)?;
        Ok(Self { path })
    }

    /// Writes `cmd.sh` and returns its path.
    pub fn write_script(&self, text: &[u8]) -> Result<PathBuf, RigError> {
        let script = self.path.join("cmd.sh");
        let mut file = std::fs::File::create(&script).map_err(|source| RigError::RunDir {
            path: script.clone(),
            source,
        })?;
        file.write_all(text)
            .and_then(|()| file.sync_all())
            .map_err(|source| RigError::RunDir {
                path: script.clone(),
                source,
            })?;
        Ok(script)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove rig run directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;
    use std::time::Duration;

    fn cmd(argv: &[&[u8]], env: &[(&str, &str)]) -> RigCommand {
        RigCommand {
            argv: argv
                .iter()
                .map(|a| OsString::from_vec(a.to_vec()))
                .collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cwd: PathBuf::from("/work/it's here"),
            timeout: Duration::from_secs(1),
        }
    }

    /// Runs the rendered script with the host's sh, with `exec` replaced by a
    /// printf of each argument, to check that quoting round-trips.
    fn shell_roundtrip(arg: &[u8]) -> Vec<u8> {
        let mut script = b"printf '%s\\0' ".to_vec();
        script.extend(shell_quote(arg));
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(OsStr::from_bytes(&script))
            .output()
            .unwrap();
        assert!(out.status.success());
        out.stdout
    }

    #[test]
    fn quoting_round_trips_through_sh() {
        let cases: &[&[u8]] = &[
            b"plain",
            b"",
            b"it's",
            b"''",
            b"a b\tc\nd",
            b"$HOME `id` $(id) \\ \" ; & | * ?",
            b"\xff\xfe non-utf8",
        ];
        for case in cases {
            let mut want = case.to_vec();
            want.push(0);
            assert_eq!(
                shell_roundtrip(case),
                want,
                "{:?}",
                String::from_utf8_lossy(case)
            );
        }
    }

    #[test]
    fn script_cds_exports_and_execs() {
        let text = render(&cmd(
            &[b"/bin/echo", b"a b", b"it's"],
            &[("RUST_LOG", "debug")],
        ))
        .unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("cd '/work/it'\\''s here' || exit 125\n"),
            "{text}"
        );
        assert!(text.contains("export RUST_LOG='debug'\n"), "{text}");
        assert!(
            text.ends_with("exec '/bin/echo' 'a b' 'it'\\''s'\n"),
            "{text}"
        );
    }

    #[test]
    fn bad_commands_are_refused() {
        assert!(render(&cmd(&[], &[])).is_err());
        assert!(render(&cmd(&[b""], &[])).is_err());
        assert!(render(&cmd(&[b"a\0b"], &[])).is_err());
        assert!(render(&cmd(&[b"ls"], &[("BAD NAME", "x")])).is_err());
        assert!(render(&cmd(&[b"ls"], &[("1X", "x")])).is_err());
        let mut hidden = cmd(&[b"ls"], &[]);
        hidden.cwd = PathBuf::from("/run/work");
        let err = render(&hidden).unwrap_err().to_string();
        assert!(err.contains("/run"), "{err}");
        assert!(render(&cmd(&[b"/proc/prog"], &[])).is_err());
        hidden.cwd = PathBuf::from("/tmp");
        assert!(render(&hidden).is_err());
        // Under a scratch directory is fine: the rig re-exposes it.
        hidden.cwd = PathBuf::from("/tmp/ci/checkout");
        assert!(render(&hidden).is_ok());
        let mut relative = cmd(&[b"ls"], &[]);
        relative.cwd = PathBuf::from("work");
        assert!(render(&relative).is_err());
    }

    #[test]
    fn scratch_paths_expose_their_top_level_directory() {
        let paths = [
            Path::new("/tmp/ci/tests"),
            Path::new("/tmp/ci/target/debug/cleave"),
            Path::new("/var/tmp/x"),
            Path::new("/work/main"),
            Path::new("/tmp"),
        ];
        assert_eq!(
            exposed_dirs(paths),
            vec![PathBuf::from("/tmp/ci"), PathBuf::from("/var/tmp/x")]
        );
    }

    #[test]
    fn run_dir_is_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let runs = dir.path().join("runs");
        let path;
        {
            let run = RunDir::create(&runs, "r1").unwrap();
            path = run.write_script(b"exit 0\n").unwrap();
            assert!(path.is_file());
        }
        assert!(!path.exists());
        assert!(!runs.join("r1").exists());
    }
}

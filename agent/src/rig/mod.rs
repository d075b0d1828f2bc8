//! The KVM integration rig: runs a command inside a VM under QEMU's software
//! emulation of an SVM-capable AMD CPU, where Debian's kernel loads kvm_amd and
//! so gives a real KVM that can boot real Linux guests, on hosts whose own
//! /dev/kvm cannot (kvm_pvm) or that have none.
//!
//! The host's root is shared read-only, so the command runs at the same paths
//! with the same binaries and cached images; it gets its own /tmp, /run and
//! /dev. The rig has no network card. Images come from images/rig/build-rig.sh
//! (`make rig`); docs/TESTING.md describes the whole design.
//!
//! - [`manifest`]: rig.json, both files' sha256 checked on every start
//! - [`script`]: the per-run directory and the command's shell script
//! - [`launch`]: the QEMU command line
//! - [`relay`]: the console protocol (start and exit markers)
//! - [`supervise`]: the QEMU process, timeout and cleanup

pub mod error;
pub mod launch;
pub mod manifest;
pub mod relay;
pub mod script;
mod supervise;

use std::ffi::OsString;
use std::io::{Read as _, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::RigError;

use crate::host::paths::cache_dir;

/// Default time a `cleave` command may take in the rig (boots there take seconds).
pub const DEFAULT_CLEAVE_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// Set in the environment of every rig command, so cleave inside knows where it runs.
pub const IN_RIG_ENV: &str = "CLEAVE_IN_RIG";

/// Host environment variables a rig command inherits by default.
const INHERITED_ENV: &[&str] = &[
    "HOME",
    // The image store (`cleave image build`): the host's is seen read-only in the rig.
    "CLEAVE_IMAGES",
    "PATH",
    "RUST_LOG",
    "RUST_BACKTRACE",
    "TERM",
    "NO_COLOR",
];

/// One command to run in the rig.
#[derive(Debug, Clone)]
pub struct RigCommand {
    /// Program and arguments; the program is looked up in the command's PATH.
    pub argv: Vec<OsString>,
    /// The whole environment of the command (nothing else is inherited).
    pub env: Vec<(String, String)>,
    /// Working directory, absolute, not under /tmp, /run, /proc, /sys or /dev.
    pub cwd: PathBuf,
    /// Whole run, boot included; QEMU is stopped when it passes.
    pub timeout: Duration,
}

impl RigCommand {
    /// `argv` in `cwd` with [`inherited_env`] and the default timeout.
    pub fn new(argv: Vec<OsString>, cwd: PathBuf) -> Self {
        Self {
            argv,
            env: inherited_env(),
            cwd,
            timeout: DEFAULT_CLEAVE_TIMEOUT,
        }
    }
}

/// How a rig command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RigOutcome {
    /// The command's exit status (128 + N if signal N killed it).
    pub exit_code: i32,
    /// From starting QEMU to the command starting inside the rig.
    pub boot_ms: u64,
}

/// HOME, PATH, RUST_LOG, RUST_BACKTRACE, TERM and NO_COLOR from this process
/// (those set), CLEAVE_CACHE (the cache this process uses, so the rig reads
/// the same images) and CLEAVE_IN_RIG=1.
pub fn inherited_env() -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = INHERITED_ENV
        .iter()
        .filter_map(|name| std::env::var(name).ok().map(|v| (name.to_string(), v)))
        .collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push((
            "PATH".into(),
            "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into(),
        ));
    }
    env.push((
        "CLEAVE_CACHE".into(),
        cache_dir().to_string_lossy().into_owned(),
    ));
    env.push((IN_RIG_ENV.into(), "1".into()));
    env
}

/// The rig manifest written by `make rig`.
pub fn manifest_path() -> PathBuf {
    cache_dir().join("rig/rig.json")
}

/// Runs `cmd` in a fresh rig, streaming its console output (stdout and stderr
/// together) into `out`, and returns its exit status. QEMU is stopped and the
/// run's files removed however this returns.
pub fn run(cmd: &RigCommand, out: &mut dyn Write) -> Result<RigOutcome, RigError> {
    if std::env::var_os(IN_RIG_ENV).is_some() {
        return Err(RigError::BadCommand(
            "this is already inside the rig, and the rig does not nest; run the command directly"
                .into(),
        ));
    }
    let image = manifest::load(&manifest_path())?;
    let qemu = launch::find_qemu()?;
    let machine = launch::Machine::from_env()?;
    let text = script::render(cmd)?;
    let cache = cache_dir();
    script::check_visible("cache directory (CLEAVE_CACHE)", &cache)?;

    let nonce = nonce()?;
    let run_dir = script::RunDir::create(
        &cache.join("rig/runs"),
        &format!("{}-{nonce}", std::process::id()),
    )?;
    let script_path = run_dir.write_script(&text)?;
    let program = cmd.argv.first().map(Path::new).filter(|p| p.is_absolute());
    let keep = script::exposed_dirs(
        [cmd.cwd.as_path(), cache.as_path()]
            .into_iter()
            .chain(program),
    );
    let cmdline = launch::kernel_cmdline(&script_path, &nonce, &keep)?;
    let args = launch::qemu_args(&image, machine, &cmdline);
    tracing::info!(
        kernel = %image.debian_kernel,
        mem_mib = machine.mem_mib,
        vcpus = machine.vcpus,
        timeout_s = cmd.timeout.as_secs(),
        "starting the KVM rig"
    );
    tracing::debug!(?args, "rig qemu arguments");
    let outcome = supervise::run(&qemu, &args, relay::Relay::new(&nonce), cmd.timeout, out);
    drop(run_dir);
    outcome
}

/// Runs this very `cleave` binary with `args` inside the rig (the host root is
/// shared, so the same path works there), in the current directory, and
/// returns its exit status. CLEAVE_RIG_TIMEOUT_SECS overrides the 20 minute
/// default timeout (for `cleave rig --exec` too).
pub fn run_cleave(args: &[OsString], out: &mut dyn Write) -> Result<i32, RigError> {
    let exe = std::env::current_exe().map_err(|e| {
        RigError::BadCommand(format!("cannot tell where the cleave binary is: {e}"))
    })?;
    let cwd = std::env::current_dir()
        .map_err(|e| RigError::BadCommand(format!("cannot read the current directory: {e}")))?;
    let mut argv = vec![exe.into_os_string()];
    argv.extend(args.iter().cloned());
    let mut cmd = RigCommand::new(argv, cwd);
    cmd.timeout = timeout_from_env()?;
    run(&cmd, out).map(|outcome| outcome.exit_code)
}

/// CLEAVE_RIG_TIMEOUT_SECS, else the 20 minute default.
pub fn timeout_from_env() -> Result<Duration, RigError> {
    let Ok(text) = std::env::var("CLEAVE_RIG_TIMEOUT_SECS") else {
        return Ok(DEFAULT_CLEAVE_TIMEOUT);
    };
    let secs = text.parse::<u64>().ok().filter(|s| *s > 0).ok_or_else(|| {
        RigError::BadCommand(format!(
            "CLEAVE_RIG_TIMEOUT_SECS={text:?} is not a positive number of seconds"
        ))
    })?;
    Ok(Duration::from_secs(secs))
}

/// 16 hex characters from the kernel's CSPRNG: marks this run's console
/// markers and names its directory.
fn nonce() -> Result<String, RigError> {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| RigError::BadCommand(format!("cannot read /dev/urandom: {e}")))?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// One rig at a time: two TCG machines on a small host would only slow each other.
    static RIG: Mutex<()> = Mutex::new(());

    /// Run directories this test process left behind.
    fn own_run_dirs() -> usize {
        let prefix = format!("{}-", std::process::id());
        std::fs::read_dir(cache_dir().join("rig/runs")).map_or(0, |dir| {
            dir.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .count()
        })
    }

    /// Boots the real rig (needs `make rig`; ~10 s under TCG), so it is opt-in:
    /// `cargo test -p cleave-agent rig:: -- --ignored`.
    #[test]
    #[ignore = "boots the KVM rig under QEMU; run `make rig` first, then with --ignored"]
    fn rig_relays_output_and_exit_status_with_a_real_kvm() {
        let script = "ls -l /dev/kvm; cat /sys/module/kvm_amd/parameters/nested; echo hi; printf 'x y'; exit 3";
        let _one = RIG.lock().unwrap_or_else(|e| e.into_inner());
        let argv = ["sh", "-c", script].map(OsString::from).to_vec();
        let mut cmd = RigCommand::new(argv, PathBuf::from("/"));
        cmd.timeout = Duration::from_secs(300);
        let mut out = Vec::new();
        let outcome = run(&cmd, &mut out).unwrap();
        let text = String::from_utf8_lossy(&out);
        assert_eq!(outcome.exit_code, 3, "{text}");
        assert!(text.contains("/dev/kvm"), "{text}");
        assert!(text.contains("\nhi\nx y"), "{text}");
        assert!(
            text.ends_with("x y"),
            "markers and power-off noise must be stripped: {text:?}"
        );
        assert!(!text.contains('\r'), "the console must be raw: {text:?}");
        assert!(outcome.boot_ms > 0);
        assert_eq!(own_run_dirs(), 0, "the run directory must be removed");
    }

    #[test]
    #[ignore = "boots the KVM rig under QEMU; run `make rig` first, then with --ignored"]
    fn rig_times_out_and_stops_qemu() {
        let _one = RIG.lock().unwrap_or_else(|e| e.into_inner());
        let argv = ["sleep", "600"].map(OsString::from).to_vec();
        let mut cmd = RigCommand::new(argv, PathBuf::from("/"));
        cmd.timeout = Duration::from_secs(45);
        let err = run(&cmd, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, RigError::TimedOut { .. }), "{err}");
        assert!(err.to_string().contains("timed out after 45s"), "{err}");
        assert_eq!(own_run_dirs(), 0, "the run directory must be removed");
    }
}

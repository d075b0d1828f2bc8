//! What can go wrong running a command in the rig, each saying how to fix it.

use std::path::PathBuf;
use std::time::Duration;

use crate::image::digest::Digest;

#[derive(Debug, thiserror::Error)]
pub enum RigError {
    #[error("the KVM rig is not built ({path} is missing); run `make rig`")]
    NotBuilt { path: PathBuf },

    #[error("qemu-system-x86_64 is not on PATH, and the rig runs under it; run `make rig` (it installs qemu-system-x86)")]
    QemuMissing,

    #[error("cannot read the rig manifest {path}: {reason}; rebuild it with `make rig`")]
    BadManifest { path: PathBuf, reason: String },

    #[error("cannot read the rig {role} {path}: {source}; rebuild it with `make rig`")]
    ReadArtifact {
        role: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("refusing to start the rig: its {role} {path} has sha256 {actual}, but rig.json pins {expected}; rebuild it with `make rig`")]
    DigestMismatch {
        role: &'static str,
        path: PathBuf,
        expected: Digest,
        actual: Digest,
    },

    #[error("cannot run this in the rig: {0}")]
    BadCommand(String),

    #[error("cannot prepare the rig run directory {path}: {source}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot start qemu-system-x86_64: {0}")]
    Spawn(std::io::Error),

    #[error("cannot relay the rig console: {0}")]
    Relay(std::io::Error),

    #[error("the rig command timed out after {}s; qemu was stopped", .after.as_secs())]
    TimedOut { after: Duration },

    #[error("the rig failed before the command started (rig status {status}); its console above says why")]
    SetupFailed { status: i32 },

    #[error(
        "qemu ended ({qemu_status}) without the rig reporting an exit status; qemu said: {stderr}"
    )]
    NoExitStatus { qemu_status: String, stderr: String },
}

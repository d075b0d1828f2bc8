//! What a user on a host whose KVM cannot run Linux sees: a plain explanation, not an
//! obscure failure. Runs directly on kvm_pvm development hosts (skipped elsewhere).

use std::process::Command;

use cleave_agent::host::kvm::KvmFlavour;
use cleave_tests::cleave_bin;

#[test]
fn boot_on_kvm_pvm_explains_itself_and_points_at_the_rig() {
    if KvmFlavour::detect() != KvmFlavour::Pvm {
        eprintln!(
            "SKIP: this host's KVM is {}, not kvm_pvm",
            KvmFlavour::detect()
        );
        return;
    }
    let out = Command::new(cleave_bin())
        .args(["boot", "--selftest"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("kvm_pvm"), "{err}");
    assert!(err.contains("standard Linux guest kernel crashes"), "{err}");
    assert!(err.contains("cleave rig -- boot --selftest"), "{err}");
}

#[test]
fn bad_arguments_are_explained_without_a_panic() {
    let cases: &[(&[&str], &str)] = &[
        (&["boot", "--kernel", "/k"], "--kernel-sha256"),
        (&["boot", "--kernel-sha256", "00"], "64 hex characters"),
        (&["rig"], "ARGS"),
        // Refused before any image is resolved or guest booted.
        (
            &[
                "template",
                "create",
                "--name",
                "x",
                "--test-kernel-arg",
                "a b",
            ],
            "must be one word",
        ),
        // A misspelt flag is not taken for the warm-up command (that comes after `--`).
        (
            &["template", "create", "--name", "x", "--bogus"],
            "unexpected argument '--bogus'",
        ),
    ];
    for (args, expect) in cases {
        let out = Command::new(cleave_bin()).args(*args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

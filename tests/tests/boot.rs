//! Real Linux guests under a real KVM (the rig on kvm_pvm hosts): the default image boots
//! with 1 and 2 vCPUs to the agent's readiness line and ends cleanly; wrong pins and bad
//! input are refused before any VM exists. All scenarios share one rig boot.

use std::time::Duration;

use cleave_agent::host::paths;
use cleave_agent::image::Manifest;
use cleave_tests::{cleave_bin, run_batch, sh_quote, Failures, Scenario};

const ZEROS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[test]
fn default_image_boots_and_bad_images_are_refused() {
    let manifest = Manifest::load(&paths::default_image_manifest())
        .expect("the default image is built (`make image`)");
    let cleave = sh_quote(&cleave_bin().to_string_lossy());
    let k = sh_quote(&manifest.kernel.path.to_string_lossy());
    let i = sh_quote(&manifest.initrd.path.to_string_lossy());
    let (ks, is) = (
        manifest.kernel.sha256.to_string(),
        manifest.initrd.sha256.to_string(),
    );
    let pinned = |kpath: &str, kpin: &str, ipath: &str, ipin: &str| {
        format!("--kernel {kpath} --kernel-sha256 {kpin} --initrd {ipath} --initrd-sha256 {ipin}")
    };

    let scenarios = vec![
        Scenario::new("selftest-1vcpu", format!("{cleave} boot --selftest --vcpus 1 --mem 128")),
        Scenario::new("selftest-2vcpu", format!("{cleave} boot --selftest --vcpus 2 --mem 256")),
        // Streams the console; the guest ends right after its readiness line, which must
        // still arrive whole (the agent drains the tty before it ends the machine).
        Scenario::new(
            "streamed-console-2vcpu",
            format!("{cleave} boot --vcpus 2 --cmdline cleave.selftest=1"),
        ),
        Scenario::new(
            "selftest-pinned-by-flags",
            format!("RUST_LOG=info {cleave} boot --selftest {}", pinned(&k, &ks, &i, &is)),
        ),
        Scenario::new(
            "kernel-digest-mismatch",
            format!("RUST_LOG=info {cleave} boot --selftest {}", pinned(&k, ZEROS, &i, &is)),
        ),
        Scenario::new(
            "initrd-digest-mismatch",
            format!("RUST_LOG=info {cleave} boot --selftest {}", pinned(&k, &ks, &i, ZEROS)),
        ),
        // A cached file changed after its manifest was written: refused on this start.
        Scenario::new(
            "tampered-cached-kernel",
            format!(
                "set -e; c=/tmp/tampered-cache; mkdir -p $c/images; cp {k} $c/vmlinux; \
                 printf x >> $c/vmlinux; \
                 printf '{{\"kernel\":{{\"path\":\"%s\",\"sha256\":\"%s\"}},\"initrd\":{{\"path\":\"%s\",\"sha256\":\"%s\"}}}}' \
                   $c/vmlinux {ks} {i} {is} > $c/images/default.json; \
                 set +e; RUST_LOG=info CLEAVE_CACHE=$c {cleave} boot --selftest"
            ),
        ),
        // The cached kernel and its manifest line rewritten together: the pins this cleave
        // was built with still refuse it.
        Scenario::new(
            "rewritten-cache",
            format!(
                "set -e; c=/tmp/rewritten-cache; mkdir -p $c/images; cp {k} $c/vmlinux; \
                 printf x >> $c/vmlinux; ks2=$(sha256sum $c/vmlinux | cut -d' ' -f1); \
                 printf '{{\"kernel\":{{\"path\":\"%s\",\"sha256\":\"%s\"}},\"initrd\":{{\"path\":\"%s\",\"sha256\":\"%s\"}}}}' \
                   $c/vmlinux $ks2 {i} {is} > $c/images/default.json; \
                 set +e; RUST_LOG=info CLEAVE_CACHE=$c {cleave} boot --selftest; echo rc=$?; rm -rf $c"
            ),
        ),
        // `cleave run` boots through the same checks; a command must never run in a guest
        // booted from a file that fails its pin. (Reuses the tampered cache made above.)
        Scenario::new(
            "run-tampered-cached-kernel",
            format!("RUST_LOG=info CLEAVE_CACHE=/tmp/tampered-cache {cleave} run -- echo ran-in-guest"),
        ),
        Scenario::new(
            "missing-kernel",
            format!("{cleave} boot {}", pinned("/nonexistent/vmlinux", &ks, &i, &is)),
        ),
        Scenario::new("directory-kernel", format!("{cleave} boot {}", pinned("/", &ks, &i, &is))),
        Scenario::new(
            "truncated-kernel",
            format!(
                "head -c 200000 {k} > /tmp/truncated; s=$(sha256sum /tmp/truncated | cut -c1-64); \
                 RUST_LOG=info {cleave} boot --kernel /tmp/truncated --kernel-sha256 $s --initrd {i} --initrd-sha256 {is}"
            ),
        ),
        Scenario::new("absurd-memory", format!("{cleave} boot --mem 0")),
        Scenario::new("absurd-vcpus", format!("{cleave} boot --vcpus 1000")),
        Scenario::new("malformed-pin", format!("{cleave} boot {}", pinned(&k, "abc", &i, &is))),
    ];
    let (place, results) = run_batch(&scenarios, Duration::from_secs(600));
    eprintln!("ran {} scenarios on the {place:?}", results.len());

    let mut f = Failures::default();
    let by = |n: &str| results.iter().find(|r| r.name == n).unwrap();

    for (name, cpus) in [
        ("selftest-1vcpu", 1),
        ("selftest-2vcpu", 2),
        ("selftest-pinned-by-flags", 1),
    ] {
        let r = by(name);
        f.check(r, r.exit_code == 0, "selftest exits 0");
        f.check(
            r,
            r.output.contains("selftest: guest agent ready in"),
            "prints the time to readiness",
        );
        f.check(
            r,
            r.output.contains(&format!("cpus={cpus} ")),
            "the guest sees its vCPUs",
        );
        f.check(
            r,
            r.output.contains("selftest: guest exited with status 0"),
            "the guest ends cleanly with status 0",
        );
    }
    // What the refused boots below must not log, a good one does: the check can bite.
    let r = by("selftest-pinned-by-flags");
    f.check(
        r,
        r.output.contains("VM built") && r.output.contains("starting guest"),
        "logs building the VM, then loading and starting the guest",
    );
    let r = by("streamed-console-2vcpu");
    f.check(
        r,
        r.exit_code == 0,
        "the guest's exit status is the command's",
    );
    f.check(
        r,
        r.output.contains(" cpus=2 mem_mib="),
        "the readiness line arrives whole",
    );
    f.check(
        r,
        r.output.contains("cleave: guest exited with status 0"),
        "the end is reported",
    );

    let r = by("selftest-1vcpu");
    let mem = r
        .output
        .split("mem_mib=")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    f.check(
        r,
        (96..=128).contains(&mem),
        "a 128 MiB guest sees about 128 MiB",
    );

    for (name, role, expected) in [
        ("kernel-digest-mismatch", "kernel", ZEROS),
        ("initrd-digest-mismatch", "initramfs", ZEROS),
        ("tampered-cached-kernel", "kernel", ks.as_str()),
        ("run-tampered-cached-kernel", "kernel", ks.as_str()),
    ] {
        let r = by(name);
        f.check(r, r.exit_code != 0, "refused");
        f.check(r, r.output.contains("refusing to boot"), "says it refuses");
        f.check(
            r,
            r.output.contains(&format!("{role} /")),
            "names the file's role and path",
        );
        f.check(r, r.output.contains(expected), "names the pinned digest");
        f.check(
            r,
            r.output.matches(" has sha256 ").count() == 1,
            "names the actual digest",
        );
        // The VM may be built while the pins are checked (`node::boot::verify_while`),
        // but nothing is loaded into it or run.
        f.check(
            r,
            !r.output.contains("starting guest"),
            "no kernel was loaded",
        );
    }
    let r = by("rewritten-cache");
    f.check(
        r,
        r.output.contains("rc=1")
            && r.output.contains("this cleave was built with")
            && r.output.contains(ks.as_str())
            && !r.output.contains("creating VM"),
        "a cache whose kernel and manifest were rewritten together is refused by the built-in pins",
    );

    let r = by("run-tampered-cached-kernel");
    f.check(
        r,
        !r.output.contains("ran-in-guest"),
        "the command never ran",
    );

    let r = by("missing-kernel");
    f.check(
        r,
        r.exit_code != 0 && r.output.contains("does not exist"),
        "missing file is named",
    );
    let r = by("directory-kernel");
    f.check(
        r,
        r.exit_code != 0 && r.output.contains("is a directory"),
        "directory is refused",
    );
    let r = by("truncated-kernel");
    f.check(
        r,
        r.exit_code != 0 && r.output.contains("not a loadable ELF vmlinux"),
        "truncated kernel is refused",
    );
    f.check(r, !r.output.contains("starting guest"), "no guest started");
    let r = by("absurd-memory");
    f.check(
        r,
        r.exit_code != 0 && r.output.contains("out of range"),
        "memory range is explained",
    );
    let r = by("absurd-vcpus");
    f.check(
        r,
        r.exit_code != 0 && r.output.contains("1..=32"),
        "vCPU range is explained",
    );
    let r = by("malformed-pin");
    f.check(
        r,
        r.exit_code != 0 && r.output.contains("64 hex characters"),
        "malformed pin is explained",
    );
    for r in &results {
        f.check(r, !r.output.contains("panicked"), "no panic");
    }
    f.assert_none();
}

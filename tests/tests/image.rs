//! Images from a user's own root filesystem, end to end under a real KVM (the rig on
//! kvm_pvm hosts): a Python root filesystem made from Debian's own packages
//! (`tests/lab/python-rootfs.sh`, cached by their hashes) is built into images from a
//! directory, a gzip tarball, an OCI layout made by umoci and the same layout as an
//! `oci-archive`; each becomes a template whose 4 forks print 4 distinct `os.urandom`
//! values; the OCI config's Env, WorkingDir and User are honoured and can be overridden;
//! the OCI whiteout is applied; a fork's writes reach neither its siblings nor a later
//! fork; fresh boots run too; a hostile archive, a tampered image and a template reused
//! for another image are refused. One rig boot for all.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cleave_tests::{cleave_bin, json_lines, run_batch, sh_quote, Failures, Outcome, Scenario};

/// Templates and images go under the test's own directory (the rig's /tmp, or the host's).
const RUNTIME: &str = "/tmp/cleave-image-test";
const URANDOM: &str = "import os, hashlib, json; print(os.urandom(16).hex())";
const WHO: &str = "import os; print(os.getcwd(), os.getuid(), os.getgid(), \
                   os.environ.get('GREETING'), os.path.exists('/usr/share/doc'))";

/// The Python root filesystem in its four forms, built on the host (it needs Debian's
/// archive, which the rig cannot reach) and seen in the rig through its read-only share.
fn python_rootfs() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("lab/python-rootfs.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .expect("running tests/lab/python-rootfs.sh");
    assert!(
        out.status.success(),
        "python-rootfs.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The 32-hex-digit lines of a fork's stdout.
fn hex16(o: &serde_json::Value) -> Vec<String> {
    o["stdout"]
        .as_str()
        .unwrap_or("")
        .lines()
        .map(str::trim)
        .filter(|l| l.len() == 32 && l.chars().all(|c| c.is_ascii_hexdigit()))
        .map(str::to_owned)
        .collect()
}

fn stdouts(r: &Outcome) -> Vec<String> {
    json_lines(r)
        .iter()
        .map(|o| o["stdout"].as_str().unwrap_or("").trim().to_owned())
        .collect()
}

#[test]
fn images_end_to_end() {
    let py = python_rootfs();
    let p = |f: &str| sh_quote(&py.join(f).to_string_lossy());
    let env = format!(
        "export XDG_RUNTIME_DIR={RUNTIME} CLEAVE_IMAGES={RUNTIME}/images; mkdir -p {RUNTIME};"
    );
    let cleave = format!(
        "{env} timeout 600 {}",
        sh_quote(&cleave_bin().to_string_lossy())
    );
    let urandom = sh_quote(URANDOM);
    let who = sh_quote(WHO);
    let oci = sh_quote(&format!("{}:py", py.join("oci").display()));
    let archive = sh_quote(&format!("{}:py", py.join("oci.tar").display()));
    let mut scenarios = vec![
        Scenario::new(
            "build-oci",
            format!("{cleave} image build --name py --from-oci {oci} --json"),
        ),
        Scenario::new(
            "build-tar",
            format!(
                "{cleave} image build --name pytar --from-tar {} --json",
                p("rootfs.tar.gz")
            ),
        ),
        Scenario::new(
            "build-dir",
            format!(
                "{cleave} image build --name pydir --from-dir {} --json",
                p("rootfs")
            ),
        ),
        Scenario::new(
            "build-archive",
            format!("{cleave} image build --name pyarch --from-oci {archive} --json"),
        ),
        Scenario::new(
            "build-again",
            format!("{cleave} image build --name py --from-oci {oci}"),
        ),
        Scenario::new("ls", format!("{cleave} image ls")),
    ];
    for img in ["py", "pytar", "pydir"] {
        scenarios.push(Scenario::new(
            &format!("forks-{img}"),
            format!(
                "{cleave} template create --name t-{img} --image {img} && \
                 {cleave} run --forks 4 --template t-{img} --json -- python3 -c {urandom}"
            ),
        ));
    }
    scenarios.extend([
        Scenario::new(
            "defaults",
            format!(
                "{cleave} run --forks 1 --template t-py --json -- python3 -c {who} && \
                 {cleave} run --forks 1 --template t-py --json --user 0:0 --cwd /tmp \
                 --env GREETING=over -- python3 -c {who} && \
                 {cleave} run --forks 1 --template t-pydir --json -- python3 -c {who}"
            ),
        ),
        // Each fork writes into the image's own tree; neither a sibling nor a later fork
        // sees it.
        Scenario::new(
            "private-writes",
            format!(
                "{cleave} run --forks 2 --template t-py --json --user 0:0 -- python3 -c \
                 'import os; print(os.path.exists(\"/srv/mark\")); open(\"/srv/mark\", \"w\").write(\"x\")' && \
                 {cleave} run --forks 1 --template t-py --json -- python3 -c \
                 'import os; print(os.path.exists(\"/srv/mark\"), open(\"/srv/hello.txt\").read().strip())'"
            ),
        ),
        Scenario::new(
            "fresh-boot",
            format!(
                "{cleave} run --image pyarch --json -- python3 -c {urandom}; \
                 {cleave} run --image pytar --user 1000:1000 -- python3 -c 'import os; print(os.getuid())'"
            ),
        ),
        Scenario::new(
            "wrong-image",
            format!("{cleave} run --forks 1 --template t-py --image pytar -- python3 -c 1"),
        ),
        Scenario::new(
            "hostile-tar",
            format!(
                "cd {RUNTIME} && tar -P -cf evil.tar /etc/hostname && \
                 {cleave} image build --name evil --from-tar {RUNTIME}/evil.tar; \
                 echo rc=$?; ls {RUNTIME}/images"
            ),
        ),
        Scenario::new(
            "tampered",
            format!(
                "printf x >> {RUNTIME}/images/pyarch/initramfs.cpio && \
                 {cleave} template create --name t-tampered --image pyarch; echo rc=$?"
            ),
        ),
        Scenario::new(
            "cleanup",
            format!(
                "for t in t-py t-pytar t-pydir; do {cleave} template rm $t; done; \
                 for i in py pytar pydir pyarch; do {cleave} image rm $i; done; \
                 {cleave} image ls; ls -A {RUNTIME}/images; \
                 ps -eo comm | grep -cE '^cleave-(fork-wor|zygote|template)'; rm -rf {RUNTIME}"
            ),
        ),
    ]);
    // A healthy batch takes ~270 s; a wedged rig (the emulated-SVM freeze, seen once in
    // a CI run of this suite: QEMU idle, no scenario progressing) is cut short and the
    // batch retried once instead of holding CI for 25 minutes.
    let (place, results) = run_batch(&scenarios, Duration::from_secs(720));
    eprintln!("ran {} scenarios on the {place:?}", results.len());
    let mut f = Failures::default();
    let by = |n: &str| results.iter().find(|r| r.name == n).unwrap();

    let mut initrd = std::collections::HashMap::new();
    for (name, sc) in [
        ("py", "build-oci"),
        ("pytar", "build-tar"),
        ("pydir", "build-dir"),
        ("pyarch", "build-archive"),
    ] {
        let r = by(sc);
        let rec = json_lines(r).pop().unwrap_or_default();
        f.check(
            r,
            r.exit_code == 0 && rec["name"] == name,
            "builds and prints its record",
        );
        initrd.insert(
            name,
            rec["initrd"]["sha256"].as_str().unwrap_or("").to_owned(),
        );
    }
    let r = by("build-oci");
    let rec = json_lines(r).pop().unwrap_or_default();
    f.check(
        r,
        rec["defaults"]["cwd"] == "/srv"
            && rec["defaults"]["user"]["uid"] == 1000
            && rec["defaults"]["env"]
                .as_array()
                .is_some_and(|e| e.iter().any(|kv| kv[0] == "GREETING")),
        "the OCI config's WorkingDir, User (a name, resolved) and Env are kept",
    );
    f.check(
        by("build-dir"),
        initrd["pydir"] == initrd["pytar"] && !initrd["pydir"].is_empty(),
        "the directory and the tarball of the same tree make the same image",
    );
    f.check(
        by("build-archive"),
        initrd["py"] == initrd["pyarch"],
        "the OCI layout and its oci-archive make the same image",
    );
    let r = by("build-again");
    f.check(
        r,
        r.exit_code != 0 && r.output.contains("exists already"),
        "an existing name is refused, not replaced",
    );
    let r = by("ls");
    f.check(
        r,
        ["default", "py ", "pytar", "pydir", "pyarch"]
            .iter()
            .all(|n| r.output.contains(n)),
        "ls lists every image",
    );

    let mut all = Vec::new();
    for img in ["py", "pytar", "pydir"] {
        let r = by(&format!("forks-{img}"));
        let forks = json_lines(r);
        let values: Vec<String> = forks.iter().flat_map(hex16).collect();
        f.check(
            r,
            r.exit_code == 0
                && forks.len() == 4
                && forks
                    .iter()
                    .all(|o| o["reseeded"] == true && o["exit_code"] == 0),
            "4 forks, each reseeded, python3 exits 0",
        );
        let distinct: HashSet<&String> = values.iter().collect();
        f.check(
            r,
            values.len() == 4 && distinct.len() == 4,
            "4 distinct os.urandom values",
        );
        all.extend(values);
    }
    let distinct: HashSet<&String> = all.iter().collect();
    f.check(
        by("forks-pydir"),
        distinct.len() == all.len(),
        "no value repeats across images",
    );

    let r = by("defaults");
    let outs = stdouts(r);
    f.check(
        r,
        outs == [
            "/srv 1000 1000 hello-from-oci False",
            "/tmp 0 0 over False",
            "/ 0 0 None True",
        ],
        "the OCI defaults hold (whiteout of /usr/share/doc applied), flags override them, \
         a directory image has none",
    );

    let r = by("private-writes");
    let outs = stdouts(r);
    f.check(
        r,
        outs == ["False", "False", "False hello from the image"],
        "writes stay in their own fork",
    );

    let r = by("fresh-boot");
    let fresh = json_lines(r);
    f.check(
        r,
        fresh.len() == 1 && hex16(&fresh[0]).len() == 1 && r.output.contains("\n1000"),
        "images boot fresh too, with the user asked for",
    );

    let r = by("wrong-image");
    f.check(
        r,
        r.exit_code != 0 && r.output.contains("not image pytar"),
        "a template is not used for another image",
    );
    let r = by("hostile-tar");
    f.check(
        r,
        r.output.contains("rc=1")
            && r.output.contains("/etc/hostname")
            && !r.output.contains("evil\n"),
        "an absolute path is refused, naming the entry, and leaves no image",
    );
    let r = by("tampered");
    f.check(
        r,
        r.output.contains("rc=1")
            && r.output.contains("refusing to boot")
            && r.output.contains(&initrd["pyarch"]),
        "a changed initramfs is refused, naming its pin",
    );
    let r = by("cleanup");
    let last: Vec<&str> = r.output.lines().rev().take(1).collect();
    f.check(
        r,
        r.exit_code == 0 && last == ["0"],
        "everything removed, no worker left",
    );
    f.assert_none();
}

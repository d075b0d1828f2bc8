//! Compiles the node API's contract (`proto/cleave/v1/cleave.proto`) into Rust with
//! Debian's `protoc` (installed by scripts/install-deps.sh), and embeds the default image's
//! pins: the sha256 of the kernel and initramfs `make image` built, read from its manifest
//! now, so that whoever can rewrite the cache (files and manifest together) cannot make
//! this binary boot something else.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/cleave/v1/cleave.proto"], &["proto"])?;
    embed_default_image_pins();
    // The fork worker is linked at a fixed address (its code is still position-independent,
    // as rustc made it): a position-independent executable has ~250 KiB of pointers that
    // the dynamic loader rewrites in every process, private to each of 10,000 workers;
    // fixed, those pages are the file's and shared by them all. ASLR does not move it then;
    // its stack, heap and libraries still move, and it runs jailed under seccomp.
    println!("cargo:rustc-link-arg-bin=cleave-fork-worker=-no-pie");
    Ok(())
}

/// `$CLEAVE_CACHE/images/default.json` (else under `$HOME/.cache/cleave`), as at run time.
fn manifest_path() -> PathBuf {
    println!("cargo:rerun-if-env-changed=CLEAVE_CACHE");
    println!("cargo:rerun-if-env-changed=HOME");
    let cache = match std::env::var_os("CLEAVE_CACHE").filter(|c| !c.is_empty()) {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/cleave"),
    };
    cache.join("images/default.json")
}

fn embed_default_image_pins() {
    let path = manifest_path();
    println!("cargo:rerun-if-changed={}", path.display());
    let pins = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|m| {
            let pin = |role: &str| {
                let s = m[role]["sha256"].as_str()?.to_string();
                (s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())).then_some(s)
            };
            Some((pin("kernel")?, pin("initrd")?))
        });
    let (kernel, initrd) = match pins {
        Some(p) => p,
        None => {
            println!(
                "cargo:warning=no default image manifest at {}: this cleave embeds no pins \
                 for the default image and will refuse to boot it (run `make image`, then \
                 build again)",
                path.display()
            );
            (String::new(), String::new())
        }
    };
    println!("cargo:rustc-env=CLEAVE_DEFAULT_KERNEL_SHA256={kernel}");
    println!("cargo:rustc-env=CLEAVE_DEFAULT_INITRD_SHA256={initrd}");
}

//! Compiles the node API's contract (`proto/cleave/v1/cleave.proto`) into Rust with
//! Debian's `protoc` (installed by scripts/install-deps.sh).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/cleave/v1/cleave.proto"], &["proto"])?;
    Ok(())
}

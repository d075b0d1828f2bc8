//! A user's root filesystem tarball (plain, gzip or zstd) as `cleave image build --from-tar`
//! reads it: every entry checked into the tree, written out as a newc archive; and the
//! newc reader that takes the guest agent out of an initramfs. Small limits keep each run
//! fast; what is being fuzzed is the parsing and checking, not the sizes.
#![no_main]

use std::io::Write;

use cleave_agent::image::rootfs::{build, find_file, Limits, Source};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = find_file(data, "init");
    let dir = std::env::temp_dir();
    let mut input = tempfile::NamedTempFile::new_in(&dir).expect("a temporary file");
    input.write_all(data).expect("writing the input");
    let limits = Limits {
        max_entries: 1_000,
        max_file_bytes: 1 << 20,
        max_total_bytes: 4 << 20,
        max_name_bytes: 1 << 20,
    };
    let mut out = Vec::new();
    let _ = build(
        &Source::Tar(input.path().to_owned()),
        b"agent",
        &dir,
        &limits,
        &mut out,
    );
});

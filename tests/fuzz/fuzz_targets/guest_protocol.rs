//! The host–guest protocol decoder, which both sides run on what the other sends (the
//! guest agent on the host's requests, the host client on a hostile guest's replies):
//! bytes in any split, frames out, nothing held beyond its bound, and every decoded
//! message re-encodes and decodes to itself.
#![no_main]

use cleave_guest::protocol::{encode, FrameDecoder, HEADER_LEN, MAX_PAYLOAD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let mut decoder = FrameDecoder::new();
    // The same bytes arrive in chunks of a size the input picks.
    for chunk in bytes.chunks(usize::from(split).max(1)) {
        let mut input = chunk;
        while let Some(result) = decoder.decode(&mut input) {
            assert!(decoder.buffered() <= HEADER_LEN + MAX_PAYLOAD as usize);
            let Ok(msg) = result else { continue };
            let mut wire = Vec::new();
            if encode(&msg, &mut wire).is_ok() {
                let mut again = FrameDecoder::new();
                let mut w = wire.as_slice();
                let back = again
                    .decode(&mut w)
                    .expect("a whole frame")
                    .expect("decodes");
                assert_eq!(back, msg);
            }
        }
    }
});

//! Property tests of the frame codec: hostile bytes never panic the
//! decoder or make it buffer beyond its bound, and every message survives
//! encode → decode however the bytes are split.

use std::ffi::OsString;
use std::path::PathBuf;

use cleave_guest::protocol::*;
use proptest::prelude::*;

const SMALL_MAX: u32 = 4096;

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

/// Strings bound for the kernel: no NUL.
fn os(max: usize) -> impl Strategy<Value = OsString> {
    use std::os::unix::ffi::OsStringExt;
    prop::collection::vec(1u8..=255, 1..max).prop_map(OsString::from_vec)
}

fn env_name() -> impl Strategy<Value = OsString> {
    "[A-Z_][A-Z0-9_]{0,8}".prop_map(OsString::from)
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        (any::<u16>(), any::<u16>()).prop_map(|(a, b)| Body::Hello(Hello {
            min_version: a,
            max_version: b
        })),
        (
            prop::collection::vec(os(16), 1..6),
            prop::collection::vec((env_name(), os(16)), 0..4),
            prop::option::of(os(16).prop_map(PathBuf::from)),
            any::<bool>(),
            prop::option::of(any::<u64>()),
            prop::option::of(
                (any::<u32>(), any::<u32>()).prop_map(|(uid, gid)| ExecUser { uid, gid })
            ),
        )
            .prop_map(|(argv, env, cwd, stdin, timeout_ms, user)| Body::Exec(
                ExecRequest {
                    argv,
                    env,
                    cwd,
                    stdin,
                    timeout_ms,
                    user
                }
            )),
        (any::<u64>(), 1i32..=64)
            .prop_map(|(target, signal)| Body::Signal(SignalRequest { target, signal })),
        (os(32), 0u32..=0o7777, any::<u64>()).prop_map(|(p, mode, size)| Body::WriteFile(
            WriteFileRequest {
                path: PathBuf::from(p),
                mode,
                size
            }
        )),
        (os(32), any::<u64>()).prop_map(|(p, limit)| Body::ReadFile(ReadFileRequest {
            path: PathBuf::from(p),
            limit
        })),
        Just(Body::Shutdown),
        Just(Body::Quiesce),
        (
            prop::collection::vec(any::<u8>(), 32..100),
            any::<[u8; 16]>(),
            any::<i64>(),
            0u32..1_000_000_000
        )
            .prop_map(|(entropy, nonce, secs, nanos)| Body::Reseed(ReseedRequest {
                entropy,
                nonce,
                time: WallTime { secs, nanos }
            })),
        bytes(300).prop_map(Body::Stdin),
        Just(Body::Eof),
        bytes(300).prop_map(Body::FileData),
        any::<u32>().prop_map(Body::Credit),
        (any::<u16>(), any::<u64>(), ".{0,20}").prop_map(|(v, up, agent)| Body::HelloReply(
            HelloReply {
                version: v,
                min_version: v,
                max_version: v,
                uptime_ms: up,
                agent
            }
        )),
        bytes(300).prop_map(Body::Stdout),
        bytes(300).prop_map(Body::Stderr),
        (any::<bool>(), any::<i32>(), any::<bool>()).prop_map(|(sig, n, timed_out)| {
            Body::Exited(ExitReport {
                status: if sig {
                    ExitStatus::Signal(n.rem_euclid(MAX_SIGNAL) + 1)
                } else {
                    ExitStatus::Code(n)
                },
                timed_out,
            })
        }),
        Just(Body::Ok),
        any::<u64>().prop_map(|bytes| Body::WriteDone { bytes }),
        (any::<u64>(), any::<u32>())
            .prop_map(|(size, mode)| Body::ReadStart(FileInfo { size, mode })),
        any::<u64>().prop_map(|bytes| Body::ReadDone { bytes }),
        (any::<bool>(), any::<[u8; 16]>(), any::<bool>(), ".{0,20}").prop_map(
            |(reseeded, nonce, clock_set, detail)| Body::Reseeded(ReseedReply {
                reseeded,
                nonce,
                clock_set,
                detail
            })
        ),
        (1u16..=10, ".{0,40}").prop_map(|(code, message)| {
            // Codes 1..=10 are the named ones; check they map back.
            let codes = [
                ErrorCode::UnknownOp,
                ErrorCode::TooLarge,
                ErrorCode::BadArguments,
                ErrorCode::NotReady,
                ErrorCode::NotFound,
                ErrorCode::Io,
                ErrorCode::UnsupportedVersion,
                ErrorCode::Busy,
                ErrorCode::FlowControl,
                ErrorCode::Unsupported,
            ];
            Body::Error(ErrorReply::new(codes[code as usize - 1], message))
        }),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    (any::<u64>(), body()).prop_map(|(id, body)| Message::new(id, body))
}

/// Feeds `data` in pieces of the given sizes and collects every result.
fn decode_split(
    dec: &mut FrameDecoder,
    data: &[u8],
    cuts: &[usize],
    max: u32,
) -> Vec<Result<Message, String>> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = cuts
            .get(i)
            .copied()
            .unwrap_or(rest.len())
            .clamp(1, rest.len());
        i += 1;
        let mut input = &rest[..n];
        rest = &rest[n..];
        while let Some(r) = dec.decode(&mut input) {
            out.push(r.map_err(|e| e.to_string()));
            assert!(dec.buffered() <= HEADER_LEN + max as usize);
        }
        assert!(
            input.is_empty(),
            "decode returns None only once input is used up"
        );
        assert!(dec.buffered() <= HEADER_LEN + max as usize);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic_or_overallocate(
        data in bytes(20_000),
        cuts in prop::collection::vec(1usize..3000, 0..20),
    ) {
        let mut dec = FrameDecoder::with_max_payload(SMALL_MAX);
        decode_split(&mut dec, &data, &cuts, SMALL_MAX);
    }

    #[test]
    fn random_frames_with_valid_headers_never_panic(
        frames in prop::collection::vec((any::<u8>(), any::<u64>(), bytes(200)), 1..20),
    ) {
        // Valid version and length, random kind and payload: exercises the
        // payload decoders rather than the header checks.
        let mut data = Vec::new();
        for (kind, id, payload) in &frames {
            data.push(PROTOCOL_VERSION);
            data.push(*kind);
            data.extend_from_slice(&[0, 0]);
            data.extend_from_slice(&id.to_le_bytes());
            data.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            data.extend_from_slice(payload);
        }
        let mut dec = FrameDecoder::with_max_payload(SMALL_MAX);
        let out = decode_split(&mut dec, &data, &[], SMALL_MAX);
        // Every frame yields exactly one result: the stream stays in sync.
        prop_assert_eq!(out.len(), frames.len());
        prop_assert!(dec.is_idle());
    }

    #[test]
    fn encode_decode_round_trips_however_split(
        msgs in prop::collection::vec(message(), 1..10),
        cuts in prop::collection::vec(1usize..64, 0..40),
    ) {
        let mut data = Vec::new();
        for m in &msgs {
            encode(m, &mut data).unwrap();
        }
        let mut dec = FrameDecoder::new();
        let out = decode_split(&mut dec, &data, &cuts, MAX_PAYLOAD);
        let decoded: Vec<Message> = out.into_iter().map(|r| r.unwrap()).collect();
        prop_assert_eq!(decoded, msgs);
    }

    #[test]
    fn blocking_reader_agrees_with_the_incremental_decoder(
        msgs in prop::collection::vec(message(), 0..10),
    ) {
        let mut data = Vec::new();
        for m in &msgs {
            write_message(&mut data, m).unwrap();
        }
        let mut r = FrameReader::new(&data[..]);
        let mut got = Vec::new();
        while let Some(m) = r.read_message().unwrap() {
            got.push(m);
        }
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn an_oversized_frame_is_skipped_and_the_next_one_decodes(
        len in (SMALL_MAX + 1)..(SMALL_MAX * 4),
        id in any::<u64>(),
        cuts in prop::collection::vec(1usize..5000, 0..10),
    ) {
        let mut data = vec![PROTOCOL_VERSION, 0x10, 0, 0];
        data.extend_from_slice(&id.to_le_bytes());
        data.extend_from_slice(&len.to_le_bytes());
        data.extend(std::iter::repeat_n(0xAB, len as usize));
        let next = Message::new(id.wrapping_add(1), Body::Ok);
        encode(&next, &mut data).unwrap();
        let mut dec = FrameDecoder::with_max_payload(SMALL_MAX);
        let out = decode_split(&mut dec, &data, &cuts, SMALL_MAX);
        prop_assert_eq!(out.len(), 2);
        prop_assert!(out[0].as_ref().unwrap_err().contains("exceeds the limit"));
        prop_assert_eq!(out[1].as_ref().unwrap(), &next);
    }
}

#[test]
fn a_huge_announced_length_is_refused_before_allocating() {
    let mut data = vec![PROTOCOL_VERSION, 0x02, 0, 0];
    data.extend_from_slice(&7u64.to_le_bytes());
    data.extend_from_slice(&u32::MAX.to_le_bytes());
    let mut dec = FrameDecoder::new();
    let mut input = &data[..];
    match dec.decode(&mut input) {
        Some(Err(DecodeError::TooLarge { id: 7, len, .. })) => assert_eq!(len, u32::MAX),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(dec.buffered(), 0, "nothing buffered for a skipped payload");
}

#[test]
fn malformed_payloads_name_the_request_and_the_field() {
    let cases: Vec<(Body, &str)> = vec![
        (
            Body::Exec(ExecRequest {
                argv: vec![],
                env: vec![],
                cwd: None,
                stdin: false,
                timeout_ms: None,
                user: None,
            }),
            "argv (empty)",
        ),
        (
            Body::Signal(SignalRequest {
                target: 1,
                signal: 0,
            }),
            "signal",
        ),
        // A guest-controlled signal number must not reach `128 + n` on the host.
        (
            Body::Exited(ExitReport {
                status: ExitStatus::Signal(i32::MAX),
                timed_out: false,
            }),
            "signal",
        ),
        (
            Body::Exited(ExitReport {
                status: ExitStatus::Signal(0),
                timed_out: false,
            }),
            "signal",
        ),
        (
            Body::WriteFile(WriteFileRequest {
                path: PathBuf::from("/x"),
                mode: 0o170000,
                size: 0,
            }),
            "mode",
        ),
        (
            Body::Reseed(ReseedRequest {
                entropy: vec![0; 8],
                nonce: [0; 16],
                time: WallTime { secs: 0, nanos: 0 },
            }),
            "entropy",
        ),
    ];
    for (body, field) in cases {
        let mut data = Vec::new();
        encode(&Message::new(42, body), &mut data).unwrap();
        let mut dec = FrameDecoder::new();
        let mut input = &data[..];
        let err = dec.decode(&mut input).unwrap().unwrap_err();
        assert_eq!(err.request_id(), Some(42));
        assert!(err.to_string().contains(field), "{err} should name {field}");
        assert!(dec.is_idle());
    }
}

#[test]
fn nul_bytes_in_argv_are_refused() {
    let mut data = Vec::new();
    let body = Body::Exec(ExecRequest::new(["sh", "-c\0x"]));
    encode(&Message::new(1, body), &mut data).unwrap();
    let err = FrameDecoder::new()
        .decode(&mut &data[..])
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("NUL"), "{err}");
}

#[test]
fn a_message_above_the_frame_limit_is_not_encoded() {
    let mut out = vec![1, 2, 3];
    let big = Message::new(1, Body::Stdout(vec![0; MAX_PAYLOAD as usize + 1]));
    assert!(matches!(
        encode(&big, &mut out),
        Err(EncodeError::TooLarge { .. })
    ));
    assert_eq!(out, [1, 2, 3], "nothing appended on failure");
}

#[test]
fn unknown_kinds_and_versions_are_skipped_with_their_ids() {
    let mut data = vec![PROTOCOL_VERSION, 0x55, 0, 0];
    data.extend_from_slice(&5u64.to_le_bytes());
    data.extend_from_slice(&3u32.to_le_bytes());
    data.extend_from_slice(b"abc");
    data.extend_from_slice(&[9, 0x01, 0, 0]);
    data.extend_from_slice(&6u64.to_le_bytes());
    data.extend_from_slice(&0u32.to_le_bytes());
    let mut dec = FrameDecoder::new();
    let mut input = &data[..];
    let a = dec.decode(&mut input).unwrap().unwrap_err();
    let b = dec.decode(&mut input).unwrap().unwrap_err();
    assert!(matches!(a, DecodeError::UnknownKind { id: 5, kind: 0x55 }));
    assert!(matches!(
        b,
        DecodeError::UnsupportedVersion { id: 6, version: 9 }
    ));
    assert!(dec.decode(&mut input).is_none());
    assert!(dec.is_idle());
}

#[test]
fn a_stream_cut_inside_a_frame_is_an_error_not_a_clean_end() {
    let mut data = Vec::new();
    encode(&Message::new(1, Body::Stdout(vec![1; 100])), &mut data).unwrap();
    data.truncate(50);
    let mut r = FrameReader::new(&data[..]);
    assert!(matches!(r.read_message(), Err(DecodeError::Io(_))));
}

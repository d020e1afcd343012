//! Property tests of the wire format: whatever bytes arrive (a shim the
//! agent tampered with, a truncated socket, a corrupt payload file), the
//! decoders return an error and never panic; oversize lengths are refused
//! before anything is allocated for them; valid frames round-trip.

use super::*;
use proptest::collection::vec;
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,24}",
        "[a-z0-9 ]{0,8}",
        Just(String::new()),
        // Long enough to push a frame past the cap now and then.
        (0usize..(MAX_CONTROL_FRAME + 64)).prop_map(|n| "m".repeat(n)),
    ]
}

fn self_check() -> impl Strategy<Value = SelfCheck> {
    (
        any::<i32>(),
        any::<u32>(),
        any::<u32>(),
        ".{0,24}",
        ".{0,24}",
        vec(".{0,8}", 0..4),
        any::<bool>(),
        vec("[A-Z_]{0,8}", 0..4),
        any::<bool>(),
        ".{0,16}",
    )
        .prop_map(
            |(
                pid,
                uid,
                gid,
                uid_map,
                gid_map,
                net_interfaces,
                no_new_privs,
                env_keys,
                root_read_only,
                hostname,
            )| SelfCheck {
                pid,
                uid,
                gid,
                uid_map,
                gid_map,
                net_interfaces,
                no_new_privs,
                env_keys,
                root_read_only,
                hostname,
            },
        )
}

fn failure_class() -> impl Strategy<Value = FailureClass> {
    prop_oneof![
        Just(FailureClass::Payload),
        Just(FailureClass::SelfCheck),
        Just(FailureClass::Exec),
        Just(FailureClass::Setup),
        Just(FailureClass::Aborted),
    ]
}

fn shim_msg() -> impl Strategy<Value = ShimMsg> {
    prop_oneof![
        self_check().prop_map(ShimMsg::Hello),
        any::<i32>().prop_map(|pid| ShimMsg::AgentStarted { pid }),
        (
            prop_oneof![
                any::<i32>().prop_map(AgentStatus::Code),
                any::<i32>().prop_map(AgentStatus::Signal),
            ],
            any::<(u64, u64, u64)>()
        )
            .prop_map(|(status, (u, s, r))| ShimMsg::AgentExited {
                status,
                usage: Usage {
                    user_cpu_us: u,
                    system_cpu_us: s,
                    max_rss_kib: r,
                },
            }),
        (failure_class(), text()).prop_map(|(class, message)| ShimMsg::Failed { class, message }),
    ]
}

fn frame_bytes(msg: &ShimMsg) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, msg).expect("write to a Vec");
    out
}

fn body_fits(msg: &ShimMsg) -> bool {
    frame_bytes(msg).len() - 4 <= MAX_CONTROL_FRAME
}

fn payload() -> impl Strategy<Value = InitPayload> {
    let opt = || proptest::option::of(any::<u64>());
    (
        any::<bool>(),
        ".{0,16}",
        ".{0,16}",
        vec(".{0,16}", 1..6).prop_filter("argv[0] set", |a| !a[0].is_empty()),
        vec((".{0,8}", ".{0,16}"), 0..6),
        ".{0,24}",
        (opt(), opt(), opt(), opt(), opt()),
        proptest::option::of((any::<u16>(), ".{0,24}", vec("[A-Z_]{1,8}", 0..3))),
    )
        .prop_map(
            |(nsjail, session_id, turn_id, argv, env, cwd, (c, o, f, a, p), llm)| InitPayload {
                version: PROTOCOL_VERSION,
                mode: if nsjail { Mode::Nsjail } else { Mode::Direct },
                session_id,
                turn_id,
                argv,
                env,
                cwd,
                rlimits: Rlimits {
                    cpu_seconds: c,
                    open_files: o,
                    file_size_bytes: f,
                    address_space_bytes: a,
                    processes: p,
                },
                llm: llm.map(|(port, socket_path, env_vars)| LlmBridge {
                    port,
                    socket_path,
                    env_vars,
                    url_path: String::new(),
                }),
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Arbitrary bytes on the control socket: an error or a message,
    /// never a panic; a length over the cap is refused as such.
    #[test]
    fn any_bytes_read_as_a_frame_never_panic(bytes in vec(any::<u8>(), 0..256)) {
        let got = read_frame(&bytes[..]);
        if bytes.len() >= 4 {
            let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
            if len > MAX_CONTROL_FRAME {
                let err = got.expect_err("over the cap");
                prop_assert_eq!(err.kind(), io::ErrorKind::InvalidData);
                prop_assert!(err.to_string().contains("over cap"), "{}", err);
            } else if len > bytes.len() - 4 {
                prop_assert_eq!(got.expect_err("cut short").kind(), io::ErrorKind::UnexpectedEof);
            }
        } else {
            // Nothing or part of a length: the shim is gone before a frame.
            prop_assert!(matches!(got, Ok(None)), "{:?}", got);
        }
    }

    /// Arbitrary frame bodies: decoded or refused, never a panic.
    #[test]
    fn any_body_decodes_or_is_refused(body in prop_oneof![
        vec(any::<u8>(), 0..512),
        (MAX_CONTROL_FRAME - 2..MAX_CONTROL_FRAME + 3).prop_map(|n| vec![0x91; n]),
    ]) {
        match decode_frame(&body) {
            Ok(msg) => prop_assert!(body.len() <= MAX_CONTROL_FRAME, "{:?}", msg),
            Err(e) => prop_assert_eq!(e.kind(), io::ErrorKind::InvalidData),
        }
    }

    /// Any length prefix over the cap is refused up front, whatever follows
    /// (nothing is allocated for the claimed size).
    #[test]
    fn oversize_lengths_are_refused(len in (MAX_CONTROL_FRAME as u32 + 1)..=u32::MAX, tail in vec(any::<u8>(), 0..64)) {
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend(tail);
        let err = read_frame(&bytes[..]).expect_err("over the cap");
        prop_assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        prop_assert!(decode_frame(&vec![0; MAX_CONTROL_FRAME + 1]).is_err());
    }

    /// A sequence of frames reads back message for message, then a clean
    /// EOF; a frame whose body is over the cap is refused, not cut.
    #[test]
    fn frame_sequences_round_trip(msgs in vec(shim_msg(), 0..6)) {
        let mut stream = Vec::new();
        for m in &msgs {
            stream.extend(frame_bytes(m));
        }
        let mut r = &stream[..];
        for m in &msgs {
            if body_fits(m) {
                prop_assert_eq!(read_frame(&mut r).expect("valid frame"), Some(m.clone()));
            } else {
                let err = read_frame(&mut r).expect_err("over the cap");
                prop_assert_eq!(err.kind(), io::ErrorKind::InvalidData);
                // The reader cannot resynchronise after a refused frame:
                // the broker ends the turn there.
                return Ok(());
            }
        }
        prop_assert!(matches!(read_frame(&mut r), Ok(None)));
    }

    /// A stream cut anywhere inside a frame is an error (or, inside the
    /// first length prefix, the end), never a different message.
    #[test]
    fn truncated_frames_are_errors(msg in shim_msg(), cut in any::<prop::sample::Index>()) {
        prop_assume!(body_fits(&msg));
        let bytes = frame_bytes(&msg);
        let cut = cut.index(bytes.len());
        let got = read_frame(&bytes[..cut]);
        if cut < 4 {
            prop_assert!(matches!(got, Ok(None)), "{:?}", got);
        } else {
            prop_assert_eq!(got.expect_err("cut short").kind(), io::ErrorKind::UnexpectedEof);
        }
    }

    /// Flipped bytes in a valid frame: an error or some message, never a
    /// panic.
    #[test]
    fn corrupted_frames_never_panic(
        msg in shim_msg(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = frame_bytes(&msg);
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= byte | 1;
        }
        let _ = read_frame(&bytes[..]);
        let _ = decode_frame(&bytes[4.min(bytes.len())..]);
    }

    /// Launch requests: arbitrary bytes and descriptor counts are refused
    /// or decoded, never a panic; valid ones round-trip.
    #[test]
    fn launch_requests_decode_or_refuse(
        bytes in vec(any::<u8>(), 0..128),
        nfds in 0usize..12,
        targets in vec(0i32..64, 0..=launch::MAX_FDS),
        argv in vec(vec(1u8..=255, 0..16), 1..5),
    ) {
        let _ = launch::decode(&bytes, nfds);
        let _ = launch::Failure::decode(&bytes);
        let args: Vec<&[u8]> = argv.iter().map(Vec::as_slice).collect();
        if let Some(req) = launch::encode(&targets, &args) {
            match launch::decode(&req, targets.len()) {
                Ok((t, a)) => {
                    prop_assert_eq!(t, targets);
                    prop_assert_eq!(a, argv);
                }
                // The only valid encoding decode refuses: an empty path.
                Err(e) => prop_assert!(argv[0].is_empty(), "{}", e),
            }
        }
    }

    /// The init payload file: arbitrary bytes are refused with a reason,
    /// valid payloads round-trip, and the size cap is exact.
    #[test]
    fn payloads_decode_or_refuse(
        p in payload(),
        junk in vec(any::<u8>(), 0..256),
        cap in 0usize..4096,
    ) {
        let bytes = p.encode().expect("encode");
        prop_assert_eq!(InitPayload::decode(&bytes).expect("valid payload"), p);
        if let Err(e) = InitPayload::decode(&junk) {
            prop_assert!(!e.to_string().is_empty());
        }
        match read_capped(&bytes[..], cap) {
            Ok(read) => prop_assert_eq!(read, bytes),
            Err(PayloadError::TooLarge { cap: c }) => {
                prop_assert_eq!(c, cap);
                prop_assert!(bytes.len() > cap);
            }
            Err(e) => prop_assert!(false, "{}", e),
        }
    }
}

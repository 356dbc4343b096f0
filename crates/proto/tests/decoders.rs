//! Hostile input for every decoder, on stable Rust: property tests (encode/decode round-trips,
//! and arbitrary bytes never panic and never decode past the limit), plus a saved corpus of
//! frames — valid, truncated, oversized — replayed and mutated byte by byte.

use proptest::prelude::*;
use touchgate_proto::*;

/// Every decoder of the protocol, run on one framed input: header then body.
fn decode_all(input: &[u8]) {
    let Some(header) = input.get(..FRAME_HEADER_LEN) else {
        return;
    };
    let header: [u8; FRAME_HEADER_LEN] = header.try_into().unwrap_or([0; 4]);
    match frame_len(header, MAX_FRAME_LEN) {
        Ok(len) => {
            assert!(len > 0 && len <= MAX_FRAME_LEN);
            let body = &input[FRAME_HEADER_LEN..];
            let body = &body[..len.min(body.len())];
            let _ = decode::<ClientMsg>(body);
            let _ = decode::<ServerMsg>(body);
            let _ = decode::<StreamOpen>(body);
            let _ = decode::<StreamReply>(body);
        }
        Err(FrameError::TooLarge { len, max }) => assert!(len > max),
        Err(FrameError::Empty) => assert_eq!(header, [0; 4]),
        Err(e) => panic!("frame_len returned {e}"),
    }
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9@._-]{0,40}"
}

fn refusal() -> impl Strategy<Value = Refusal> {
    (
        prop_oneof![
            Just(RefusalCode::Forbidden),
            Just(RefusalCode::UnknownService),
            Just(RefusalCode::BindingMismatch),
            Just(RefusalCode::RateLimited),
            Just(RefusalCode::SessionRevoked),
        ],
        ".{0,200}",
    )
        .prop_map(|(c, m)| Refusal::new(c, m))
}

fn client_msg() -> impl Strategy<Value = ClientMsg> {
    prop_oneof![
        (name(), name(), proptest::option::of(".{0,100}")).prop_map(
            |(user, invite_code, software_ca_pem)| {
                ClientMsg::EnrollBegin {
                    user,
                    invite_code,
                    software_ca_pem,
                }
            }
        ),
        name().prop_map(|user| ClientMsg::LoginBegin { user }),
        ".{0,300}".prop_map(|token| ClientMsg::Resume { token }),
        name().prop_map(|s| ClientMsg::LoginFinish {
            credential: serde_json::json!({ "id": s })
        }),
    ]
}

fn server_msg() -> impl Strategy<Value = ServerMsg> {
    prop_oneof![
        refusal().prop_map(ServerMsg::Error),
        (
            ".{0,300}",
            name(),
            any::<u64>(),
            proptest::collection::vec(name(), 0..5)
        )
            .prop_map(|(token, user, expires_at, names)| {
                ServerMsg::Session(SessionInfo {
                    token,
                    user,
                    expires_at,
                    services: names
                        .into_iter()
                        .map(|name| ServiceInfo {
                            name,
                            kind: ServiceKind::Tcp,
                        })
                        .collect(),
                })
            }),
        name().prop_map(|credential_id| ServerMsg::Enrolled { credential_id }),
    ]
}

fn roundtrip<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
    m: &T,
) {
    let f = encode(m);
    let header: [u8; 4] = f[..4].try_into().expect("header");
    let len = frame_len(header, MAX_FRAME_LEN).expect("within limit");
    assert_eq!(len, f.len() - 4);
    assert_eq!(&decode::<T>(&f[4..]).expect("decodes"), m);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn client_messages_round_trip(m in client_msg()) {
        roundtrip(&m);
    }

    #[test]
    fn server_messages_round_trip(m in server_msg()) {
        roundtrip(&m);
    }

    #[test]
    fn stream_frames_round_trip(service in name(), r in refusal(), accepted in any::<bool>()) {
        roundtrip(&StreamOpen { service, local: None });
        roundtrip(&if accepted { StreamReply::Accepted } else { StreamReply::Refused(r) });
    }

    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn arbitrary_json_never_panics_a_decoder(s in "\\{.{0,200}\\}") {
        let mut framed = (s.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(s.as_bytes());
        decode_all(&framed);
    }
}

#[test]
fn saved_corpus_and_every_one_byte_mutation_of_it_decode_without_panic() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut files = 0;
    let mut runs = 0u64;
    for entry in std::fs::read_dir(&dir).expect("corpus folder") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("corpus file");
        files += 1;
        decode_all(&bytes);
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut m = bytes.clone();
                m[i] ^= flip;
                decode_all(&m);
                runs += 1;
            }
            decode_all(&bytes[..i]);
            runs += 1;
        }
    }
    assert!(files >= 10, "corpus has {files} files");
    assert!(runs > 1000, "only {runs} mutations ran");
}

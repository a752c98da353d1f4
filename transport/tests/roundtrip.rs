//! Every message type survives encode -> frame -> decode unchanged.

use kvcoord_memory::{BlockShape, CudaIpcLayer, Dtype, KvLayout, MemoryHandle, Placement};
use kvcoord_transport::frame::{self, HEADER_BYTES};
use kvcoord_transport::*;
use proptest::prelude::*;

fn hash() -> impl Strategy<Value = ChunkHash> {
    any::<[u8; 32]>().prop_map(ChunkHash)
}

fn instance() -> impl Strategy<Value = InstanceKey> {
    (any::<u64>(), any::<u32>()).prop_map(|(engine, rank)| InstanceKey { engine, rank })
}

fn layout() -> impl Strategy<Value = KvLayout> {
    let shape = prop_oneof![
        (any::<u32>(), any::<u32>()).prop_map(|(kv_heads, head_dim)| BlockShape::Mha { kv_heads, head_dim }),
        any::<u32>().prop_map(|latent| BlockShape::Mla { latent }),
    ];
    let dtype = prop_oneof![Just(Dtype::F16), Just(Dtype::Bf16), Just(Dtype::F32), Just(Dtype::Fp8)];
    let placement = (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u32>(), any::<u64>()).prop_map(
        |(layer_offset, layer_stride, block_stride, run_bytes, runs_per_block, run_stride)| Placement {
            layer_offset,
            layer_stride,
            block_stride,
            run_bytes,
            runs_per_block,
            run_stride,
        },
    );
    (any::<u32>(), any::<u32>(), any::<u32>(), shape, dtype, placement).prop_map(
        |(num_layers, num_blocks, block_tokens, shape, dtype, placement)| KvLayout {
            num_layers,
            num_blocks,
            block_tokens,
            shape,
            dtype,
            placement,
        },
    )
}

fn memory() -> impl Strategy<Value = MemoryHandle> {
    prop_oneof![
        any::<u64>().prop_map(|size| MemoryHandle::HostFd { size }),
        (
            any::<[u8; 16]>(),
            prop::collection::vec((prop::collection::vec(any::<u8>(), 64), any::<u64>(), any::<u64>()), 0..4)
        )
            .prop_map(|(device_uuid, ls)| MemoryHandle::CudaIpc {
                device_uuid,
                layers: ls.into_iter().map(|(handle, offset, size)| CudaIpcLayer { handle, offset, size }).collect(),
            }),
    ]
}

fn request_body() -> impl Strategy<Value = RequestBody> {
    let hashes = || prop::collection::vec(hash(), 0..8);
    let ids = || prop::collection::vec(any::<u32>(), 0..32);
    prop_oneof![
        Just(RequestBody::Ping),
        (instance(), ".{0,20}", any::<u32>(), layout(), memory()).prop_map(
            |(instance, model, world_size, layout, memory)| {
                RequestBody::Register(RegisterKvCache { instance, model, world_size, layout, memory, secret: None })
            }
        ),
        instance().prop_map(|instance| RequestBody::Unregister { instance }),
        (instance(), hashes(), ids(), prop::option::of(prop::collection::vec(any::<u8>(), 64))).prop_map(
            |(instance, chunks, block_ids, ready_event)| RequestBody::Store(StoreChunks {
                instance,
                chunks,
                block_ids,
                ready_event
            })
        ),
        (instance(), hashes(), any::<bool>()).prop_map(|(instance, chunks, lease)| RequestBody::Lookup(LookupPrefix {
            instance,
            chunks,
            lease
        })),
        (".{0,40}", any::<u32>(), hashes(), any::<bool>()).prop_map(|(model, world_size, chunks, lease)| {
            RequestBody::LookupModel(LookupByModel { model, world_size, chunks, lease })
        }),
        (
            instance(),
            hashes(),
            ids(),
            prop::option::of(any::<u128>().prop_map(LeaseId)),
            prop::option::of(prop::collection::vec(any::<u8>(), 0..80))
        )
            .prop_map(|(instance, chunks, block_ids, lease, done_event)| {
                RequestBody::Retrieve(RetrieveChunks { instance, chunks, block_ids, lease, done_event })
            }),
        any::<u128>().prop_map(|l| RequestBody::ReleaseLease { lease: LeaseId(l) }),
        Just(RequestBody::Clear),
        Just(RequestBody::Stats),
        any::<u32>().prop_map(|i| RequestBody::InjectFault(FaultTarget::CopyLane(i))),
        instance().prop_map(|k| RequestBody::InjectFault(FaultTarget::Instance(k))),
        Just(RequestBody::Status),
    ]
}

fn error_kind() -> impl Strategy<Value = ErrorKind> {
    prop_oneof![
        Just(ErrorKind::NotRegistered),
        Just(ErrorKind::LayoutMismatch),
        Just(ErrorKind::InvalidArgument),
        Just(ErrorKind::OutOfMemory),
        Just(ErrorKind::Unavailable),
        Just(ErrorKind::Timeout),
        Just(ErrorKind::Unauthorized),
        Just(ErrorKind::ProtocolMismatch),
        Just(ErrorKind::ShuttingDown),
        Just(ErrorKind::Internal),
        Just(ErrorKind::PermissionDenied),
    ]
}

fn reply_result() -> impl Strategy<Value = Result<ReplyBody, WireError>> {
    let store = prop_oneof![
        Just(StoreOutcome::Stored),
        Just(StoreOutcome::AlreadyPresent),
        Just(StoreOutcome::SkippedNoMemory)
    ];
    let retrieve = prop_oneof![Just(RetrieveOutcome::Retrieved), Just(RetrieveOutcome::Missing)];
    let ok = prop_oneof![
        any::<u64>().prop_map(|e| ReplyBody::Pong { epoch: ServerEpoch(e) }),
        (any::<bool>(), any::<[u8; 16]>())
            .prop_map(|(already, s)| ReplyBody::Registered { already, secret: InstanceSecret(s) }),
        Just(ReplyBody::Unregistered),
        prop::collection::vec(store, 0..8).prop_map(ReplyBody::Stored),
        (any::<u32>(), prop::option::of(any::<u64>()))
            .prop_map(|(chunks, l)| ReplyBody::Found { chunks, lease: l.map(|l: u64| LeaseId(l as u128)) }),
        prop::collection::vec(retrieve, 0..8).prop_map(ReplyBody::Retrieved),
        Just(ReplyBody::LeaseReleased),
        any::<u64>().prop_map(|objects| ReplyBody::Cleared { objects }),
        (any::<u64>(), any::<u64>(), ".{0,8}").prop_map(|(epoch, l1_used, backend)| ReplyBody::Stats(Box::new(
            ServerStats { epoch, l1_used, backend, ..Default::default() }
        ))),
        Just(ReplyBody::FaultInjected),
        (layout(), ".{0,12}", any::<u64>()).prop_map(|(layout, model, engine)| ReplyBody::Status(Box::new(
            StatusReport {
                version: "1".into(),
                epoch: format!("{engine:016x}"),
                uptime_ms: 5,
                backend: "host".into(),
                devices: vec!["lane 0".into()],
                endpoints: vec![],
                admin: None,
                instances: vec![InstanceStatus {
                    engine,
                    rank: 0,
                    model,
                    world_size: 1,
                    layout,
                    bytes: 9,
                    owner_session: 1,
                    orphaned: false,
                    idle_ms: 3,
                }],
                stats: ServerStats { remote_up: 1, remote_hits: engine, ..Default::default() },
                instances_hidden: false,
                remote: Some(RemoteStatus {
                    endpoint: "redis://127.0.0.1:6379".into(),
                    up: true,
                    since_ms: 7,
                    last_error: None,
                }),
            }
        ))),
    ];
    prop_oneof![ok.prop_map(Ok), (error_kind(), ".{0,30}").prop_map(|(k, m)| Err(WireError::new(k, m)))]
}

fn through_a_frame<T: serde::Serialize + serde::de::DeserializeOwned>(msg: &T) -> T {
    let bytes = frame::encode(msg, 0, frame::DEFAULT_MAX_FRAME_BYTES).unwrap();
    frame::decode(&bytes[HEADER_BYTES..]).unwrap()
}

proptest! {
    #[test]
    fn every_request_round_trips(id in any::<u64>(), deadline_ms in any::<u32>(), body in request_body()) {
        let f = ClientFrame::Request(Request { id: RequestId(id), deadline_ms, body });
        prop_assert_eq!(through_a_frame(&f), f);
    }

    #[test]
    fn every_reply_round_trips(id in any::<u64>(), result in reply_result()) {
        let f = ServerFrame::Reply(Reply { id: RequestId(id), result });
        prop_assert_eq!(through_a_frame(&f), f);
    }

    #[test]
    fn handshake_and_error_frames_round_trip(p in any::<u32>(), name in ".{0,30}", epoch in any::<u64>(), k in error_kind(), m in ".{0,30}") {
        let hello = ClientFrame::Hello(Hello { protocol: p, client: name, token: Some("t".repeat(16)) });
        prop_assert_eq!(through_a_frame(&hello), hello);
        let w = ServerFrame::Welcome(Welcome {
            protocol: p, epoch: ServerEpoch(epoch), chunk_tokens: 256,
            limits: Limits { max_frame_bytes: 1 << 20, max_chunks_per_request: 64 }, server: "s".into(),
            tenant: "default".into(), admin: false,
        });
        prop_assert_eq!(through_a_frame(&w), w);
        for f in [ServerFrame::Refused(WireError::new(k, m.clone())), ServerFrame::Undecodable(WireError::new(k, m))] {
            prop_assert_eq!(through_a_frame(&f), f);
        }
    }

    #[test]
    fn random_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = frame::decode::<ClientFrame>(&bytes);
        let _ = frame::decode::<ServerFrame>(&bytes);
    }
}

#[test]
fn encoding_past_the_frame_limit_is_an_error() {
    let body = RequestBody::Lookup(LookupPrefix {
        instance: InstanceKey { engine: 1, rank: 0 },
        chunks: vec![ChunkHash([0; 32]); 100],
        lease: false,
    });
    let f = ClientFrame::Request(Request { id: RequestId(1), deadline_ms: 1, body });
    assert!(matches!(frame::encode(&f, 0, 1000), Err(frame::FrameError::TooLarge { .. })));
}

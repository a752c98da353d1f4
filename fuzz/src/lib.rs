//! What each fuzz target checks: one public function per target (named like
//! the target), each taking the fuzzer's raw bytes and panicking when a
//! property fails, which libFuzzer records as a crash. The root package's
//! `tests/fuzz_inputs.rs` includes this file and runs every committed seed
//! (`fuzz/seeds/`) and crash input (`fuzz/regressions/`) through the same
//! functions in the normal test suite.
//!
//! This file owns inputs and properties only; it must never hold a fix or a
//! workaround for what it finds (those go into the code under test).

use std::fmt::Debug;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use kvcoord::config::ServerConfig;
use kvcoord::server::logsafe::{Sanitized, MAX_LOGGED_CHARS};
use kvcoord::server::supervisor::check_register;
use kvcoord_memory::{Dtype, KvLayout, LayoutError, MemoryHandle, VllmLayout};
use kvcoord_transport::frame::{self, FrameError, HEADER_BYTES, MAX_FDS_PER_FRAME};
use kvcoord_transport::handshake::HANDSHAKE_MAX_FRAME_BYTES;
use kvcoord_transport::stream;
use kvcoord_transport::{
    ClientFrame, FaultTarget, InstanceKey, LookupByModel, LookupPrefix, RegisterKvCache, Request, RequestBody,
    RetrieveChunks, ServerFrame, StoreChunks,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The chunk size the server runs with by default.
const CHUNK_TOKENS: u32 = 256;

/// Encodes `msg` as a frame and decodes it back: the same value.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(msg: &T) {
    let bytes = match frame::encode(msg, 0, frame::HARD_MAX_FRAME_BYTES) {
        Ok(b) => b,
        // Structured inputs can be larger than any frame: refused, not cut.
        Err(FrameError::TooLarge { .. }) => return,
        Err(e) => panic!("{msg:?} does not encode: {e}"),
    };
    let header = frame::parse_header(bytes[..HEADER_BYTES].try_into().expect("a header"), frame::HARD_MAX_FRAME_BYTES)
        .expect("an encoded frame's header parses");
    assert_eq!(header.len as usize, bytes.len() - HEADER_BYTES, "the header states the payload length");
    let back: T = frame::decode(&bytes[HEADER_BYTES..]).unwrap_or_else(|e| panic!("{msg:?} does not decode: {e}"));
    assert_eq!(&back, msg, "decode(encode(x)) != x");
}

/// Decodes `payload` as `T`; what decodes must re-encode to the same value.
fn decoded<T: Serialize + DeserializeOwned + PartialEq + Debug>(payload: &[u8]) -> Option<T> {
    match frame::decode::<T>(payload) {
        Ok(v) => {
            round_trip(&v);
            Some(v)
        }
        Err(FrameError::Decode(_)) => None,
        Err(e) => panic!("decoding can only fail as Decode, got {e}"),
    }
}

/// A client's text as the server logs it: no control or bidi character
/// survives, and the length is capped.
fn check_sanitized(text: &str) {
    let shown = Sanitized(text).to_string();
    let bidi =
        |c: char| matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}');
    assert!(
        !shown.chars().any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}' || bidi(c)),
        "{shown:?} carries a control character to the log"
    );
    // Escapes are at most 10 characters (`\u{10ffff}`), plus the count.
    assert!(shown.chars().count() <= MAX_LOGGED_CHARS * 10 + 32, "{} characters logged", shown.len());
}

/// What the server does with a decoded client frame before any state.
fn check_client_frame(f: &ClientFrame) {
    match f {
        ClientFrame::Hello(h) => check_sanitized(&h.client),
        ClientFrame::Request(r) => check_body(&r.body),
    }
}

fn check_body(body: &RequestBody) {
    let _ = body.op();
    assert!(body.fd_count() <= MAX_FDS_PER_FRAME as usize);
    match body {
        RequestBody::Register(r) => check_register_request(r),
        RequestBody::LookupModel(l) => check_sanitized(&l.model),
        _ => {}
    }
}

/// The server's register checks never panic, and what they accept is a
/// valid layout inside the declared memory with chunk objects under 4 GiB.
fn check_register_request(r: &RegisterKvCache) {
    check_sanitized(&r.model);
    let mut normalized = r.clone();
    normalized.layout = r.layout.normalized();
    for req in [r, &normalized] {
        if check_register(req, CHUNK_TOKENS).is_ok() {
            check_valid_layout(&req.layout);
            if let MemoryHandle::HostFd { size } = req.memory {
                assert_eq!(req.layout.fits_in(size), Ok(()));
            }
            let per_chunk = req.layout.blocks_per_chunk(CHUNK_TOKENS).expect("accepted: chunks are whole blocks");
            assert!(req.layout.chunk_object_bytes(per_chunk) <= kvcoord_memory::arena::MAX_SLAB_BYTES);
        }
    }
}

/// Target `frame`: a byte stream as the server reads it (the first frame
/// under the handshake's limit, the rest under the default one). Headers
/// are refused only for their size or descriptor count; every payload is
/// decoded as a client frame and as a server frame, and whatever decodes
/// re-encodes to the same value.
pub fn frame(data: &[u8]) {
    for (payload, _) in split_frames(data, HANDSHAKE_MAX_FRAME_BYTES, frame::DEFAULT_MAX_FRAME_BYTES).0 {
        if let Some(f) = decoded::<ClientFrame>(payload) {
            check_client_frame(&f);
        }
        decoded::<ServerFrame>(payload);
    }
}

/// How a byte stream ends after its last whole frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamEnd {
    /// Nothing left.
    Clean,
    /// A partial header or payload.
    Truncated,
    /// A header over the limit or declaring too many descriptors.
    BadHeader,
}

/// The whole frames at the start of `data` (payload, declared descriptors),
/// the first under `first_max`, then under `max`, and how the stream ends.
fn split_frames(data: &[u8], first_max: u32, max: u32) -> (Vec<(&[u8], u8)>, StreamEnd) {
    let (mut frames, mut rest, mut limit) = (Vec::new(), data, first_max);
    loop {
        if rest.is_empty() {
            return (frames, StreamEnd::Clean);
        }
        let Some(h) = rest.get(..HEADER_BYTES) else { return (frames, StreamEnd::Truncated) };
        let header = match frame::parse_header(h.try_into().expect("a header"), limit) {
            Ok(h) => h,
            Err(FrameError::TooLarge { len, max }) => {
                assert!(len > max as u64);
                return (frames, StreamEnd::BadHeader);
            }
            Err(FrameError::TooManyFds { declared }) => {
                assert!(declared > MAX_FDS_PER_FRAME);
                return (frames, StreamEnd::BadHeader);
            }
            Err(e) => panic!("a header can only be refused for its size or descriptors: {e}"),
        };
        assert!(header.len <= limit && header.fds <= MAX_FDS_PER_FRAME);
        let end = HEADER_BYTES + header.len as usize;
        let Some(payload) = rest.get(HEADER_BYTES..end) else { return (frames, StreamEnd::Truncated) };
        frames.push((payload, header.fds));
        rest = &rest[end..];
        limit = max;
    }
}

/// Target `request_body`: the first byte picks a request type, the rest is
/// decoded as it; what decodes re-encodes to the same value and goes
/// through the server's checks for it (a register's layout and memory).
pub fn request_body(data: &[u8]) {
    let Some((&which, payload)) = data.split_first() else { return };
    match which % 9 {
        0 => {
            if let Some(b) = decoded::<RequestBody>(payload) {
                check_body(&b);
            }
        }
        1 => {
            if let Some(r) = decoded::<RegisterKvCache>(payload) {
                check_register_request(&r);
            }
        }
        2 => {
            if let Some(s) = decoded::<StoreChunks>(payload) {
                check_blocks(s.chunks.len(), &s.block_ids);
            }
        }
        3 => {
            decoded::<LookupPrefix>(payload);
        }
        4 => {
            if let Some(l) = decoded::<LookupByModel>(payload) {
                check_sanitized(&l.model);
            }
        }
        5 => {
            if let Some(r) = decoded::<RetrieveChunks>(payload) {
                check_blocks(r.chunks.len(), &r.block_ids);
            }
        }
        6 => {
            decoded::<FaultTarget>(payload);
        }
        7 => {
            if let Some(r) = decoded::<Request>(payload) {
                check_body(&r.body);
            }
        }
        _ => {
            decoded::<InstanceKey>(payload);
        }
    }
}

/// A store's or retrieve's block ids against a small real layout, as the
/// instance actor validates them.
fn check_blocks(chunks: usize, ids: &[u32]) {
    let layout = KvLayout::mha(4, 256, 16, 4, 64, Dtype::Bf16);
    match layout.chunk_blocks(CHUNK_TOKENS, chunks, ids) {
        Ok(blocks) => {
            assert_eq!(blocks.chunk_count(), chunks);
            for c in 0..chunks {
                assert!(blocks.chunk(c).iter().all(|b| b.get() < layout.num_blocks));
            }
        }
        Err(LayoutError::BlockCount { .. } | LayoutError::BlockOutOfRange { .. }) => {}
        Err(e) => panic!("block ids refused for an unexpected reason: {e}"),
    }
}

/// Target `request_roundtrip`: structured client and server frames (every
/// request and reply variant, any field values) encode and decode back to
/// themselves, with the descriptor count they declare.
pub fn request_roundtrip(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(client) = ClientFrame::arbitrary(&mut u) else { return };
    round_trip(&client);
    check_client_frame(&client);
    if let ClientFrame::Request(r) = &client {
        let fds = r.body.fd_count() as u8;
        if let Ok(bytes) = frame::encode(&client, fds, frame::HARD_MAX_FRAME_BYTES) {
            assert_eq!(bytes[4], fds, "the header carries the descriptor count");
        }
    }
    if let Ok(server) = ServerFrame::arbitrary(&mut u) {
        round_trip(&server);
    }
}

/// A layout built the ways a client builds one, or raw.
#[derive(Arbitrary, Debug)]
enum LayoutInput {
    Mha { layers: u32, blocks: u32, tokens: u32, heads: u32, dim: u32, dtype: Dtype },
    Vllm { order: VllmLayout, layers: u32, blocks: u32, tokens: u32, heads: u32, dim: u32, dtype: Dtype },
    Mla { layers: u32, blocks: u32, tokens: u32, latent: u32, dtype: Dtype },
    Raw(KvLayout),
}

/// One layout case: a layout, an optional change to one placement field,
/// memory and chunk sizes, block ids and a position to look up.
#[derive(Arbitrary, Debug)]
struct LayoutCase {
    layout: LayoutInput,
    offset: Option<u64>,
    tweak: Option<(u8, u64)>,
    memory: u64,
    chunk_tokens: u32,
    chunks: u16,
    block_ids: Vec<u32>,
    probe: (u32, u32, u32),
    world_size: u32,
    rank: u32,
}

impl LayoutInput {
    fn build(&self) -> KvLayout {
        match *self {
            LayoutInput::Mha { layers, blocks, tokens, heads, dim, dtype } => {
                KvLayout::mha(layers, blocks, tokens, heads, dim, dtype)
            }
            LayoutInput::Vllm { order, layers, blocks, tokens, heads, dim, dtype } => {
                KvLayout::vllm(order, layers, blocks, tokens, heads, dim, dtype)
            }
            LayoutInput::Mla { layers, blocks, tokens, latent, dtype } => {
                KvLayout::mla(layers, blocks, tokens, latent, dtype)
            }
            LayoutInput::Raw(l) => l,
        }
    }
}

/// Target `layout`: `kvcoord_memory::layout` with arbitrary numbers. No
/// function panics on any layout; a layout that validates has sizes and
/// offsets that fit in 64 bits (checked against 128-bit arithmetic), fits
/// exactly its own size, and normalizes to an equal-sized valid layout.
pub fn layout(data: &[u8]) {
    let Ok(case) = LayoutCase::arbitrary(&mut Unstructured::new(data)) else { return };
    let mut l = case.layout.build();
    if let Some(offset) = case.offset {
        l = l.at_offset(offset);
    }
    if let Some((field, value)) = case.tweak {
        let p = &mut l.placement;
        match field % 6 {
            0 => p.layer_offset = value,
            1 => p.layer_stride = value,
            2 => p.block_stride = value,
            3 => p.run_bytes = value,
            4 => p.runs_per_block = value as u32,
            _ => p.run_stride = value,
        }
    }
    let valid = l.validate();
    let fits = l.fits_in(case.memory);
    assert!(valid.is_ok() || fits.is_err(), "an invalid layout fits: {valid:?}");
    let normalized = l.normalized();
    let _ = l.blocks_per_chunk(case.chunk_tokens);
    let _ = l.chunk_object_bytes(case.chunk_tokens);
    let blocks = l.chunk_blocks(case.chunk_tokens, case.chunks as usize, &case.block_ids);
    if let Ok(b) = &blocks {
        assert_eq!(b.chunk_count(), case.chunks as usize);
        assert_eq!(b.blocks_per_chunk(), l.blocks_per_chunk(case.chunk_tokens).unwrap());
    }
    // The server's register checks on this layout, with host memory.
    let request = RegisterKvCache {
        instance: InstanceKey { engine: 1, rank: case.rank },
        model: "m".into(),
        world_size: case.world_size,
        layout: l,
        memory: MemoryHandle::HostFd { size: case.memory },
        secret: None,
    };
    check_register_request(&request);
    if valid.is_err() {
        assert_eq!(normalized, l, "an invalid layout normalizes to itself");
        return;
    }
    check_valid_layout(&l);
    check_valid_layout(&normalized);
    assert_eq!(normalized.total_bytes(), l.total_bytes());
    assert_eq!(normalized.kv_bytes(), l.kv_bytes());
    assert_eq!(normalized.normalized(), normalized, "normalizing twice changes nothing more");
    assert_eq!(fits.is_ok(), case.memory >= l.total_bytes());
    if let Ok(b) = blocks {
        let per_chunk = b.blocks_per_chunk();
        let object = l.chunk_object_bytes(per_chunk) as u128;
        let (layers, runs) = (l.num_layers as u128, l.runs() as u128);
        let exact = layers * runs * per_chunk as u128 * l.run_bytes() as u128;
        assert_eq!(object, exact.min(u64::MAX as u128), "the object size, saturated at u64::MAX");
    }
    // A position inside the layout: its run ends inside the placement.
    let (layer, run, block) = (case.probe.0 % l.num_layers, case.probe.1 % l.runs(), case.probe.2 % l.num_blocks);
    let block = l.block(block).expect("in range");
    let p = &l.placement;
    let want = p.layer_offset as u128
        + layer as u128 * p.layer_stride as u128
        + run as u128 * p.run_stride as u128
        + block.get() as u128 * p.block_stride as u128;
    assert_eq!(l.offset(layer, run, block) as u128, want);
    assert!(want + p.run_bytes as u128 <= l.total_bytes() as u128, "a run ends past the placement");
}

/// The sizes of a valid layout, recomputed in 128 bits: none overflows.
fn check_valid_layout(l: &KvLayout) {
    l.validate().expect("a valid layout");
    let p = &l.placement;
    let (layers, blocks, runs) = (l.num_layers as u128, l.num_blocks as u128, p.runs_per_block as u128);
    let extent = (runs - 1) * p.run_stride as u128 + (blocks - 1) * p.block_stride as u128 + p.run_bytes as u128;
    assert_eq!(l.layer_extent() as u128, extent);
    let total = p.layer_offset as u128 + (layers - 1) * p.layer_stride as u128 + extent;
    assert_eq!(l.total_bytes() as u128, total);
    assert!(usize::try_from(total).is_ok(), "a valid layout is addressable");
    assert_eq!(l.block_bytes() as u128, runs * p.run_bytes as u128);
    assert_eq!(l.kv_bytes() as u128, layers * blocks * runs * p.run_bytes as u128);
    assert_eq!(l.fits_in(l.total_bytes()), Ok(()));
    assert!(matches!(l.fits_in(l.total_bytes() - 1), Err(LayoutError::MemorySize { .. })));
}

/// Target `config`: any TOML text. Parsing and validation never panic, and
/// a parsed configuration, printed as `--print-config` prints it, reads
/// back as the same configuration with the same verdict.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = toml::from_str::<ServerConfig>(text) else { return };
    let verdict = config.validate().map_err(|e| e.key);
    let printed = toml::to_string_pretty(&config).unwrap_or_else(|e| panic!("{config:?} does not print: {e}"));
    let again: ServerConfig =
        toml::from_str(&printed).unwrap_or_else(|e| panic!("the printed configuration does not parse: {e}\n{printed}"));
    assert_eq!(again, config, "the printed configuration reads back differently:\n{printed}");
    assert_eq!(again.validate().map_err(|e| e.key), verdict);
}

/// One write of the `frame_stream` script: bytes, with descriptors attached.
struct Piece<'a> {
    bytes: &'a [u8],
    fds: usize,
}

/// A `frame_stream` input: `[limit][len][fds][len bytes]...`; `limit`
/// picks the reader's frame limit, each piece is written with `fds % 8`
/// descriptors (a seed is a real encoded stream cut into pieces). At most
/// [`MAX_PIECES`] writes: the rest of the input is the last one.
const MAX_PIECES: usize = 12;

fn script(data: &[u8]) -> Option<(u32, Vec<Piece<'_>>)> {
    let (&limit, mut rest) = data.split_first()?;
    let max = [64, 4096, HANDSHAKE_MAX_FRAME_BYTES, frame::DEFAULT_MAX_FRAME_BYTES][limit as usize % 4];
    let mut pieces = Vec::new();
    while let [len, fds, tail @ ..] = rest {
        let n = if pieces.len() + 1 == MAX_PIECES { tail.len() } else { (*len as usize).min(tail.len()) };
        pieces.push(Piece { bytes: &tail[..n], fds: *fds as usize % 8 });
        rest = &tail[n..];
    }
    Some((max, pieces))
}

/// Encodes a `frame_stream` input: `stream` cut into pieces of at most
/// `piece` bytes (the last of [`MAX_PIECES`] takes the rest), without
/// descriptors (seeds are made with it).
pub fn stream_script(limit: u8, stream: &[u8], piece: u8) -> Vec<u8> {
    let mut out = vec![limit];
    let mut rest = stream;
    for i in 1..=MAX_PIECES {
        let n = if i == MAX_PIECES { rest.len() } else { rest.len().min(piece.max(1) as usize) };
        out.extend([n.min(255) as u8, 0]);
        out.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        if rest.is_empty() {
            break;
        }
    }
    out
}

/// What every `frame_stream` run shares, made once (so that the
/// descriptors it holds are there before the first run counts them): the
/// descriptor the pieces carry, and the runtime.
fn stream_env() -> &'static (OwnedFd, tokio::runtime::Runtime) {
    static ENV: OnceLock<(OwnedFd, tokio::runtime::Runtime)> = OnceLock::new();
    ENV.get_or_init(|| {
        // A peer that vanished must not kill the process (libFuzzer's main
        // does not ignore SIGPIPE as a Rust main does).
        // SAFETY: setting a signal's disposition to SIG_IGN runs no handler.
        unsafe { nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, nix::sys::signal::SigHandler::SigIgn) }
            .expect("ignore SIGPIPE");
        let devnull = std::fs::File::open("/dev/null").expect("/dev/null").into();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        // The runtime's own descriptors, opened on first use.
        runtime.block_on(async { drop(tokio::net::UnixStream::pair()) });
        (devnull, runtime)
    })
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// Target `frame_stream`: the real [`stream::FrameReader`] over a Unix
/// socket, fed a script of writes (split anywhere, some carrying
/// descriptors). Without descriptors it yields exactly the frames a
/// whole-buffer parse finds, then the matching error; with them, frames in
/// the same order until it refuses; and every descriptor it received is
/// closed once the reader is gone.
pub fn frame_stream(data: &[u8]) {
    let Some((max, pieces)) = script(data) else { return };
    let (devnull, runtime) = stream_env();
    let all: Vec<u8> = pieces.iter().flat_map(|p| p.bytes.iter().copied()).collect();
    let any_fds = pieces.iter().any(|p| p.fds > 0 && !p.bytes.is_empty());
    let (expected, end) = split_frames(&all, max, max);
    let before = open_fds();
    let (got, error) = runtime.block_on(async {
        let (a, b) = tokio::net::UnixStream::pair().expect("a socket pair");
        let (mut reader, unused) = stream::unix_pair(a, max);
        drop(unused);
        let (_, mut writer) = stream::unix_pair(b, max);
        let write = async move {
            for p in &pieces {
                if p.bytes.is_empty() {
                    continue;
                }
                let fds = vec![devnull.as_fd(); p.fds];
                if writer.write_with_fds(p.bytes, &fds).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        };
        let read = async move {
            let mut got = Vec::new();
            let error = loop {
                match reader.read::<ClientFrame>().await {
                    Ok((f, fds)) => got.push((f, fds.len())),
                    Err(e) => break e,
                }
            };
            (got, error)
        };
        let ((got, error), ()) = tokio::join!(read, write);
        (got, error)
    });
    // The frames a whole-buffer parse finds, checked in the reader's order
    // (size, whole payload, descriptors, decode) up to the first refusal.
    let mut want = Vec::new();
    let mut refusal = None;
    for (payload, fds) in &expected {
        if *fds > 0 && !any_fds {
            refusal = Some("a frame declaring descriptors that never came");
            break;
        }
        match frame::decode::<ClientFrame>(payload) {
            Ok(f) => want.push(f),
            Err(_) => {
                refusal = Some("an undecodable payload");
                break;
            }
        }
    }
    let frames: Vec<ClientFrame> = got.iter().map(|(f, _)| f.clone()).collect();
    if any_fds {
        // Descriptors may be refused anywhere (stray, too many): a prefix.
        assert!(frames.len() <= want.len(), "more frames than the bytes hold");
        assert_eq!(frames[..], want[..frames.len()], "frames out of order");
    } else {
        assert_eq!(frames, want, "the reader and a whole-buffer parse disagree");
        let ok = match (&error, refusal, end) {
            (FrameError::FdMismatch { .. }, Some(r), _) => r.starts_with("a frame declaring"),
            (FrameError::Decode(_), Some(r), _) => r.starts_with("an undecodable"),
            (FrameError::Closed, None, StreamEnd::Clean) => true,
            (FrameError::Truncated { .. }, None, StreamEnd::Truncated) => true,
            (FrameError::TooLarge { .. } | FrameError::TooManyFds { .. }, None, StreamEnd::BadHeader) => true,
            _ => false,
        };
        assert!(ok, "the reader ended with {error} where the parse ends {end:?} after {refusal:?}");
    }
    assert!(got.iter().all(|(_, n)| *n <= MAX_FDS_PER_FRAME as usize));
    drop(got);
    assert_eq!(open_fds(), before, "descriptors leaked");
}

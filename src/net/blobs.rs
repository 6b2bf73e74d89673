//! Scan data streams: the sender streams a manifest then chunks (compressed when it pays, at a
//! level chosen for the link); the receiver verifies each chunk before storing it, so a cut
//! transfer resumes at the first missing chunk.

use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use quinn::RecvStream;
use tokio::sync::{mpsc, Mutex};
use tracing::{debug, warn};

use super::pace::{Pacer, RateLimit};
use super::progress::{Direction, Transfer};
use super::{read_frame, write_frame, Event, NetError, STREAM_BLOB};
use crate::node::blobsink::BlobSink;
use crate::node::DB_FILE;
use crate::proto::blob::{encode_chunk, level_for_rate, link_rate_bps, LinkView};
use crate::proto::{wire, Frame, Hash32, ProtoError};
use crate::store::blobs::CHUNK_BYTES;
use crate::store::Store;

fn store_err(e: impl std::fmt::Display) -> NetError {
    NetError::Node(e.to_string())
}

/// The link's rate as the congestion controller sees it (see [`link_rate_bps`]).
pub(super) fn estimated_rate_bps(conn: &quinn::Connection) -> u64 {
    let stats = conn.stats();
    link_rate_bps(&LinkView {
        rtt: conn.rtt(),
        window_bytes: stats.path.cwnd,
        pacing_bps: conn.congestion_state().metrics().pacing_rate,
        bytes_sent: stats.udp_tx.bytes,
    })
}

pub(super) fn spawn_sender(
    conn: quinn::Connection,
    dir: std::path::PathBuf,
    queue: Arc<Mutex<mpsc::Receiver<(Hash32, u64)>>>,
    events: mpsc::Sender<Event>,
    (rate, pacer): (Arc<RateLimit>, Arc<Pacer>),
) {
    tokio::spawn(async move {
        loop {
            let next = queue.lock().await.recv().await;
            let Some((hash, from)) = next else { break };
            match send(&conn, &dir, hash, from, &rate, &pacer).await {
                Ok(()) => {
                    let _ = events.send(Event::BlobSent).await;
                }
                Err(e) => {
                    warn!("sending scan {}: {e}", hex::encode(hash));
                    if conn.close_reason().is_some() {
                        break;
                    }
                }
            }
        }
    });
}

/// Chunks a sender reads, verifies and encodes ahead of its stream (at most 1 MiB of scan per
/// stream): the store and the compressor work while QUIC sends.
const CHUNKS_AHEAD_MAX: usize = 4;
/// The first chunk of a transfer is compressed at most at this level (level 19 runs at about
/// 0.4–0.5 MB/s per core here, so half a second per 256 KiB chunk), so the link does not idle
/// while it is prepared; the later chunks are compressed while earlier ones are on the wire.
const FIRST_CHUNK_LEVEL_MAX: i32 = 9;
/// Chunk frames a receiver reads off its stream ahead of verifying and storing them: the stream
/// keeps flowing while a batch is committed.
const FRAMES_AHEAD_MAX: usize = 4;
/// Largest first frame of a scan stream: a manifest of the most chunks a frame may list, its
/// fields and header. Anything larger is refused before it is read.
const SCAN_HEADER_FRAME_BYTES_MAX: usize = wire::ITEMS_MAX * 32 + 256;
/// Largest later frame of a scan stream: one chunk (never larger compressed: a chunk that does
/// not shrink is sent raw) and its fields. A control stream allows 16 MiB; a scan stream needs
/// no more than this.
const SCAN_CHUNK_FRAME_BYTES_MAX: usize = CHUNK_BYTES + 64;

/// One BlobChunk frame as its header and its data (whose size the rate limit counts), written to
/// the stream as two `Bytes` so the data reaches QUIC's send buffer without a copy.
type EncodedChunk = [Bytes; 2];

async fn send(
    conn: &quinn::Connection,
    dir: &Path,
    hash: Hash32,
    from: u64,
    rate: &RateLimit,
    pacer: &Pacer,
) -> Result<(), NetError> {
    let store = Store::open(&dir.join(DB_FILE), 1).map_err(store_err)?;
    // A scan still arriving here is forwarded as its chunks arrive (cut-through): a relay does
    // not make its communes wait for the whole scan.
    let (manifest, arriving) = match store.blob_manifest(&hash).map_err(store_err)? {
        Some(stored) => (Some(stored), false),
        None => (store.blob_partial_manifest(&hash).map_err(store_err)?, true),
    };
    let (size, chunk_hashes) = manifest.ok_or_else(|| NetError::Node("scan vanished".into()))?;
    let lost = |e: String| NetError::Lost {
        peer: "peer".into(),
        reason: e,
    };
    let mut stream = conn.open_uni().await.map_err(|e| lost(e.to_string()))?;
    // Scans of urgent dispatches (rank 1-3) go before bulk ones (0); control frames (10) first.
    stream
        .set_priority(store.blob_rank(&hash).map_err(store_err)? as i32)
        .ok();
    stream
        .write_all(&[STREAM_BLOB])
        .await
        .map_err(|e| lost(e.to_string()))?;
    let count = chunk_hashes.len() as u64;
    let first = from.min(count);
    let header = Frame::BlobHeader {
        hash,
        size,
        chunk_bytes: CHUNK_BYTES as u64,
        first,
        chunk_hashes,
    };
    write_frame(&mut stream, &header, 3).await?;
    let mut progress = Transfer::start(
        conn,
        hash,
        Direction::Send,
        size,
        first * CHUNK_BYTES as u64,
    );
    // The level is chosen here, per chunk, as the link changes; the reader uses the latest
    // choice for the chunks it encodes ahead.
    let level_now = Arc::new(AtomicI32::new(level_for_rate(estimated_rate_bps(conn))));
    let mut chunks = spawn_chunk_reader(store, hash, first..count, level_now.clone(), arriving);
    for _ in first..count {
        let level = level_for_rate(estimated_rate_bps(conn));
        level_now.store(level, Ordering::Relaxed);
        let mut frame = chunks
            .recv()
            .await
            .unwrap_or_else(|| Err(NetError::Node("the scan reader stopped".into())))?;
        rate.take(frame[1].len()).await;
        pacer.write(&mut stream, &mut frame).await?;
        progress.moved(progress.bytes_done() + CHUNK_BYTES as u64);
    }
    stream.finish().map_err(|e| lost(e.to_string()))?;
    debug!(hash = %hex::encode(hash), from, "scan sent");
    Ok(())
}

/// How often a sender forwarding a scan that is still arriving looks for its next chunk.
const ARRIVING_POLL: std::time::Duration = std::time::Duration::from_millis(50);
/// A scan still arriving whose next chunk has not come for this long is given up (the peer
/// asks again later).
const ARRIVING_STALL_MAX: std::time::Duration = std::time::Duration::from_secs(120);

/// Reads, verifies and encodes chunks `range` of a scan on a blocking thread, at most
/// CHUNKS_AHEAD_MAX ahead of the stream; it stops at the first error (which it hands on) or
/// when the receiving end is dropped. For a scan still `arriving`, a chunk not recorded yet is
/// waited for (each is recorded once verified and durable here).
fn spawn_chunk_reader(
    store: Store,
    hash: Hash32,
    range: std::ops::Range<u64>,
    level: Arc<AtomicI32>,
    arriving: bool,
) -> mpsc::Receiver<Result<EncodedChunk, NetError>> {
    let (tx, rx) = mpsc::channel(CHUNKS_AHEAD_MAX);
    tokio::task::spawn_blocking(move || {
        let first = range.start;
        for idx in range {
            let waited = std::time::Instant::now();
            let chunk = loop {
                match store.blob_chunk(&hash, idx) {
                    Err(crate::store::StoreError::NotFound(_))
                        if arriving && waited.elapsed() < ARRIVING_STALL_MAX =>
                    {
                        if tx.is_closed() {
                            return;
                        }
                        std::thread::sleep(ARRIVING_POLL);
                    }
                    other => break other,
                }
            };
            let encoded = chunk.map_err(store_err).map(|data| {
                let raw_len = data.len() as u64;
                let mut level = level.load(Ordering::Relaxed);
                if idx == first {
                    level = level.min(FIRST_CHUNK_LEVEL_MAX);
                }
                let (compressed, data) = encode_chunk(data.into(), level);
                let frame = Frame::BlobChunk {
                    idx,
                    compressed,
                    raw_len,
                    data,
                };
                let (header, data) = wire::encode_split(&frame, 1);
                [header.into(), data]
            });
            let failed = encoded.is_err();
            if tx.blocking_send(encoded).is_err() || failed {
                break;
            }
        }
    });
    rx
}

/// Receives one scan stream into the store; returns its hash once complete and verified. The
/// stream is read here while a blocking thread verifies and stores the chunks.
pub(super) async fn receive(
    recv: &mut RecvStream,
    dir: &Path,
    conn: &quinn::Connection,
) -> Result<Hash32, (Option<Hash32>, NetError)> {
    let header = match read_frame(recv, SCAN_HEADER_FRAME_BYTES_MAX).await {
        Ok(Some(f)) => f,
        Ok(None) => {
            return Err((
                None,
                ProtoError::Violation("empty scan stream".into()).into(),
            ))
        }
        Err(e) => return Err((None, e)),
    };
    // Frames still to come if the header is well formed; BlobSink::begin checks it.
    let (expected, mut progress) = match &header {
        Frame::BlobHeader {
            hash,
            size,
            first,
            chunk_hashes,
            ..
        } => (
            (chunk_hashes.len() as u64).saturating_sub(*first),
            Some(Transfer::start(
                conn,
                *hash,
                Direction::Receive,
                *size,
                first.saturating_mul(CHUNK_BYTES as u64),
            )),
        ),
        _ => (0, None),
    };
    let (tx, rx) = mpsc::channel(FRAMES_AHEAD_MAX);
    let db = dir.join(DB_FILE);
    let sink = tokio::task::spawn_blocking(move || store_scan(&db, header, rx));
    for _ in 0..expected {
        let frame = tokio::select! {
            frame = read_frame(recv, SCAN_CHUNK_FRAME_BYTES_MAX) => frame,
            // The sink refused the scan or a chunk: stop reading, its error says why.
            () = tx.closed() => break,
        };
        let ended = !matches!(frame, Ok(Some(_)));
        if let (Some(p), false) = (&mut progress, ended) {
            p.moved(p.bytes_done() + CHUNK_BYTES as u64);
        }
        if tx.send(frame).await.is_err() || ended {
            break;
        }
    }
    drop(tx);
    sink.await
        .map_err(|e| (None, NetError::Node(e.to_string())))?
}

/// The blocking half of `receive`: verifies and stores the frames the stream hands over.
fn store_scan(
    db: &Path,
    header: Frame,
    mut frames: mpsc::Receiver<Result<Option<Frame>, NetError>>,
) -> Result<Hash32, (Option<Hash32>, NetError)> {
    let mut store = Store::open(db, 1).map_err(|e| (None, store_err(e)))?;
    // A second copy of a scan asked for twice (a retry racing the first transfer, or the
    // same scan arriving through another peer) is not a hostile one: it is dropped unread.
    if let Frame::BlobHeader { hash, .. } = &header {
        if store
            .has_blob(hash)
            .map_err(|e| (Some(*hash), store_err(e)))?
        {
            return Err((Some(*hash), NetError::AlreadyStored));
        }
    }
    let mut sink = BlobSink::begin(&mut store, header).map_err(|(h, e)| (h, e.into()))?;
    let hash = sink.hash;
    while !sink.is_complete() {
        let frame = match frames.blocking_recv() {
            Some(Ok(Some(f))) => f,
            Some(Ok(None)) | None => break,
            Some(Err(e)) => {
                // Keep what arrived verified: the next session resumes after it.
                sink.flush().map_err(|e| (Some(hash), e.into()))?;
                return Err((Some(hash), e));
            }
        };
        sink.chunk(frame).map_err(|e| (Some(hash), e.into()))?;
    }
    sink.finish().map_err(|e| (Some(hash), e.into()))
}

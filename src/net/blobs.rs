//! Scan data streams: the sender streams a manifest then chunks (compressed when it pays, at a
//! level chosen for the link); the receiver verifies each chunk before storing it, so a cut
//! transfer resumes at the first missing chunk.

use std::path::Path;
use std::sync::Arc;

use quinn::RecvStream;
use tokio::sync::{mpsc, Mutex};
use tracing::{debug, warn};

use super::{read_frame, write_frame, Event, NetError, STREAM_BLOB};
use crate::node::{now_ms, DB_FILE};
use crate::proto::blob::{decode_chunk, encode_chunk, level_for_rate};
use crate::proto::{Frame, Hash32, ProtoError};
use crate::store::blobs::{BLOB_BYTES_MAX, CHUNK_BYTES};
use crate::store::Store;

/// Verified chunks written per transaction: amortises the fsync, bounds what a cut loses.
const CHUNKS_PER_COMMIT: usize = 16;

fn store_err(e: impl std::fmt::Display) -> NetError {
    NetError::Node(e.to_string())
}

/// The link's rate as the congestion controller sees it: window over round-trip time.
fn estimated_rate_bps(conn: &quinn::Connection) -> u64 {
    let rtt = conn.rtt().as_secs_f64().max(1e-4);
    (conn.stats().path.cwnd as f64 * 8.0 / rtt) as u64
}

/// A token bucket on scan bytes sent to one peer (`sync.limit.rate_kbps`).
pub(super) struct RateLimit {
    bytes_per_s: Option<f64>,
    state: Mutex<(f64, std::time::Instant)>,
}

impl RateLimit {
    pub(super) fn new(rate_kbps: Option<u64>) -> Self {
        RateLimit {
            bytes_per_s: rate_kbps.map(|k| k as f64 * 1000.0 / 8.0),
            state: Mutex::new((0.0, std::time::Instant::now())),
        }
    }

    /// Waits until `bytes` may be sent. The bucket holds at most one second of credit.
    async fn take(&self, bytes: usize) {
        let Some(rate) = self.bytes_per_s else { return };
        let wait = {
            let mut state = self.state.lock().await;
            let now = std::time::Instant::now();
            let credit = (state.0 + now.duration_since(state.1).as_secs_f64() * rate).min(rate);
            state.0 = credit - bytes as f64;
            state.1 = now;
            if state.0 < 0.0 {
                std::time::Duration::from_secs_f64(-state.0 / rate)
            } else {
                std::time::Duration::ZERO
            }
        };
        tokio::time::sleep(wait).await;
    }
}

pub(super) fn spawn_sender(
    conn: quinn::Connection,
    dir: std::path::PathBuf,
    queue: Arc<Mutex<mpsc::Receiver<(Hash32, u64)>>>,
    events: mpsc::Sender<Event>,
    rate: Arc<RateLimit>,
) {
    tokio::spawn(async move {
        loop {
            let next = queue.lock().await.recv().await;
            let Some((hash, from)) = next else { break };
            match send(&conn, &dir, hash, from, &rate).await {
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

async fn send(
    conn: &quinn::Connection,
    dir: &Path,
    hash: Hash32,
    from: u64,
    rate: &RateLimit,
) -> Result<(), NetError> {
    let store = Store::open(&dir.join(DB_FILE), 1).map_err(store_err)?;
    let (size, chunk_hashes) = store
        .blob_manifest(&hash)
        .map_err(store_err)?
        .ok_or_else(|| NetError::Node("scan vanished".into()))?;
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
    let first = from.min(chunk_hashes.len() as u64);
    let header = Frame::BlobHeader {
        hash,
        size,
        chunk_bytes: CHUNK_BYTES as u64,
        first,
        chunk_hashes: chunk_hashes.clone(),
    };
    write_frame(&mut stream, &header, 3).await?;
    for idx in first..chunk_hashes.len() as u64 {
        let data = store.blob_chunk(&hash, idx).map_err(store_err)?;
        let level = level_for_rate(estimated_rate_bps(conn));
        let raw_len = data.len() as u64;
        // High levels cost tens of milliseconds per chunk: keep them off the async workers.
        let (compressed, payload) = if level >= 9 {
            tokio::task::spawn_blocking(move || encode_chunk(&data, level))
                .await
                .map_err(|e| NetError::Node(e.to_string()))?
        } else {
            encode_chunk(&data, level)
        };
        rate.take(payload.len()).await;
        write_frame(
            &mut stream,
            &Frame::BlobChunk {
                idx,
                compressed,
                raw_len,
                data: payload,
            },
            1,
        )
        .await?;
    }
    stream.finish().map_err(|e| lost(e.to_string()))?;
    debug!(hash = %hex::encode(hash), from, "scan sent");
    Ok(())
}

/// Receives one scan stream into the store; returns its hash once complete and verified.
pub(super) async fn receive(
    recv: &mut RecvStream,
    dir: &Path,
) -> Result<Hash32, (Option<Hash32>, NetError)> {
    let Some(Frame::BlobHeader {
        hash,
        size,
        chunk_bytes,
        first,
        chunk_hashes,
    }) = read_frame(recv).await.map_err(|e| (None, e))?
    else {
        return Err((
            None,
            ProtoError::Violation("scan stream does not start with a manifest".into()).into(),
        ));
    };
    let fail = |e: NetError| (Some(hash), e);
    let bad = |m: String| (Some(hash), NetError::Proto(ProtoError::Malformed(m)));
    if chunk_bytes != CHUNK_BYTES as u64
        || size > BLOB_BYTES_MAX
        || chunk_hashes.len() as u64 != size.div_ceil(CHUNK_BYTES as u64)
    {
        return Err(bad(format!(
            "manifest of {size} bytes in {} chunks of {chunk_bytes} is inconsistent",
            chunk_hashes.len()
        )));
    }
    let mut store = Store::open(&dir.join(DB_FILE), 1).map_err(|e| fail(store_err(e)))?;
    // Only scans this node's documents reference are accepted: a peer cannot fill the disk.
    let wanted = store.blob_wanted(&hash).map_err(|e| fail(store_err(e)))?;
    if !wanted {
        return Err(bad("a scan this node did not ask for".into()));
    }
    let have = store
        .write(|tx| tx.blob_partial_begin(&hash, size, &chunk_hashes, now_ms()))
        .map_err(|e| fail(store_err(e)))?;
    if first > have {
        return Err(bad(format!(
            "stream starts at chunk {first} but this node holds only {have}"
        )));
    }
    let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut next = first;
    let flush = |store: &mut Store, batch: &mut Vec<(u64, Vec<u8>)>| {
        store
            .write(|tx| {
                for (idx, data) in batch.iter() {
                    tx.blob_partial_chunk(&hash, *idx, data)?;
                }
                Ok(())
            })
            .map_err(|e| fail(store_err(e)))?;
        batch.clear();
        Ok::<(), (Option<Hash32>, NetError)>(())
    };
    while next < chunk_hashes.len() as u64 {
        let frame = match read_frame(recv).await {
            Ok(Some(f)) => f,
            Ok(None) => {
                flush(&mut store, &mut batch)?;
                return Err(bad(format!(
                    "stream ended at chunk {next} of {}",
                    chunk_hashes.len()
                )));
            }
            Err(e) => {
                // Keep what arrived verified: the next session resumes after it.
                flush(&mut store, &mut batch)?;
                return Err(fail(e));
            }
        };
        let Frame::BlobChunk {
            idx,
            compressed,
            raw_len,
            data,
        } = frame
        else {
            return Err(bad("expected a chunk".into()));
        };
        if idx != next {
            return Err(bad(format!(
                "chunk {idx} arrived where {next} was expected"
            )));
        }
        let raw = decode_chunk(
            compressed,
            raw_len,
            chunk_bytes,
            &data,
            &chunk_hashes[idx as usize],
        )
        .map_err(|e| fail(e.into()))?;
        batch.push((idx, raw));
        next += 1;
        if batch.len() >= CHUNKS_PER_COMMIT {
            flush(&mut store, &mut batch)?;
        }
    }
    flush(&mut store, &mut batch)?;
    store
        .write(|tx| tx.blob_partial_finish(&hash, now_ms()))
        .map_err(|e| fail(store_err(e)))?;
    Ok(hash)
}

//! The eStargz prefetch landmark: a layer written with a recorded
//! workload (`ctr-remote image optimize`, `breakfs refactor --profile`)
//! puts the files that workload reads first at the front and ends them
//! with a `.prefetch.landmark` entry. That region is fetched at mount, at
//! once, in as few Range requests as [`REGION_PIECE`] allows, ahead of
//! background work; a reader asking for one of its chunks meanwhile joins
//! the request under way, and a reader of any other chunk is served by the
//! ordinary workers, never queued behind the region.

use std::sync::Arc;
use std::time::Instant;

use breakfs_index::{Descriptor, Digest, TocLayer};

use super::queue::{Batch, claim, run_batch};
use super::{ChunkLoc, Fetcher};

/// Largest Range request of a landmarked region: a region bigger than
/// this is fetched as consecutive pieces, so that the first files of the
/// workload are stored (and their readers served) before the last arrive.
pub const REGION_PIECE: u64 = 8 << 20;

/// The chunks of the prefetch region of eStargz layer `desc`: those whose
/// members lie before its `.prefetch.landmark`, in layer order. Empty when
/// the layer has no such landmark (none, or `.no.prefetch.landmark`), or
/// when a chunk of the region cannot be checked alone.
pub fn landmarked_chunks(desc: &Descriptor, layer: &TocLayer) -> Vec<ChunkLoc> {
    let Some(end) = layer.prefetch_end else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (entry, chunks) in &layer.entries {
        for c in chunks.iter().filter(|c| c.compressed_end <= end) {
            match crate::chunk_loc(desc, entry, chunks.len(), c) {
                Some(loc) => out.push(loc),
                None => return Vec::new(),
            }
        }
    }
    out.sort_by_key(|c| c.offset);
    out
}

/// What fetching a landmarked region did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionFetch {
    /// Range requests made (pieces with a chunk not yet stored or fetched).
    pub requests: usize,
    /// Chunks this fetch took on (others were stored or under way).
    pub chunks: usize,
    /// Of those, chunks that no source delivered.
    pub failed: usize,
}

impl Fetcher {
    /// Fetch the prefetch region `chunks` of layer `layer` (see
    /// [`landmarked_chunks`]) at once: cut into pieces of at most
    /// [`REGION_PIECE`] compressed bytes, each one Range request, one after
    /// another in layer order (the recorded order). Chunks in the store or
    /// being fetched are left alone; each piece's chunks are taken from
    /// the queue only when its request starts, so a reader of a later
    /// piece is not held behind the earlier ones. Background work waits
    /// while the region comes. Every chunk is checked before it is stored.
    pub async fn fetch_region(&self, layer: &Digest, chunks: &[ChunkLoc]) -> RegionFetch {
        let mut done = RegionFetch::default();
        for piece in pieces(chunks, REGION_PIECE) {
            // One request per piece, holes and all.
            let r = self.fetch_run(layer, piece, u64::MAX).await;
            done.requests += r.requests;
            done.chunks += r.chunks;
            done.failed += r.failed;
        }
        done
    }

    /// Fetch `chunks` of layer `layer` (neighbours, or near ones) as one
    /// Range request of the caller's own, spanning them all (the bytes
    /// between them too), at on-demand priority but on no worker: the
    /// workers stay free for readers. Chunks in the store or being fetched
    /// are left alone (where that leaves a hole of more than `max_hole`
    /// bytes, the request is cut in two there, both made at once); queued
    /// ones are taken off the queue with their waiters, and a reader asking
    /// for one of them meanwhile joins this request. Background work waits
    /// a quiet spell from its end, as after a reader's request. Every
    /// chunk is checked before it is stored.
    pub async fn fetch_run(
        &self,
        layer: &Digest,
        chunks: &[ChunkLoc],
        max_hole: u64,
    ) -> RegionFetch {
        let mut taken = claim(&self.inner, chunks);
        if taken.is_empty() {
            return RegionFetch::default();
        }
        taken.sort_by_key(|c| c.offset);
        let mut parts: Vec<Vec<ChunkLoc>> = Vec::new();
        for c in taken {
            match parts.last_mut() {
                Some(p)
                    if c.offset
                        <= p.iter()
                            .map(|l| l.compressed_end)
                            .max()
                            .unwrap_or(0)
                            .saturating_add(max_hole) =>
                {
                    p.push(c)
                }
                _ => parts.push(vec![c]),
            }
        }
        let began = Instant::now();
        let requests = parts.len();
        self.inner.state.lock().own_running += 1;
        let fetched = parts.into_iter().map(|jobs| {
            let start = jobs.iter().map(|c| c.offset).min().unwrap_or(0);
            let end = jobs
                .iter()
                .map(|c| c.compressed_end)
                .max()
                .unwrap_or(start);
            let chunks = jobs.len();
            let batch = Batch {
                layer: layer.clone(),
                start,
                end,
                jobs,
                background: false,
            };
            async move {
                let failed = run_batch(&self.inner, batch).await;
                tracing::debug!(layer = %layer.short(), start, bytes = end - start, chunks, failed, secs = began.elapsed().as_secs_f64(), "run of chunks fetched");
                (chunks, failed)
            }
        });
        let done = futures::future::join_all(fetched).await;
        {
            let mut st = self.inner.state.lock();
            st.own_running -= 1;
            st.quiet_from(Instant::now());
        }
        RegionFetch {
            requests,
            chunks: done.iter().map(|(c, _)| c).sum(),
            failed: done.iter().map(|(_, f)| f).sum(),
        }
    }

    /// [`Fetcher::fetch_region`] on a task of its own, for each layer of
    /// `regions` with a non-empty region; returns at once.
    pub fn spawn_regions(&self, regions: Vec<(Digest, Vec<ChunkLoc>)>) {
        for (layer, chunks) in regions.into_iter().filter(|(_, c)| !c.is_empty()) {
            let fetcher = self.clone();
            let chunks = Arc::new(chunks);
            tokio::spawn(async move {
                let r = fetcher.fetch_region(&layer, &chunks).await;
                if r.failed > 0 {
                    tracing::warn!(layer = %layer, failed = r.failed, "fetching the landmarked prefetch region: some chunks failed; they are fetched when read");
                } else if r.requests > 0 {
                    tracing::info!(layer = %layer.short(), requests = r.requests, chunks = r.chunks, "fetched the landmarked prefetch region");
                }
            });
        }
    }
}

/// `chunks` (in layer order) cut into runs spanning at most `max` bytes
/// each (a chunk bigger than `max` alone).
fn pieces(chunks: &[ChunkLoc], max: u64) -> Vec<&[ChunkLoc]> {
    let mut out = Vec::new();
    let mut first = 0;
    for i in 1..=chunks.len() {
        let cut = i == chunks.len()
            || chunks[i]
                .compressed_end
                .saturating_sub(chunks[first].offset)
                > max;
        if cut {
            out.push(&chunks[first..i]);
            first = i;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use breakfs_index::{Entry, EntryKind, TocChunk};

    use super::*;

    fn loc(offset: u64, end: u64) -> ChunkLoc {
        ChunkLoc {
            layer: Digest::of(b"l"),
            offset,
            compressed_end: end,
            inner_offset: 0,
            size: 1,
            digest: Digest::of(&offset.to_le_bytes()),
        }
    }

    #[test]
    fn a_region_is_cut_into_bounded_pieces_in_order() {
        let chunks: Vec<ChunkLoc> = (0..10).map(|i| loc(i * 100, (i + 1) * 100)).collect();
        let cut = pieces(&chunks, 350);
        let spans: Vec<(u64, u64)> = cut
            .iter()
            .map(|p| (p[0].offset, p[p.len() - 1].compressed_end))
            .collect();
        assert_eq!(spans, [(0, 300), (300, 600), (600, 900), (900, 1000)]);
        assert_eq!(pieces(&chunks, 1 << 20).len(), 1);
        assert!(pieces(&[], 100).is_empty());
        // A chunk bigger than a piece goes alone.
        assert_eq!(pieces(&[loc(0, 500), loc(500, 600)], 100).len(), 2);
    }

    #[test]
    fn only_chunks_before_the_landmark_are_in_the_region() {
        let desc = Descriptor::new(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            Digest::of(b"l"),
            1000,
        );
        let file = |path: &str, offset: u64, end: u64| {
            let mut e = Entry::new(path, EntryKind::File);
            e.size = 4;
            e.digest = Some(Digest::of(path.as_bytes()));
            let c = TocChunk {
                offset,
                inner_offset: 0,
                compressed_end: end,
                chunk_offset: 0,
                chunk_size: 4,
                chunk_digest: None,
            };
            (e, vec![c])
        };
        let mut layer = TocLayer {
            entries: vec![
                file("b", 200, 300),
                file("a", 100, 200),
                file("c", 400, 500),
            ],
            prefetch_end: Some(300),
        };
        let region = landmarked_chunks(&desc, &layer);
        let offsets: Vec<u64> = region.iter().map(|c| c.offset).collect();
        assert_eq!(offsets, [100, 200]);
        layer.prefetch_end = None;
        assert!(landmarked_chunks(&desc, &layer).is_empty());
    }
}

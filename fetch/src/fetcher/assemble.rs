//! Whole-blob assembly: a layer whose chunks were all fetched as kept
//! ranges becomes its whole, verified blob.

use std::io::Write;

use breakfs_index::{Descriptor, Digest};

use crate::{ContentStore, Error, Result};

/// The spans of `[0, size)` that `held` (sorted, merged) leaves out, joined
/// when they are less than `join` apart (fewer requests, a little overlap).
pub(super) fn fill_spans(held: &[(u64, u64)], size: u64, join: u64) -> Vec<(u64, u64)> {
    let mut gaps: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    for &(s, e) in held {
        if s > pos {
            gaps.push((pos, s.min(size)));
        }
        pos = pos.max(e);
    }
    if pos < size {
        gaps.push((pos, size));
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in gaps {
        match out.last_mut() {
            Some(last) if s - last.1 < join => last.1 = e,
            _ => out.push((s, e)),
        }
    }
    out
}

/// Write layer `desc` from `fetched` spans and kept ranges into a temp
/// file, check its digest and size, and move it into place.
pub(super) fn assemble(
    store: &ContentStore,
    desc: &Descriptor,
    fetched: &[(u64, Vec<u8>)],
) -> Result<()> {
    let temp = store.temp_path();
    let what = format!("layer {} assembled from kept ranges", desc.digest);
    let result = (|| -> Result<Digest> {
        let f = std::fs::File::create(&temp)
            .map_err(|e| Error::io(format!("creating {}", temp.display()), e))?;
        let mut hw =
            breakfs_index::HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, f));
        let held = crate::cas::merge_ranges(&store.held_ranges(&desc.digest));
        let mut pos = 0u64;
        while pos < desc.size {
            if let Some((s, b)) = fetched
                .iter()
                .find(|(s, b)| *s <= pos && pos < s + b.len() as u64)
            {
                let from = (pos - s) as usize;
                hw.write_all(&b[from..])
                    .map_err(|e| Error::io(what.clone(), e))?;
                pos = s + b.len() as u64;
                continue;
            }
            let Some(&(_, e)) = held.iter().find(|(s, e)| *s <= pos && pos < *e) else {
                return Err(Error::Unavailable {
                    what: what.clone(),
                    reason: format!("nothing covers offset {pos}"),
                });
            };
            let e = e.min(desc.size);
            // Through the kept ranges in pieces of at most 4 MiB.
            let mut at = pos;
            while at < e {
                let n = (e - at).min(4 << 20);
                let bytes =
                    store
                        .read_held(&desc.digest, at, n)?
                        .ok_or_else(|| Error::Unavailable {
                            what: what.clone(),
                            reason: format!("a kept range at {at} went away"),
                        })?;
                hw.write_all(&bytes)
                    .map_err(|e| Error::io(what.clone(), e))?;
                at += n;
            }
            pos = e;
        }
        let (out, digest, size) = hw.finish();
        out.into_inner()
            .map_err(|e| Error::io(what.clone(), e.into_error()))?;
        if size != desc.size {
            return Err(Error::SizeMismatch {
                what: what.clone(),
                expected: desc.size,
                actual: size,
            });
        }
        Ok(digest)
    })();
    let outcome = match result {
        Ok(d) if d == desc.digest => store.commit_temp(&temp, &store.blob_path(&desc.digest)),
        Ok(actual) => Err(Error::DigestMismatch {
            what,
            expected: desc.digest.clone(),
            actual,
        }),
        Err(e) => Err(e),
    };
    if outcome.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    outcome
}

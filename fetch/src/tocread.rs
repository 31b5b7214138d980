//! Reading an eStargz layer's TOC from a store with range requests: the
//! footer first, then the TOC member, never the whole blob.

use breakfs_index::{Descriptor, Toc, TocLayer};

use crate::{Error, Result, Store};

/// A layer's TOC read from its blob's tail, converted to entries.
#[derive(Clone, Debug)]
pub struct LayerToc {
    /// The entries with their chunk maps.
    pub layer: TocLayer,
    /// Offset of the TOC member in the blob.
    pub toc_offset: u64,
    /// The raw TOC.
    pub toc: Toc,
    /// Bytes fetched to read it (tail guesses included).
    pub fetched: u64,
    /// Range requests made to read it (0: taken from a peer's copy).
    pub requests: u32,
    /// The blob's bytes from the TOC's member to its end (footer
    /// included): what another node needs to read the TOC.
    pub tail: Vec<u8>,
}

/// The name of the store record that keeps layer `layer`'s bytes from its
/// TOC's member to its end, for peers ([`LayerToc::tail`]).
pub fn toc_tail_name(layer: &breakfs_index::Digest) -> String {
    format!("toctail-{}.bin", layer.hex())
}

/// Keep `records` (name, bytes) as the store's derived records, on the
/// blocking pool and all at once: each is written and synced, and an
/// image's TOCs are read together, so that their records written one
/// after another in the async task that reads them held its mount up by
/// a disk sync per record (about 0.3 s for 48 layers on a busy machine).
pub(crate) async fn put_metas(
    store: &std::sync::Arc<crate::ContentStore>,
    records: Vec<(String, Vec<u8>)>,
) -> Result<()> {
    let writes = records.into_iter().map(|(name, bytes)| {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.put_meta(&name, &bytes))
    });
    for done in futures::future::join_all(writes).await {
        done.map_err(|e| Error::io("keeping a TOC record", std::io::Error::other(e)))??;
    }
    Ok(())
}

/// First guess of how much of a blob's tail holds footer and TOC: most
/// layers of a refactored image have TOCs of a few KiB, and a bigger one
/// costs one more round trip, not the bandwidth of a big guess per layer.
const FIRST_TAIL: u64 = 8 * 1024;

/// The annotation on a layer's descriptor that says how many bytes the
/// blob's tail from its TOC's member holds ([`hint_toc_tail`]): `breakfs
/// refactor` writes it in the manifests it writes, and a node puts it on
/// a descriptor in memory (the manifest's bytes kept as they were) as an
/// access profile recorded it. The TOC is then read in one request of
/// exactly those bytes, not a guess and then the rest. Only a hint, from
/// a manifest or a profile alike: out of bounds it is ignored, and what
/// the footer says decides, so a wrong one costs a second read.
pub const TOC_TAIL_HINT: &str = "dev.breakfs.toc-tail";

/// Largest tail a hint makes a TOC read ask for in its first request.
pub const MAX_HINTED_TAIL: u64 = 4 << 20;

/// Say on `desc` that its TOC, footer included, is the blob's last `tail`
/// bytes ([`TOC_TAIL_HINT`]); a tail out of bounds is not said.
pub fn hint_toc_tail(desc: &mut Descriptor, tail: u64) {
    if tail_in_bounds(desc, tail) {
        desc.annotations
            .insert(TOC_TAIL_HINT.to_string(), tail.to_string());
    }
}

/// Whether a hinted tail of blob `desc` is one to say and take: at least
/// a footer, at most the blob and [`MAX_HINTED_TAIL`].
fn tail_in_bounds(desc: &Descriptor, tail: u64) -> bool {
    (breakfs_index::FOOTER_SIZE..=MAX_HINTED_TAIL.min(desc.size)).contains(&tail)
}

/// How much of blob `desc`'s tail to read first: the hinted tail when it
/// has one within bounds ([`tail_in_bounds`], whoever wrote it: a
/// registry's manifest is outside input), else [`FIRST_TAIL`].
fn first_tail(desc: &Descriptor) -> u64 {
    desc.annotations
        .get(TOC_TAIL_HINT)
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|&t| tail_in_bounds(desc, t))
        .unwrap_or(FIRST_TAIL)
        .min(desc.size)
}

impl Store {
    /// The eStargz TOC of a layer, or `None` if the layer has no TOC (a
    /// plain tar+gzip, zstd or uncompressed layer). The TOC is checked
    /// against the descriptor's TOC digest annotation when it has one.
    pub async fn read_toc(&self, desc: &Descriptor) -> Result<Option<LayerToc>> {
        let what = format!("TOC of layer {} in {}", desc.digest, self.name());
        read_toc_with(desc, &what, |start, len| {
            self.read_range(&desc.digest, start, len)
        })
        .await
    }
}

/// [`Store::read_toc`] over any range reader `read(start, len)`.
pub async fn read_toc_with<F, Fut>(
    desc: &Descriptor,
    what: &str,
    read: F,
) -> Result<Option<LayerToc>>
where
    F: Fn(u64, u64) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<u8>>>,
{
    {
        use breakfs_index::{Compression, TailRead};
        let what = what.to_string();
        if Compression::from_media_type(&desc.media_type) != Some(Compression::Gzip)
            || desc.size < breakfs_index::FOOTER_SIZE
        {
            return Ok(None);
        }
        let mut want = first_tail(desc);
        let mut tail: Vec<u8> = Vec::new();
        for requests in 1..=2 {
            // Only what the last read did not bring.
            let have = tail.len() as u64;
            let mut more = read(desc.size - want, want - have).await?;
            if more.len() as u64 != want - have {
                return Err(Error::Protocol {
                    what,
                    reason: format!(
                        "asked for {} bytes of the blob's tail, the source answered {}",
                        want - have,
                        more.len()
                    ),
                });
            }
            more.extend_from_slice(&tail);
            tail = more;
            let fetched = tail.len() as u64;
            let parsed = match Toc::read_from_blob_tail(&tail, desc.size) {
                Ok(r) => r,
                // Without the annotation, a footer that does not parse just
                // means a plain gzip layer.
                Err(_) if desc.toc_digest().is_none() => return Ok(None),
                Err(e) => {
                    return Err(match unfaithful_ranges(desc, &what, &tail, &read).await {
                        Some(e) => e,
                        None => e.into(),
                    });
                }
            };
            match parsed {
                TailRead::NeedTail(n) if n > want && n <= desc.size => want = n,
                TailRead::NeedTail(n) => {
                    return Err(Error::Protocol {
                        what,
                        reason: format!(
                            "the footer asks for a {n}-byte tail of a {}-byte blob",
                            desc.size
                        ),
                    });
                }
                TailRead::Toc(t) => {
                    return checked(desc, what, t, &tail, fetched, requests).map(Some);
                }
            }
        }
        Err(Error::Protocol {
            what,
            reason: "the TOC could not be located in the blob's tail".into(),
        })
    }
}

/// The TOC of layer `desc` from `tail`, the blob's bytes from the TOC's
/// member to its end as another node sent them: checked against the
/// descriptor's TOC digest, which it must have.
pub fn toc_from_tail(desc: &Descriptor, what: &str, tail: &[u8]) -> Result<LayerToc> {
    use breakfs_index::TailRead;
    let what = what.to_string();
    let Some(expected) = desc.toc_digest() else {
        return Err(Error::Protocol {
            what,
            reason: "the layer has no TOC digest to check a TOC from another node by".into(),
        });
    };
    match Toc::read_from_blob_tail(tail, desc.size)? {
        TailRead::Toc(t) if t.toc_digest == expected => {
            checked(desc, what, t, tail, tail.len() as u64, 0)
        }
        TailRead::Toc(t) => Err(Error::DigestMismatch {
            what,
            expected,
            actual: t.toc_digest,
        }),
        TailRead::NeedTail(n) => Err(Error::Protocol {
            what,
            reason: format!(
                "the {} bytes sent are not the blob's tail from its TOC ({n} are)",
                tail.len()
            ),
        }),
    }
}

/// The TOC `t` read from `tail` (the blob's last bytes), checked against
/// the TOC digest annotation of `desc` when it has one.
fn checked(
    desc: &Descriptor,
    what: String,
    t: breakfs_index::TocTail,
    tail: &[u8],
    fetched: u64,
    requests: u32,
) -> Result<LayerToc> {
    if let Some(expected) = desc.toc_digest()
        && expected != t.toc_digest
    {
        return Err(Error::DigestMismatch {
            what,
            expected,
            actual: t.toc_digest,
        });
    }
    let layer = t.toc.to_layer(desc.size, Some(t.toc_offset))?;
    // The footer's offset lies inside the tail (the read asked for it).
    let from = (tail.len() as u64).saturating_sub(desc.size - t.toc_offset) as usize;
    Ok(LayerToc {
        layer,
        toc_offset: t.toc_offset,
        toc: t.toc,
        fetched,
        requests,
        tail: tail[from..].to_vec(),
    })
}

/// When a tail that should hold a TOC does not parse, ask for the blob's
/// last bytes again with another range: a source that answers Range
/// requests with other bytes than the blob's (some do when they ignore
/// the offset) gives two answers that disagree, and that, not the layer,
/// is what is wrong. `None` when they agree (or cannot be compared).
async fn unfaithful_ranges<F, Fut>(
    desc: &Descriptor,
    what: &str,
    tail: &[u8],
    read: &F,
) -> Option<Error>
where
    F: Fn(u64, u64) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<u8>>>,
{
    let n = breakfs_index::FOOTER_SIZE;
    if (tail.len() as u64) <= n {
        return None;
    }
    let again = read(desc.size - n, n).await.ok()?;
    let first = &tail[tail.len() - n as usize..];
    (again != first).then(|| Error::Protocol {
        what: what.to_string(),
        reason: format!(
            "the source answered two Range requests for the blob's last {n} bytes with \
             different bytes: it does not serve byte ranges of the blob faithfully"
        ),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Write as _;
    use std::sync::atomic::{AtomicU32, Ordering};

    use breakfs_index::{Digest, media_types};

    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// A tar stream of one file `name` holding `data` (ustar, no end blocks).
    fn tar_one(name: &str, data: &[u8]) -> Vec<u8> {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let mut out = h.to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    /// An eStargz-shaped blob whose TOC (of many directories) is more than
    /// the first tail guess, and its descriptor.
    fn blob() -> (Vec<u8>, Descriptor, u64) {
        // Names of hex digits: a TOC that compresses to well over 8 KiB.
        let entries: Vec<String> = (0..400u32)
            .map(|i| {
                let name = Digest::of(&i.to_le_bytes()).hex().to_string();
                format!(r#"{{"name":"{name}/","type":"dir"}}"#)
            })
            .collect();
        let json = format!(r#"{{"version":1,"entries":[{}]}}"#, entries.join(","));
        // A payload of some 60 KB compressed before the TOC.
        let payload: String = (0..2000u32)
            .map(|i| Digest::of(&(i + 1_000_000).to_le_bytes()).hex().to_string())
            .collect();
        let mut blob = gzip(payload.as_bytes());
        assert!(blob.len() > 50_000);
        let toc_offset = blob.len() as u64;
        let member = gzip(&tar_one(breakfs_index::TOC_TAR_NAME, json.as_bytes()));
        blob.extend_from_slice(&member);
        blob.extend_from_slice(&breakfs_index::footer(toc_offset));
        let desc = Descriptor::new(
            media_types::OCI_LAYER_GZIP,
            Digest::of(&blob),
            blob.len() as u64,
        );
        (blob, desc, toc_offset)
    }

    /// Read the TOC of `desc` in `blob`: it and the Range requests made.
    async fn read(blob: &[u8], desc: &Descriptor) -> (Option<LayerToc>, u32) {
        let asked = AtomicU32::new(0);
        let r = read_toc_with(desc, "test", |start, len| {
            asked.fetch_add(1, Ordering::Relaxed);
            let bytes = blob[start as usize..(start + len) as usize].to_vec();
            async move { Ok(bytes) }
        })
        .await
        .unwrap();
        (r, asked.load(Ordering::Relaxed))
    }

    /// A right hint reads the TOC in one request; a wrong one, short or
    /// long, still reads the same TOC (a short one with the footer's
    /// second read); one out of bounds is not taken.
    #[tokio::test]
    async fn a_toc_tail_hint_saves_a_read_and_a_wrong_one_costs_no_failure() {
        let (blob, desc, toc_offset) = blob();
        let tail = desc.size - toc_offset;
        assert!(tail > FIRST_TAIL, "the TOC must not fit the first guess");
        let (plain, n) = read(&blob, &desc).await;
        let plain = plain.unwrap();
        assert_eq!((plain.toc_offset, n), (toc_offset, 2));
        let hinted = |t: u64| {
            let mut d = desc.clone();
            hint_toc_tail(&mut d, t);
            d
        };
        for (hint, requests) in [
            (tail, 1),
            (tail + 1000, 1),
            (desc.size, 1),
            (tail - 100, 2),
            (breakfs_index::FOOTER_SIZE, 2),
        ] {
            let (t, n) = read(&blob, &hinted(hint)).await;
            let t = t.unwrap();
            assert_eq!(t.toc_offset, toc_offset, "hint {hint}");
            assert_eq!(t.toc, plain.toc, "hint {hint}");
            assert_eq!(t.tail.len() as u64, tail, "hint {hint}");
            assert_eq!(n, requests, "hint {hint}");
        }
        // Out of bounds: not said, or not taken.
        assert!(!hinted(3).annotations.contains_key(TOC_TAIL_HINT));
        assert!(
            !hinted(desc.size + 1)
                .annotations
                .contains_key(TOC_TAIL_HINT)
        );
        // Nor taken as a manifest says it (outside input): a value out of
        // bounds reads as no hint does, the first guess then the rest.
        for lie in [
            "not a number".to_string(),
            "-1".into(),
            "3".into(),
            (desc.size + 1).to_string(),
            (MAX_HINTED_TAIL + 1).to_string(),
            u64::MAX.to_string(),
            "99999999999999999999999".into(),
        ] {
            let mut d = desc.clone();
            d.annotations.insert(TOC_TAIL_HINT.into(), lie.clone());
            assert_eq!(first_tail(&d), FIRST_TAIL, "{lie}");
            let (t, n) = read(&blob, &d).await;
            assert_eq!((t.unwrap().toc_offset, n), (toc_offset, 2), "{lie}");
        }
    }
}

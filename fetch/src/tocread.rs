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

/// First guess of how much of a blob's tail holds footer and TOC: most
/// layers of a refactored image have TOCs of a few KiB, and a bigger one
/// costs one more round trip, not the bandwidth of a big guess per layer.
const FIRST_TAIL: u64 = 8 * 1024;

/// How much of a `size`-byte blob's tail to read first.
fn first_tail(size: u64) -> u64 {
    FIRST_TAIL.min(size)
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
        let mut want = first_tail(desc.size);
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

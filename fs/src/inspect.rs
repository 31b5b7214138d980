//! `breakfs inspect`: an image's manifest, layers, entries, TOCs, and
//! which other tags of its repository or layout share each layer.

use std::collections::HashMap;
use std::fmt::Write;

use breakfs_fetch::Store;
use breakfs_index::{Compression, ImageRef, LayerIndex, decoder};

use crate::{Error, Result};

fn mb(b: u64) -> String {
    format!("{:.1}", b as f64 / 1e6)
}

/// The text `breakfs inspect` prints for image `r` in `store`.
pub async fn inspect(store: &Store, r: &ImageRef) -> Result<String> {
    let mut out = String::new();
    let image = store.resolve(r).await?;
    let _ = writeln!(out, "image     {r}");
    let _ = writeln!(
        out,
        "manifest  {} ({})",
        image.manifest_digest,
        image.media_type()
    );
    let _ = writeln!(
        out,
        "config    {} ({} bytes)",
        image.manifest.config.digest, image.manifest.config.size
    );
    // Which other tags share each layer.
    let mut shared: HashMap<String, Vec<String>> = Default::default();
    if let Ok(tags) = store.tags().await {
        for t in tags {
            if Some(t.as_str()) == r.tag() {
                continue;
            }
            if let Ok(other) = store.resolve(&r.with_tag(&t)).await {
                for l in other.layers() {
                    shared
                        .entry(l.digest.to_string())
                        .or_default()
                        .push(t.clone());
                }
            }
        }
    }
    let total: u64 = image.layers().iter().map(|l| l.size).sum();
    let _ = writeln!(
        out,
        "layers    {} ({} MB compressed)",
        image.layers().len(),
        mb(total)
    );
    let _ = writeln!(
        out,
        "  {:<3} {:<19} {:>10} {:>12} {:>8} {:>4}  shared with",
        "#", "digest", "MB", "uncompr. MB", "entries", "TOC"
    );
    for (i, l) in image.layers().iter().enumerate() {
        // A TOC whose chunks cannot be fetched alone is not used: mount and
        // pull read such a layer whole, and say so.
        let mut unusable = None;
        let (entries, uncompressed, toc) = match store.read_toc(l).await? {
            Some(t) => {
                let unc = l
                    .annotations
                    .get(breakfs_index::annotations::UNCOMPRESSED_SIZE)
                    .and_then(|s| s.parse::<u64>().ok());
                unusable = breakfs_fetch::lazy_chunk_locs(l, &t.layer).err();
                let toc = if unusable.is_some() { "bad" } else { "yes" };
                (t.layer.entries.len(), unc, toc)
            }
            None => {
                let bytes = store.read_blob(l).await?;
                let comp =
                    Compression::from_media_type(&l.media_type).ok_or_else(|| Error::BadImage {
                        what: format!("layer {}", l.digest),
                        reason: format!("unknown media type {}", l.media_type),
                    })?;
                let idx = LayerIndex::read(
                    decoder(comp, &bytes[..])
                        .map_err(|e| Error::io(format!("decompressing layer {}", l.digest), e))?,
                    &format!("layer {}", l.digest),
                )?;
                (idx.entries.len(), Some(idx.tar_size), "no")
            }
        };
        let mut with = shared
            .get(&l.digest.to_string())
            .cloned()
            .unwrap_or_default();
        with.sort();
        with.dedup();
        let _ = writeln!(
            out,
            "  {:<3} {:<19} {:>10} {:>12} {:>8} {:>4}  {}",
            i,
            l.digest.short(),
            mb(l.size),
            uncompressed.map(mb).unwrap_or_else(|| "?".into()),
            entries,
            toc,
            if with.is_empty() {
                "-".to_string()
            } else {
                with.join(", ")
            }
        );
        if let Some(why) = unusable {
            let _ = writeln!(out, "      TOC not used ({why}): the layer is read whole");
        }
    }
    Ok(out)
}

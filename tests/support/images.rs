//! Small hand-made images for tests: tar layers built entry by entry and
//! written into an OCI layout, including deliberately broken ones.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use sha2::{Digest as _, Sha256};

/// One tar entry to put in a test layer.
pub enum T<'a> {
    /// A directory.
    Dir(&'a str),
    /// A regular file with content and mode.
    File(&'a str, &'a [u8], u32),
    /// A symlink and its target.
    Symlink(&'a str, &'a str),
    /// A hard link to an earlier path.
    Hardlink(&'a str, &'a str),
}

fn header(path_len_ok: bool) -> tar::Header {
    let mut h = if path_len_ok {
        tar::Header::new_ustar()
    } else {
        tar::Header::new_gnu()
    };
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

/// Write a raw path into a header without the tar crate's checks, so
/// `..` and absolute paths can be produced on purpose.
fn set_raw_path(h: &mut tar::Header, path: &str) {
    let name = &mut h.as_old_mut().name;
    name.fill(0);
    name[..path.len()].copy_from_slice(path.as_bytes());
}

/// An uncompressed tar of `entries`.
pub fn tar_of(entries: &[T]) -> Vec<u8> {
    let mut out = tar_entries(entries);
    out.resize(out.len() + 1024, 0);
    out
}

/// The tar blocks of `entries`, without the end-of-archive marker (to
/// stream a big layer entry by entry). Paths longer than a header holds
/// get a GNU long-name entry first.
pub fn tar_entries(entries: &[T]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut h = header(true);
        let (path, data): (&str, &[u8]) = match e {
            T::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                (p, b"")
            }
            T::File(p, d, m) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*m);
                (p, d)
            }
            T::Symlink(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_link_name(t).expect("short link target");
                (p, b"")
            }
            T::Hardlink(p, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_link_name(t).expect("short link target");
                (p, b"")
            }
        };
        let name_field = h.as_old().name.len();
        if path.len() > name_field {
            let mut long = header(false);
            long.set_entry_type(tar::EntryType::GNULongName);
            set_raw_path(&mut long, "././@LongLink");
            long.set_size(path.len() as u64 + 1);
            long.set_cksum();
            out.extend_from_slice(long.as_bytes());
            out.extend_from_slice(path.as_bytes());
            out.push(0);
            out.resize(out.len().div_ceil(512) * 512, 0);
            set_raw_path(&mut h, &path[..name_field]);
        } else {
            set_raw_path(&mut h, path);
        }
        h.set_size(data.len() as u64);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out
}

/// Random bytes from `seed`: content that does not compress.
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut out);
    out
}

/// gzip `data` at the default level.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(data).expect("gzip to memory");
    enc.finish().expect("gzip to memory")
}

/// `sha256:HEX` of `data`.
pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn put_blob(dir: &Path, data: &[u8]) -> String {
    let d = digest(data);
    let path = dir.join("blobs/sha256").join(&d[7..]);
    std::fs::create_dir_all(path.parent().expect("blob dir")).expect("create blobs dir");
    std::fs::write(path, data).expect("write blob");
    d
}

/// Options for [`write_image`].
pub struct Layer {
    /// The uncompressed tar.
    pub tar: Vec<u8>,
    /// The blob as stored (gzip of `tar` unless broken on purpose).
    pub blob: Vec<u8>,
    /// The media type to declare.
    pub media_type: String,
    /// A digest to declare instead of the blob's (to test verification).
    pub declared_digest: Option<String>,
    /// Annotations of the layer's descriptor.
    pub annotations: BTreeMap<String, String>,
}

impl Layer {
    /// A normal gzip layer of `tar`.
    pub fn gzip(tar: Vec<u8>) -> Layer {
        let blob = gzip(&tar);
        Layer {
            tar,
            blob,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            declared_digest: None,
            annotations: BTreeMap::new(),
        }
    }
}

/// Write an image of `layers` into the OCI layout `dir` under `tag`
/// (adding to an existing layout's index).
pub fn write_image(dir: &Path, tag: &str, layers: &[Layer]) {
    write_image_with(dir, tag, layers, default_run_config());
}

/// [`write_image`] with `run` as the config's `config` object (Env,
/// Entrypoint, Cmd, ...).
pub fn write_image_with(dir: &Path, tag: &str, layers: &[Layer], run: serde_json::Value) {
    let blobs: Vec<LayerBlob> = layers
        .iter()
        .map(|l| {
            let d = put_blob(dir, &l.blob);
            LayerBlob {
                digest: l.declared_digest.clone().unwrap_or(d),
                size: l.blob.len() as u64,
                diff_id: digest(&l.tar),
                media_type: l.media_type.clone(),
                annotations: l.annotations.clone(),
            }
        })
        .collect();
    write_manifest_with(dir, tag, &blobs, run);
}

/// What a test image runs with unless it says otherwise: only a PATH.
fn default_run_config() -> serde_json::Value {
    serde_json::json!({"Env": ["PATH=/usr/bin:/bin"]})
}

/// A layer blob already in a layout, described for its manifest and config.
pub struct LayerBlob {
    /// `sha256:HEX` of the blob as declared.
    pub digest: String,
    /// Size of the blob.
    pub size: u64,
    /// `sha256:HEX` of the uncompressed tar.
    pub diff_id: String,
    /// The media type to declare.
    pub media_type: String,
    /// Annotations of the descriptor.
    pub annotations: BTreeMap<String, String>,
}

/// Stream a gzip layer too big to hold in memory into the layout `dir`:
/// `fill` writes the uncompressed tar, compressed at `level` on the way.
pub fn stream_layer(
    dir: &Path,
    level: u32,
    fill: impl FnOnce(&mut dyn std::io::Write),
) -> LayerBlob {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("create blobs dir");
    let temp = blobs.join("streaming");
    let file = std::fs::File::create(&temp).expect("create blob");
    let compressed = Hashing(std::io::BufWriter::new(file), Sha256::new(), 0);
    let mut tar = Hashing(
        GzEncoder::new(compressed, Compression::new(level)),
        Sha256::new(),
        0,
    );
    fill(&mut tar);
    let Hashing(gz, tar_hash, _) = tar;
    let Hashing(mut out, blob_hash, size) = gz.finish().expect("gzip to file");
    out.flush().expect("write blob");
    let digest = format!("sha256:{}", hex::encode(blob_hash.finalize()));
    std::fs::rename(&temp, blobs.join(&digest[7..])).expect("name blob");
    LayerBlob {
        digest,
        size,
        diff_id: format!("sha256:{}", hex::encode(tar_hash.finalize())),
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        annotations: BTreeMap::new(),
    }
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W>(W, Sha256, u64);

impl<W: std::io::Write> std::io::Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.1.update(&buf[..n]);
        self.2 += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Write an image of layer blobs already in the layout `dir` under `tag`
/// (adding to an existing layout's index).
pub fn write_manifest(dir: &Path, tag: &str, layers: &[LayerBlob]) {
    write_manifest_with(dir, tag, layers, default_run_config());
}

/// [`write_manifest`] with `run` as the config's `config` object.
pub fn write_manifest_with(dir: &Path, tag: &str, layers: &[LayerBlob], run: serde_json::Value) {
    std::fs::create_dir_all(dir).expect("layout dir");
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("oci-layout");
    let descs: Vec<_> = layers
        .iter()
        .map(|l| {
            let mut d = serde_json::json!({
                "mediaType": l.media_type,
                "digest": l.digest,
                "size": l.size,
            });
            if !l.annotations.is_empty() {
                d["annotations"] = serde_json::json!(l.annotations);
            }
            d
        })
        .collect();
    let diff_ids: Vec<_> = layers.iter().map(|l| l.diff_id.clone()).collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": layers.iter().map(|_| serde_json::json!({"created_by": "test"})).collect::<Vec<_>>(),
    })
    .to_string();
    let config_digest = put_blob(dir, config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descs,
    })
    .to_string();
    let manifest_digest = put_blob(dir, manifest.as_bytes());
    let index_path = dir.join("index.json");
    let mut index: serde_json::Value = std::fs::read(&index_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({"schemaVersion": 2, "manifests": []}));
    let list = index["manifests"].as_array_mut().expect("manifests array");
    list.retain(|m| m["annotations"]["org.opencontainers.image.ref.name"] != tag);
    list.push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest,
        "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }));
    std::fs::write(&index_path, index.to_string()).expect("index.json");
}

/// A hand-made eStargz layer of regular files: each file's tar header in
/// one gzip member, its content in the next, then the TOC member and the
/// footer. `tamper` may edit the TOC before it is written, to make it lie.
pub fn estargz_layer(
    files: &[(&str, &[u8])],
    tamper: impl FnOnce(&mut breakfs_index::Toc),
) -> Layer {
    use breakfs_index::{Toc, TocEntry, TocEntryType, footer};
    let mut blob = Vec::new();
    let mut tar = Vec::new();
    let mut toc = Toc {
        version: 1,
        entries: Vec::new(),
    };
    for (name, body) in files {
        let one = tar_of(&[T::File(name, body, 0o644)]);
        // The header block, then the content padded to 512.
        let (header, rest) = one.split_at(512);
        let content = &rest[..body.len().div_ceil(512) * 512];
        blob.extend_from_slice(&gzip(header));
        tar.extend_from_slice(header);
        let offset = blob.len() as u64;
        blob.extend_from_slice(&gzip(content));
        tar.extend_from_slice(content);
        let mut e = TocEntry::new(*name, TocEntryType::Reg);
        e.size = body.len() as u64;
        e.mode = 0o644;
        e.offset = offset;
        e.digest = digest(body);
        e.chunk_size = body.len() as u64;
        e.chunk_digest = digest(body);
        toc.entries.push(e);
    }
    tamper(&mut toc);
    let toc_offset = blob.len() as u64;
    let json = toc.to_json();
    let toc_tar = tar_of(&[T::File("stargz.index.json", &json, 0o644)]);
    blob.extend_from_slice(&gzip(&toc_tar));
    blob.extend_from_slice(&footer(toc_offset));
    tar.extend_from_slice(&toc_tar);
    Layer {
        tar,
        blob,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        declared_digest: None,
        annotations: BTreeMap::new(),
    }
}

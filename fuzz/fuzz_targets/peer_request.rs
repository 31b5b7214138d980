//! The node's peer HTTP request parsing: the `/v2/{rest}` path (repository
//! name, digest or tag), the `Range` header, the name and tag lookup of a
//! manifest, and the media type a served manifest gets.
//!
//! The input is text-like, one field a line: `REST`, the `Range` header
//! value, the blob's size in decimal (a non-number is taken as 0); the
//! whole input is also tried as a manifest body. Checked: a digest that
//! parses prints back to itself and names a store path inside the store;
//! a range lies inside the blob and follows RFC 9110; only the one name and
//! tag the node resolved finds a manifest.

#![no_main]

use std::sync::OnceLock;

use axum::http::HeaderValue;
use breakfs_fetch::ContentStore;
use breakfs_node::{V2Object, manifest_media_type, range_of, v2_object};
use breakfs_index::Digest;
use libfuzzer_sys::fuzz_target;

const NAME: &str = "library/app";
const TAG: &str = "v1";

struct Harness {
    _dir: tempfile::TempDir,
    store: ContentStore,
    manifest: Digest,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = ContentStore::open(dir.path()).expect("a store");
        let manifest = Digest::of(b"{}");
        store.put_ref(NAME, TAG, &manifest).expect("a ref");
        Harness {
            _dir: dir,
            store,
            manifest,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let mut lines = data.splitn(3, |b| *b == b'\n');
    let rest = lines.next().unwrap_or_default();
    let range = lines.next();
    let size = lines
        .next()
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);

    if let Ok(rest) = std::str::from_utf8(rest) {
        match v2_object(rest) {
            Some(V2Object::Blob { name, digest }) => {
                assert!(rest.starts_with(name) && rest.ends_with(digest));
                check_digest(h, digest);
            }
            Some(V2Object::Manifest { name, reference }) => {
                assert!(rest.starts_with(name) && rest.ends_with(reference));
                let found = h.store.lookup_ref(name, reference);
                let ours = name == NAME && reference == TAG;
                assert_eq!(found.is_some(), ours, "{name:?}:{reference:?}");
                if ours {
                    assert_eq!(found.as_ref(), Some(&h.manifest));
                }
                check_digest(h, reference);
            }
            None => assert!(!rest.contains("/blobs/") && !rest.contains("/manifests/")),
        }
    }

    if let Some(value) = range.and_then(|r| HeaderValue::from_bytes(r).ok()) {
        if let Ok(Some((start, end))) = range_of(&value, size) {
            assert!(
                start < end && end <= size,
                "{value:?} of {size}: {start}..{end}"
            );
            check_rfc9110(value.to_str().unwrap_or_default(), size, start, end);
        }
    }

    if let Some(media_type) = manifest_media_type(data) {
        let v: serde_json::Value = serde_json::from_slice(data).expect("it parsed before");
        assert!(v.get("schemaVersion").is_some());
        assert!(!media_type.is_empty() || v.get("mediaType").is_some());
    }
});

fn check_digest(h: &Harness, s: &str) {
    let Ok(d) = Digest::parse(s) else {
        return;
    };
    assert_eq!(d.to_string(), s, "a digest does not print back");
    let path = h.store.blob_path(&d);
    assert!(
        path.starts_with(h.store.root()),
        "{} escapes the store",
        path.display()
    );
    assert_eq!(path.file_name().and_then(|n| n.to_str()), Some(d.hex()));
}

/// What RFC 9110 says a single `bytes=` range of a `size`-byte
/// representation selects.
fn check_rfc9110(value: &str, size: u64, start: u64, end: u64) {
    let spec = value.strip_prefix("bytes=").expect("a bytes range");
    let (a, b) = spec.split_once('-').expect("a dash");
    let (a, b) = (a.trim(), b.trim());
    let want = match (a.parse::<u64>().ok(), b.parse::<u64>().ok()) {
        (Some(first), Some(last)) => (first, last.saturating_add(1).min(size)),
        (Some(first), None) => (first, size),
        (None, Some(suffix)) => (size.saturating_sub(suffix), size),
        (None, None) => panic!("{value:?} was accepted"),
    };
    assert_eq!((start, end), want, "{value:?} of a {size}-byte blob");
}

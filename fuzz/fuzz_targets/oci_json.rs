//! Manifest, index and image-config parsing, as a registry's or a
//! layout's bytes reach it.
//!
//! The input is parsed as a manifest or index (media type from the
//! document, and from each Content-Type a registry may send), as an image
//! config, and, when it is text, as an image reference and a platform. A
//! parsed document must serialise and parse back to itself; a config must
//! keep its layers through a rewrite.

#![no_main]

use breakfs_index::{ImageConfig, ImageRef, ManifestDoc, Platform, media_types};
use libfuzzer_sys::fuzz_target;

const CONTENT_TYPES: &[Option<&str>] = &[
    None,
    Some(media_types::OCI_MANIFEST),
    Some(media_types::OCI_INDEX),
    Some(media_types::DOCKER_MANIFEST),
    Some("application/json; charset=utf-8"),
];

fuzz_target!(|data: &[u8]| {
    for ct in CONTENT_TYPES {
        if let Ok(doc) = ManifestDoc::parse(data, *ct, "fuzz manifest") {
            check_doc(&doc);
        }
    }
    if let Ok(mut config) = ImageConfig::parse(data, "fuzz config") {
        let _ = config.diff_ids();
        let ids = [breakfs_index::Digest::of(data)];
        config.set_layers(&ids, &["fuzz".to_string()]);
        let again = ImageConfig::parse(&config.to_bytes(), "rewritten config");
        let ids_again = again.ok().and_then(|c| c.diff_ids().ok());
        assert_eq!(ids_again.as_deref(), Some(&ids[..]), "diff_ids lost");
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(r) = ImageRef::parse(s) {
            let _ = r.tag();
            let shown = r.to_string();
            let again = ImageRef::parse(&shown).map(|a| a.to_string());
            assert_eq!(again.ok().as_deref(), Some(shown.as_str()), "{s:?}");
        }
        if let Ok(p) = Platform::parse(s) {
            assert!(p.matches(&p));
        }
    }
});

fn check_doc(doc: &ManifestDoc) {
    let bytes = match doc {
        ManifestDoc::Image(m) => {
            for l in &m.layers {
                let _ = l.toc_digest();
            }
            serde_json::to_vec(m)
        }
        ManifestDoc::Index(i) => serde_json::to_vec(i),
    };
    let Ok(bytes) = bytes else {
        panic!("a parsed document does not serialise");
    };
    match ManifestDoc::parse(&bytes, None, "re-serialised manifest") {
        Ok(again) => assert_eq!(&again, doc, "the document does not round-trip"),
        Err(e) => panic!("a re-serialised document does not parse: {e}"),
    }
}

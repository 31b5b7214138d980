#![allow(clippy::unwrap_used)]

use super::*;

/// The keys of `breakfs refactor --json`: scripts read them, so a field
/// renamed or dropped must show up here.
#[test]
fn the_json_report_has_a_key_per_field() {
    let r = ImageReport {
        source: "oci:/src:v1".into(),
        dest: "oci:/dest:v1".into(),
        manifest_digest: Digest::of(b"manifest"),
        layers: 3,
        original_layers: 5,
        compressed_bytes: 10,
        original_compressed_bytes: 11,
        reused_compressed_bytes: 12,
        file_bytes: 13,
        reused_file_bytes: 14,
        bound_bytes: 15,
        duplicated_bytes: 16,
        mtime_changes: 17,
        shadowed_bytes: 18,
        uploaded_bytes: 19,
        seconds: 1.5,
    };
    let v = serde_json::to_value(&r).unwrap();
    let obj = v.as_object().unwrap();
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "bound_bytes",
            "compressed_bytes",
            "dest",
            "duplicated_bytes",
            "file_bytes",
            "layers",
            "manifest",
            "mtime_changes",
            "original_compressed_bytes",
            "original_layers",
            "reused_compressed_bytes",
            "reused_file_bytes",
            "seconds",
            "shadowed_bytes",
            "source",
            "uploaded_bytes",
        ]
    );
    assert_eq!(v["manifest"], Digest::of(b"manifest").to_string());
    assert_eq!(v["source"], "oci:/src:v1");
    assert_eq!(v["reused_file_bytes"], 14);
    assert_eq!(v["seconds"], 1.5);
}

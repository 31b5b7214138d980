#![allow(clippy::unwrap_used)]

use std::io::Write as _;

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
        stale_bought_bytes: 20,
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
            "stale_bought_bytes",
            "uploaded_bytes",
        ]
    );
    assert_eq!(v["manifest"], Digest::of(b"manifest").to_string());
    assert_eq!(v["source"], "oci:/src:v1");
    assert_eq!(v["reused_file_bytes"], 14);
    assert_eq!(v["seconds"], 1.5);
    assert_eq!(v["stale_bought_bytes"], 20);
}

/// A one-layer image `oci:DIR:tag` holding `files` (path, content), all
/// with one mtime.
fn source_image(dir: &Path, tag: &str, files: &[(&str, Vec<u8>)]) -> ImageRef {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, content) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, path, content.as_slice()).unwrap();
    }
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [Digest::of(&tar).to_string()]},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let r = ImageRef::parse(&format!("oci:{}:{tag}", dir.display())).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open(&r, &ClientOptions::default()).await.unwrap();
        let layer = Descriptor::new(
            media_types::OCI_LAYER_GZIP,
            Digest::of(&gz),
            gz.len() as u64,
        );
        let config_desc = Descriptor::new(
            media_types::OCI_CONFIG,
            Digest::of(&config),
            config.len() as u64,
        );
        store.push_blob_bytes(&layer, &gz).await.unwrap();
        store.push_blob_bytes(&config_desc, &config).await.unwrap();
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(media_types::OCI_MANIFEST.into()),
            config: config_desc,
            layers: vec![layer],
            annotations: BTreeMap::new(),
        };
        store
            .push_manifest(
                tag,
                media_types::OCI_MANIFEST,
                &serde_json::to_vec(&manifest).unwrap(),
            )
            .await
            .unwrap();
    });
    r
}

/// Pseudo-random bytes (incompressible, distinct per seed).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn refactor_into(src: &ImageRef, dest: &Path, tag: &str, work: &Path) -> ImageReport {
    let opts = RefactorOptions {
        plan: PlanOptions::default(),
        writer: WriterOptions::default(),
        client: ClientOptions::default(),
        work_dir: work.to_path_buf(),
        deltas: false,
    };
    let dest = ImageRef::parse(&format!("oci:{}:{tag}", dest.display())).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut r = rt
        .block_on(refactor(
            std::slice::from_ref(src),
            &dest,
            &opts,
            &NoProgress,
        ))
        .unwrap();
    r.pop().unwrap()
}

/// The distinct layer digests of `tags` in the layout `dir`, sorted.
fn published_digests(dir: &Path, tags: &[&str]) -> Vec<String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut out = std::collections::BTreeSet::new();
    for tag in tags {
        let r = ImageRef::parse(&format!("oci:{}:{tag}", dir.display())).unwrap();
        let image = rt.block_on(async {
            let store = Store::open(&r, &ClientOptions::default()).await.unwrap();
            store.resolve(&r).await.unwrap()
        });
        out.extend(image.layers().iter().map(|l| l.digest.to_string()));
    }
    out.into_iter().collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The destination's layer index stands for reading every layer's TOC: a
/// run that finds it, one without it and one whose index is not one (or
/// lists a layer with another size) all plan and write the same image.
#[test]
fn the_layer_index_gives_what_the_tocs_give() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let a: Vec<u8> = noise(1, 200_000);
    let b: Vec<u8> = noise(2, 300_000);
    let c: Vec<u8> = noise(3, 100_000);
    let v1 = source_image(&src, "v1", &[("a", a.clone()), ("b", b.clone())]);
    let v2 = source_image(&src, "v2", &[("a", a.clone()), ("c", c.clone())]);
    let v3 = source_image(&src, "v3", &[("a", a), ("b", b), ("c", c)]);
    let dest = tmp.path().join("dest");
    let work = tmp.path().join("work");
    refactor_into(&v1, &dest, "v1", &work);
    assert!(
        !dest.join(published::INDEX_FILE).exists(),
        "an index of an empty destination"
    );
    refactor_into(&v2, &dest, "v2", &work);
    let index = dest.join(published::INDEX_FILE);
    let text = std::fs::read_to_string(&index).unwrap();
    assert!(
        text.contains("\"a\""),
        "v1's layers are not indexed: {text}"
    );

    // v3 into copies of the destination: with the index, without it, with
    // garbage in its place, and with every layer listed at a wrong size.
    let mut reports = Vec::new();
    for (k, how) in ["kept", "removed", "garbage", "wrong size"]
        .iter()
        .enumerate()
    {
        let d = tmp.path().join(format!("dest{k}"));
        copy_dir(&dest, &d);
        let i = d.join(published::INDEX_FILE);
        match *how {
            "removed" => std::fs::remove_file(&i).unwrap(),
            "garbage" => std::fs::write(&i, b"{not json").unwrap(),
            "wrong size" => {
                let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
                for l in v["layers"].as_object_mut().unwrap().values_mut() {
                    l["size"] = serde_json::json!(1);
                }
                std::fs::write(&i, serde_json::to_vec(&v).unwrap()).unwrap();
            }
            _ => {}
        }
        let r = refactor_into(&v3, &d, "v3", &tmp.path().join(format!("work{k}")));
        // Every run leaves an index of every layer it found: v1's and v2's.
        let after: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&i).unwrap()).unwrap();
        let mut listed: Vec<String> = after["layers"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        listed.sort();
        assert_eq!(listed, published_digests(&d, &["v1", "v2"]), "{how}");
        reports.push((how, r));
    }
    let (_, first) = &reports[0];
    assert!(first.reused_file_bytes >= 500_000, "{first:?}");
    for (how, r) in &reports[1..] {
        assert_eq!(r.manifest_digest, first.manifest_digest, "{how}");
        assert_eq!(r.reused_file_bytes, first.reused_file_bytes, "{how}");
        assert_eq!(r.bound_bytes, first.bound_bytes, "{how}");
    }
    assert!(
        published_digests(&dest, &["v1", "v2"]).len() >= 2,
        "v2 wrote no layer of its own"
    );
}

//! Image I/O against real parts: OCI layouts checked with skopeo and umoci,
//! and a real `docker-registry` for pull, push, auth and corruption.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use breakfs_fetch::{ClientOptions, Error, Store};
use breakfs_index::{
    Descriptor, Digest, ImageIndex, ImageRef, Manifest, Platform, annotations, media_types,
};

use crate::support::registry::{TestRegistry, free_port};

/// A small image built in memory: one gzip layer, a config, a manifest.
struct Built {
    layer: Vec<u8>,
    layer_desc: Descriptor,
    config: Vec<u8>,
    config_desc: Descriptor,
    manifest: Vec<u8>,
    manifest_digest: Digest,
}

fn build_image(seed: &str, arch: &str) -> Built {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, mode: u32, data: &[u8], kind: tar::EntryType| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(data.len() as u64);
        h.set_cksum();
        tar.append_data(&mut h, path, data).unwrap();
    };
    add("etc/", 0o755, b"", tar::EntryType::Directory);
    add(
        "etc/hello.txt",
        0o644,
        format!("hello from {seed}\n").as_bytes(),
        tar::EntryType::Regular,
    );
    add(
        "bin/tool",
        0o755,
        format!("#!/bin/sh\necho {seed}\n").repeat(50).as_bytes(),
        tar::EntryType::Regular,
    );
    let tar_bytes = tar.into_inner().unwrap();
    let diff_id = Digest::of(&tar_bytes);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar_bytes).unwrap();
    let layer = gz.finish().unwrap();
    let layer_desc = Descriptor::new(
        media_types::OCI_LAYER_GZIP,
        Digest::of(&layer),
        layer.len() as u64,
    );
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/bin/tool"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
        "history": [{"created_by": format!("test {seed}")}],
    }))
    .unwrap();
    let config_desc = Descriptor::new(
        media_types::OCI_CONFIG,
        Digest::of(&config),
        config.len() as u64,
    );
    let manifest = serde_json::to_vec(&Manifest {
        schema_version: 2,
        media_type: Some(media_types::OCI_MANIFEST.into()),
        config: config_desc.clone(),
        layers: vec![layer_desc.clone()],
        annotations: Default::default(),
    })
    .unwrap();
    let manifest_digest = Digest::of(&manifest);
    Built {
        layer,
        layer_desc,
        config,
        config_desc,
        manifest,
        manifest_digest,
    }
}

fn opts() -> ClientOptions {
    ClientOptions {
        plain_http: true,
        // Never pick up the developer's own credentials.
        docker_config: Some(PathBuf::from("/nonexistent/breakfs-test/config.json")),
        ..ClientOptions::default()
    }
}

fn layout_ref(dir: &Path, tag: &str) -> ImageRef {
    ImageRef::parse(&format!("oci:{}:{tag}", dir.display())).unwrap()
}

/// Write `img` to the layout under `tag` through the API; the layer goes via a file.
async fn write_to_layout(dir: &Path, tag: &str, img: &Built) -> Store {
    let store = Store::open(&layout_ref(dir, tag), &opts()).await.unwrap();
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), &img.layer).unwrap();
    store
        .push_blob_file(&img.layer_desc, tmp.path())
        .await
        .unwrap();
    store
        .push_blob_bytes(&img.config_desc, &img.config)
        .await
        .unwrap();
    store
        .push_manifest(tag, media_types::OCI_MANIFEST, &img.manifest)
        .await
        .unwrap();
    store
}

fn skopeo(args: &[&str]) -> String {
    let out = Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .output()
        .expect("running skopeo (apt-get install skopeo)");
    assert!(
        out.status.success(),
        "skopeo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Push every blob of `img` from `from` and its manifest to `to`; how many blobs were uploaded.
async fn copy_image(from: &Store, to: &Store, tag: &str, img: &Built) -> usize {
    let Store::Layout(layout) = from else {
        panic!("copy_image reads from a layout");
    };
    let mut uploaded = 0;
    for desc in [&img.layer_desc, &img.config_desc] {
        if to
            .push_blob_file(desc, &layout.blob_path(&desc.digest))
            .await
            .unwrap()
        {
            uploaded += 1;
        }
    }
    let d = to
        .push_manifest(tag, media_types::OCI_MANIFEST, &img.manifest)
        .await
        .unwrap();
    assert_eq!(d, img.manifest_digest);
    uploaded
}

#[tokio::test]
async fn layout_written_by_breakfs_is_standard() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("layout");
    let v1 = build_image("v1", "amd64");
    let v2 = build_image("v2", "amd64");
    let store = write_to_layout(&dir, "v1", &v1).await;
    write_to_layout(&dir, "v2", &v2).await;

    // skopeo reads it: the layout is standard.
    let inspect = skopeo(&["inspect", &format!("oci:{}:v1", dir.display())]);
    let json: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(json["Digest"], v1.manifest_digest.to_string());
    assert_eq!(json["Layers"][0], v1.layer_desc.digest.to_string());

    // umoci unpacks it into a rootfs with our files.
    let bundle = tmp.path().join("bundle");
    let out = Command::new("umoci")
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:v1", dir.display()))
        .arg(&bundle)
        .output()
        .expect("running umoci");
    assert!(
        out.status.success(),
        "umoci unpack: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/etc/hello.txt")).unwrap(),
        "hello from v1\n"
    );

    assert_eq!(store.tags().await.unwrap(), vec!["v1", "v2"]);
    let img = store.resolve(&layout_ref(&dir, "v1")).await.unwrap();
    assert_eq!(img.manifest_digest, v1.manifest_digest);
    assert_eq!(img.config.diff_ids().unwrap().len(), 1);
    assert_eq!(img.config_bytes, v1.config);

    // Re-tagging v1 replaces its entry and keeps v2.
    let v1b = build_image("v1b", "amd64");
    write_to_layout(&dir, "v1", &v1b).await;
    assert_eq!(store.tags().await.unwrap(), vec!["v2", "v1"]);
    let img = store.resolve(&layout_ref(&dir, "v1")).await.unwrap();
    assert_eq!(img.manifest_digest, v1b.manifest_digest);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2);
    assert!(dir.join("oci-layout").is_file());
    // No temp files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());

    // Without a tag, a layout of several images names them.
    let err = store
        .resolve(&ImageRef::parse(&format!("oci:{}", dir.display())).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("v1") && err.contains("v2"), "{err}");

    // A range of a layout blob, and a pushed blob that lies about its digest.
    let r = store
        .read_range(&v1.layer_desc.digest, 10, 20)
        .await
        .unwrap();
    assert_eq!(r, v1.layer[10..30]);
    let mut lie = v1.config_desc.clone();
    lie.digest = Digest::of(b"something else");
    let err = store.push_blob_bytes(&lie, &v1.config).await.unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
}

#[tokio::test]
async fn registry_pull_and_push() {
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("layout");
    let img = build_image("reg", "amd64");
    let layout = write_to_layout(&dir, "v1", &img).await;

    // skopeo copies our layout into the registry, and we read it back.
    skopeo(&[
        "copy",
        &format!("oci:{}:v1", dir.display()),
        &reg.reference("fromskopeo:v1"),
        "--dest-tls-verify=false",
    ]);
    let r = ImageRef::parse(&reg.reference("fromskopeo:v1")).unwrap();
    let remote = Store::open(&r, &opts()).await.unwrap();
    let pulled = remote.resolve(&r).await.unwrap();
    assert_eq!(pulled.manifest.layers[0].digest, img.layer_desc.digest);
    assert_eq!(pulled.config_bytes, img.config);
    let out = tmp.path().join("out/layer.tar.gz");
    remote
        .blob_to_file(&pulled.manifest.layers[0], &out)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), img.layer);
    let got = remote
        .read_range(&img.layer_desc.digest, 5, 100)
        .await
        .unwrap();
    assert_eq!(got, img.layer[5..105]);
    let tail = remote
        .read_range(&img.layer_desc.digest, img.layer.len() as u64 - 3, 100)
        .await
        .unwrap();
    assert_eq!(tail, img.layer[img.layer.len() - 3..]);

    // Our own push: everything the first time, nothing the second.
    let r = ImageRef::parse(&reg.reference("mine:v1")).unwrap();
    let mine = Store::open(&r, &opts()).await.unwrap();
    assert!(!mine.has_blob(&img.layer_desc.digest).await.unwrap());
    assert_eq!(copy_image(&layout, &mine, "v1", &img).await, 2);
    assert_eq!(copy_image(&layout, &mine, "v2", &img).await, 0);
    assert!(mine.has_blob(&img.layer_desc.digest).await.unwrap());
    let mut tags = mine.tags().await.unwrap();
    tags.sort();
    assert_eq!(tags, vec!["v1", "v2"]);
    let back = mine.resolve(&r.with_tag("v2")).await.unwrap();
    assert_eq!(back.manifest_digest, img.manifest_digest);
    // By digest too.
    let by_digest =
        ImageRef::parse(&reg.reference(&format!("mine@{}", img.manifest_digest))).unwrap();
    assert_eq!(
        mine.resolve(&by_digest).await.unwrap().manifest_digest,
        img.manifest_digest
    );
    // skopeo reads what we pushed.
    let inspect = skopeo(&["inspect", "--tls-verify=false", &reg.reference("mine:v1")]);
    assert!(
        inspect.contains(&img.manifest_digest.to_string()),
        "{inspect}"
    );

    // A cross-repository mount uploads nothing but makes the blob appear.
    let other_ref = ImageRef::parse(&reg.reference("other:v1")).unwrap();
    let other = Store::open(&other_ref, &opts()).await.unwrap();
    let Store::Layout(l) = &layout else {
        unreachable!()
    };
    let uploaded = other
        .push_blob_file_from(
            &img.layer_desc,
            &l.blob_path(&img.layer_desc.digest),
            Some(&r),
        )
        .await
        .unwrap();
    assert!(!uploaded);
    assert!(other.has_blob(&img.layer_desc.digest).await.unwrap());

    // A chunked upload (PATCH with Content-Range) of a bigger blob.
    let big: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let big_desc = Descriptor::new(
        media_types::OCI_LAYER_TAR,
        Digest::of(&big),
        big.len() as u64,
    );
    let big_path = tmp.path().join("big");
    std::fs::write(&big_path, &big).unwrap();
    let mut chunky = Store::open(&other_ref, &opts()).await.unwrap();
    if let Store::Registry(g) = &mut chunky {
        g.set_upload_chunk_size(4096);
    }
    assert!(chunky.push_blob_file(&big_desc, &big_path).await.unwrap());
    assert_eq!(other.read_blob(&big_desc).await.unwrap(), big);
    // A file whose bytes do not match its descriptor is refused, and not stored.
    let mut liar = big_desc.clone();
    liar.digest = Digest::of(b"not it");
    let err = chunky.push_blob_file(&liar, &big_path).await.unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert!(!other.has_blob(&liar.digest).await.unwrap());

    // Missing things are NotFound, naming what.
    let err = mine
        .resolve(&r.with_tag("nope"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mine:nope") && err.contains("not found"),
        "{err}"
    );
}

#[tokio::test]
async fn docker_schema2_from_registry() {
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("layout");
    let img = build_image("d2", "amd64");
    write_to_layout(&dir, "v1", &img).await;
    skopeo(&[
        "copy",
        "--format",
        "v2s2",
        &format!("oci:{}:v1", dir.display()),
        &reg.reference("docker2:v1"),
        "--dest-tls-verify=false",
    ]);
    let r = ImageRef::parse(&reg.reference("docker2:v1")).unwrap();
    let store = Store::open(&r, &opts()).await.unwrap();
    let pulled = store.resolve(&r).await.unwrap();
    assert_eq!(pulled.media_type(), media_types::DOCKER_MANIFEST);
    assert_eq!(
        pulled.layers()[0].media_type,
        media_types::DOCKER_LAYER_GZIP
    );
    assert_eq!(
        store.read_blob(&pulled.layers()[0]).await.unwrap(),
        img.layer
    );
}

#[tokio::test]
async fn corrupt_blob_in_registry_is_detected() {
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("layout");
    let img = build_image("corrupt", "amd64");
    let layout = write_to_layout(&dir, "v1", &img).await;
    let r = ImageRef::parse(&reg.reference("bad:v1")).unwrap();
    let remote = Store::open(&r, &opts()).await.unwrap();
    copy_image(&layout, &remote, "v1", &img).await;

    let data = reg.blob_data_path(img.layer_desc.digest.hex());
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();

    let err = remote.read_blob(&img.layer_desc).await.unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains(&img.layer_desc.digest.to_string()),
        "{err}"
    );
    let dest = tmp.path().join("dl/layer");
    let err = remote
        .blob_to_file(&img.layer_desc, &dest)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert!(!dest.exists(), "a corrupt blob must not land at its path");
    let leftovers = std::fs::read_dir(tmp.path().join("dl")).unwrap().count();
    assert_eq!(leftovers, 0, "the temp file must be removed");
}

#[tokio::test]
async fn unreachable_registry_fails_fast_and_clearly() {
    let port = free_port();
    let r = ImageRef::parse(&format!("docker://127.0.0.1:{port}/x:v1")).unwrap();
    let store = Store::open(&r, &opts()).await.unwrap();
    let t0 = Instant::now();
    let err = store.resolve(&r).await.unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(msg.contains("--plain-http"), "{msg}");
}

#[tokio::test]
async fn htpasswd_registry_uses_docker_config() {
    let reg = TestRegistry::start_with_auth("alice", "s3cret");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("layout");
    let img = build_image("auth", "amd64");
    let layout = write_to_layout(&dir, "v1", &img).await;
    let r = ImageRef::parse(&reg.reference("private:v1")).unwrap();

    // No credentials: a clear refusal that says what to do.
    let anon = Store::open(&r, &opts()).await.unwrap();
    let err = anon.tags().await.unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("docker login {}", reg.host())),
        "{msg}"
    );

    let write_config = |name: &str, pass: &str| {
        let path = tmp.path().join(name);
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("alice:{pass}"));
        let cfg = serde_json::json!({"auths": {reg.host(): {"auth": auth}}});
        std::fs::write(&path, cfg.to_string()).unwrap();
        path
    };

    // Wrong password: rejected, naming the user and the file.
    let bad = ClientOptions {
        docker_config: Some(write_config("bad.json", "wrong")),
        ..opts()
    };
    let err = Store::open(&r, &bad)
        .await
        .unwrap()
        .has_blob(&img.layer_desc.digest)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("alice") && msg.contains("bad.json"), "{msg}");

    // Right password: push and pull work.
    let good = ClientOptions {
        docker_config: Some(write_config("good.json", "s3cret")),
        ..opts()
    };
    let remote = Store::open(&r, &good).await.unwrap();
    assert_eq!(copy_image(&layout, &remote, "v1", &img).await, 2);
    let pulled = remote.resolve(&r).await.unwrap();
    assert_eq!(pulled.manifest_digest, img.manifest_digest);
    assert_eq!(remote.tags().await.unwrap(), vec!["v1"]);
}

#[tokio::test]
async fn multi_platform_index() {
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("layout");
    let amd = build_image("amd", "amd64");
    let s390 = build_image("s390", "s390x");
    let layout = Store::open(&layout_ref(&dir, "multi"), &opts())
        .await
        .unwrap();
    let mut entries = Vec::new();
    for (img, plat) in [(&amd, "linux/amd64"), (&s390, "linux/s390x")] {
        layout
            .push_blob_bytes(&img.layer_desc, &img.layer)
            .await
            .unwrap();
        layout
            .push_blob_bytes(&img.config_desc, &img.config)
            .await
            .unwrap();
        let d = layout
            .push_manifest_untagged(media_types::OCI_MANIFEST, &img.manifest)
            .await
            .unwrap();
        let mut desc = Descriptor::new(media_types::OCI_MANIFEST, d, img.manifest.len() as u64);
        desc.platform = Some(Platform::parse(plat).unwrap());
        entries.push(desc);
    }
    let index = serde_json::to_vec(&ImageIndex {
        schema_version: 2,
        media_type: Some(media_types::OCI_INDEX.into()),
        manifests: entries,
        annotations: Default::default(),
    })
    .unwrap();
    layout
        .push_manifest("multi", media_types::OCI_INDEX, &index)
        .await
        .unwrap();
    // Only the index is tagged in index.json.
    assert_eq!(layout.tags().await.unwrap(), vec!["multi"]);

    let r = layout_ref(&dir, "multi");
    let img = layout.resolve(&r).await.unwrap();
    assert_eq!(img.manifest_digest, amd.manifest_digest);
    assert_eq!(img.index_digest, Some(Digest::of(&index)));

    let arm = ClientOptions {
        platform: Platform::parse("linux/arm64").unwrap(),
        ..opts()
    };
    let arm_store = Store::open(&r, &arm).await.unwrap();
    let err = arm_store.resolve(&r).await.unwrap_err();
    assert!(matches!(err, Error::NoPlatform { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("linux/arm64") && msg.contains("linux/amd64, linux/s390x"),
        "{msg}"
    );
    let s = layout
        .resolve_platform(&r, &Platform::parse("linux/s390x").unwrap())
        .await
        .unwrap();
    assert_eq!(s.manifest_digest, s390.manifest_digest);

    // skopeo sees the index, and copies all of it to the registry; we pick from it there.
    skopeo(&[
        "copy",
        "--all",
        &format!("oci:{}:multi", dir.display()),
        &reg.reference("multi:v1"),
        "--dest-tls-verify=false",
    ]);
    let rr = ImageRef::parse(&reg.reference("multi:v1")).unwrap();
    let remote = Store::open(&rr, &opts()).await.unwrap();
    let img = remote.resolve(&rr).await.unwrap();
    assert_eq!(img.manifest_digest, amd.manifest_digest);
    let s = remote
        .resolve_platform(&rr, &Platform::parse("linux/s390x").unwrap())
        .await
        .unwrap();
    assert_eq!(s.config_bytes, s390.config);
    // An index lists platforms, so the tag's entry in a layout has no ref clash.
    let idx = std::fs::read(dir.join("index.json")).unwrap();
    assert!(String::from_utf8_lossy(&idx).contains(annotations::REF_NAME));
}

//! The image corpus builder (tests/support/corpus.rs): its layouts are
//! standard OCI (skopeo reads them, umoci unpacks them), the unpacked images
//! run their app, the config layer's whiteouts, opaque directory, xattr,
//! setuid file and hardlink come through, the three builds differ as they
//! should, and a second build is a cache hit.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::corpus::{self, Build, CorpusImage, TEST_FAMILIES};

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn versions(image: &CorpusImage) -> BTreeMap<&str, &str> {
    image
        .packages
        .iter()
        .map(|(p, v)| (p.as_str(), v.as_str()))
        .collect()
}

fn get<'a>(images: &'a [CorpusImage], family: &str, build: Build) -> &'a CorpusImage {
    images
        .iter()
        .find(|i| i.family == family && i.build == build)
        .unwrap_or_else(|| panic!("no {family} {} image built", build.tag()))
}

#[test]
#[allow(clippy::unwrap_used)]
fn corpus_images_are_standard_runnable_and_cached() {
    assert!(
        is_root(),
        "this test needs root (the corpus builder and umoci unpack): run the suite as root (scripts/test.sh)"
    );
    let images = corpus::build_families(TEST_FAMILIES).unwrap();
    assert_eq!(images.len(), TEST_FAMILIES.len() * 3);

    for family in TEST_FAMILIES {
        let fam = corpus::family(family).unwrap();
        let v1 = versions(get(&images, family, Build::V1));
        let v2 = versions(get(&images, family, Build::V2));
        let point = versions(get(&images, family, Build::Point));
        assert_eq!(
            v1.len(),
            v2.len(),
            "{family}: same package set in v1 and v2"
        );
        let v1_v2 = v1.iter().filter(|(p, v)| v2[*p] != **v).count();
        assert!(
            v1_v2 > 0,
            "{family}: v2 has no package at another version than v1"
        );
        let changed: Vec<&str> = v1
            .iter()
            .filter(|(p, v)| point[*p] != **v)
            .map(|(p, _)| *p)
            .collect();
        assert!(
            fam.app_packages.iter().any(|p| changed.contains(p)),
            "{family}: point does not update the app packages: {changed:?}"
        );
        let others = changed
            .iter()
            .filter(|p| !fam.app_packages.contains(p))
            .count();
        assert!(
            others <= 3,
            "{family}: point changes {others} non-app packages"
        );

        for build in Build::ALL {
            let image = get(&images, family, build);
            assert_eq!(
                image.reference,
                format!("oci:{}:{}", image.layout.display(), build.tag())
            );
            let inspect = Command::new("skopeo")
                .args(["inspect", &image.reference])
                .output()
                .expect("skopeo is installed (apt-get install skopeo)");
            assert!(
                inspect.status.success(),
                "skopeo inspect {}: {}",
                image.reference,
                String::from_utf8_lossy(&inspect.stderr)
            );
            let info: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
            assert_eq!(info["Architecture"], "amd64");
            assert_eq!(info["Layers"].as_array().map(Vec::len), Some(4));

            let dir = tempfile::tempdir().unwrap();
            let rootfs = corpus::unpack_and_run(image, &dir.path().join("bundle"))
                .unwrap_or_else(|e| panic!("{}: {e:#}", image.reference));
            let at = |p: &str| rootfs.join(p.trim_start_matches('/'));

            for removed in &image.removed {
                assert!(
                    std::fs::symlink_metadata(at(removed)).is_err(),
                    "{}: {removed} was deleted by the config layer but is there",
                    image.reference
                );
            }
            let mut opaque: Vec<String> = std::fs::read_dir(at(&image.opaque_dir))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            opaque.sort();
            assert!(
                opaque.contains(&format!("docker-{family}.conf")),
                "{opaque:?}"
            );
            assert!(opaque.len() <= 3, "opaque dir kept lower files: {opaque:?}");

            let value = xattr::get(at(&image.xattr_path), &image.xattr_name).unwrap();
            assert_eq!(value.as_deref(), Some(image.xattr_value.as_slice()));

            let gosu = std::fs::metadata(at("/usr/local/bin/gosu")).unwrap();
            assert_eq!(gosu.mode() & 0o4777, 0o4755, "setuid helper");
            let a = std::fs::metadata(at("/docker-entrypoint.sh")).unwrap();
            let b = std::fs::metadata(at("/usr/local/bin/docker-entrypoint.sh")).unwrap();
            assert_eq!(a.ino(), b.ino(), "entrypoint hardlink");
            assert!(
                std::fs::symlink_metadata(at("/lib"))
                    .unwrap()
                    .file_type()
                    .is_symlink()
            );

            let status = std::fs::read_to_string(at("/var/lib/dpkg/status")).unwrap();
            let (app, version) = image
                .packages
                .iter()
                .find(|(p, _)| p == fam.app_packages[0])
                .unwrap();
            assert!(status.contains(&format!("Package: {app}\nStatus: install ok installed\n")));
            assert!(status.contains(&format!("Version: {version}\n")));
            let list =
                std::fs::read_to_string(at(&format!("/var/lib/dpkg/info/{app}.list"))).unwrap();
            assert!(list.starts_with("/.\n"), "{app}.list");
        }
    }

    let started = Instant::now();
    let again = corpus::build_families(TEST_FAMILIES).unwrap();
    assert!(
        again.iter().all(|i| i.cache_hit),
        "second build is a cache hit"
    );
    assert!(started.elapsed() < Duration::from_secs(120));
    let digests = |imgs: &[CorpusImage]| -> Vec<String> {
        imgs.iter().map(|i| i.manifest_digest.clone()).collect()
    };
    assert_eq!(digests(&images), digests(&again));
}

//! The planner's tests: small hand-built images, and a property over
//! random image families.

use std::collections::BTreeMap;

use breakfs_index::{Digest, Entry, EntryKind, MergedEntry, MergedView};
use proptest::prelude::*;

use super::items::{file_bytes_of, is_content};
use super::units::{P_PACKAGE, Unit, pack, pack_by_class};
use super::{LayerSource, Plan, PlanImage, PlanLayer, PlanOptions, PublishedLayer, plan};
use crate::dpkg::PackageDb;

fn file(path: &str, size: u64, content: &str, mtime: i64) -> Entry {
    let mut e = Entry::new(path, EntryKind::File);
    e.size = size;
    e.mode = 0o644;
    e.mtime = mtime;
    e.digest = Some(Digest::of(content.as_bytes()));
    e
}

fn other(path: &str, kind: EntryKind, mtime: i64) -> Entry {
    let mut e = Entry::new(path, kind);
    e.mode = 0o755;
    e.mtime = mtime;
    if kind == EntryKind::Symlink {
        e.link = "target".to_string();
    }
    e
}

fn hardlink(path: &str, primary: &Entry) -> Entry {
    Entry {
        path: path.to_string(),
        kind: EntryKind::Hardlink,
        link: primary.path.clone(),
        ..primary.clone()
    }
}

/// An image from entries (parents added as directories with `dir_mtime`)
/// and packages `(source, [paths])`.
fn image(
    name: &str,
    entries: Vec<Entry>,
    packages: &[(&str, Vec<String>)],
    dir_mtime: i64,
) -> PlanImage {
    let mut view = MergedView::default();
    for e in entries {
        let mut parent = e.path.as_str();
        while let Some((p, _)) = parent.rsplit_once('/') {
            if view.get(p).is_none() {
                view.insert(MergedEntry {
                    entry: other(p, EntryKind::Dir, dir_mtime),
                    layer: 0,
                    data_offset: 0,
                });
            }
            parent = p;
        }
        view.insert(MergedEntry {
            entry: e,
            layer: 0,
            data_offset: 0,
        });
    }
    let status: String = packages
        .iter()
        .map(|(src, _)| format!("Package: {src}\nSource: {src} (1.0)\n\n"))
        .collect();
    let lists: Vec<(String, Vec<u8>)> = packages
        .iter()
        .map(|(src, paths)| {
            let list: String = paths.iter().map(|p| format!("/{p}\n")).collect();
            (format!("{src}:amd64"), list.into_bytes())
        })
        .collect();
    let packages = PackageDb::from_dpkg(status.as_bytes(), &lists, &view);
    PlanImage {
        name: name.to_string(),
        view,
        packages,
    }
}

/// Files of package `pkg` version `ver`: `n` files of `size` bytes.
fn package(pkg: &str, ver: u32, n: usize, size: u64) -> (Vec<Entry>, (String, Vec<String>)) {
    let entries: Vec<Entry> = (0..n)
        .map(|f| {
            file(
                &format!("usr/share/{pkg}/f{f}"),
                size,
                &format!("{pkg}-{ver}-{f}"),
                1000 + ver as i64,
            )
        })
        .collect();
    let paths = entries.iter().map(|e| e.path.clone()).collect();
    (entries, (pkg.to_string(), paths))
}

fn build(name: &str, versions: &[(&str, u32)], dir_mtime: i64) -> PlanImage {
    let mut entries = vec![
        other("usr/bin", EntryKind::Dir, dir_mtime),
        other("bin", EntryKind::Symlink, dir_mtime),
        other("dev/null", EntryKind::CharDev, dir_mtime),
        other("run/fifo", EntryKind::Fifo, dir_mtime),
        file("etc/generated", 10, &format!("gen{dir_mtime}"), dir_mtime),
    ];
    let mut pkgs = Vec::new();
    for (pkg, ver) in versions {
        let (e, p) = package(pkg, *ver, 4, 1000);
        entries.extend(e);
        pkgs.push(p);
    }
    let mut owned: Vec<(&str, Vec<String>)> = Vec::new();
    for (src, paths) in &pkgs {
        owned.push((src.as_str(), paths.clone()));
    }
    image(name, entries, &owned, dir_mtime)
}

fn publish(plan: &Plan) -> Vec<PublishedLayer> {
    plan.layers
        .iter()
        .enumerate()
        .map(|(n, l)| PublishedLayer {
            id: format!("sha256:{n}"),
            entries: l.entries.clone(),
        })
        .collect()
}

/// The layers of `plan` as an eStargz reader without the TOC sees them
/// (a plain tar read): with the TOC and landmark files, which no view holds.
fn publish_with_landmarks(plan: &Plan) -> Vec<PublishedLayer> {
    let mut published = publish(plan);
    for l in &mut published {
        l.entries.push(file(".no.prefetch.landmark", 1, "\u{f}", 0));
        l.entries.push(file("stargz.index.json", 700, &l.id, 0));
    }
    published
}

fn assert_shape(plan: &Plan, opts: &PlanOptions) {
    for (i, ip) in plan.images.iter().enumerate() {
        assert!(
            ip.layers.len() <= opts.max_layers,
            "image {i}: {} layers",
            ip.layers.len()
        );
        let (top, content) = ip.layers.split_last().unwrap();
        for &l in content {
            assert!(
                plan.layers[l].entries.iter().all(|e| is_content(e.kind)),
                "content layer {} holds a non-file",
                plan.layers[l].label
            );
        }
        assert!(
            plan.layers[*top]
                .entries
                .iter()
                .all(|e| !is_content(e.kind))
        );
    }
}

#[test]
fn incremental_reuses_exactly_the_unchanged_packages() {
    let opts = PlanOptions::default();
    let v1 = build(
        "app:v1",
        &[("glibc", 1), ("openssl", 1), ("python", 1), ("zlib", 1)],
        50,
    );
    let p1 = plan(std::slice::from_ref(&v1), &[], &opts).unwrap();
    p1.check(std::slice::from_ref(&v1), &[]).unwrap();
    assert_shape(&p1, &opts);
    assert_eq!(p1.images[0].reused_bytes, 0);
    let top = &p1.layers[*p1.images[0].layers.last().unwrap()];
    assert_eq!(
        top.entries.len(),
        v1.view.len() - 17,
        "every non-file is in the top layer"
    );
    let labels: Vec<&str> = p1.layers.iter().map(|l| l.label.as_str()).collect();
    for pkg in [
        "pkg:glibc",
        "pkg:openssl",
        "pkg:python",
        "pkg:zlib",
        "dir:/",
    ] {
        assert!(labels.contains(&pkg), "{labels:?}");
    }

    let published = publish(&p1);
    let v2 = build(
        "app:v2",
        &[("glibc", 1), ("openssl", 2), ("python", 1), ("zlib", 2)],
        60,
    );
    let p2 = plan(std::slice::from_ref(&v2), &published, &opts).unwrap();
    p2.check(std::slice::from_ref(&v2), &published).unwrap();
    assert_shape(&p2, &opts);
    let ip = &p2.images[0];
    assert_eq!(ip.bound_bytes, 8000);
    assert_eq!(ip.reused_bytes, 8000);
    assert_eq!(ip.file_bytes, 16010);
    let mut reused: Vec<&str> = p2
        .layers
        .iter()
        .filter(|l| matches!(l.source, LayerSource::Reused(_)))
        .map(|l| l.label.as_str())
        .collect();
    reused.sort();
    assert_eq!(reused.len(), 2);
    for (l, pkg) in reused.iter().zip(["pkg:glibc", "pkg:python"]) {
        let LayerSource::Reused(j) = p2.layers.iter().find(|x| x.label == *l).unwrap().source
        else {
            unreachable!()
        };
        assert_eq!(p1.layers[j].label, pkg);
    }
    assert!(ip.mtime_changes.is_empty());

    // The same pair in one call: v2 reuses layers planned for v1.
    let both = [v1.clone(), v2.clone()];
    let p = plan(&both, &[], &opts).unwrap();
    p.check(&both, &[]).unwrap();
    assert_eq!(p.images[1].reused_bytes, 8000);
    assert_eq!(p.images[1].bound_bytes, 8000);
}

#[test]
fn relax_mtime_reuses_restamped_files_and_reports_it() {
    let v1 = build("app:v1", &[("glibc", 1), ("python", 1)], 50);
    let mut v2 = build("app:v2", &[("glibc", 1), ("python", 1)], 60);
    // A rebuild: same content, new mtimes on every glibc file.
    let restamped: Vec<MergedEntry> = v2
        .view
        .iter()
        .filter(|me| me.entry.path.starts_with("usr/share/glibc/"))
        .cloned()
        .collect();
    for mut me in restamped {
        me.entry.mtime += 500;
        v2.view.insert(me);
    }
    let exact = PlanOptions::default();
    let relax = PlanOptions {
        relax_mtime: true,
        ..PlanOptions::default()
    };
    for (opts, reused) in [(&exact, 4000), (&relax, 8000)] {
        let p1 = plan(std::slice::from_ref(&v1), &[], opts).unwrap();
        let published = publish(&p1);
        let p2 = plan(std::slice::from_ref(&v2), &published, opts).unwrap();
        p2.check(std::slice::from_ref(&v2), &published).unwrap();
        let ip = &p2.images[0];
        assert_eq!(ip.reused_bytes, reused);
        assert_eq!(ip.bound_bytes, reused);
        if opts.relax_mtime {
            // Four glibc files back to their v1 mtime, and the top layer of
            // v1 reused with directory mtimes from v1.
            let files: Vec<_> = ip
                .mtime_changes
                .iter()
                .filter(|c| c.0.starts_with("usr/share/glibc/"))
                .collect();
            assert_eq!(files.len(), 4);
            assert!(
                files
                    .iter()
                    .all(|(_, old, new)| *old == 1501 && *new == 1001)
            );
        } else {
            assert!(ip.mtime_changes.is_empty());
        }
    }
}

#[test]
fn hardlink_groups_stay_in_one_layer_after_their_primary() {
    let a = file("usr/lib/a", 500, "a", 1);
    let entries = vec![
        a.clone(),
        hardlink("usr/lib/b", &a),
        hardlink("opt/c", &a),
        file("usr/lib/d", 100, "d", 1),
    ];
    let img = image(
        "hl",
        entries,
        &[
            ("pa", vec!["usr/lib/a".into()]),
            ("pc", vec!["opt/c".into()]),
        ],
        5,
    );
    for joint in [false, true] {
        let opts = PlanOptions {
            joint,
            ..PlanOptions::default()
        };
        let p = plan(std::slice::from_ref(&img), &[], &opts).unwrap();
        p.check(std::slice::from_ref(&img), &[]).unwrap();
        let holder: Vec<&PlanLayer> = p
            .layers
            .iter()
            .filter(|l| l.entries.iter().any(|e| e.path == "usr/lib/a"))
            .collect();
        assert_eq!(holder.len(), 1);
        let paths: Vec<&str> = holder[0].entries.iter().map(|e| e.path.as_str()).collect();
        let pos = |x: &str| paths.iter().position(|p| *p == x).unwrap();
        assert!(pos("usr/lib/a") < pos("usr/lib/b") && pos("usr/lib/a") < pos("opt/c"));
        assert_eq!(p.images[0].file_bytes, 600);
    }
}

#[test]
fn a_mostly_current_layer_is_reused_with_its_stale_files_shadowed() {
    // One big package; v2 patches one small file and drops another.
    let mut v1_entries: Vec<Entry> = (0..10)
        .map(|f| {
            file(
                &format!("usr/share/big/f{f}"),
                10_000,
                &format!("big-{f}"),
                1000,
            )
        })
        .collect();
    v1_entries.push(file("usr/share/big/patched", 500, "old", 1000));
    v1_entries.push(file("usr/share/big/dropped", 500, "gone", 1000));
    let paths: Vec<String> = v1_entries.iter().map(|e| e.path.clone()).collect();
    let v1 = image("v1", v1_entries.clone(), &[("big", paths.clone())], 5);
    let mut v2_entries: Vec<Entry> = v1_entries
        .iter()
        .filter(|e| !e.path.ends_with("dropped"))
        .cloned()
        .collect();
    for e in &mut v2_entries {
        if e.path.ends_with("patched") {
            *e = file("usr/share/big/patched", 600, "new", 2000);
        }
    }
    let v2 = image("v2", v2_entries, &[("big", paths)], 6);
    let opts = PlanOptions::default();
    let p1 = plan(std::slice::from_ref(&v1), &[], &opts).unwrap();
    let published = publish(&p1);
    let p2 = plan(std::slice::from_ref(&v2), &published, &opts).unwrap();
    p2.check(std::slice::from_ref(&v2), &published).unwrap();
    let ip = &p2.images[0];
    assert_eq!(
        ip.reused_bytes, 100_000,
        "the ten unchanged files are reused"
    );
    assert_eq!(
        ip.shadowed_bytes, 1000,
        "the patched and dropped files are stale"
    );
    let top = &p2.layers[*ip.layers.last().unwrap()];
    assert!(
        top.entries
            .iter()
            .any(|e| e.path == "usr/share/big/.wh.dropped"),
        "the dropped file is whited out in the top layer"
    );
    let new_has_patched = ip.layers.iter().any(|&l| {
        matches!(p2.layers[l].source, LayerSource::New)
            && p2.layers[l]
                .entries
                .iter()
                .any(|e| e.path == "usr/share/big/patched" && e.size == 600)
    });
    assert!(
        new_has_patched,
        "the new version of the patched file is in a new layer"
    );
}

#[test]
fn layer_cap_holds_in_incremental_mode() {
    let pkgs: Vec<(String, u32)> = (0..30).map(|n| (format!("p{n:02}"), 1)).collect();
    let refs: Vec<(&str, u32)> = pkgs.iter().map(|(p, v)| (p.as_str(), *v)).collect();
    let img = build("many", &refs, 1);
    let opts = PlanOptions {
        max_layers: 6,
        ..PlanOptions::default()
    };
    let p = plan(std::slice::from_ref(&img), &[], &opts).unwrap();
    p.check(std::slice::from_ref(&img), &[]).unwrap();
    assert_shape(&p, &opts);
    assert_eq!(p.images[0].layers.len(), 6);
    assert_eq!(p.images[0].duplicated_bytes, 0);
}

#[test]
fn joint_mode_shares_broadest_first_and_pays_for_the_cap() {
    // Four images; every pair shares one package, each has its own.
    let names = ["a", "b", "c", "d"];
    let mut images = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut vers: Vec<(String, u32)> = vec![("common".into(), 1), (format!("own{name}"), 1)];
        for (j, other) in names.iter().enumerate() {
            if i != j {
                let (x, y) = if i < j { (name, other) } else { (other, name) };
                vers.push((format!("pair{x}{y}"), 1));
            }
        }
        let refs: Vec<(&str, u32)> = vers.iter().map(|(p, v)| (p.as_str(), *v)).collect();
        images.push(build(&format!("img:{name}"), &refs, i as i64));
    }
    let opts = PlanOptions {
        joint: true,
        ..PlanOptions::default()
    };
    let p = plan(&images, &[], &opts).unwrap();
    p.check(&images, &[]).unwrap();
    assert_shape(&p, &opts);
    for ip in &p.images {
        let users: Vec<usize> = ip.layers.iter().map(|&l| p.layers[l].users.len()).collect();
        let content = &users[..users.len() - 1];
        assert!(
            content.windows(2).all(|w| w[0] >= w[1]),
            "not broadest-first: {users:?}"
        );
        assert_eq!(content[0], 4);
        assert_eq!(ip.duplicated_bytes, 0);
    }
    // Each shared package stored once.
    let stored: u64 = p.layers.iter().map(|l| file_bytes_of(&l.entries)).sum();
    let distinct: u64 = 4000 + 4 * 4000 + 6 * 4000 + 4 * 10;
    assert_eq!(stored, distinct);

    // A cap of 4: common + own + top leave one layer for three pair groups.
    let capped = PlanOptions {
        max_layers: 4,
        ..opts.clone()
    };
    let p = plan(&images, &[], &capped).unwrap();
    p.check(&images, &[]).unwrap();
    assert_shape(&p, &capped);
    let dup: u64 = p.images.iter().map(|i| i.duplicated_bytes).sum();
    let stored: u64 = p.layers.iter().map(|l| file_bytes_of(&l.entries)).sum();
    assert!(dup > 0);
    assert_eq!(
        stored,
        distinct + dup,
        "duplicated bytes are what the cap costs"
    );
}

#[test]
fn joint_relax_keeps_the_first_images_mtime() {
    let a = image("a", vec![file("usr/x", 10, "x", 1)], &[], 1);
    let b = image("b", vec![file("usr/x", 10, "x", 2)], &[], 1);
    let opts = PlanOptions {
        joint: true,
        relax_mtime: true,
        ..PlanOptions::default()
    };
    let both = [a, b];
    let p = plan(&both, &[], &opts).unwrap();
    p.check(&both, &[]).unwrap();
    assert!(p.images[0].mtime_changes.is_empty());
    assert_eq!(p.images[1].mtime_changes, vec![("usr/x".to_string(), 2, 1)]);
    assert_eq!(
        p.layers.iter().filter(|l| l.users.len() == 2).count(),
        2,
        "the file and the identical top"
    );
}

#[test]
fn check_catches_a_wrong_plan() {
    let img = build("x", &[("glibc", 1)], 1);
    let opts = PlanOptions::default();
    let mut p = plan(std::slice::from_ref(&img), &[], &opts).unwrap();
    let l = p.images[0].layers[0];
    p.layers[l].entries.pop();
    let err = p.check(std::slice::from_ref(&img), &[]).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    assert!(
        plan(
            std::slice::from_ref(&img),
            &[],
            &PlanOptions {
                max_layers: 1,
                ..opts
            }
        )
        .is_err()
    );
}

#[test]
fn pack_keeps_big_units_alone_and_bundles_small_ones() {
    let units: Vec<Unit> = [1000u64, 900, 10, 9, 8, 7, 6, 5]
        .iter()
        .enumerate()
        .map(|(n, &bytes)| Unit {
            key: format!("u{n}"),
            members: vec![n],
            bytes,
            p: P_PACKAGE,
            class: 0,
        })
        .collect();
    let bins = pack(&units, 4);
    assert_eq!(bins.len(), 4);
    assert_eq!(bins[0], vec![0]);
    assert_eq!(bins[1], vec![1]);
    let mut all: Vec<usize> = bins.concat();
    all.sort();
    assert_eq!(all, (0..8).collect::<Vec<_>>());
}

#[test]
fn pack_by_class_keeps_classes_apart_while_the_bins_suffice() {
    // Units of class 0 (a base layer) and class 1 (the app), sizes mixed.
    let units: Vec<Unit> = [(1000u64, 0), (900, 1), (10, 0), (9, 1), (8, 0), (7, 1)]
        .iter()
        .enumerate()
        .map(|(n, &(bytes, class))| Unit {
            key: format!("u{n}"),
            members: vec![n],
            bytes,
            p: P_PACKAGE,
            class,
        })
        .collect();
    let bins = pack_by_class(&units, 4);
    assert_eq!(bins.len(), 4);
    for bin in &bins {
        assert!(
            bin.iter().all(|&u| units[u].class == units[bin[0]].class),
            "{bins:?}"
        );
    }
    let mut all: Vec<usize> = bins.concat();
    all.sort();
    assert_eq!(all, (0..6).collect::<Vec<_>>());
    // One bin cannot keep them apart.
    assert_eq!(pack_by_class(&units, 1).len(), 1);
}

#[test]
fn bins_are_stacked_base_class_first_and_least_likely_to_change_first() {
    // (bytes, class, chance of change): the app class (1) is bigger, and
    // in the base class (0) a big unowned subtree (0.5) is bigger than
    // the packages (0.1).
    let spec = [
        (5000u64, 1, P_PACKAGE),
        (4000, 0, 0.5),
        (3000, 0, P_PACKAGE),
        (2000, 0, P_PACKAGE),
        (1000, 1, 0.5),
    ];
    let units: Vec<Unit> = spec
        .iter()
        .enumerate()
        .map(|(n, &(bytes, class, p))| Unit {
            key: format!("u{n}"),
            members: vec![n],
            bytes,
            p,
            class,
        })
        .collect();
    let bins = pack_by_class(&units, 5);
    assert_eq!(bins, vec![vec![2], vec![3], vec![1], vec![0], vec![4]]);
    // Across classes too when one class must share a bin with another.
    let bins = pack(&units, 5);
    assert_eq!(bins.concat(), vec![2, 3, 1, 0, 4]);
}

/// A random family of images: a pool of files, each image takes some,
/// some files change content or mtime per image, plus hard links,
/// symlinks and fifos.
fn family() -> impl Strategy<Value = Vec<PlanImage>> {
    let pool = prop::collection::vec((0u8..6, 0u8..6, 1u64..5000, 0u8..8), 1..40);
    let per_image =
        prop::collection::vec((prop::collection::vec(any::<u8>(), 40), any::<u8>()), 1..5);
    (pool, per_image).prop_map(|(pool, imgs)| {
        imgs.iter()
            .enumerate()
            .map(|(i, (picks, seed))| {
                let mut entries = Vec::new();
                let mut owned: BTreeMap<String, Vec<String>> = BTreeMap::new();
                let mut primaries: Vec<Entry> = Vec::new();
                for (n, (d, pkg, size, how)) in pool.iter().enumerate() {
                    let pick = picks[n];
                    if pick % 4 == 0 {
                        continue;
                    }
                    let path = format!("d{d}/s{}/f{n}", n % 3);
                    let changed = pick % 5 == 0;
                    let content = if changed {
                        format!("{n}-{i}")
                    } else {
                        format!("{n}")
                    };
                    let mtime = if pick % 7 == 0 { i as i64 } else { 0 };
                    let mut e = file(&path, *size, &content, mtime);
                    if how % 3 == 0 {
                        e.mode = 0o755;
                    }
                    match how {
                        7 if !primaries.is_empty() => {
                            let p = &primaries[n % primaries.len()];
                            entries.push(hardlink(&format!("{path}.hl"), p));
                        }
                        6 => {
                            entries.push(other(&format!("{path}.ln"), EntryKind::Symlink, i as i64))
                        }
                        5 => entries.push(other(&format!("{path}.p"), EntryKind::Fifo, 0)),
                        _ => {}
                    }
                    if *pkg < 4 {
                        owned
                            .entry(format!("src{pkg}"))
                            .or_default()
                            .push(path.clone());
                    }
                    primaries.push(e.clone());
                    entries.push(e);
                }
                // Hard links must sort after their primary: rename targets canonically.
                let mut fixed = Vec::new();
                for e in entries {
                    if e.kind == EntryKind::Hardlink && e.path < e.link {
                        continue;
                    }
                    fixed.push(e);
                }
                let pk: Vec<(&str, Vec<String>)> =
                    owned.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                image(&format!("img{i}"), fixed, &pk, *seed as i64 % 3)
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn plans_rebuild_every_view(images in family(), max_layers in 2usize..8, relax in any::<bool>()) {
        for joint in [false, true] {
            let opts = PlanOptions { max_layers, relax_mtime: relax, joint, target_layer_bytes: 8000 };
            let p = plan(&images, &[], &opts).unwrap();
            prop_assert!(p.check(&images, &[]).is_ok(), "{:?}", p.check(&images, &[]).err());
            for (i, ip) in p.images.iter().enumerate() {
                prop_assert!(ip.layers.len() <= max_layers);
                prop_assert!(ip.reused_bytes <= ip.file_bytes);
                prop_assert!(
                    ip.reused_bytes <= ip.bound_bytes,
                    "image {}: reused {} bytes, bound {}", i, ip.reused_bytes, ip.bound_bytes
                );
            }
            // And incrementally on top of the first plan's layers.
            let published = publish_with_landmarks(&p);
            let inc = PlanOptions { joint: false, ..opts };
            let q = plan(&images, &published, &inc).unwrap();
            prop_assert!(q.check(&images, &published).is_ok(), "{:?}", q.check(&images, &published).err());
            for (i, ip) in q.images.iter().enumerate() {
                prop_assert!(ip.layers.len() <= max_layers);
                prop_assert!(
                    ip.reused_bytes <= ip.bound_bytes,
                    "image {}: reused {} bytes, bound {}", i, ip.reused_bytes, ip.bound_bytes
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Image 0 is the previous version of image 1; the others were
    /// published in the same destination after it. Planning image 1
    /// against the whole destination reuses at least as much as planning
    /// it against image 0's layers alone.
    #[test]
    fn a_destination_never_lowers_share_below_the_previous_version_alone(
        images in family(), relax in any::<bool>()
    ) {
        prop_assume!(images.len() >= 2);
        let opts = PlanOptions { relax_mtime: relax, target_layer_bytes: 8000, ..PlanOptions::default() };
        let own = publish(&plan(&images[..1], &[], &opts).unwrap());
        let mut all = own.clone();
        for img in &images[2..] {
            let p = plan(std::slice::from_ref(img), &all, &opts).unwrap();
            let n = all.len();
            all.extend(
                publish(&p)
                    .into_iter()
                    .zip(&p.layers)
                    .filter(|(_, l)| l.source == LayerSource::New)
                    .enumerate()
                    .map(|(k, (mut l, _))| {
                        l.id = format!("sha256:{}", n + k);
                        l
                    }),
            );
        }
        let new = std::slice::from_ref(&images[1]);
        let alone = plan(new, &own, &opts).unwrap();
        let dest = plan(new, &all, &opts).unwrap();
        prop_assert!(dest.check(new, &all).is_ok(), "{:?}", dest.check(new, &all).err());
        prop_assert!(
            dest.images[0].reused_bytes >= alone.images[0].reused_bytes,
            "against the destination {} bytes reused, against the previous version alone {}",
            dest.images[0].reused_bytes,
            alone.images[0].reused_bytes
        );
    }
}

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::Digest;
use crate::tarindex::testtar::tar_of;

fn e(path: &str, kind: EntryKind) -> Entry {
    let mut e = Entry::new(path, kind);
    e.mode = if kind == EntryKind::Dir { 0o755 } else { 0o644 };
    e
}

fn f(path: &str, content: &str) -> (Entry, Vec<u8>) {
    let mut x = e(path, EntryKind::File);
    x.size = content.len() as u64;
    x.digest = Some(Digest::of(content.as_bytes()));
    (x, content.as_bytes().to_vec())
}

fn d(path: &str) -> (Entry, Vec<u8>) {
    (e(path, EntryKind::Dir), vec![])
}

fn link(path: &str, kind: EntryKind, target: &str) -> (Entry, Vec<u8>) {
    let mut x = e(path, kind);
    x.link = target.to_string();
    (x, vec![])
}

fn layer(entries: &[(Entry, Vec<u8>)]) -> LayerIndex {
    LayerIndex::read(&tar_of(entries)[..], "layer test").unwrap()
}

fn build(layers: &[&[(Entry, Vec<u8>)]]) -> Result<MergedView> {
    let layers: Vec<LayerIndex> = layers.iter().map(|l| layer(l)).collect();
    MergedView::build(&layers)
}

fn paths(v: &MergedView) -> Vec<&str> {
    v.iter().map(|m| m.entry.path.as_str()).collect()
}

fn bad_reason(r: Result<MergedView>) -> (String, String) {
    match r {
        Err(Error::BadEntry { path, reason }) => (path, reason),
        other => panic!("expected BadEntry, got {other:?}"),
    }
}

#[test]
fn upper_wins_and_whiteouts_delete() {
    let v = build(&[
        &[
            d("a"),
            f("a/x", "1"),
            f("a/y", "2"),
            d("a/sub"),
            f("a/sub/z", "3"),
        ],
        &[f("a/x", "new"), f("a/.wh.sub", ""), f("a/.wh.y", "")],
    ])
    .unwrap();
    assert_eq!(paths(&v), ["a", "a/x"]);
    let x = v.get("a/x").unwrap();
    assert_eq!(x.entry.digest, Some(Digest::of(b"new")));
    assert_eq!(x.layer, 1);
}

#[test]
fn opaque_dir_hides_lower_keeps_same_layer() {
    // The same layer's entries survive whatever their tar order.
    let v = build(&[
        &[
            d("a"),
            f("a/old", "1"),
            d("a/d"),
            f("a/d/deep", "2"),
            f("b", "3"),
        ],
        &[f("a/new", "4"), f("a/.wh..wh..opq", ""), d("a")],
    ])
    .unwrap();
    assert_eq!(paths(&v), ["a", "a/new", "b"]);
    assert_eq!(v.get("a").unwrap().layer, 1);
}

#[test]
fn whiteout_in_layer_does_not_hit_same_layer() {
    let v = build(&[&[f("x", "1")], &[f("x", "2"), f(".wh.x", "")]]).unwrap();
    assert_eq!(v.get("x").unwrap().entry.digest, Some(Digest::of(b"2")));
}

#[test]
fn dir_replaced_by_file_and_file_by_dir() {
    let v = build(&[
        &[d("a"), f("a/x", "1"), f("b", "2")],
        &[f("a", "file now"), d("b"), f("b/inner", "3")],
    ])
    .unwrap();
    assert_eq!(paths(&v), ["a", "b", "b/inner"]);
    assert_eq!(v.get("a").unwrap().entry.kind, EntryKind::File);
    assert_eq!(v.get("b").unwrap().entry.kind, EntryKind::Dir);
}

#[test]
fn dir_over_dir_keeps_children_takes_metadata() {
    let mut upper = e("a", EntryKind::Dir);
    upper.mode = 0o700;
    upper.mtime = 99;
    let v = build(&[&[d("a"), f("a/x", "1")], &[(upper, vec![])]]).unwrap();
    assert_eq!(paths(&v), ["a", "a/x"]);
    assert_eq!(v.get("a").unwrap().entry.mode, 0o700);
    assert_eq!(v.get("a").unwrap().entry.mtime, 99);
}

#[test]
fn missing_parents_are_implicit() {
    let v = build(&[&[f("usr/bin/x", "1")]]).unwrap();
    assert_eq!(paths(&v), ["usr/bin/x"]);
}

#[test]
fn through_symlink_is_refused() {
    let (path, reason) = bad_reason(build(&[
        &[link("lib", EntryKind::Symlink, "usr/lib")],
        &[f("lib/evil.so", "x")],
    ]));
    assert_eq!(path, "lib/evil.so");
    assert!(reason.contains("symlink lib"), "{reason}");
    // Earlier in the same layer counts too.
    let (_, reason) = bad_reason(build(&[&[
        link("a", EntryKind::Symlink, "/etc"),
        f("a/b/c", "x"),
    ]]));
    assert!(reason.contains("path goes through symlink a"), "{reason}");
    // Replacing the symlink by a directory first is fine.
    let v = build(&[
        &[link("lib", EntryKind::Symlink, "usr/lib")],
        &[d("lib"), f("lib/ok.so", "x")],
    ])
    .unwrap();
    assert_eq!(paths(&v), ["lib", "lib/ok.so"]);
    // Whiteouts under a symlink are refused as well.
    assert!(
        build(&[
            &[link("lib", EntryKind::Symlink, "usr/lib")],
            &[f("lib/.wh.x", "")]
        ])
        .is_err()
    );
}

#[test]
fn hardlinks_are_canonical() {
    // The tar stored z first and linked a to it: the view names a primary.
    let v = build(&[&[
        f("z", "content"),
        link("a", EntryKind::Hardlink, "z"),
        link("m", EntryKind::Hardlink, "z"),
    ]])
    .unwrap();
    let a = v.get("a").unwrap();
    assert_eq!(a.entry.kind, EntryKind::File);
    assert_eq!(a.entry.digest, Some(Digest::of(b"content")));
    for p in ["m", "z"] {
        let m = v.get(p).unwrap();
        assert_eq!(m.entry.kind, EntryKind::Hardlink);
        assert_eq!(m.entry.link, "a");
        assert_eq!(m.entry.size, 7);
        assert_eq!(m.entry.digest, a.entry.digest);
        assert_eq!(m.data_offset, a.data_offset);
    }
    assert_eq!(
        v.hardlink_groups(),
        vec![vec!["a".to_string(), "m".to_string(), "z".to_string()]]
    );
    assert_eq!(v.file_bytes(), 7);
    // The same tree stored the other way round gives an equal view.
    let w = build(&[&[
        f("a", "content"),
        link("m", EntryKind::Hardlink, "a"),
        link("z", EntryKind::Hardlink, "a"),
    ]])
    .unwrap();
    assert!(v.diff(&w, false).is_empty(), "{:?}", v.diff(&w, false));
}

#[test]
fn hardlink_survives_deleted_or_replaced_target() {
    let v = build(&[
        &[f("orig", "data"), link("keep", EntryKind::Hardlink, "orig")],
        &[f(".wh.orig", "")],
    ])
    .unwrap();
    assert_eq!(paths(&v), ["keep"]);
    let keep = v.get("keep").unwrap();
    assert_eq!(keep.entry.kind, EntryKind::File);
    assert_eq!(keep.entry.digest, Some(Digest::of(b"data")));
    assert_eq!(keep.layer, 0);
    let v = build(&[
        &[f("orig", "data"), link("keep", EntryKind::Hardlink, "orig")],
        &[f("orig", "other")],
    ])
    .unwrap();
    assert_eq!(v.get("keep").unwrap().entry.kind, EntryKind::File);
    assert_eq!(
        v.get("keep").unwrap().entry.digest,
        Some(Digest::of(b"data"))
    );
    assert_eq!(
        v.get("orig").unwrap().entry.digest,
        Some(Digest::of(b"other"))
    );
    assert!(v.hardlink_groups().is_empty());
}

#[test]
fn hardlink_to_lower_layer_joins_the_group() {
    let v = build(&[&[f("b", "x")], &[link("a", EntryKind::Hardlink, "b")]]).unwrap();
    assert_eq!(v.get("a").unwrap().layer, 0);
    assert_eq!(v.get("b").unwrap().entry.link, "a");
}

#[test]
fn hardlink_errors() {
    let (path, reason) = bad_reason(build(&[&[link("a", EntryKind::Hardlink, "nope")]]));
    assert_eq!(path, "a");
    assert!(reason.contains("does not exist"), "{reason}");
    let (_, reason) = bad_reason(build(&[&[d("dir"), link("a", EntryKind::Hardlink, "dir")]]));
    assert!(reason.contains("directory"), "{reason}");
    // A target deleted by the same layer's whiteout is gone.
    assert!(
        build(&[
            &[f("t", "1")],
            &[f(".wh.t", ""), link("a", EntryKind::Hardlink, "t")]
        ])
        .is_err()
    );
}

#[test]
fn special_files_pass_through() {
    let mut c = e("dev/null", EntryKind::CharDev);
    c.dev_major = 1;
    c.dev_minor = 3;
    let mut b = e("dev/sda", EntryKind::BlockDev);
    b.dev_major = 8;
    let mut s = f("bin/su", "su");
    s.0.mode = 0o4755;
    let v = build(&[&[
        (c, vec![]),
        (b, vec![]),
        (e("p", EntryKind::Fifo), vec![]),
        s,
    ]])
    .unwrap();
    assert_eq!(v.get("dev/null").unwrap().entry.dev_minor, 3);
    assert_eq!(v.get("dev/sda").unwrap().entry.kind, EntryKind::BlockDev);
    assert_eq!(v.get("p").unwrap().entry.kind, EntryKind::Fifo);
    assert_eq!(v.get("bin/su").unwrap().entry.mode, 0o4755);
}

#[test]
fn diff_names_each_difference() {
    let mut a = e("x", EntryKind::File);
    a.mode = 0o755;
    a.mtime = 1;
    a.xattrs.insert("user.k".to_string(), b"v".to_vec());
    let mut b = a.clone();
    b.mode = 0o700;
    b.mtime = 2;
    b.xattrs.clear();
    let m = |e: Entry| MergedEntry {
        entry: e,
        layer: 0,
        data_offset: 0,
    };
    let left = MergedView::from_entries([m(a), m(e("only-l", EntryKind::Dir))]);
    let right = MergedView::from_entries([m(b), m(e("only-r", EntryKind::Fifo))]);
    assert_eq!(
        left.diff(&right, false),
        [
            "only-l: only in left",
            "only-r: only in right",
            "x: mode 0755 vs 0700",
            "x: mtime 1 vs 2",
            "x: xattr user.k only in left",
        ]
    );
    assert_eq!(left.diff(&right, true).len(), 4);
    assert!(left.diff(&left, false).is_empty());
}

// ---- property tests ----

/// A random coherent tree: entries in path order, every ancestor an
/// explicit directory, hard links pointing at files earlier or later.
#[derive(Debug, Clone)]
struct Tree {
    entries: Vec<(Entry, Vec<u8>)>,
}

fn tree() -> impl Strategy<Value = Tree> {
    prop::collection::vec(
        (
            prop::collection::vec(0u8..4, 1..4),
            0u8..5,
            0u32..0o10000,
            0i64..100,
            prop::collection::vec(any::<u8>(), 0..40),
            any::<prop::sample::Index>(),
        ),
        1..25,
    )
    .prop_map(|raw| {
        let names = ["a", "b", "c", "dd"];
        let mut specs: BTreeMap<String, (u8, u32, i64, Vec<u8>, prop::sample::Index)> =
            BTreeMap::new();
        for (parts, kind, mode, mtime, content, idx) in raw {
            let parts: Vec<&str> = parts.iter().map(|p| names[*p as usize]).collect();
            for i in 1..parts.len() {
                specs
                    .entry(parts[..i].join("/"))
                    .or_insert((1, 0o755, mtime, vec![], idx));
                // An ancestor must be a directory.
                if let Some(s) = specs.get_mut(&parts[..i].join("/")) {
                    s.0 = 1;
                }
            }
            let path = parts.join("/");
            let has_children = specs.keys().any(|k| k.starts_with(&format!("{path}/")));
            let kind = if has_children { 1 } else { kind };
            specs.insert(path, (kind, mode, mtime, content, idx));
        }
        let files: Vec<String> = specs
            .iter()
            .filter(|(_, s)| s.0 == 0)
            .map(|(p, _)| p.clone())
            .collect();
        let mut entries = Vec::new();
        let mut links = Vec::new();
        for (path, (kind, mode, mtime, content, idx)) in specs {
            let mut x = Entry::new(path, EntryKind::Fifo);
            x.mode = mode;
            x.mtime = mtime;
            x.uid = mode % 7;
            match kind {
                0 => {
                    x.kind = EntryKind::File;
                    x.size = content.len() as u64;
                    x.digest = Some(Digest::of(&content));
                    if content.len() % 3 == 0 {
                        x.xattrs.insert("user.t".to_string(), content.clone());
                    }
                    entries.push((x, content));
                }
                1 => {
                    x.kind = EntryKind::Dir;
                    entries.push((x, vec![]));
                }
                2 => {
                    x.kind = EntryKind::Symlink;
                    x.link = format!("target{mode}");
                    entries.push((x, vec![]));
                }
                3 if !files.is_empty() => {
                    x.kind = EntryKind::Hardlink;
                    x.link = idx.get(&files).clone();
                    links.push((x, vec![]));
                }
                _ => entries.push((x, vec![])),
            }
        }
        // Links after every file, so each target precedes its links.
        entries.extend(links);
        Tree { entries }
    })
}

fn layer_of(entries: Vec<(Entry, Vec<u8>)>) -> LayerIndex {
    LayerIndex::read(&tar_of(&entries)[..], "layer test").unwrap()
}

proptest! {
    /// Splitting a tree over layers (no whiteouts) changes nothing.
    #[test]
    fn split_layers_equal_flat(t in tree(), assign in prop::collection::vec(0usize..4, 25)) {
        let flat = MergedView::build(&[layer_of(t.entries.clone())]).unwrap();
        let n = 4;
        let mut layer_of_path: BTreeMap<String, usize> = BTreeMap::new();
        let mut split: Vec<Vec<(Entry, Vec<u8>)>> = vec![Vec::new(); n];
        for (i, (e, c)) in t.entries.iter().enumerate() {
            let mut l = assign[i % assign.len()];
            if e.kind == EntryKind::Hardlink {
                // A link needs its target in its own layer or below.
                l = l.max(layer_of_path[&e.link]);
            }
            layer_of_path.insert(e.path.clone(), l);
            split[l].push((e.clone(), c.clone()));
        }
        let layers: Vec<LayerIndex> = split.into_iter().map(layer_of).collect();
        let merged = MergedView::build(&layers).unwrap();
        let diff = flat.diff(&merged, false);
        prop_assert!(diff.is_empty(), "{:?}", diff);
        let a: Vec<&Entry> = flat.iter().map(|m| &m.entry).collect();
        let b: Vec<&Entry> = merged.iter().map(|m| &m.entry).collect();
        prop_assert_eq!(a, b);
        // Every path of the tree is there, and every member of a group
        // shares the primary's content.
        let want: BTreeSet<&str> = t.entries.iter().map(|(e, _)| e.path.as_str()).collect();
        let got: BTreeSet<&str> = merged.iter().map(|m| m.entry.path.as_str()).collect();
        prop_assert_eq!(want, got);
        for group in merged.hardlink_groups() {
            let primary = merged.get(&group[0]).unwrap();
            prop_assert_eq!(primary.entry.kind, EntryKind::File);
            for p in &group[1..] {
                let m = merged.get(p).unwrap();
                prop_assert_eq!(&m.entry.digest, &primary.entry.digest);
                prop_assert_eq!((m.layer, m.data_offset), (primary.layer, primary.data_offset));
            }
        }
    }

    /// A `.wh.X` layer removes exactly X and its subtree.
    #[test]
    fn whiteout_removes_exactly_subtree(t in tree(), pick in any::<prop::sample::Index>()) {
        let base = layer_of(t.entries.clone());
        let before = MergedView::build(std::slice::from_ref(&base)).unwrap();
        let victim = pick.get(&t.entries).0.path.clone();
        let (dir, name) = split(&victim);
        let wh = (e(&join(dir, &format!(".wh.{name}")), EntryKind::File), vec![]);
        let after = MergedView::build(&[base, layer_of(vec![wh])]).unwrap();
        let prefix = format!("{victim}/");
        let expected: BTreeSet<&str> = before
            .iter()
            .map(|m| m.entry.path.as_str())
            .filter(|p| *p != victim && !p.starts_with(&prefix))
            .collect();
        let got: BTreeSet<&str> = after.iter().map(|m| m.entry.path.as_str()).collect();
        prop_assert_eq!(expected, got);
        let in_group: BTreeSet<String> = before.hardlink_groups().into_iter().flatten().collect();
        for m in after.iter() {
            let old = before.get(&m.entry.path).unwrap();
            if in_group.contains(&m.entry.path) {
                // Its group may have lost its primary; content stays.
                prop_assert_eq!(&m.entry.digest, &old.entry.digest);
                prop_assert_eq!(m.entry.mode, old.entry.mode);
            } else {
                prop_assert_eq!(m, old);
            }
        }
    }
}

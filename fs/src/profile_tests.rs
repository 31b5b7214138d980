use super::*;
use crate::tree::{FileChunk, LayerFile};
use breakfs_index::{Entry, EntryKind};

fn layer(n: u8) -> Digest {
    Digest::of(&[n])
}

/// A file of `chunks` chunks of 100 bytes, stored one member after the
/// other in `layer` from compressed offset `at` (members of 50 bytes).
fn file(path: &str, layer: &Digest, at: u64, chunks: u64) -> LayerFile {
    let mut e = Entry::new(path, EntryKind::File);
    e.size = chunks * 100;
    e.mode = 0o644;
    let chunks = (0..chunks)
        .map(|i| {
            let digest = Digest::of(format!("{path}#{i}").as_bytes());
            let loc = ChunkLoc {
                layer: layer.clone(),
                offset: at + i * 50,
                compressed_end: at + (i + 1) * 50,
                inner_offset: 0,
                size: 100,
                digest: digest.clone(),
            };
            FileChunk::new(i * 100, 100, digest, Some(loc))
        })
        .collect();
    (e, chunks)
}

/// Two layers: `a` (3 chunks at 0..150) and `b` (2 chunks at 150..250) in
/// layer 1, `c` (1 chunk at 0..50) in layer 2.
fn tree() -> Tree {
    Tree::build(vec![
        vec![
            file("usr/a", &layer(1), 0, 3),
            file("usr/b", &layer(1), 150, 2),
        ],
        vec![file("etc/c", &layer(2), 0, 1)],
    ])
    .unwrap()
}

fn ino(t: &Tree, path: &str) -> u64 {
    t.resolve(crate::ROOT, path).unwrap()
}

fn image() -> Digest {
    Digest::of(b"manifest")
}

fn entry(layer: &Digest, offset: u64, end: u64, rank: f64) -> ProfileEntry {
    ProfileEntry {
        layer: layer.clone(),
        offset,
        end,
        path: String::new(),
        file_offset: 0,
        rank,
        seen: 1,
    }
}

fn profile(entries: Vec<ProfileEntry>) -> Profile {
    Profile {
        version: PROFILE_VERSION,
        image: image(),
        runs: 1,
        entries,
        tocs: Vec::new(),
    }
}

#[test]
fn the_recorder_keeps_first_reads_once_in_order() {
    let t = tree();
    let r = Recorder::new(&t);
    assert!(r.quiet_for().is_none());
    let (c, b) = (ino(&t, "/etc/c"), ino(&t, "/usr/b"));
    r.note(c, t.node(c).unwrap(), 0, 100);
    // Bytes 150..250 of b: its second chunk only.
    r.note(b, t.node(b).unwrap(), 150, 200);
    r.note(c, t.node(c).unwrap(), 0, 100);
    // All of b: its first chunk is new, its second was read.
    r.note(b, t.node(b).unwrap(), 0, 200);
    let run = r.run(&t);
    let got: Vec<(&str, u64)> = run
        .iter()
        .map(|e| (e.path.as_str(), e.file_offset))
        .collect();
    assert_eq!(got, [("etc/c", 0), ("usr/b", 100), ("usr/b", 0)]);
    assert_eq!((run[1].offset, run[1].end), (200, 250));
    assert!(r.quiet_for().is_some());
    r.stop();
    let a = ino(&t, "/usr/a");
    r.note(a, t.node(a).unwrap(), 0, 300);
    assert_eq!(r.len(), 3, "a stopped recorder takes no more");
}

#[test]
fn a_read_waiting_on_a_fetch_keeps_the_recording_from_going_quiet() {
    let t = tree();
    let r = Arc::new(Recorder::new(&t));
    let c = ino(&t, "/etc/c");
    r.note(c, t.node(c).unwrap(), 0, 100);
    let waiting = r.waiting();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(r.quiet_for(), Some(std::time::Duration::ZERO));
    let ended = std::time::Instant::now();
    drop(waiting);
    // Quiet counts from the wait's end, not from the first read before it
    // (ms are truncated: 1 ms of slack).
    let q = r.quiet_for().unwrap();
    assert!(
        q <= ended.elapsed() + std::time::Duration::from_millis(1),
        "{q:?}"
    );
}

#[test]
fn the_recorder_is_bounded() {
    // More chunks than a profile keeps: the log stops at the bound.
    let t = Tree::build(vec![vec![file(
        "big",
        &layer(1),
        0,
        MAX_ENTRIES as u64 + 10,
    )]])
    .unwrap();
    let r = Recorder::new(&t);
    let f = ino(&t, "/big");
    r.note(f, t.node(f).unwrap(), 0, u64::MAX);
    assert_eq!(r.len(), MAX_ENTRIES);
    assert!(r.is_stopped());
    assert_eq!(r.run(&t).len(), MAX_ENTRIES);
}

#[test]
fn a_profile_round_trips_and_runs_merge_by_mean_rank() {
    let l = layer(1);
    let one = profile(vec![entry(&l, 0, 50, 0.0), entry(&l, 50, 100, 0.5)]);
    let back = Profile::parse(&one.to_bytes(), &image()).unwrap();
    assert_eq!(back, one);
    // A second run read 100..150 first and 0..50 second, not 50..100.
    let two = profile(vec![entry(&l, 100, 150, 0.0), entry(&l, 0, 50, 0.5)]);
    let m = one.merge(&two);
    assert_eq!(m.runs, 2);
    let order: Vec<(u64, f64, u32)> = m
        .entries
        .iter()
        .map(|e| (e.offset, e.rank, e.seen))
        .collect();
    // 0..50: (0 + 0.5)/2; 100..150: (1 + 0)/2; 50..100: (0.5 + 1)/2.
    assert_eq!(order, [(0, 0.25, 2), (100, 0.5, 1), (50, 0.75, 1)]);
}

#[test]
fn merged_profiles_stay_bounded() {
    let l = layer(1);
    let big = |from: u64| {
        profile(
            (0..MAX_ENTRIES as u64)
                .map(|i| entry(&l, (from + i) * 10, (from + i) * 10 + 10, 0.5))
                .collect(),
        )
    };
    let m = big(0).merge(&big(MAX_ENTRIES as u64));
    assert_eq!(m.entries.len(), MAX_ENTRIES);
}

#[test]
fn malformed_huge_or_foreign_profiles_are_refused() {
    let img = image();
    assert!(Profile::parse(b"{not json", &img).is_err());
    assert!(Profile::parse(b"[]", &img).is_err());
    let huge = vec![b' '; MAX_PROFILE_BYTES + 1];
    assert!(Profile::parse(&huge, &img).is_err());
    let other = Profile {
        image: Digest::of(b"another image"),
        ..profile(vec![])
    };
    assert!(Profile::parse(&other.to_bytes(), &img).is_err());
    let newer = Profile {
        version: PROFILE_VERSION + 1,
        ..profile(vec![])
    };
    assert!(Profile::parse(&newer.to_bytes(), &img).is_err());
}

#[test]
fn bad_entries_are_dropped_and_the_rest_kept() {
    let img = image();
    let l = layer(1);
    let doc = serde_json::json!({
        "version": PROFILE_VERSION,
        "image": img.to_string(),
        "runs": u64::MAX,
        "entries": [
            {"layer": "sha256:nothex", "offset": 0, "end": 50},
            {"layer": l.to_string(), "offset": 50, "end": 50},
            {"layer": l.to_string(), "offset": 0, "end": 50, "rank": -7.0, "seen": 1000},
            {"layer": l.to_string(), "offset": 0, "end": 50, "rank": 0.1},
            {"layer": l.to_string(), "offset": 50, "end": 100, "rank": 9.0, "path": "x".repeat(5000)},
            {"layer": l.to_string(), "offset": 100, "end": 150, "rank": 9.0},
        ],
    });
    let p = Profile::parse(&serde_json::to_vec(&doc).unwrap(), &img).unwrap();
    assert_eq!(p.runs, MAX_RUNS);
    let kept: Vec<(u64, f64)> = p.entries.iter().map(|e| (e.offset, e.rank)).collect();
    assert_eq!(kept, [(0, 0.0), (100, 1.0)]);
    // Entries beyond the bound are dropped when read.
    let many: Vec<_> = (0..MAX_ENTRIES as u64 + 100)
        .map(|i| serde_json::json!({"layer": l.to_string(), "offset": i * 10, "end": i * 10 + 10}))
        .collect();
    let doc =
        serde_json::json!({"version": 1, "image": img.to_string(), "runs": 1, "entries": many});
    let p = Profile::parse(&serde_json::to_vec(&doc).unwrap(), &img).unwrap();
    assert_eq!(p.entries.len(), MAX_ENTRIES);
}

#[test]
fn a_plan_merges_neighbours_and_ignores_what_the_image_lacks() {
    let t = tree();
    let (l1, l2) = (layer(1), layer(2));
    let p = profile(vec![
        // c first, then b's second chunk, a's first, a's second.
        entry(&l2, 0, 50, 0.0),
        entry(&l1, 200, 250, 0.1),
        entry(&l1, 0, 50, 0.2),
        entry(&l1, 50, 100, 0.3),
        // Not in the image, or naming a member wrongly.
        entry(&layer(9), 0, 50, 0.4),
        entry(&l1, 10, 50, 0.5),
        entry(&l1, 100, 120, 0.6),
        entry(&l1, 1 << 40, (1 << 40) + 50, 0.7),
    ]);
    let plan = plan(&t, &p, 1 << 20, 0);
    assert_eq!(plan.ignored, 4);
    let runs: Vec<Vec<u64>> = plan
        .runs
        .iter()
        .map(|r| r.iter().map(|l| l.offset).collect())
        .collect();
    // Layer 2's chunk (rank 0) first; in layer 1, 0..100 is one run and
    // 200..250 (100..200 was not read) another, ranked by its best chunk.
    assert_eq!(runs, [vec![0], vec![200], vec![0, 50]]);
    assert_eq!(plan.runs[0][0].layer, l2);
    assert_eq!(plan.bytes, 200);
    // A small range bound cuts runs.
    let plan = super::plan(&t, &p, 50, 0);
    assert_eq!(plan.runs.len(), 4);
    // Gaps of up to 100 bytes joined: layer 1's chunks are one run, the
    // members in between (a's third chunk, b's first) fetched too.
    let plan = super::plan(&t, &p, 1 << 20, 100);
    let runs: Vec<Vec<u64>> = plan
        .runs
        .iter()
        .map(|r| r.iter().map(|l| l.offset).collect())
        .collect();
    assert_eq!(runs, [vec![0], vec![0, 50, 100, 150, 200]]);
    assert_eq!(plan.bytes, 300);
    // Not past the range bound.
    let plan = super::plan(&t, &p, 200, 100);
    assert_eq!(plan.runs.len(), 3);
}

#[test]
fn a_plan_stays_within_its_budget_and_skips_what_a_member_does_not_hold() {
    let t = tree();
    let l1 = layer(1);
    let layers = LayerChunks::of_tree(&t);
    let one = layers.iter().find(|l| l.layer() == &l1).unwrap();
    // Entries for 0..50 and 200..250, 150 bytes apart: a gap of 150 is
    // not joined at 100, and a budget of 100 pays for both members only.
    let p = profile(vec![entry(&l1, 0, 50, 0.0), entry(&l1, 200, 250, 0.5)]);
    let budget = AtomicU64::new(100);
    let plan = plan_layer(one, &p, 1 << 20, 100, &budget);
    assert_eq!(plan.runs.len(), 2);
    assert_eq!(plan.bytes, 100);
    assert_eq!(budget.load(Ordering::Relaxed), 0);
    // A budget that pays for the first member and not the second.
    let budget = AtomicU64::new(60);
    let plan = plan_layer(one, &p, 1 << 20, 1000, &budget);
    assert_eq!(plan.runs.len(), 1);
    assert_eq!(plan.bytes, 50);
    // A gap joined only while the budget pays for it too.
    let budget = AtomicU64::new(120);
    let plan = plan_layer(one, &p, 1 << 20, 1000, &budget);
    assert_eq!(plan.runs.len(), 2);
    let budget = AtomicU64::new(250);
    let plan = plan_layer(one, &p, 1 << 20, 1000, &budget);
    assert_eq!(plan.runs.len(), 1);
    assert_eq!(plan.bytes, 250);
    // Another layer's entries are not this layer's business.
    let p = profile(vec![entry(&layer(2), 0, 50, 0.0)]);
    let plan = plan_layer(one, &p, 1 << 20, 1000, &AtomicU64::new(1 << 20));
    assert!(plan.runs.is_empty());
    assert_eq!(plan.ignored, 0);
}

/// Where a profile says the TOCs are: kept when they could be right,
/// dropped when they cannot (a bad digest, an offset past the blob, a tail
/// too short or too long to be a TOC's, a layer said twice), bounded in
/// number, merged as a union, and given for a layer only at its size.
#[test]
fn toc_positions_are_bounded_checked_merged_and_only_a_hint() {
    let img = image();
    let (a, b, c) = (layer(1), layer(2), layer(3));
    let doc = serde_json::json!({
        "version": PROFILE_VERSION,
        "image": img.to_string(),
        "runs": 1,
        "entries": [],
        "tocs": [
            {"layer": "sha256:nothex", "offset": 0, "size": 1000},
            {"layer": a.to_string(), "offset": 900, "size": 1000},
            {"layer": a.to_string(), "offset": 500, "size": 1000},
            {"layer": b.to_string(), "offset": 2000, "size": 1000},
            {"layer": b.to_string(), "offset": 990, "size": 1000},
            {"layer": c.to_string(), "offset": 0, "size": breakfs_fetch::MAX_HINTED_TAIL + 1},
        ],
    });
    let p = Profile::parse(&serde_json::to_vec(&doc).unwrap(), &img).unwrap();
    let at = |l: &Digest, offset, size| TocAt {
        layer: l.clone(),
        offset,
        size,
    };
    assert_eq!(p.tocs, [at(&a, 900, 1000)]);
    let desc = |l: &Digest, size| {
        breakfs_index::Descriptor::new(breakfs_index::media_types::OCI_LAYER_GZIP, l.clone(), size)
    };
    assert_eq!(p.toc_tail(&desc(&a, 1000)), Some(100));
    assert_eq!(p.toc_tail(&desc(&a, 1001)), None, "another blob's size");
    assert_eq!(p.toc_tail(&desc(&b, 1000)), None);
    // A profile without positions (an older node's) reads as none.
    let old = serde_json::json!({"version": 1, "image": img.to_string(), "runs": 1, "entries": []});
    assert!(
        Profile::parse(&serde_json::to_vec(&old).unwrap(), &img)
            .unwrap()
            .tocs
            .is_empty()
    );
    // Bounded when read.
    let many: Vec<_> = (0..MAX_TOCS + 10)
        .map(|i| {
            let l = Digest::of(&(i as u64).to_le_bytes());
            serde_json::json!({"layer": l.to_string(), "offset": 10, "size": 1000})
        })
        .collect();
    let doc = serde_json::json!({"version": 1, "image": img.to_string(), "runs": 1, "entries": [], "tocs": many});
    let p = Profile::parse(&serde_json::to_vec(&doc).unwrap(), &img).unwrap();
    assert_eq!(p.tocs.len(), MAX_TOCS);
    // Merged as a union, the first profile's word kept.
    let one = Profile {
        tocs: vec![at(&a, 900, 1000)],
        ..profile(vec![])
    };
    let two = Profile {
        tocs: vec![at(&a, 800, 1000), at(&b, 700, 1000)],
        ..profile(vec![])
    };
    assert_eq!(one.merge(&two).tocs, [at(&a, 900, 1000), at(&b, 700, 1000)]);
    let round = Profile::parse(&one.merge(&two).to_bytes(), &img).unwrap();
    assert_eq!(round.tocs.len(), 2);
}

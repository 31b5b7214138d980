//! The plan's self-check: every stack rebuilds its image's merged view.

use std::collections::{BTreeMap, HashSet};

use breakfs_index::{Entry, EntryKind};

use super::items::{is_landmark, parent_of};
use super::types::{LayerSource, Plan, PlanImage, PublishedLayer};
use crate::{Error, Result};

impl Plan {
    /// Rebuild every image's merged view from its planned layers (upper
    /// wins, hard links take their primary's metadata) and compare it with
    /// the original view, mtimes as the plan reports them; also check that
    /// whiteouts hide only files of lower layers and every hard link sits
    /// after its primary in the same layer.
    pub fn check(&self, images: &[PlanImage], published: &[PublishedLayer]) -> Result<()> {
        for (i, (img, ip)) in images.iter().zip(&self.images).enumerate() {
            let mut diffs: Vec<String> = Vec::new();
            let mut expected: BTreeMap<String, Entry> = img
                .view
                .iter()
                .map(|me| (me.entry.path.clone(), me.entry.clone()))
                .collect();
            for (path, old, new) in &ip.mtime_changes {
                match expected.get_mut(path) {
                    Some(e) if e.mtime == *old => e.mtime = *new,
                    Some(e) => diffs.push(format!(
                        "{path}: reported mtime change from {old}, but the view has {}",
                        e.mtime
                    )),
                    None => diffs.push(format!(
                        "{path}: reported mtime change for a path the view lacks"
                    )),
                }
            }
            let mut rebuilt: BTreeMap<String, (usize, Entry)> = BTreeMap::new();
            for &l in &ip.layers {
                let Some(layer) = self.layers.get(l) else {
                    diffs.push(format!(
                        "stack names layer {l}, the plan has {}",
                        self.layers.len()
                    ));
                    continue;
                };
                if !layer.users.contains(&i) {
                    diffs.push(format!(
                        "layer {l} ({}) does not list the image as a user",
                        layer.label
                    ));
                }
                let entries = match layer.source {
                    LayerSource::Reused(j) => match published.get(j) {
                        Some(p) => &p.entries,
                        None => {
                            diffs.push(format!(
                                "layer {l} reuses published layer {j}, which does not exist"
                            ));
                            continue;
                        }
                    },
                    LayerSource::New => &layer.entries,
                };
                let mut here = HashSet::new();
                for e in entries {
                    if is_landmark(&e.path) {
                        continue;
                    }
                    let name = e.path.rsplit('/').next().unwrap_or(&e.path);
                    if let Some(hidden) = name.strip_prefix(".wh.") {
                        // Only a plain file of a lower layer may be hidden.
                        let dir = parent_of(&e.path);
                        let target = if dir.is_empty() {
                            hidden.to_string()
                        } else {
                            format!("{dir}/{hidden}")
                        };
                        match rebuilt.get(&target) {
                            Some((tl, t)) if *tl != l && t.kind == EntryKind::File => {
                                rebuilt.remove(&target);
                            }
                            _ => diffs.push(format!(
                                "{}: whiteout in layer {l} hides no file of a lower layer",
                                e.path
                            )),
                        }
                        continue;
                    }
                    if e.kind == EntryKind::Hardlink && !here.contains(e.link.as_str()) {
                        diffs.push(format!(
                            "{}: hard link to {:?}, which is not earlier in layer {l}",
                            e.path, e.link
                        ));
                    }
                    here.insert(e.path.as_str());
                    rebuilt.insert(e.path.clone(), (l, e.clone()));
                }
            }
            let links: Vec<(String, usize, String)> = rebuilt
                .iter()
                .filter(|(_, (_, e))| e.kind == EntryKind::Hardlink)
                .map(|(p, (l, e))| (p.clone(), *l, e.link.clone()))
                .collect();
            for (path, l, target) in links {
                let primary = match rebuilt.get(&target) {
                    Some((pl, e)) if *pl == l && e.kind == EntryKind::File => e.clone(),
                    _ => {
                        diffs.push(format!(
                            "{path}: hard link to {target:?}, not a file of the same layer"
                        ));
                        continue;
                    }
                };
                if let Some((_, e)) = rebuilt.get_mut(&path) {
                    let (p, link) = (std::mem::take(&mut e.path), std::mem::take(&mut e.link));
                    *e = Entry {
                        path: p,
                        kind: EntryKind::Hardlink,
                        link,
                        ..primary
                    };
                }
            }
            for (path, want) in &expected {
                match rebuilt.get(path) {
                    None => diffs.push(format!("{path}: missing")),
                    Some((l, got)) if got != want => diffs.push(format!(
                        "{path}: layer {l} has {got:?}, the view has {want:?}"
                    )),
                    Some(_) => {}
                }
            }
            for path in rebuilt.keys() {
                if !expected.contains_key(path) {
                    diffs.push(format!("{path}: not in the view"));
                }
            }
            if !diffs.is_empty() {
                let count = diffs.len();
                diffs.truncate(5);
                return Err(Error::PlanMismatch {
                    image: img.name.clone(),
                    count,
                    first: diffs,
                });
            }
        }
        Ok(())
    }
}

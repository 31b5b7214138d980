//! Set-up work cached outside the repository, between runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Result;

use super::harness::run;

/// `$BREAKFS_TESTBED_CACHE`, or ~/.cache/breakfs/testbed.
pub fn cache_root() -> PathBuf {
    std::env::var_os("BREAKFS_TESTBED_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/breakfs/testbed")
        })
}

/// `root/KIND-KEY` if a run finished making it.
pub fn finished_dir(kind: &str, key: &str) -> Option<PathBuf> {
    let dir = cache_root().join(format!("{kind}-{key}"));
    dir.join("done").exists().then_some(dir)
}

/// `root/KIND-KEY`, made by `build` (into a fresh directory) unless a
/// finished one is there. Keeps the newest other one of the same kind (a
/// second configuration, the test suite's or the benchmark's), drops
/// older ones.
pub fn cached_dir(
    kind: &str,
    key: &str,
    build: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    if let Some(dir) = finished_dir(kind, key) {
        return Ok(dir);
    }
    let root = cache_root();
    let dir = root.join(format!("{kind}-{key}"));
    let mut others: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{kind}-"))
        })
        .filter(|e| e.path().join("done").exists())
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    others.sort();
    others.pop();
    for (_, p) in others {
        let _ = std::fs::remove_dir_all(p);
    }
    let fresh = root.join(format!(".{kind}-{key}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&fresh);
    std::fs::create_dir_all(&fresh)?;
    if let Err(e) = build(&fresh) {
        let _ = std::fs::remove_dir_all(&fresh);
        return Err(e);
    }
    std::fs::write(fresh.join("done"), b"")?;
    // Another run may have made the same meanwhile: keep one.
    if std::fs::rename(&fresh, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&fresh);
    }
    Ok(dir)
}

/// `cp -al FROM TO` (hard links), or a real copy across file systems.
pub fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let linked = Command::new("cp")
        .arg("-al")
        .arg(from)
        .arg(to)
        .stderr(Stdio::null())
        .status()?;
    if !linked.success() {
        let _ = std::fs::remove_dir_all(to);
        run(
            Command::new("cp").arg("-a").arg(from).arg(to),
            "copying the registry storage",
        )?;
    }
    Ok(())
}

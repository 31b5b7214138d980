//! An image's start, fetched ahead: the programs its config runs
//! (`Entrypoint`, `Cmd`) and the files they load, found in the image's
//! merged tree built from its layers' TOCs alone. A lazily mounted image
//! (the containerd snapshotter's layers) can have these in the store
//! while it is still being pulled, so that its first container does not
//! wait on them one round trip at a time.

use breakfs_fetch::{Fetcher, Image};
use breakfs_index::{EntryKind, ImageConfig};
use futures::future::try_join_all;

use crate::deps::{ClosureFetched, fetch_with_dependencies};
use crate::image::{build_tree, lazy_files};
use crate::tree::{ROOT, Tree};
use crate::{Error, Result};

/// The search path of a config without `PATH` in its `Env` (Docker's).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The dynamic loader's cache of library paths.
const LOADER_CACHE: &str = "/etc/ld.so.cache";

/// What [`prefetch_start`] found and fetched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StartFetched {
    /// The programs the config starts, as found in the image.
    pub programs: Vec<String>,
    /// Those and the files they load.
    pub fetched: ClosureFetched,
}

/// The merged tree of `image` from its layers' TOCs alone (read from the
/// store, or fetched), or `None` when a layer has no TOC, or one that
/// cannot be read lazily: nothing is fetched whole for it.
pub async fn lazy_tree(image: &Image, fetcher: &Fetcher) -> Result<Option<Tree>> {
    let tocs = image.layers().iter().map(|desc| async move {
        let toc = fetcher.layer_toc(desc).await.map_err(|e| Error::BadImage {
            what: format!("layer {} of {}", desc.digest, image.reference),
            reason: breakfs_index::Causes(&e).to_string(),
        })?;
        Ok::<_, Error>(toc.and_then(|t| lazy_files(t, desc).ok()))
    });
    let Some(layers) = try_join_all(tocs)
        .await?
        .into_iter()
        .collect::<Option<Vec<_>>>()
    else {
        return Ok(None);
    };
    let tree = build_tree(image.reference.to_string(), move || Tree::build(layers)).await?;
    Ok(Some(tree))
}

/// The files `config` starts (the first word of `Entrypoint`, and of
/// `Cmd`, which an entrypoint script typically runs in turn), looked up
/// in `tree` as the runtime does: a name with a `/` from `WorkingDir`, a
/// bare name through `PATH` of `Env`. Names not found are left out.
pub fn start_programs(tree: &Tree, config: &ImageConfig) -> Vec<(String, u64)> {
    let c = config.json().get("config");
    let first = |key: &str| {
        c.and_then(|c| c.get(key))
            .and_then(|v| v.as_array())
            .and_then(|a| a.first())
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let path = c
        .and_then(|c| c.get("Env"))
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str()?.strip_prefix("PATH="))
        .next_back()
        .unwrap_or(DEFAULT_PATH)
        .to_string();
    let workdir = c
        .and_then(|c| c.get("WorkingDir"))
        .and_then(|v| v.as_str())
        .filter(|w| w.starts_with('/'))
        .unwrap_or("/")
        .to_string();
    let is_file = |ino: u64| {
        tree.node(ino)
            .is_some_and(|n| n.entry.kind == EntryKind::File)
    };
    let mut out: Vec<(String, u64)> = Vec::new();
    for name in [first("Entrypoint"), first("Cmd")].into_iter().flatten() {
        let found = if name.contains('/') {
            let full = if name.starts_with('/') {
                name.clone()
            } else {
                format!("{}/{name}", workdir.trim_end_matches('/'))
            };
            tree.resolve(ROOT, &full).filter(|&i| is_file(i))
        } else {
            path.split(':')
                .filter(|d| d.starts_with('/'))
                .find_map(|d| {
                    tree.resolve(ROOT, &format!("{}/{name}", d.trim_end_matches('/')))
                        .filter(|&i| is_file(i))
                })
        };
        if let Some(ino) = found
            && !out.iter().any(|(_, i)| *i == ino)
        {
            out.push((name, ino));
        }
    }
    out
}

/// Fetch what starting `image` reads first: the programs its config
/// starts ([`start_programs`]), the files they load and the loader's
/// cache (`/etc/ld.so.cache`), through
/// `fetcher` at on-demand priority, found in the image's merged tree
/// ([`lazy_tree`]). `None` when the image cannot be read from TOCs alone.
pub async fn prefetch_start(image: &Image, fetcher: &Fetcher) -> Result<Option<StartFetched>> {
    let Some(tree) = lazy_tree(image, fetcher).await? else {
        return Ok(None);
    };
    let programs = start_programs(&tree, &image.config);
    let mut roots: Vec<u64> = programs.iter().map(|(_, i)| *i).collect();
    // What glibc's loader reads before any library of a dynamic program.
    if !roots.is_empty()
        && let Some(cache) = tree.resolve(ROOT, LOADER_CACHE)
    {
        roots.push(cache);
    }
    let fetched = fetch_with_dependencies(&tree, fetcher, &roots).await;
    Ok(Some(StartFetched {
        programs: programs.into_iter().map(|(n, _)| n).collect(),
        fetched,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{FileChunk, LayerFile};
    use breakfs_index::{Digest, Entry};

    fn file(path: &str) -> LayerFile {
        let mut e = Entry::new(path, EntryKind::File);
        e.size = 1;
        e.mode = 0o755;
        let chunks = vec![FileChunk::new(0, 1, Digest::of(path.as_bytes()), None)];
        (e, chunks)
    }

    fn link(path: &str, to: &str) -> LayerFile {
        let mut e = Entry::new(path, EntryKind::Symlink);
        e.link = to.into();
        (e, Vec::new())
    }

    fn config(v: serde_json::Value) -> ImageConfig {
        ImageConfig::parse(&serde_json::to_vec(&v).unwrap_or_default(), "config")
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The entrypoint and the command's program, by PATH (the config's,
    /// else Docker's) or by path from the working dir, through symlinks;
    /// names the image lacks are left out.
    #[test]
    fn start_programs_are_found_as_the_runtime_finds_them() {
        let tree = Tree::build(vec![
            vec![
                file("bin/dash"),
                link("bin/sh", "dash"),
                file("usr/bin/redis-server"),
            ],
            vec![
                file("usr/local/bin/docker-entrypoint.sh"),
                file("app/run.sh"),
            ],
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let names = |c: serde_json::Value| -> Vec<(String, String)> {
            start_programs(&tree, &config(c))
                .into_iter()
                .map(|(n, i)| {
                    (
                        n,
                        tree.node(i)
                            .map(|n| n.entry.path.clone())
                            .unwrap_or_default(),
                    )
                })
                .collect()
        };
        assert_eq!(
            names(serde_json::json!({"config": {
                "Env": ["PATH=/usr/local/bin:/usr/bin"],
                "Entrypoint": ["docker-entrypoint.sh"],
                "Cmd": ["redis-server", "--version"],
            }})),
            [
                (
                    "docker-entrypoint.sh".into(),
                    "usr/local/bin/docker-entrypoint.sh".into()
                ),
                ("redis-server".into(), "usr/bin/redis-server".into()),
            ]
        );
        assert_eq!(
            names(serde_json::json!({"config": {"Cmd": ["/bin/sh", "-c", "x"]}})),
            [("/bin/sh".into(), "bin/dash".into())]
        );
        assert_eq!(
            names(serde_json::json!({"config": {"WorkingDir": "/app", "Cmd": ["./run.sh"]}})),
            [("./run.sh".into(), "app/run.sh".into())]
        );
        assert!(names(serde_json::json!({"config": {"Cmd": ["nothing-here"]}})).is_empty());
        assert!(names(serde_json::json!({})).is_empty());
    }
}

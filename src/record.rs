//! `breakfs refactor --profile CMD`: run CMD once in a source image and
//! record the order in which it first reads the image's files, so that
//! the refactored layers put those files first, before each layer's
//! eStargz prefetch landmark (docs/profiles.md).
//!
//! The image is mounted by breakfs (FUSE, recording its first reads, as a
//! node's mounts do), an overlay with a throwaway upper layer goes on top,
//! and CMD runs under the image's `/bin/sh` chrooted into it, in new mount
//! and pid namespaces with `/proc` mounted (`unshare`, as root).

use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use breakfs_fetch::{ClientOptions, ContentStore, FetchOptions};
use breakfs_fs::MountOptions;
use breakfs_index::ImageRef;
use nix::mount::{MntFlags, MsFlags};

/// PATH for CMD when the image's config sets none (Docker's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a recording gave.
pub struct Recorded {
    /// Files of the image CMD read, first read first.
    pub paths: Vec<String>,
    /// Whether CMD was still running at the time limit (a server): it was
    /// stopped, and what it read until then is the profile.
    pub timed_out: bool,
}

/// The overlay and FUSE mounts of a recording, undone when dropped.
struct Scratch {
    dir: PathBuf,
    overlay: Option<PathBuf>,
    mounted: Option<breakfs_fs::Mounted>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(m) = self.overlay.take() {
            let _ = nix::mount::umount2(&m, MntFlags::MNT_DETACH);
        }
        drop(self.mounted.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Run shell command `cmd` once in image `image` and record the files it
/// reads; `work` holds the content store the image is fetched into and a
/// scratch directory. CMD is stopped after `limit`.
pub async fn record(
    image: &ImageRef,
    client: &ClientOptions,
    cmd: &str,
    work: &Path,
    limit: Duration,
) -> Result<Recorded> {
    let store_dir = work.join("profile-store");
    let store = Arc::new(
        ContentStore::open(&store_dir)
            .with_context(|| format!("opening the content store {}", store_dir.display()))?,
    );
    let opened = breakfs_fs::open_image(image, store, client, FetchOptions::default())
        .await
        .with_context(|| format!("opening {image} to record --profile"))?;
    let env = image_env(opened.image.config.json());
    let wd = opened
        .image
        .config
        .json()
        .pointer("/config/WorkingDir")
        .and_then(|v| v.as_str())
        .filter(|s| s.starts_with('/'))
        .unwrap_or("/")
        .to_string();
    let tree = opened.tree.clone();

    let dir = work.join(format!("profile-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut scratch = Scratch {
        dir: dir.clone(),
        overlay: None,
        mounted: None,
    };
    let (lower, upper, ovl_work, root) = (
        dir.join("lower"),
        dir.join("upper"),
        dir.join("work"),
        dir.join("root"),
    );
    for d in [&lower, &upper, &ovl_work, &root] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let opts = MountOptions {
        hydrate: false,
        threads: 4,
        dependency_prefetch: false,
    };
    let mounted = breakfs_fs::mount(opened, &lower, &opts)
        .with_context(|| format!("mounting {image} to record --profile"))?;
    let recorder = mounted
        .recorder
        .clone()
        .context("the mount made to record --profile records nothing")?;
    scratch.mounted = Some(mounted);
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        ovl_work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &root,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .with_context(|| format!("mounting an overlay over {image} at {}", root.display()))?;
    scratch.overlay = Some(root.clone());

    // The image's working directory, where it has one.
    let wd = if std::fs::metadata(root.join(wd.trim_start_matches('/'))).is_ok_and(|m| m.is_dir()) {
        wd
    } else {
        "/".to_string()
    };
    if !resolves_to_file(&root, "/bin/sh") {
        bail!(
            "{image} has no /bin/sh to run the --profile command {cmd:?} with: \
             profile it with an image that has a shell"
        );
    }
    // /proc and a few devices, in the throwaway upper layer.
    std::fs::create_dir_all(root.join("proc")).context("creating /proc in the overlay")?;
    std::fs::create_dir_all(root.join("dev")).context("creating /dev in the overlay")?;
    for (name, minor) in [
        ("null", "3"),
        ("zero", "5"),
        ("random", "8"),
        ("urandom", "9"),
    ] {
        let node = root.join("dev").join(name);
        if std::fs::symlink_metadata(&node).is_err() {
            let ok = std::process::Command::new("mknod")
                .arg(&node)
                .args(["c", "1", minor])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                tracing::warn!("could not make {} for --profile", node.display());
            }
        }
    }

    let mut c = tokio::process::Command::new("unshare");
    c.args(["--mount", "--pid", "--fork", "--kill-child"])
        .arg("--mount-proc=/proc")
        .arg(format!("--root={}", root.display()))
        .arg(format!("--wd={wd}"))
        .args(["/bin/sh", "-c", cmd])
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let began = Instant::now();
    let child = c
        .spawn()
        .context("starting `unshare` to run the --profile command (util-linux; run as root)")?;
    let (timed_out, output) = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(out) => (
            false,
            Some(out.context("waiting for the --profile command")?),
        ),
        // The child is killed as the future that owned it is dropped.
        Err(_) => (true, None),
    };
    if let Some(out) = &output
        && !out.status.success()
    {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = err
            .chars()
            .rev()
            .take(2000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        bail!(
            "the --profile command {cmd:?} failed in {image} ({}): {}",
            out.status,
            tail.trim()
        );
    }
    recorder.stop();
    let paths = recorder.paths(&tree);
    tracing::debug!(
        "recorded {} files of {image} in {:.2}s",
        paths.len(),
        began.elapsed().as_secs_f64()
    );
    drop(scratch);
    if paths.is_empty() {
        bail!("the --profile command {cmd:?} read no file of {image}");
    }
    Ok(Recorded { paths, timed_out })
}

/// The environment the image's config gives its processes, with PATH and
/// HOME set when it leaves them out.
fn image_env(config: &serde_json::Value) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = config
        .pointer("/config/Env")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str()?.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in [("PATH", DEFAULT_PATH), ("HOME", "/root")] {
        if !env.iter().any(|(key, _)| key == k) {
            env.push((k.to_string(), v.to_string()));
        }
    }
    env
}

/// Whether absolute `path` names a file under `root` when its symlinks are
/// resolved inside `root` (as a chroot sees them).
fn resolves_to_file(root: &Path, path: &str) -> bool {
    let mut todo: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .rev()
        .map(String::from)
        .collect();
    let mut cur = PathBuf::new();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        match c.as_str() {
            "." => continue,
            ".." => {
                cur.pop();
                continue;
            }
            _ => {}
        }
        let next = cur.join(&c);
        let Ok(meta) = std::fs::symlink_metadata(root.join(&next)) else {
            return false;
        };
        if !meta.file_type().is_symlink() {
            cur = next;
            continue;
        }
        hops += 1;
        let Ok(target) = std::fs::read_link(root.join(&next)) else {
            return false;
        };
        if hops > 40 {
            return false;
        }
        if target.is_absolute() {
            cur = PathBuf::new();
        }
        for comp in target.components().rev() {
            if let Component::Normal(s) = comp {
                todo.push(s.to_string_lossy().into_owned());
            } else if comp == Component::ParentDir {
                todo.push("..".into());
            }
        }
    }
    std::fs::metadata(root.join(&cur)).is_ok_and(|m| m.is_file())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let d = std::env::temp_dir().join(format!("breakfs-record-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("usr/bin")).unwrap();
        std::fs::write(d.join("usr/bin/dash"), b"").unwrap();
        std::fs::create_dir_all(d.join("bin")).unwrap();
        std::os::unix::fs::symlink("/usr/bin/dash", d.join("bin/sh")).unwrap();
        std::os::unix::fs::symlink("../usr/bin/nothing", d.join("bin/bash")).unwrap();
        assert!(resolves_to_file(&d, "/bin/sh"));
        assert!(!resolves_to_file(&d, "/bin/bash"));
        assert!(!resolves_to_file(&d, "/bin/zsh"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_image_env_gets_a_path() {
        let env = image_env(&serde_json::json!({"config": {"Env": ["LANG=C.UTF-8", "PATH=/x"]}}));
        assert!(env.contains(&("PATH".into(), "/x".into())));
        assert!(env.contains(&("HOME".into(), "/root".into())));
        assert!(env.contains(&("LANG".into(), "C.UTF-8".into())));
    }
}

//! The eStargz baselines, made by the tool stargz-snapshotter's users run:
//! each original converted per layer by `ctr-remote image convert
//! --estargz --oci` (lazily pullable, no recorded workload), and by
//! `ctr-remote image optimize --oci`, which runs the image's own command
//! (entrypoint and cmd) in a container of a private containerd (runc),
//! records the files it reads, and lays them first in each layer before
//! the `.prefetch.landmark`. The conversions are cached outside the
//! repository as one OCI layout (tags `esgz-FAMILY-TAG`, `opt-FAMILY-TAG`),
//! keyed by the originals' digests and ctr-remote's version.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use sha2::{Digest as _, Sha256};

use super::cache::{cached_dir, finished_dir};
use super::containerd::{NAMESPACE, TestContainerd, output_with_timeout};
use super::corpus::CorpusImage;
use super::harness::{run, skopeo_copy};
use super::interrupt::{check_interrupt, parallel};

/// A conversion of the originals.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Conversion {
    /// `ctr-remote image convert --estargz --oci`.
    Convert,
    /// `ctr-remote image optimize --oci` (the image's command recorded).
    Optimize,
}

impl Conversion {
    /// Its repository prefix in the registry and tag prefix in the layout.
    pub fn prefix(self) -> &'static str {
        match self {
            Conversion::Convert => "esgz",
            Conversion::Optimize => "esgz-opt",
        }
    }

    const BOTH: [Conversion; 2] = [Conversion::Convert, Conversion::Optimize];
}

/// How long one conversion may take (optimize runs the image's command
/// and waits up to ctr-remote's 10 s monitoring period; gzip level 9 of a
/// few hundred MB on a loaded machine takes minutes).
const CONVERT_TIMEOUT: Duration = Duration::from_secs(1200);

/// The OCI layout holding both conversions of every image in `images`,
/// converted now unless cached; `level` is the gzip level (`None`:
/// ctr-remote's default).
pub fn converted(tmp: &Path, images: &[CorpusImage], level: Option<u32>) -> Result<PathBuf> {
    let key = &cache_key(images, level)?;
    cached_dir("estargz", key, |fresh| {
        eprintln!(
            "testbed: converting {} images with ctr-remote (convert --estargz, optimize; cached for the next run)",
            images.len()
        );
        let ctrd = TestContainerd::start()?;
        let work = tmp.join("estargz-work");
        std::fs::create_dir_all(&work)?;
        // One writer of the layout's index at a time.
        let layout = Mutex::new(fresh);
        let r = parallel(images, 2, |im| {
            convert_one(&ctrd, &work, &layout, im, level)
        });
        let _ = std::fs::remove_dir_all(&work);
        r.map(|_| ())
    })
}

/// The conversions [`converted`] would return, if an earlier run made
/// them (a run without eStargz strategies converts nothing, but fills the
/// registry as the runs with them did, and so shares their cached
/// registry).
pub fn cached(images: &[CorpusImage], level: Option<u32>) -> Option<PathBuf> {
    let key = cache_key(images, level).ok()?;
    finished_dir("estargz", &key)
}

/// The conversions' cache key: ctr-remote's version, the gzip level and
/// the originals' digests.
fn cache_key(images: &[CorpusImage], level: Option<u32>) -> Result<String> {
    let version = run(
        Command::new("ctr-remote").arg("--version"),
        "ctr-remote --version (apt-get install stargz-snapshotter)",
    )?;
    let mut key = Sha256::new();
    key.update(version.as_bytes());
    if let Some(l) = level {
        // Unset keeps the key the default conversions were cached under.
        key.update(format!("level {l}").as_bytes());
    }
    for im in images {
        key.update(im.manifest_digest.as_bytes());
    }
    Ok(hex::encode(key.finalize())[..16].to_string())
}

/// Both conversions of `im` into the layout `out`.
fn convert_one(
    ctrd: &TestContainerd,
    work: &Path,
    out: &Mutex<&Path>,
    im: &CorpusImage,
    level: Option<u32>,
) -> Result<()> {
    check_interrupt()?;
    let name = format!("{}-{}", im.family, im.tag);
    let archive = work.join(format!("{name}.tar"));
    skopeo_copy(
        &format!("oci:{}:{}", im.layout.display(), im.tag),
        &format!("oci-archive:{}:{}", archive.display(), im.tag),
    )?;
    let original = format!("localhost/orig/{}:{}", im.family, im.tag);
    ctr(
        ctrd,
        &[
            "image",
            "import",
            "--base-name",
            &format!("localhost/orig/{}", im.family),
            &archive.to_string_lossy(),
        ],
        "ctr image import",
    )?;
    std::fs::remove_file(&archive)?;
    for c in Conversion::BOTH {
        check_interrupt()?;
        let target = format!("localhost/{}/{}:{}", c.prefix(), im.family, im.tag);
        let mut args: Vec<String> = match c {
            Conversion::Convert => ["image", "convert", "--estargz", "--oci"]
                .map(String::from)
                .to_vec(),
            Conversion::Optimize => ["image", "optimize", "--oci"].map(String::from).to_vec(),
        };
        if let Some(l) = level {
            args.push(format!("--estargz-compression-level={l}"));
        }
        let mut cmd = Command::new("ctr-remote");
        cmd.arg("--address")
            .arg(ctrd.address())
            .args(["--namespace", NAMESPACE])
            .args(&args)
            .args([&original, &target]);
        let o = output_with_timeout(&mut cmd, CONVERT_TIMEOUT)?;
        ensure!(
            o.status.success(),
            "ctr-remote {args:?} {original} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let exported = work.join(format!("{}-{name}.tar", c.prefix()));
        ctr(
            ctrd,
            &[
                "image",
                "export",
                "--platform",
                "linux/amd64",
                &exported.to_string_lossy(),
                &target,
            ],
            "ctr image export",
        )?;
        {
            let out = out.lock().unwrap();
            skopeo_copy(
                &format!("oci-archive:{}", exported.display()),
                &format!("oci:{}:{}-{name}", out.display(), c.prefix()),
            )?;
        }
        std::fs::remove_file(&exported)?;
        ctr(ctrd, &["image", "rm", &target], "ctr image rm")?;
    }
    ctr(ctrd, &["image", "rm", &original], "ctr image rm")?;
    Ok(())
}

fn ctr(ctrd: &TestContainerd, args: &[&str], what: &str) -> Result<()> {
    ctrd.ctr_checked(args, CONVERT_TIMEOUT)
        .with_context(|| what.to_string())?;
    Ok(())
}

/// Push both conversions of every image from `layout` to the registry at
/// `reference(REPO:TAG)` as `esgz/FAMILY:TAG` and `esgz-opt/FAMILY:TAG`.
pub fn push(
    layout: &Path,
    images: &[CorpusImage],
    reference: impl Fn(&str) -> String,
) -> Result<()> {
    for im in images {
        for c in Conversion::BOTH {
            check_interrupt()?;
            skopeo_copy(
                &format!(
                    "oci:{}:{}-{}-{}",
                    layout.display(),
                    c.prefix(),
                    im.family,
                    im.tag
                ),
                &reference(&format!("{}/{}:{}", c.prefix(), im.family, im.tag)),
            )?;
        }
    }
    Ok(())
}

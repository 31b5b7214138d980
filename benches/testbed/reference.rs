//! Honesty: sampled content hashes of each original image, which every
//! deployment's rootfs must match.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use sha2::{Digest as _, Sha256};

use super::cache::cache_root;
use super::corpus::CorpusImage;
use super::harness::{Env, run};

/// Paths and hashes of sampled regular files of the unpacked original.
pub struct Reference {
    files: Vec<(PathBuf, String)>,
}

pub fn sha256_file(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The reference hashes of `image`, cached by its manifest digest.
pub fn reference(env: &Env, image: &CorpusImage, samples: usize) -> Result<Reference> {
    let cached = cache_root().join("refs").join(format!(
        "{}-{samples}.txt",
        image.manifest_digest.trim_start_matches("sha256:")
    ));
    if let Ok(text) = std::fs::read_to_string(&cached) {
        let files: Vec<(PathBuf, String)> = text
            .lines()
            .filter_map(|l| l.split_once("  "))
            .map(|(h, p)| (PathBuf::from(p), h.to_string()))
            .collect();
        if !files.is_empty() {
            return Ok(Reference { files });
        }
    }
    let r = unpack_reference(env, image, samples)?;
    if let Some(d) = cached.parent() {
        std::fs::create_dir_all(d)?;
    }
    let text: String = r
        .files
        .iter()
        .map(|(p, h)| format!("{h}  {}\n", p.display()))
        .collect();
    let partial = cached.with_extension("partial");
    std::fs::write(&partial, text)?;
    std::fs::rename(&partial, &cached)?;
    Ok(r)
}

fn unpack_reference(env: &Env, image: &CorpusImage, samples: usize) -> Result<Reference> {
    let dir = env.tmp.join(format!("ref-{}-{}", image.family, image.tag));
    run(
        Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:{}", image.layout.display(), image.tag))
            .arg(&dir),
        "umoci unpack of the original",
    )?;
    let rootfs = dir.join("rootfs");
    let mut all = Vec::new();
    let mut stack = vec![rootfs.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                all.push(e.path());
            }
        }
    }
    all.sort();
    // Every k-th file, and the biggest ones.
    let step = (all.len() / samples.max(1)).max(1);
    let mut chosen: Vec<PathBuf> = all.iter().step_by(step).cloned().collect();
    let mut by_size = all.clone();
    by_size.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)));
    chosen.extend(by_size.into_iter().take(3));
    chosen.sort();
    chosen.dedup();
    let files = chosen
        .into_iter()
        .map(|p| {
            let h = sha256_file(&p)?;
            Ok((p.strip_prefix(&rootfs)?.to_path_buf(), h))
        })
        .collect::<Result<_>>()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Reference { files })
}

pub fn verify(rootfs: &Path, r: &Reference, what: &str) -> Result<()> {
    for (p, want) in &r.files {
        let got =
            sha256_file(&rootfs.join(p)).with_context(|| format!("{what}: /{}", p.display()))?;
        ensure!(
            got == *want,
            "{what}: /{} differs from the original image (sha256 {got}, want {want})",
            p.display()
        );
    }
    Ok(())
}

//! Builds the image corpus (tests/support/corpus.rs) into the cache and
//! prints where it is: `cargo bench --bench corpus -- [FAMILY...|all] [--check]`.
//! `--check` also unpacks every image with umoci and runs its command in a
//! chroot (needs root).

#[path = "../tests/support/corpus.rs"]
mod corpus;

use std::collections::BTreeMap;
use std::process::ExitCode;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("corpus: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let mut names = Vec::new();
    let mut check = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--bench" => {}
            "--check" => check = true,
            "all" => names.extend(corpus::FAMILIES.iter().map(|f| f.name)),
            other if other.starts_with('-') => {}
            other => names.push(corpus::family(other)?.name),
        }
    }
    if names.is_empty() {
        names.extend(corpus::TEST_FAMILIES.iter().copied());
    }
    println!("corpus cache: {}", corpus::cache_dir().display());
    println!(
        "{:<9} {:<6} {:>5} {:>5} {:>5} {:>5} {:>10} {:>9} {:>7} {:>7}  reference",
        "family", "build", "pkgs", "base", "deps", "app", "tar MB", "gz MB", "Δv1", "secs"
    );
    for name in names {
        let images = corpus::build_family(name)?;
        let v1: BTreeMap<&str, &str> = images
            .iter()
            .find(|i| i.build == corpus::Build::V1)
            .map(|i| {
                i.packages
                    .iter()
                    .map(|(p, v)| (p.as_str(), v.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        for image in &images {
            let differ = image
                .packages
                .iter()
                .filter(|(p, v)| v1.get(p.as_str()) != Some(&v.as_str()))
                .count();
            let pk = |n: usize| image.layers.get(n).map(|l| l.packages).unwrap_or(0);
            println!(
                "{:<9} {:<6} {:>5} {:>5} {:>5} {:>5} {:>10.1} {:>9.1} {:>7} {:>7.0}  {}",
                image.family,
                image.tag,
                image.packages.len(),
                pk(0),
                pk(1),
                pk(2),
                image.uncompressed_size() as f64 / 1e6,
                image.compressed_size() as f64 / 1e6,
                differ,
                image.build_seconds,
                image.reference
            );
            if check {
                let dir = tempfile::tempdir()?;
                corpus::unpack_and_run(image, &dir.path().join("bundle"))?;
                println!("          {:?} runs", image.command);
            }
        }
    }
    Ok(())
}

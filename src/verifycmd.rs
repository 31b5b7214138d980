//! `breakfs verify`: check a content store end to end.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Args)]
pub struct VerifyArgs {
    /// The content store: a node's --cache (/var/lib/breakfs/store by
    /// default there) or a mount's (~/.cache/breakfs/store).
    #[arg(long, value_name = "DIR")]
    cache: PathBuf,
    /// Remove what is corrupt, and what killed processes left over, so
    /// that it is fetched again when needed.
    #[arg(long)]
    repair: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run_verify(a: VerifyArgs) -> Result<()> {
    if !a.cache.join("blobs/sha256").is_dir() {
        bail!(
            "{} is not a breakfs content store (it has no blobs/sha256): give a store's \
             directory with --cache, like a node's /var/lib/breakfs/store",
            a.cache.display()
        );
    }
    let (cache, repair) = (a.cache.clone(), a.repair);
    let report = tokio::task::spawn_blocking(move || breakfs_fetch::verify_store(&cache, repair))
        .await?
        .with_context(|| format!("verifying the content store {}", a.cache.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    let left = report.corrupt_remaining();
    if left > 0 {
        bail!(
            "{left} corrupt {} in {}; run `breakfs verify --repair --cache {}` to remove them",
            if left == 1 { "entry" } else { "entries" },
            a.cache.display(),
            a.cache.display()
        );
    }
    Ok(())
}

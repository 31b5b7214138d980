//! Resolving an image through a node's fetch chain: the manifest from its
//! registry or layout, the config through the chain (a peer may hold it),
//! the blobs announced to the cloud source so that it knows where they live.

use std::sync::Arc;

use breakfs_index::{Descriptor, ImageRef};

use crate::{ClientOptions, CloudSource, Fetcher, Image, Result, Store};

/// Resolve `r` through `fetcher` (config through the chain), announce its
/// blobs to `cloud` and keep its manifest in the store.
pub async fn resolve_image(
    r: &ImageRef,
    client: &ClientOptions,
    fetcher: &Fetcher,
    cloud: &Arc<CloudSource>,
) -> Result<Image> {
    let source = Store::open(r, client).await?;
    let load_config = {
        let (fetcher, cloud, source) = (fetcher.clone(), cloud.clone(), source.clone());
        move |desc: Descriptor| -> futures::future::BoxFuture<'static, Result<Vec<u8>>> {
            cloud.announce(&source, [&desc.digest]);
            let fetcher = fetcher.clone();
            Box::pin(async move { fetcher.small_blob(&desc).await })
        }
    };
    let image = source
        .resolve_with(r, source.platform(), Some(&load_config))
        .await?;
    let name = match &source {
        Store::Registry(_) => "cloud",
        Store::Layout(_) => "layout",
    };
    fetcher.record_transfer(name, image.manifest_bytes.len() as u64);
    cloud.announce(&source, image.layers().iter().map(|l| &l.digest));
    image.keep_in(fetcher.store())?;
    Ok(image)
}

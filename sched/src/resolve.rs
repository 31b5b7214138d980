//! Image resolution: a pod's image reference made into its layers (digest
//! and size) from the registry's manifest, cached for a minute, with one
//! resolution shared by every call that needs the image meanwhile.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use breakfs_fetch::{ClientOptions, Store};
use breakfs_index::ImageRef;
use futures::FutureExt as _;

use crate::error::{Error, Result};
use crate::score::Layer;

/// How long a resolved tag is trusted.
const IMAGE_TTL: Duration = Duration::from_secs(60);

/// One image's resolution, awaited by every call that needs it meanwhile.
type Resolving = futures::future::Shared<
    futures::future::BoxFuture<'static, std::result::Result<Vec<Layer>, Arc<Error>>>,
>;

/// Resolved images and resolutions under way.
pub(crate) struct Resolver {
    client: ClientOptions,
    /// Resolved images, with when.
    images: Mutex<HashMap<String, (Vec<Layer>, Instant)>>,
    /// Resolutions under way, by image: calls that need the image
    /// meanwhile wait for the one resolution instead of each asking the
    /// registry.
    resolving: Mutex<HashMap<String, Resolving>>,
}

impl Resolver {
    /// A resolver asking registries with `client`.
    pub(crate) fn new(client: ClientOptions) -> Resolver {
        Resolver {
            client,
            images: Mutex::new(HashMap::new()),
            resolving: Mutex::new(HashMap::new()),
        }
    }

    /// Take `layers` as the layers of `image` for a while.
    pub(crate) fn set_image(&self, image: &str, layers: Vec<Layer>) {
        let mut images = self.images.lock();
        // Forget what expired, so the map holds only images of the last TTL.
        images.retain(|_, (_, at)| at.elapsed() < IMAGE_TTL);
        images.insert(image.to_string(), (layers, Instant::now()));
    }

    /// The layers of `image` (a pod's image reference), resolved and cached.
    /// Concurrent calls for an image not cached share one resolution (a
    /// burst of 1,000 calls for a new image asked the registry 278 times).
    pub(crate) async fn layers(&self, image: &str) -> Result<Vec<Layer>> {
        if let Some((l, at)) = self.images.lock().get(image)
            && at.elapsed() < IMAGE_TTL
        {
            return Ok(l.clone());
        }
        let pending = self
            .resolving
            .lock()
            .entry(image.to_string())
            .or_insert_with(|| {
                resolve_layers(image.to_string(), self.client.clone())
                    .map(|r| r.map_err(Arc::new))
                    .boxed()
                    .shared()
            })
            .clone();
        let out = pending.clone().await;
        // Whoever sees it end first files the answer (the call that started
        // it may have been dropped meanwhile).
        let mut resolving = self.resolving.lock();
        if resolving.get(image).is_some_and(|p| p.ptr_eq(&pending)) {
            resolving.remove(image);
            if let Ok(l) = &out {
                self.set_image(image, l.clone());
            }
        }
        out.map_err(Error::Shared)
    }
}

/// Resolve a pod's image reference to its layers (a bare `HOST/REPO:TAG`
/// is a registry image).
async fn resolve_layers(image: String, client: ClientOptions) -> Result<Vec<Layer>> {
    let r = if image.contains("://") || image.starts_with("oci:") {
        image.clone()
    } else {
        format!("docker://{image}")
    };
    let reference = ImageRef::parse(&r).map_err(|source| Error::ImageRef {
        image: image.clone(),
        source: Box::new(source),
    })?;
    let resolved = async {
        let store = Store::open(&reference, &client).await?;
        store.resolve(&reference).await
    };
    let resolved = resolved.await.map_err(|source| Error::Resolve {
        image: r,
        source: Box::new(source),
    })?;
    Ok(resolved
        .layers()
        .iter()
        .map(|d| Layer {
            digest: d.digest.clone(),
            size: d.size,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A registry on loopback that answers `/v2/` and, slowly, 404 to
    /// every manifest; the manifest requests it got.
    async fn slow_registry() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = asked.clone();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = c.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                        let answer = if head.contains("/manifests/") {
                            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
                        } else {
                            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
                        };
                        if c.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (host, asked)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_for_one_image_resolve_it_once() {
        let (host, asked) = slow_registry().await;
        let r = Resolver::new(ClientOptions {
            plain_http: true,
            ..ClientOptions::default()
        });
        let image = format!("{host}/app:v1");
        let calls = (0..50).map(|_| r.layers(&image));
        let results = futures::future::join_all(calls).await;
        assert!(results.iter().all(|r| r.is_err()), "{results:?}");
        // One resolution for the 50 calls (it failed: the next call asks again).
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(r.resolving.lock().is_empty());
        let e = r.layers(&image).await.unwrap_err();
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 2);
        // The error names the image.
        assert!(
            e.to_string()
                .contains(&format!("resolving the image docker://{image}")),
            "{}",
            breakfs_index::Causes(&e)
        );
    }
}

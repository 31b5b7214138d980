//! Prefetch: get whole images or layers into the node before anyone mounts
//! them (the push side of deployment). Work goes through the node's fetch
//! scheduler at background priority, so on-demand reads always pass ahead
//! of it, and at the background rate limit.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;

use breakfs_index::{Descriptor, Digest, ImageRef};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use breakfs_fetch::{
    ClientOptions, CloudSource, Error, Fetcher, Priority, Result, layer_chunk_locs, resolve_image,
};

/// A `POST /prefetch` body.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PrefetchRequest {
    /// Whole images: every layer of each.
    #[serde(default)]
    pub images: Vec<String>,
    /// Only these layers (digests) of `image`.
    #[serde(default)]
    pub layers: Vec<Digest>,
    /// The image `layers` belong to (needed to know where they live).
    #[serde(default)]
    pub image: Option<String>,
    /// Layers' popularity across the cluster as the scheduler sees it
    /// (decayed placements): the node's budget values each layer at least
    /// that much, so what the planner keeps is not the first evicted.
    #[serde(default)]
    pub popularity: BTreeMap<Digest, f64>,
}

impl PrefetchRequest {
    /// The first reference that names a path on this node (`oci:DIR`), which
    /// a request from the network may not: the node would read that
    /// directory into its store and serve it to anyone.
    pub fn local_reference(&self) -> Option<&str> {
        self.images
            .iter()
            .chain(&self.image)
            .map(String::as_str)
            .find(|r| matches!(ImageRef::parse(r), Ok(ImageRef::Layout { .. })))
    }
}

/// The state of one prefetch task.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PrefetchTask {
    /// The image.
    pub image: String,
    /// Layers asked for.
    pub layers: usize,
    /// Layers now held whole.
    pub done: usize,
    /// Finished (with or without an error).
    pub finished: bool,
    /// The error, if it failed.
    pub error: Option<String>,
}

/// Runs prefetch tasks on a node's fetcher.
pub struct Prefetcher {
    fetcher: Fetcher,
    cloud: Arc<CloudSource>,
    client: ClientOptions,
    tasks: Mutex<BTreeMap<u64, PrefetchTask>>,
    next: Mutex<u64>,
}

impl Prefetcher {
    /// A prefetcher over `fetcher`, whose chain ends in `cloud`.
    pub fn new(
        fetcher: Fetcher,
        cloud: Arc<CloudSource>,
        client: ClientOptions,
    ) -> Arc<Prefetcher> {
        Arc::new(Prefetcher {
            fetcher,
            cloud,
            client,
            tasks: Mutex::new(BTreeMap::new()),
            next: Mutex::new(0),
        })
    }

    /// Check `req` and start its tasks; returns their ids.
    pub fn start(self: &Arc<Self>, req: PrefetchRequest) -> Result<Vec<u64>> {
        let mut jobs: Vec<(ImageRef, Option<Vec<Digest>>)> = Vec::new();
        for i in &req.images {
            jobs.push((ImageRef::parse(i)?, None));
        }
        if !req.layers.is_empty() {
            let Some(image) = &req.image else {
                return Err(Error::Protocol {
                    what: "prefetch request".into(),
                    reason: "\"layers\" needs \"image\": the image they belong to".into(),
                });
            };
            jobs.push((ImageRef::parse(image)?, Some(req.layers.clone())));
        }
        if jobs.is_empty() {
            return Err(Error::Protocol {
                what: "prefetch request".into(),
                reason: "give \"images\": [REF...] or \"image\": REF with \"layers\": [DIGEST...]"
                    .into(),
            });
        }
        if let Some(b) = self.fetcher.store().budget() {
            b.at_least(req.popularity.iter().map(|(d, p)| (d, *p)));
        }
        let mut ids = Vec::new();
        for (r, only) in jobs {
            let id = {
                let mut n = self.next.lock();
                *n += 1;
                *n
            };
            self.tasks.lock().insert(
                id,
                PrefetchTask {
                    image: r.to_string(),
                    ..PrefetchTask::default()
                },
            );
            let me = self.clone();
            tokio::spawn(async move {
                let r = me.run(id, &r, only).await;
                let mut tasks = me.tasks.lock();
                if let Some(t) = tasks.get_mut(&id) {
                    t.finished = true;
                    if let Err(e) = r {
                        let e = breakfs_index::Causes(&e).to_string();
                        tracing::warn!(image = %t.image, "prefetch failed: {e}");
                        t.error = Some(e);
                    }
                }
            });
            ids.push(id);
        }
        Ok(ids)
    }

    /// All tasks so far.
    pub fn tasks(&self) -> BTreeMap<u64, PrefetchTask> {
        self.tasks.lock().clone()
    }

    async fn run(&self, id: u64, r: &ImageRef, only: Option<Vec<Digest>>) -> Result<()> {
        let image = resolve_image(r, &self.client, &self.fetcher, &self.cloud).await?;
        let layers: Vec<Descriptor> = image
            .layers()
            .iter()
            .filter(|l| only.as_ref().is_none_or(|o| o.contains(&l.digest)))
            .cloned()
            .collect();
        if let Some(t) = self.tasks.lock().get_mut(&id) {
            t.layers = layers.len();
        }
        let mut work = futures::stream::iter(layers.into_iter().map(|l| async move {
            let r = self.layer(&l).await;
            (l, r)
        }))
        .buffer_unordered(4);
        let mut first_error = None;
        while let Some((l, r)) = work.next().await {
            match r {
                Ok(()) => {
                    if let Some(t) = self.tasks.lock().get_mut(&id) {
                        t.done += 1;
                    }
                }
                Err(e) => {
                    tracing::warn!(layer = %l.digest, "prefetching a layer failed: {e}", e = breakfs_index::Causes(&e));
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// One layer whole into the store: an eStargz layer chunk by chunk at
    /// background priority (then assembled), any other layer as one blob.
    async fn layer(&self, desc: &Descriptor) -> Result<()> {
        let f = &self.fetcher;
        if let Some(b) = f.store().budget() {
            b.touch([&desc.digest]);
        }
        if f.store().has_blob(&desc.digest) {
            return Ok(());
        }
        let locs = match f.layer_toc(desc).await? {
            Some(toc) => layer_chunk_locs(desc, &toc),
            None => None,
        };
        let Some(locs) = locs else {
            f.ensure_blob(desc).await?;
            return Ok(());
        };
        let mut seen = std::collections::HashSet::new();
        let waits: futures::stream::FuturesUnordered<_> = locs
            .iter()
            .filter(|l| seen.insert(l.digest.clone()))
            .map(|l| f.ensure(l, Priority::Background, None))
            .collect();
        let results: Vec<Result<()>> = waits.collect().await;
        if let Some(e) = results.into_iter().find_map(|r| r.err()) {
            return Err(e);
        }
        if !f.complete_layer(desc).await? {
            return Err(Error::Unavailable {
                what: format!("layer {}", desc.digest),
                reason: "its ranges did not assemble into the layer".into(),
            });
        }
        Ok(())
    }
}

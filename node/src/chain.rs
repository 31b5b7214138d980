//! The node's source chain and service, assembled in one place: store
//! (with its budget) → peers → with `--relay`, the least loaded of its own
//! and its peers' registry links → cloud, under one fetch scheduler shared
//! by its mounts and its prefetcher.

use std::sync::Arc;
use std::time::Duration;

use breakfs_fetch::budget::Budget;
use breakfs_fetch::{CloudSource, ContentStore, FetchOptions, Fetcher, LocalSource, Source};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::mounts::MountTable;
use crate::peer::{Links, PeerSource, Peers};
use crate::prefetch::Prefetcher;
use crate::relay::{Relay, RelaySource};
use crate::server::{NodeService, Served};
use crate::{Error, Result};

/// How often peers' cache indexes are polled.
const PEER_POLL: Duration = Duration::from_secs(2);

/// The node's service over the store at `c.cache`, reached by peers at
/// `url`, its mount control at `control` (`unix:PATH`); its peer polling
/// stops on `stop`. Also returns the budget, if any, for the daemon to
/// save.
pub(crate) async fn build(
    c: &Config,
    url: &str,
    control: String,
    stop: &CancellationToken,
) -> Result<(Arc<NodeService>, Option<Arc<Budget>>, Arc<Links>)> {
    let store = Arc::new(ContentStore::open(&c.cache).map_err(|source| Error::Store {
        what: format!("opening the content store {}", c.cache.display()),
        source,
    })?);
    if c.verify {
        let what = format!("verifying the content store {}", c.cache.display());
        let cache = c.cache.clone();
        let report = tokio::task::spawn_blocking(move || breakfs_fetch::verify_store(&cache, true))
            .await
            .map_err(|e| Error::io(what.clone(), e.into()))?
            .map_err(|source| Error::Store { what, source })?;
        eprintln!("breakfs node: {report}");
    }
    let budget = c.budget.map(|limit| {
        let b = Arc::new(Budget::new(limit, &store));
        store.set_budget(b.clone());
        b
    });
    let links = Arc::new(Links::default());
    let peers = Peers::new(url, &c.peers, links.clone())?;
    peers.set_learning(c.learn_peers);
    // A wait on a peer's fetch ends well within one attempt.
    peers
        .rollout
        .set_wait((c.deadline / 3).max(Duration::from_secs(1)) / 2);
    peers.spawn_polling(PEER_POLL, stop.clone());
    let cloud = Arc::new(CloudSource::new());
    {
        let links = links.clone();
        cloud.on_transfer(Arc::new(move |_, bytes, secs| {
            links.transfer("cloud", bytes, secs)
        }));
    }
    let opts = FetchOptions {
        workers: c.parallel,
        background_workers: (c.parallel / 4).max(1),
        deadline: c.deadline,
        attempt_timeout: (c.deadline / 3).max(Duration::from_secs(1)),
        keep_ranges: true,
        background_rate: c.prefetch_rate,
        background_target: c.background_target,
        ..FetchOptions::default()
    };
    let relay = Relay::new(&c.relay, &c.client, c.token.clone());
    {
        let links = links.clone();
        relay.on_transfer(Arc::new(move |link, bytes, secs| {
            links.transfer(link, bytes, secs)
        }));
    }
    let mut sources: Vec<Arc<dyn Source>> = vec![
        Arc::new(LocalSource {
            store: store.clone(),
        }),
        Arc::new(PeerSource {
            peers: peers.clone(),
        }),
    ];
    if !c.relay.is_empty() {
        sources.push(Arc::new(RelaySource {
            relay: relay.clone(),
            peers: peers.clone(),
            cloud: cloud.clone(),
        }));
    }
    sources.push(cloud.clone());
    if let Some(b) = &budget {
        let (peers, links) = (peers.clone(), links.clone());
        b.set_refetchable(Box::new(move |layer| {
            peers.someone_holds(layer) || links.ok_within("cloud", 120.0)
        }));
    }
    let fetcher = Fetcher::new(store.clone(), sources, opts);
    let prefetcher = Prefetcher::new(fetcher.clone(), cloud.clone(), c.client.clone());
    let svc = Arc::new(NodeService {
        store,
        fetcher,
        cloud,
        client: c.client.clone(),
        peers,
        prefetcher,
        node_url: url.to_string(),
        budget: c.budget,
        served: Served::default(),
        relay,
        mounts: MountTable::new(control),
        snapshot_stats: Default::default(),
    });
    Ok((svc, budget, links))
}

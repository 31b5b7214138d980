//! Moving bytes for breakfs: reading and writing images in OCI image
//! layouts and registries.
//!
//! The door is [`Store`]: one layout directory (`oci:DIR[:TAG]`) or one
//! registry repository (`docker://HOST/REPO[:TAG|@DIGEST]`, OCI
//! distribution API with Basic and Bearer-token auth from the docker
//! config) behind one API. [`Store::resolve`] turns a reference into an
//! [`Image`] (manifest and config, digests verified, an index followed to
//! the platform of [`ClientOptions`]); blob reads verify size and digest and
//! land atomically; pushes skip blobs already present and mount across
//! repositories where they can.
//!
//! [`Fetcher`] schedules chunk fetches over a chain of [`Source`]s (the
//! local store, then whatever the caller adds, ending in the cloud:
//! [`CloudSource`]), checking every chunk; [`resolve_image`] resolves an
//! image through that chain. The node daemon (`breakfs-node`) puts its
//! peers and relays into the chain; this crate knows nothing of them.
//!
//! [`ContentStore`] is a node's verified, content-addressed cache, kept
//! within a [`budget::Budget`]; [`verify_store`] checks one end to end
//! (`breakfs verify`). [`guard`] holds the request limits and the bearer
//! token that the node's and the scheduler's servers share.

mod auth;
mod blobfile;
pub mod budget;
mod cas;
pub mod delta;
mod error;
mod fetcher;
pub mod guard;
mod layout;
mod meta;
mod metrics;
mod options;
mod registry;
mod resolve;
mod source;
mod store;
mod tocread;
mod verify;

pub use cas::{ContentStore, merge_ranges};
pub use delta::{DeltaIndex, load_deltas};
pub use error::{Error, Result};
pub use fetcher::{
    ChunkLoc, FetchOptions, FetchStats, Fetcher, PEER_REST, Priority, REGION_PIECE, RangeFlight,
    RegionFetch, SourceStats, YieldStats, landmarked_chunks,
};
pub use layout::OciLayout;
pub use meta::{Hydration, chunk_loc, chunk_loc_or_why, layer_chunk_locs, lazy_chunk_locs};
pub use metrics::{Histogram, LATENCY_BOUNDS};
pub use options::ClientOptions;
pub use registry::{FetchedManifest, RegistryRepo};
pub use resolve::resolve_image;
pub use source::{
    CloudSource, LocalSource, Meta, MetaTurn, Plan, Source, SourceClass, StoreSource, TransferHook,
    not_here,
};
pub use store::{BlobLoader, Image, Store};
pub use tocread::{LayerToc, MAX_HINTED_TAIL, TOC_TAIL_HINT, hint_toc_tail, toc_tail_name};
pub use verify::{Finding, Severity, Tally, VerifyReport, verify_store};

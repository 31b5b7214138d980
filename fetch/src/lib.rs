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
//! A node's fetch chain is its store, its peers (`peer`), with `--relay`
//! its peers' registry links beside its own (`relay`), and the cloud
//! ([`CloudSource`]), under one scheduler ([`Fetcher`]).
//!
//! [`ContentStore`] is a node's verified, content-addressed cache;
//! [`verify_store`] checks one end to end (`breakfs verify`).
//!
//! [`run_shaping_proxy`] is a TCP proxy with delay and bandwidth per
//! direction, standing in for slow links in tests and benchmarks.

mod auth;
mod blobfile;
pub mod budget;
mod cas;
mod error;
mod fetcher;
pub mod guard;
mod layout;
mod meta;
pub mod metrics;
mod options;
pub mod peer;
pub mod prefetch;
mod registry;
pub mod relay;
pub mod server;
mod shaping;
mod source;
mod store;
mod tocread;
mod verify;

pub use cas::{ContentStore, merge_ranges};
pub use error::{Error, Result};
pub use fetcher::{ChunkLoc, FetchOptions, FetchStats, Fetcher, Priority, SourceStats};
pub use layout::OciLayout;
pub use meta::{chunk_loc, layer_chunk_locs};
pub use options::ClientOptions;
pub use registry::{FetchedManifest, RegistryRepo};
pub use shaping::{LinkShape, run_shaping_proxy, run_shaping_routes, run_switchable_routes};
pub use source::{CloudSource, LocalSource, Source, SourceClass, StoreSource};
pub use store::{BlobLoader, Image, Store};
pub use tocread::LayerToc;
pub use verify::{Finding, Severity, Tally, VerifyReport, verify_store};

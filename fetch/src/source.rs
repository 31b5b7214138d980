//! Where chunk and blob bytes come from: the seam between the fetch
//! scheduler and the places that hold content (the cloud registry or an OCI
//! layout today; peer edge nodes plug in here too).

use std::path::Path;

use breakfs_index::{Descriptor, Digest};
use futures::future::BoxFuture;

use crate::{Result, Store};

/// A place that serves layer blobs by digest.
pub trait Source: Send + Sync {
    /// A short name for status and logs (`cloud`, `peer 10.0.0.2:7070`).
    fn name(&self) -> String;

    /// `len` bytes at `start` of blob `blob`, unverified (the caller checks
    /// every chunk against its digest).
    fn read_range<'a>(
        &'a self,
        blob: &'a Digest,
        start: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>>>;

    /// The whole blob into `path`, verified against `desc`.
    fn blob_to_file<'a>(
        &'a self,
        desc: &'a Descriptor,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<()>>;
}

/// A registry or layout store as a source, named `name`.
pub struct StoreSource {
    /// The store.
    pub store: Store,
    /// How it shows in status output.
    pub name: String,
}

impl Source for StoreSource {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn read_range<'a>(
        &'a self,
        blob: &'a Digest,
        start: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(self.store.read_range(blob, start, len))
    }

    fn blob_to_file<'a>(
        &'a self,
        desc: &'a Descriptor,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.store.blob_to_file(desc, path))
    }
}

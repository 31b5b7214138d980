//! The lazy FUSE filesystem over an image's merged view.
//!
//! [`open_image`] resolves an image and builds its [`Tree`] from metadata
//! alone (eStargz TOCs; layers without a TOC are fetched whole and indexed
//! once), [`open_layer`] one eStargz layer alone, in overlayfs' own form;
//! [`mount`] serves the tree over FUSE, content from the content store,
//! missing chunks fetched on demand ahead of background hydration
//! ([`mount_resumable`] and [`resume`]: a mount served by one process after
//! another);
//! [`profile`] records the order of a mount's first reads and uses a
//! learned profile to fetch a start-up's chunks at once;
//! [`extract`] writes the same tree to a plain directory, files in parallel
//! as their chunks arrive ([`extract_reporting`] with its progress).

mod deps;
mod error;
mod extract;
mod fuse;
mod image;
mod inspect;
mod mount;
mod passthrough;
pub mod profile;
mod push;
mod start;
mod tree;

pub use deps::{ClosureFetched, ElfDependencies, elf_dependencies, fetch_with_dependencies};
pub use error::{Error, Result};
pub use extract::{ExtractStats, extract, extract_reporting};
pub use fuse::{ImageFs, ReadCounts, ReadStats};
pub use image::{
    LayerMode, LayerSeen, OpenedImage, open_image, open_image_on, open_layer, open_resolved,
};
pub use inspect::inspect;
pub use mount::{
    FuseConnection, Hydration, MountOptions, Mounted, StatusRecord, check_mountpoint,
    is_breakfs_type, is_mountpoint, mount, mount_resumable, mount_type, read_status, remove_status,
    resume, status_dir, status_path, write_status,
};
pub use start::{StartFetched, lazy_tree, prefetch_start, start_programs};
pub use tree::{FileChunk, LayerFile, Node, OVERLAY_OPAQUE, ROOT, Tree};

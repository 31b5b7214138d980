//! The lazy FUSE filesystem over an image's merged view (issue: lazy mount).

//! Moving bytes for breakfs: reading and writing images in OCI layouts and
//! registries (pull and push, auth), and later the content store, sources
//! and the fetch scheduler.

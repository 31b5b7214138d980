//! Layer compression: which codec a media type uses, and a decoder for it.

use std::io::{BufReader, Read};

use crate::media_types;

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip, possibly multi-member (eStargz).
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// The compression a layer media type implies, or `None` if it is not a
    /// layer media type breakfs reads.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            media_types::OCI_LAYER_TAR | "application/vnd.docker.image.rootfs.diff.tar" => {
                Some(Compression::None)
            }
            media_types::OCI_LAYER_GZIP | media_types::DOCKER_LAYER_GZIP => Some(Compression::Gzip),
            media_types::OCI_LAYER_ZSTD | "application/vnd.docker.image.rootfs.diff.tar.zstd" => {
                Some(Compression::Zstd)
            }
            _ => None,
        }
    }
}

/// A reader of the uncompressed tar stream of a layer.
pub fn decoder<'a, R: Read + 'a>(
    compression: Compression,
    reader: R,
) -> std::io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        Compression::None => Box::new(reader),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(
            256 * 1024,
            reader,
        ))),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(reader)?),
    })
}

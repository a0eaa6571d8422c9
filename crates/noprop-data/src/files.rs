//! Reading whole files, gzip-compressed or not.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;

use crate::DataError;

/// The first two bytes of every gzip stream.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The largest decompressed size this crate trusts a gzip trailer for when
/// reserving memory up front; larger claims just grow the buffer as it fills.
const MAX_RESERVE: usize = 1 << 30;

/// Reads a whole file, decompressing it first if it is gzip.
///
/// Compression is recognised by the content, not the name: a mirror or a
/// browser that silently decompressed a `.gz` download leaves a raw file
/// under a `.gz` name, and that must still load.
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if !raw.starts_with(&GZIP_MAGIC) {
        return Ok(raw);
    }
    gunzip(&raw).map_err(|e| DataError::io(path, e))
}

/// Opens a file for streaming, decompressing it on the fly if it is gzip.
pub(crate) fn open_maybe_gz(path: &Path) -> std::io::Result<Box<dyn Read>> {
    let mut file = BufReader::new(File::open(path)?);
    if file.fill_buf()?.starts_with(&GZIP_MAGIC) {
        Ok(Box::new(MultiGzDecoder::new(file)))
    } else {
        Ok(Box::new(file))
    }
}

/// Decompresses a gzip stream held in memory.
///
/// Several concatenated gzip members are accepted, since some tools write
/// them. The last four bytes of a gzip file give the decompressed size modulo
/// 2^32, which is exact for files as small as these data sets' and lets the
/// output be allocated once.
fn gunzip(compressed: &[u8]) -> std::io::Result<Vec<u8>> {
    let hint = compressed
        .len()
        .checked_sub(4)
        .and_then(|start| compressed.get(start..))
        .and_then(|tail| <[u8; 4]>::try_from(tail).ok())
        .map_or(0, |tail| u32::from_le_bytes(tail) as usize)
        .min(MAX_RESERVE);
    let mut out = Vec::with_capacity(hint);
    MultiGzDecoder::new(compressed).read_to_end(&mut out)?;
    Ok(out)
}

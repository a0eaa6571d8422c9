//! Reading files whose sizes come from untrusted headers, gzip-compressed or
//! not, without ever allocating more than the file can hold.
//!
//! Every reader here follows one rule: a size read from a file is checked
//! against [`MAX_FILE_LEN`] and against what the file on disk can hold
//! *before* any buffer is reserved for it, and then exactly that many bytes
//! are read, with an error if the stream ends early or goes on past them.
//! For a gzip file the bound is its compressed length times the largest
//! expansion deflate can achieve, so a small file can never make the reader
//! allocate much, and a decompression bomb is stopped after the bytes its
//! header promised rather than inflated whole.
//!
//! This is a leaf module: it imports only the error type.

use std::cell::Cell;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use flate2::read::MultiGzDecoder;

use crate::error::DataError;

/// The largest number of bytes one data file (or one archive member) may
/// hold once decompressed.
///
/// The largest file of a supported data set, CIFAR-100's `train.bin`, is
/// about 154 MB and MNIST's training images 47 MB, so 1 GiB leaves room for
/// any data set of this kind while keeping a forged header from asking for
/// terabytes.
pub const MAX_FILE_LEN: u64 = 1 << 30;

/// The most a deflate stream can expand: each 258-byte match costs at least
/// about two bits, which bounds the ratio near 1032:1. A gzip file claiming
/// more than this times its compressed length cannot be genuine.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// The first two bytes of every gzip stream.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A file opened for streaming, with what is known about it before reading.
pub(crate) struct Opened {
    /// The path, for errors.
    pub(crate) path: PathBuf,
    /// The content, decompressed on the fly if the file is gzip.
    pub(crate) reader: Box<dyn Read>,
    /// The length of the file on disk.
    pub(crate) file_len: u64,
    /// Whether the file is gzip-compressed.
    pub(crate) gzip: bool,
}

impl Opened {
    /// Checks that this file can hold `claimed` bytes of content, as a
    /// header says it does, before anything is allocated for them.
    ///
    /// A raw file must be exactly that long; a gzip file must be long enough
    /// that deflate could have produced that much.
    pub(crate) fn check_claim(&self, claimed: u64) -> Result<(), DataError> {
        check_claim(&self.path, claimed, self.file_len, self.gzip)
    }

    /// Reads exactly `len` bytes of content, counting `already` bytes read
    /// before them (a header) in any error's lengths.
    ///
    /// Call [`check_claim`](Self::check_claim) first: this reserves `len`
    /// bytes up front.
    pub(crate) fn read_exact_vec(&mut self, len: u64, already: u64) -> Result<Vec<u8>, DataError> {
        read_exact_vec(&mut self.reader, &self.path, len, already)
    }

    /// Checks that the content ends here, which for a gzip file also makes
    /// the decoder verify the stream's CRC and length.
    ///
    /// `expected_len` is the whole content's length, for the error.
    pub(crate) fn expect_end(&mut self, expected_len: u64) -> Result<(), DataError> {
        let mut probe = [0u8; 1];
        loop {
            match self.reader.read(&mut probe) {
                Ok(0) => return Ok(()),
                Ok(_) if self.gzip => {
                    // How much more there is stays unmeasured on purpose: a
                    // bomb could go on for gigabytes.
                    return Err(DataError::TrailingData {
                        path: self.path.clone(),
                        expected_len,
                    });
                }
                Ok(_) => {
                    return Err(DataError::TrailingBytes {
                        path: self.path.clone(),
                        expected_len,
                        found_len: self.file_len.max(expected_len.saturating_add(1)),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(DataError::io(&self.path, e)),
            }
        }
    }
}

/// Opens a file for streaming, decompressing it on the fly if it is gzip.
///
/// Compression is recognised by the content, not the name: a mirror or a
/// browser that silently decompressed a `.gz` download leaves a raw file
/// under a `.gz` name, and that must still load. Several concatenated gzip
/// members are accepted, since some tools write them.
pub(crate) fn open_maybe_gz(path: &Path) -> Result<Opened, DataError> {
    let io_err = |e| DataError::io(path, e);
    let file = File::open(path).map_err(io_err)?;
    let file_len = file.metadata().map_err(io_err)?.len();
    let mut file = BufReader::new(file);
    let gzip = file.fill_buf().map_err(io_err)?.starts_with(&GZIP_MAGIC);
    let reader: Box<dyn Read> = if gzip {
        Box::new(MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    Ok(Opened {
        path: path.to_path_buf(),
        reader,
        file_len,
        gzip,
    })
}

/// Checks a size claimed by a header against [`MAX_FILE_LEN`] and against
/// what a file of `file_len` bytes (gzip or not) can hold.
pub(crate) fn check_claim(
    path: &Path,
    claimed: u64,
    file_len: u64,
    gzip: bool,
) -> Result<(), DataError> {
    if claimed > MAX_FILE_LEN {
        return Err(DataError::TooLarge {
            path: path.to_path_buf(),
            claimed,
            limit: MAX_FILE_LEN,
        });
    }
    if gzip {
        let most = file_len.saturating_mul(MAX_DEFLATE_RATIO);
        if claimed > most {
            return Err(DataError::ImplausibleSize {
                path: path.to_path_buf(),
                claimed,
                compressed_len: file_len,
            });
        }
        return Ok(());
    }
    if claimed > file_len {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected_len: claimed,
            found_len: file_len,
        });
    }
    if claimed < file_len {
        return Err(DataError::TrailingBytes {
            path: path.to_path_buf(),
            expected_len: claimed,
            found_len: file_len,
        });
    }
    Ok(())
}

/// Reads exactly `len` bytes from `reader` into a buffer reserved once.
///
/// `len` must already have been checked with [`check_claim`]; `already`
/// counts bytes read before (a header), so that a
/// [`Truncated`](DataError::Truncated) error gives whole-content lengths.
pub(crate) fn read_exact_vec(
    reader: &mut dyn Read,
    path: &Path,
    len: u64,
    already: u64,
) -> Result<Vec<u8>, DataError> {
    let too_large = || DataError::TooLarge {
        path: path.to_path_buf(),
        claimed: len,
        limit: MAX_FILE_LEN,
    };
    if len > MAX_FILE_LEN {
        return Err(too_large());
    }
    let want = usize::try_from(len).map_err(|_| too_large())?;
    let mut out = Vec::new();
    // A failed reservation is reported, not turned into an abort.
    out.try_reserve_exact(want).map_err(|_| too_large())?;
    // `take` stops the read at `len`, and since the buffer already has room
    // for exactly that much, `read_to_end` never grows it.
    reader
        .take(len)
        .read_to_end(&mut out)
        .map_err(|e| DataError::io(path, e))?;
    if out.len() < want {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected_len: already.saturating_add(len),
            found_len: already.saturating_add(out.len() as u64),
        });
    }
    Ok(out)
}

/// Reads up to `buf.len()` bytes, stopping early only at the end of the
/// stream, and returns how many were read.
pub(crate) fn read_up_to(reader: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A reader that fails once more than `left` bytes come through it.
///
/// Archives are read by the `tar` crate, which buffers some entries (GNU
/// long names, PAX headers) whole; bounding the stream it reads bounds those
/// buffers too, whatever their headers claim.
pub(crate) struct Bounded<R> {
    inner: R,
    left: u64,
    exceeded: Rc<Cell<bool>>,
}

impl<R: Read> Bounded<R> {
    /// Wraps `inner`, allowing at most `limit` bytes; the flag turns true
    /// when the limit is passed, so that the caller can tell that error from
    /// the stream's own.
    pub(crate) fn new(inner: R, limit: u64) -> (Self, Rc<Cell<bool>>) {
        let exceeded = Rc::new(Cell::new(false));
        let reader = Self {
            inner,
            left: limit,
            exceeded: Rc::clone(&exceeded),
        };
        (reader, exceeded)
    }
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        match self.left.checked_sub(n as u64) {
            Some(left) => {
                self.left = left;
                Ok(n)
            }
            None => {
                self.exceeded.set(true);
                Err(std::io::Error::other("the stream is longer than its limit"))
            }
        }
    }
}

/// The most content a file of `file_len` bytes can hold: itself when raw,
/// the largest deflate expansion when gzip, and never more than
/// [`MAX_FILE_LEN`].
pub(crate) fn content_bound(file_len: u64, gzip: bool) -> u64 {
    if gzip {
        file_len.saturating_mul(MAX_DEFLATE_RATIO).min(MAX_FILE_LEN)
    } else {
        file_len.min(MAX_FILE_LEN)
    }
}

/// Finds `name` or `name.gz` in `dir`, preferring the uncompressed file,
/// which loads faster.
pub(crate) fn find_raw_or_gz(dir: &Path, name: &str) -> Option<PathBuf> {
    let raw = dir.join(name);
    if raw.is_file() {
        return Some(raw);
    }
    let gz = dir.join(format!("{name}.gz"));
    gz.is_file().then_some(gz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_checked_against_the_limit_and_the_file() {
        let p = Path::new("f");
        assert!(matches!(
            check_claim(p, u64::MAX, u64::MAX, false),
            Err(DataError::TooLarge {
                claimed: u64::MAX,
                ..
            })
        ));
        assert!(matches!(
            check_claim(p, 1 << 20, 1000, true),
            Err(DataError::ImplausibleSize {
                compressed_len: 1000,
                ..
            })
        ));
        assert!(check_claim(p, 1_000_000, 1000, true).is_ok());
        assert!(matches!(
            check_claim(p, 11, 10, false),
            Err(DataError::Truncated {
                expected_len: 11,
                found_len: 10,
                ..
            })
        ));
        assert!(matches!(
            check_claim(p, 9, 10, false),
            Err(DataError::TrailingBytes {
                expected_len: 9,
                found_len: 10,
                ..
            })
        ));
        assert!(check_claim(p, 10, 10, false).is_ok());
    }

    #[test]
    fn a_short_stream_is_truncated() {
        let mut data: &[u8] = &[1, 2, 3];
        assert!(matches!(
            read_exact_vec(&mut data, Path::new("f"), 5, 8),
            Err(DataError::Truncated {
                expected_len: 13,
                found_len: 11,
                ..
            })
        ));
    }
}

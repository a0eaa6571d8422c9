//! The IDX file format of MNIST.
//!
//! An IDX file is a 4-byte magic number, then one big-endian `u32` per
//! dimension, then the values in row-major order. The magic number's first
//! two bytes are zero, the third gives the value type (`0x08` for unsigned
//! bytes, the only type MNIST uses and the only one read here) and the fourth
//! the number of dimensions. So MNIST's image files start with
//! [`IMAGES_MAGIC`] (`0x00000803`: bytes, three dimensions) and its label
//! files with [`LABELS_MAGIC`] (`0x00000801`: bytes, one dimension).

use std::path::Path;

use crate::error::DataError;
use crate::files::{open_maybe_gz, read_up_to};

/// The magic number of an IDX file of unsigned bytes in three dimensions
/// (images, rows, columns).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// The magic number of an IDX file of unsigned bytes in one dimension
/// (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// Parses IDX bytes, checking the magic number and that the file holds
/// exactly as many bytes as its header says.
///
/// Returns the dimensions and the values. `path` is only used to name the
/// file in errors.
pub fn parse<'a>(
    bytes: &'a [u8],
    path: &Path,
    expected_magic: u32,
) -> Result<(Vec<usize>, &'a [u8]), DataError> {
    let truncated = |expected_len: u64| DataError::Truncated {
        path: path.to_path_buf(),
        expected_len,
        found_len: bytes.len() as u64,
    };
    let word = |at: usize| -> Option<u32> {
        let four = bytes.get(at..at + 4)?;
        Some(u32::from_be_bytes(four.try_into().ok()?))
    };

    let magic = word(0).ok_or_else(|| truncated(4))?;
    if magic != expected_magic {
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            found: magic,
            expected: expected_magic,
        });
    }
    let ndims = (magic & 0xff) as usize;
    let header_len = 4 + 4 * ndims;
    let dims = (0..ndims)
        .map(|d| word(4 + 4 * d).map(|v| v as usize))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| truncated(header_len as u64))?;

    // The product of the dimensions comes from the file, so it is computed in
    // u64 with overflow checks rather than trusted.
    let body_len = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .unwrap_or(u64::MAX);
    let expected_len = body_len.saturating_add(header_len as u64);
    let found_len = bytes.len() as u64;
    if found_len < expected_len {
        return Err(truncated(expected_len));
    }
    if found_len > expected_len {
        return Err(DataError::TrailingBytes {
            path: path.to_path_buf(),
            expected_len,
            found_len,
        });
    }
    Ok((dims, &bytes[header_len..]))
}

/// Reads an IDX file of unsigned bytes from disk, raw or gzip-compressed,
/// checking the magic number and that the content is exactly as long as the
/// header says.
///
/// Returns the dimensions and the values. Unlike [`parse`], this never holds
/// more than the header promises: the header is read first from the
/// (decompressing) stream, its size is checked against
/// [`MAX_FILE_LEN`](crate::MAX_FILE_LEN) and against what the file on disk
/// can hold, and only then is a buffer of exactly that size filled. Content
/// past that size is an error found after reading one more byte, so a gzip
/// bomb behind a modest header costs no more memory than the header claims.
pub fn read(path: &Path, expected_magic: u32) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let mut file = open_maybe_gz(path)?;
    let mut header = [0u8; 4 + 4 * 255];
    let mut word = |at: usize, file: &mut crate::files::Opened| -> Result<u32, DataError> {
        let four = &mut header[at..at + 4];
        let got = read_up_to(&mut file.reader, four).map_err(|e| DataError::io(path, e))?;
        if got < 4 {
            return Err(DataError::Truncated {
                path: path.to_path_buf(),
                expected_len: at as u64 + 4,
                found_len: (at + got) as u64,
            });
        }
        Ok(u32::from_be_bytes([four[0], four[1], four[2], four[3]]))
    };

    let magic = word(0, &mut file)?;
    if magic != expected_magic {
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            found: magic,
            expected: expected_magic,
        });
    }
    // The magic number matched the caller's, so the number of dimensions is
    // the caller's too; the header buffer holds the most a byte can say.
    let ndims = (magic & 0xff) as usize;
    let mut dims = Vec::with_capacity(ndims);
    for d in 0..ndims {
        dims.push(word(4 + 4 * d, &mut file)? as usize);
    }
    let header_len = 4 + 4 * ndims as u64;
    // Each dimension fits in a u32 but their product may not fit anywhere;
    // saturating keeps an overflowing product above every limit.
    let body_len = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .unwrap_or(u64::MAX);
    let expected_len = body_len.saturating_add(header_len);
    file.check_claim(expected_len)?;
    let body = file.read_exact_vec(body_len, header_len)?;
    file.expect_end(expected_len)?;
    Ok((dims, body))
}

/// Encodes unsigned bytes as an IDX file with the given dimensions.
///
/// The magic number is `0x0000_08NN` with `NN` the number of dimensions, so
/// three dimensions give [`IMAGES_MAGIC`] and one gives [`LABELS_MAGIC`].
///
/// # Panics
///
/// If `data.len()` is not the product of `dims`, if there are more than 255
/// dimensions, or if a dimension does not fit in a `u32`: these are mistakes
/// in the calling code, not in a file.
pub fn encode(dims: &[usize], data: &[u8]) -> Vec<u8> {
    assert!(dims.len() <= 255, "IDX files have at most 255 dimensions");
    assert_eq!(
        dims.iter().product::<usize>(),
        data.len(),
        "IDX data length must be the product of the dimensions"
    );
    let mut out = Vec::with_capacity(4 + 4 * dims.len() + data.len());
    out.extend_from_slice(&(0x0800 | dims.len() as u32).to_be_bytes());
    for &d in dims {
        let d = u32::try_from(d).expect("IDX dimensions fit in a u32");
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let data: Vec<u8> = (0..24).collect();
        let bytes = encode(&[2, 3, 4], &data);
        assert_eq!(&bytes[..8], &[0, 0, 8, 3, 0, 0, 0, 2]);
        let (dims, values) = parse(&bytes, Path::new("x"), IMAGES_MAGIC).unwrap();
        assert_eq!(dims, vec![2, 3, 4]);
        assert_eq!(values, &data[..]);
    }

    #[test]
    fn huge_dimensions_do_not_overflow() {
        let mut bytes = vec![0, 0, 8, 3];
        for _ in 0..3 {
            bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        }
        assert!(matches!(
            parse(&bytes, Path::new("x"), IMAGES_MAGIC),
            Err(DataError::Truncated {
                expected_len: u64::MAX,
                ..
            })
        ));
    }

    #[test]
    fn short_header_is_truncated() {
        assert!(matches!(
            parse(&[0, 0, 8], Path::new("x"), LABELS_MAGIC),
            Err(DataError::Truncated {
                expected_len: 4,
                found_len: 3,
                ..
            })
        ));
        assert!(matches!(
            parse(&[0, 0, 8, 1, 0, 0], Path::new("x"), LABELS_MAGIC),
            Err(DataError::Truncated {
                expected_len: 8,
                found_len: 6,
                ..
            })
        ));
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = encode(&[2], &[1, 2]);
        bytes.push(0);
        assert!(matches!(
            parse(&bytes, Path::new("x"), LABELS_MAGIC),
            Err(DataError::TrailingBytes {
                expected_len: 10,
                found_len: 11,
                ..
            })
        ));
    }
}

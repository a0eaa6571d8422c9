//! Hostile inputs: forged sizes, decompression bombs, truncated archives and
//! a property-based fuzz suite over the IDX and CIFAR readers.
//!
//! Memory is checked by construction rather than by watching the process:
//! this test binary installs a global allocator that records, per thread,
//! the largest single allocation requested. A reader that trusts a header
//! asks for the header's size in one go (or doubles a buffer up to it), so a
//! bound on the largest request is a bound on what a forged size can cost.
//!
//! The fuzz properties run a few hundred cases each by default, a few
//! seconds in all. Set `NOPROP_FUZZ_CASES` for a longer run:
//!
//! ```text
//! NOPROP_FUZZ_CASES=100000 nice cargo test -p noprop-data --all-features --test hostile
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::path::Path;

use noprop_data::idx::{self, IMAGES_MAGIC, LABELS_MAGIC};
use noprop_data::{load_cifar10, load_cifar100, load_mnist, DataError, Split, MAX_FILE_LEN};
use proptest::prelude::*;

/// The system allocator, recording the largest request of each thread.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// thread-local is const-initialised and has no destructor, so touching it
// cannot allocate or re-enter the allocator.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note(size: usize) {
    // `try_with` because the allocator may run while the thread-local is
    // being torn down at thread exit.
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Runs `f` and returns its result with the largest single allocation it
/// requested on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|largest| largest.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

/// One mebibyte.
const MIB: usize = 1 << 20;

fn idx_bytes(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// A gzip stream of `header` followed by `zeros` zero bytes, compressed as
/// it is written, so that building a large bomb costs little memory.
fn gzip_bomb(header: &[u8], zeros: usize) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(header).unwrap();
    let chunk = vec![0u8; MIB];
    let mut left = zeros;
    while left > 0 {
        let n = left.min(chunk.len());
        encoder.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    encoder.finish().unwrap()
}

/// Writes a valid training split of `n` MNIST images, raw.
fn write_mnist(dir: &Path, n: usize) {
    let pixels: Vec<u8> = (0..n * 784).map(|i| (i % 251) as u8).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    std::fs::write(
        dir.join("train-images-idx3-ubyte"),
        idx_bytes(IMAGES_MAGIC, &[n as u32, 28, 28], &pixels),
    )
    .unwrap();
    std::fs::write(
        dir.join("train-labels-idx1-ubyte"),
        idx_bytes(LABELS_MAGIC, &[n as u32], &labels),
    )
    .unwrap();
}

#[test]
fn idx_headers_claiming_2_to_the_40_bytes_or_more_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    // 2^16 x 2^12 x 2^12 = 2^40 bytes, and 3 x (2^32 - 1), which overflows
    // 64 bits.
    for dims in [[1 << 16, 1 << 12, 1 << 12], [u32::MAX; 3]] {
        let raw = idx_bytes(IMAGES_MAGIC, &dims, &[0; 100]);
        for bytes in [raw.clone(), gzip(&raw)] {
            std::fs::write(&path, &bytes).unwrap();
            let (result, largest) = largest_allocation(|| idx::read(&path, IMAGES_MAGIC));
            let err = result.unwrap_err();
            assert!(
                matches!(
                    err,
                    DataError::TooLarge {
                        limit: MAX_FILE_LEN,
                        ..
                    }
                ),
                "{err}"
            );
            assert!(!err.to_string().contains('\n'), "{err}");
            assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
            assert!(largest < MIB, "allocated {largest} bytes");
        }
    }
}

#[test]
fn a_gzip_file_claiming_more_than_it_can_hold_is_rejected_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.gz");
    // 500 MB of labels claimed by a file of a few dozen bytes.
    std::fs::write(
        &path,
        gzip(&idx_bytes(LABELS_MAGIC, &[500_000_000], &[1, 2])),
    )
    .unwrap();
    let (result, largest) = largest_allocation(|| idx::read(&path, LABELS_MAGIC));
    let err = result.unwrap_err();
    assert!(matches!(err, DataError::ImplausibleSize { .. }), "{err}");
    assert!(largest < MIB, "allocated {largest} bytes");
}

#[test]
fn a_gzip_bomb_is_stopped_after_the_bytes_its_header_promises() {
    let dir = tempfile::tempdir().unwrap();
    write_mnist(dir.path(), 2);
    // The label file claims two labels but decompresses to 64 MiB more; its
    // compressed size (about 64 KiB) makes the claim itself plausible.
    std::fs::remove_file(dir.path().join("train-labels-idx1-ubyte")).unwrap();
    let bomb = gzip_bomb(&idx_bytes(LABELS_MAGIC, &[2], &[3, 4]), 64 * MIB);
    std::fs::write(dir.path().join("train-labels-idx1-ubyte.gz"), &bomb).unwrap();
    let (result, largest) = largest_allocation(|| load_mnist(dir.path(), Split::Train));
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            DataError::TrailingData {
                expected_len: 10,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("train-labels-idx1-ubyte.gz"),
        "{err}"
    );
    assert!(largest < MIB, "allocated {largest} bytes");
}

#[test]
fn a_corrupt_gzip_checksum_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.gz");
    let mut bytes = gzip(&idx_bytes(LABELS_MAGIC, &[3], &[1, 2, 3]));
    // The CRC-32 is the trailer's first four bytes.
    let crc = bytes.len() - 8;
    bytes[crc] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let err = idx::read(&path, LABELS_MAGIC).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }), "{err}");
}

/// A tar archive of the CIFAR-10 files, one record each, optionally with the
/// size field of member `forge` replaced.
fn cifar10_tar(forge: Option<(usize, u64)>) -> Vec<u8> {
    let names = [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ];
    let mut builder = tar::Builder::new(Vec::new());
    for (k, name) in names.iter().enumerate() {
        let mut record = vec![k as u8];
        record.extend((0..3072).map(|i| (i * 7 + k) as u8));
        let mut header = tar::Header::new_gnu();
        header
            .set_path(format!("cifar-10-batches-bin/{name}"))
            .unwrap();
        header.set_mode(0o644);
        match forge {
            // GNU tar writes sizes of 8 GiB and more in base 256, which the
            // reader honours.
            Some((at, size)) if at == k => header.set_size(size),
            _ => header.set_size(record.len() as u64),
        }
        header.set_cksum();
        builder.append(&header, record.as_slice()).unwrap();
    }
    builder.into_inner().unwrap()
}

#[test]
fn a_truncated_cifar_archive_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("cifar-10-binary.tar.gz");
    let whole = gzip(&cifar10_tar(None));
    std::fs::write(&archive, &whole).unwrap();
    assert_eq!(load_cifar10(dir.path(), Split::Train).unwrap().len(), 5);
    // Cut inside the gzip trailer: every member is intact, but the CRC and
    // length cannot be checked.
    for cut in [4, 8, 12] {
        std::fs::write(&archive, &whole[..whole.len() - cut]).unwrap();
        for split in Split::ALL {
            let err = load_cifar10(dir.path(), split).unwrap_err();
            assert!(matches!(err, DataError::Io { .. }), "{err}");
            assert!(err.to_string().contains("cifar-10-binary.tar.gz"), "{err}");
        }
    }
}

#[test]
fn cifar_member_sizes_near_2_to_the_40_or_64_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("cifar-10-binary.tar.gz");
    for size in [1u64 << 40, 1 << 62] {
        for bytes in [
            cifar10_tar(Some((0, size))),
            gzip(&cifar10_tar(Some((0, size)))),
        ] {
            std::fs::write(&archive, &bytes).unwrap();
            let (result, largest) = largest_allocation(|| load_cifar10(dir.path(), Split::Train));
            let err = result.unwrap_err();
            let source = std::error::Error::source(&err).map(|s| s.to_string());
            assert!(
                matches!(
                    err,
                    DataError::TooLarge { .. } | DataError::PartialRecord { .. }
                ),
                "size {size}: {err}: {source:?}"
            );
            assert!(err.to_string().contains("data_batch_1.bin"), "{err}");
            assert!(largest < MIB, "allocated {largest} bytes");
        }
    }
    // The tar reader itself refuses a size whose padding overflows 64 bits;
    // that is still a one-line error naming the archive.
    std::fs::write(&archive, gzip(&cifar10_tar(Some((0, u64::MAX))))).unwrap();
    let (result, largest) = largest_allocation(|| load_cifar10(dir.path(), Split::Train));
    let err = result.unwrap_err();
    assert!(matches!(err, DataError::Io { .. }), "{err}");
    assert!(err.to_string().contains("cifar-10-binary.tar.gz"), "{err}");
    assert!(largest < MIB, "allocated {largest} bytes");

    // A whole number of records, within the limit, that the archive cannot
    // hold.
    let size = 3073 * 100_000;
    std::fs::write(&archive, gzip(&cifar10_tar(Some((0, size))))).unwrap();
    let (result, largest) = largest_allocation(|| load_cifar10(dir.path(), Split::Train));
    let err = result.unwrap_err();
    assert!(matches!(err, DataError::ImplausibleSize { .. }), "{err}");
    assert!(largest < MIB, "allocated {largest} bytes");
}

// The fuzz suite. Each case writes one file and runs a reader on it; the
// properties are that nothing panics (proptest reports a panic as a
// failure) and that no single allocation exceeds what the file on disk
// could hold once decompressed, plus a little for the loader's own tables.

/// The number of cases per property: `NOPROP_FUZZ_CASES`, else 256.
fn cases() -> u32 {
    std::env::var("NOPROP_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// The largest allocation a reader may make for a file of `len` bytes: the
/// most deflate can expand it (about 1032 times), decoded to `f32`s (four
/// bytes per pixel), with 1 MiB to spare.
fn allocation_bound(len: usize) -> usize {
    len * 1032 * 4 + MIB
}

/// A mutation of a valid file.
#[derive(Clone, Debug)]
enum Mutation {
    /// Keep only this many bytes (modulo the length).
    Truncate(usize),
    /// Flip one bit (position modulo the length in bits).
    FlipBit(usize),
    /// Overwrite a big-endian `u32` at this offset (modulo the length).
    Forge(usize, u32),
    /// Append these bytes.
    Append(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        any::<usize>().prop_map(Mutation::FlipBit),
        // Header words are where sizes live, so forge them most often.
        (0usize..16, any::<u32>()).prop_map(|(at, v)| Mutation::Forge(at, v)),
        (any::<usize>(), any::<u32>()).prop_map(|(at, v)| Mutation::Forge(at, v)),
        proptest::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Append),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match mutation {
        Mutation::Truncate(n) => bytes.truncate(n % bytes.len()),
        Mutation::FlipBit(bit) => {
            let bit = bit % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
        }
        Mutation::Forge(at, value) => {
            let at = at % bytes.len();
            for (i, b) in value.to_be_bytes().into_iter().enumerate() {
                if let Some(slot) = bytes.get_mut(at + i) {
                    *slot = b;
                }
            }
        }
        Mutation::Append(extra) => bytes.extend_from_slice(extra),
    }
}

/// Where a mutation is applied.
#[derive(Clone, Copy, Debug)]
enum Stage {
    /// To the raw content, stored raw.
    Raw,
    /// To the raw content, then gzipped (forged sizes behind a valid CRC).
    BeforeGzip,
    /// To the gzipped bytes.
    AfterGzip,
}

fn stage() -> impl Strategy<Value = Stage> {
    prop_oneof![
        Just(Stage::Raw),
        Just(Stage::BeforeGzip),
        Just(Stage::AfterGzip)
    ]
}

fn mutate(valid: &[u8], mutations: &[Mutation], stage: Stage) -> Vec<u8> {
    let mut bytes = valid.to_vec();
    match stage {
        Stage::Raw => mutations.iter().for_each(|m| apply(&mut bytes, m)),
        Stage::BeforeGzip => {
            mutations.iter().for_each(|m| apply(&mut bytes, m));
            bytes = gzip(&bytes);
        }
        Stage::AfterGzip => {
            bytes = gzip(&bytes);
            mutations.iter().for_each(|m| apply(&mut bytes, m));
        }
    }
    bytes
}

/// Runs `read` on `bytes` written to `path` and checks the allocation bound.
fn check_reader<T>(
    path: &Path,
    bytes: &[u8],
    read: impl FnOnce() -> T,
) -> Result<T, TestCaseError> {
    std::fs::write(path, bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (out, largest) = largest_allocation(read);
    prop_assert!(
        largest <= allocation_bound(bytes.len()),
        "allocated {} bytes for a file of {}",
        largest,
        bytes.len()
    );
    Ok(out)
}

fn valid_labels(n: usize) -> Vec<u8> {
    idx_bytes(LABELS_MAGIC, &[n as u32], &vec![7; n])
}

fn valid_images(n: usize) -> Vec<u8> {
    idx_bytes(IMAGES_MAGIC, &[n as u32, 28, 28], &vec![200; n * 784])
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn idx_reader_survives_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        gz in any::<bool>(),
        images in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes = if gz { gzip(&bytes) } else { bytes };
        let magic = if images { IMAGES_MAGIC } else { LABELS_MAGIC };
        let result = check_reader(&path, &bytes, || idx::read(&path, magic))?;
        if let Ok((dims, values)) = result {
            prop_assert_eq!(values.len() as u64, dims.iter().map(|&d| d as u64).product::<u64>());
        }
    }

    #[test]
    fn idx_reader_survives_mutated_valid_files(
        n in 0usize..4,
        images in any::<bool>(),
        mutations in proptest::collection::vec(mutation(), 1..4),
        stage in stage(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let (valid, magic) = if images {
            (valid_images(n), IMAGES_MAGIC)
        } else {
            (valid_labels(n), LABELS_MAGIC)
        };
        let bytes = mutate(&valid, &mutations, stage);
        let _outcome = check_reader(&path, &bytes, || idx::read(&path, magic))?;
    }

    #[test]
    fn mnist_loader_survives_mutated_files(
        n in 1usize..4,
        mutations in proptest::collection::vec(mutation(), 1..3),
        stage in stage(),
        target_images in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        write_mnist(dir.path(), n);
        let (name, valid) = if target_images {
            ("train-images-idx3-ubyte", valid_images(n))
        } else {
            ("train-labels-idx1-ubyte", valid_labels(n))
        };
        let bytes = mutate(&valid, &mutations, stage);
        let path = dir.path().join(name);
        let result = check_reader(&path, &bytes, || load_mnist(dir.path(), Split::Train))?;
        if let Ok(train) = result {
            prop_assert!(!train.is_empty());
            prop_assert_eq!(train.images.len(), train.len() * 784);
        }
    }

    #[test]
    fn cifar_readers_survive_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        gz in any::<bool>(),
        hundred in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archive.tar.gz");
        let bytes = if gz { gzip(&bytes) } else { bytes };
        let _outcome = check_reader(&path, &bytes, || {
            if hundred {
                load_cifar100(&path, Split::Test).map(|d| d.len())
            } else {
                load_cifar10(&path, Split::Test).map(|d| d.len())
            }
        })?;
    }

    #[test]
    fn cifar_archive_reader_survives_mutated_archives(
        mutations in proptest::collection::vec(mutation(), 1..3),
        stage in stage(),
        // Tar headers are 512 bytes, with the size field at offset 124, so
        // forge inside the first few headers' size fields as well.
        forged_size in proptest::option::of((0usize..6, any::<u64>())),
        split_is_train in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cifar-10-binary.tar.gz");
        let valid = cifar10_tar(forged_size);
        let bytes = mutate(&valid, &mutations, stage);
        let split = if split_is_train { Split::Train } else { Split::Test };
        let result = check_reader(&path, &bytes, || load_cifar10(&path, split))?;
        if let Ok(data) = result {
            prop_assert!(!data.is_empty());
            prop_assert_eq!(data.images.len(), data.len() * 3072);
        }
    }

    #[test]
    fn cifar_record_files_survive_arbitrary_contents(
        bytes in proptest::collection::vec(any::<u8>(), 0..8000),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("cifar-100-binary");
        std::fs::create_dir_all(&folder).unwrap();
        let path = folder.join("test.bin");
        let result = check_reader(&path, &bytes, || load_cifar100(dir.path(), Split::Test))?;
        if let Ok(data) = result {
            prop_assert_eq!(data.len() * 3074, bytes.len());
        }
    }
}

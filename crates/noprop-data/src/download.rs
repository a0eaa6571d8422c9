//! Checksummed downloads of the official files (feature `download`).
//!
//! Every file is fetched into a temporary file next to its destination,
//! verified, and only then renamed into place, so an interrupted or corrupt
//! download never leaves a file that the loaders would pick up. Files that
//! are already there are verified instead of fetched again; one that fails
//! verification is reported, not overwritten, since it may be the user's.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::catalog::{CifarLayout, DatasetSpec, CIFAR100_LAYOUT, CIFAR10_LAYOUT, MNIST_LAYOUT};
use crate::catalog::{DatasetKind, Layout};
use crate::cifar;
use crate::error::DataError;
use crate::files::find_raw_or_gz;
use crate::verify::{check, md5_of, sha256_of_content, verify_record_sizes};

/// The default MNIST mirror, which serves the four canonical `.gz` files.
pub const MNIST_BASE_URL: &str = MNIST_LAYOUT.base_url;

/// The SHA-256 of each canonical MNIST file *after* decompression, keyed by
/// its name without `.gz` (from the catalog).
///
/// Checking the IDX content rather than the `.gz` wrapper accepts any mirror
/// that re-compressed the files, and raw files a user unpacked by hand.
pub const MNIST_SHA256: [(&str, &str); 4] = [
    (MNIST_LAYOUT.files[0].stem, MNIST_LAYOUT.files[0].sha256),
    (MNIST_LAYOUT.files[1].stem, MNIST_LAYOUT.files[1].sha256),
    (MNIST_LAYOUT.files[2].stem, MNIST_LAYOUT.files[2].sha256),
    (MNIST_LAYOUT.files[3].stem, MNIST_LAYOUT.files[3].sha256),
];

/// The official CIFAR-10 binary archive.
pub const CIFAR10_URL: &str = CIFAR10_LAYOUT.url;
/// The MD5 of [`CIFAR10_URL`]'s archive, as published on the CIFAR page.
pub const CIFAR10_MD5: &str = CIFAR10_LAYOUT.md5;
/// The official CIFAR-100 binary archive.
pub const CIFAR100_URL: &str = CIFAR100_LAYOUT.url;
/// The MD5 of [`CIFAR100_URL`]'s archive, as published on the CIFAR page.
pub const CIFAR100_MD5: &str = CIFAR100_LAYOUT.md5;

/// Verifies the files of a data set already in `dest` and fetches the
/// missing ones from the catalog's default URLs; what
/// [`DatasetKind::ensure`] calls with `download` true.
pub fn download(kind: DatasetKind, dest: &Path) -> Result<(), DataError> {
    let spec = kind.spec();
    match &spec.layout {
        Layout::Idx(layout) => fetch_mnist(dest, layout.base_url, &idx_table(layout)),
        Layout::Cifar(layout) => fetch_cifar(dest, layout.url, spec, layout, layout.md5),
    }
}

fn idx_table(layout: &crate::catalog::IdxLayout) -> Vec<(&'static str, &'static str)> {
    layout.files.iter().map(|f| (f.stem, f.sha256)).collect()
}

/// Fetches the MNIST files from `base_url` into `dest` (as `<name>.gz`),
/// verifying each against `table`; a file already there, raw or `.gz`, is
/// verified instead of downloaded. The table is a parameter so that tests
/// can serve small files of their own.
fn fetch_mnist(dest: &Path, base_url: &str, table: &[(&str, &str)]) -> Result<(), DataError> {
    create_dir(dest)?;
    for &(name, expected) in table {
        if let Some(existing) = find_raw_or_gz(dest, name) {
            check(existing.display(), expected, sha256_of_content(&existing)?)?;
            continue;
        }
        let url = join_url(base_url, &format!("{name}.gz"));
        download_verified(&url, &dest.join(format!("{name}.gz")), |tmp| {
            let found = sha256_of_content(tmp).map_err(|e| DataError::Download {
                url: url.clone(),
                message: format!("the file is not valid gzip: {e}"),
            })?;
            check(&url, expected, found)
        })?;
    }
    Ok(())
}

/// The CIFAR downloads with the expected checksum as a parameter.
fn fetch_cifar(
    dest: &Path,
    url: &str,
    spec: &DatasetSpec,
    layout: &CifarLayout,
    expected_md5: &str,
) -> Result<(), DataError> {
    let unpacked = dest.join(layout.folder);
    let archive = dest.join(layout.archive);
    if layout.all_files().all(|name| unpacked.join(name).is_file()) {
        // An archive kept beside the folder is verified too: a corrupt file
        // is reported whichever copy it is.
        if archive.is_file() {
            check(archive.display(), expected_md5, md5_of(&archive)?)?;
        }
        return verify_record_sizes(spec, layout, &unpacked);
    }
    create_dir(dest)?;
    let downloaded = if archive.is_file() {
        check(archive.display(), expected_md5, md5_of(&archive)?)?;
        false
    } else {
        download_verified(url, &archive, |tmp| check(url, expected_md5, md5_of(tmp)?))?;
        true
    };
    unpack(&archive, spec, layout, &unpacked)?;
    if downloaded {
        std::fs::remove_file(&archive).map_err(|e| DataError::io(&archive, e))?;
    }
    Ok(())
}

/// Writes the record files of `spec` from the archive into `unpacked`, each
/// through a temporary file, so that a half-written file never looks
/// complete.
fn unpack(
    archive: &Path,
    spec: &DatasetSpec,
    layout: &CifarLayout,
    unpacked: &Path,
) -> Result<(), DataError> {
    let names: Vec<&str> = layout.all_files().collect();
    let members = cifar::read_members(archive, spec, layout, &names)?;
    create_dir(unpacked)?;
    for (name, bytes) in names.iter().zip(members) {
        let Some(bytes) = bytes else {
            return Err(DataError::MissingFile {
                path: archive.join(layout.folder).join(name),
                hint: format!("the archive has no member {}/{name}", layout.folder),
            });
        };
        let path = unpacked.join(name);
        let tmp = temp_path(&path);
        let written = std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| DataError::io(&path, e));
        if written.is_err() {
            // The temporary file may not even exist; the write error is the
            // one worth reporting.
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
    }
    Ok(())
}

/// Downloads `url` into a temporary file beside `dest`, runs `verify` on it,
/// and renames it to `dest`. On any failure the temporary file is removed.
fn download_verified(
    url: &str,
    dest: &Path,
    verify: impl FnOnce(&Path) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let tmp = temp_path(dest);
    let result = download_to(url, &tmp)
        .and_then(|()| verify(&tmp))
        .and_then(|()| std::fs::rename(&tmp, dest).map_err(|e| DataError::io(dest, e)));
    if result.is_err() {
        // Removing may fail because nothing was created; the first error is
        // the one to report either way.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Streams the body of a GET request into a new file.
fn download_to(url: &str, path: &Path) -> Result<(), DataError> {
    let failed = |message: String| DataError::Download {
        url: url.to_owned(),
        message,
    };
    let config = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_per_read(Some(Duration::from_secs(120)))
        .user_agent(concat!("noprop-data/", env!("CARGO_PKG_VERSION")))
        .build();
    let agent = ureq::Agent::new_with_config(config);
    let mut response = agent.get(url).call().map_err(|e| failed(e.to_string()))?;
    let mut body = response.body_mut().as_reader();
    let mut file = File::create(path).map_err(|e| DataError::io(path, e))?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = body.read(&mut buf).map_err(|e| failed(e.to_string()))?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])
            .map_err(|e| DataError::io(path, e))?;
    }
    file.sync_all().map_err(|e| DataError::io(path, e))
}

/// A hidden, per-process temporary name in the same folder as `dest`, so
/// that the final rename stays on one file system.
fn temp_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map_or_else(|| "download".into(), |n| n.to_string_lossy().into_owned());
    dest.with_file_name(format!(".{name}.{}.part", std::process::id()))
}

fn create_dir(dir: &Path) -> Result<(), DataError> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))
}

/// Joins a folder URL and a file name with exactly one slash.
fn join_url(base: &str, name: &str) -> String {
    format!("{}/{name}", base.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::hex;
    use crate::{idx, load_cifar10, load_mnist, Split, MNIST_FILES};
    use md5::Md5;
    use sha2::{Digest, Sha256};
    use std::collections::HashMap;
    use std::io::BufRead;
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    /// Serves the given files over HTTP/1.1 on a loopback port, answering at
    /// most `max_requests` requests and giving up after 20 seconds, so the
    /// thread always ends by itself. Unknown paths get a 404.
    fn serve(files: Served, max_requests: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut served = 0;
            while served < max_requests && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        answer(stream, &files);
                        served += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => break,
                }
            }
        });
        url
    }

    fn answer(stream: TcpStream, files: &Served) {
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut reader = std::io::BufReader::new(stream);
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).is_err() {
            return;
        }
        // Skip the headers up to the blank line.
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
            line.clear();
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or("/");
        let body = files.get(path.trim_start_matches('/'));
        let mut stream = reader.into_inner();
        let (status, body) = match body {
            Some(body) => ("200 OK", body.as_slice()),
            None => ("404 Not Found", &b"not found"[..]),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body));
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        hex(&Sha256::digest(bytes))
    }

    /// Files served by name.
    type Served = HashMap<String, Vec<u8>>;

    /// Tiny MNIST files (3 training and 2 test images) as served, gzipped,
    /// and the table of their decompressed SHA-256s.
    fn tiny_mnist() -> (Served, Vec<(String, String)>) {
        let contents = [
            idx::encode(&[3, 28, 28], &vec![7u8; 3 * 784]),
            idx::encode(&[3], &[1, 2, 3]),
            idx::encode(&[2, 28, 28], &vec![9u8; 2 * 784]),
            idx::encode(&[2], &[4, 5]),
        ];
        let mut files = HashMap::new();
        let mut table = Vec::new();
        for (name, content) in MNIST_FILES.iter().zip(&contents) {
            files.insert(format!("{name}.gz"), gzip(content));
            table.push((name.to_string(), sha256_hex(content)));
        }
        (files, table)
    }

    fn borrowed(table: &[(String, String)]) -> Vec<(&str, &str)> {
        table
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect()
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn mnist_download_verifies_then_skips_present_files() {
        let (files, table) = tiny_mnist();
        let url = serve(files, 4);
        let dest = tempfile::tempdir().unwrap();
        fetch_mnist(dest.path(), &url, &borrowed(&table)).unwrap();
        let mut expected: Vec<String> = MNIST_FILES.iter().map(|n| format!("{n}.gz")).collect();
        expected.sort();
        assert_eq!(entries(dest.path()), expected);
        let train = load_mnist(dest.path(), Split::Train).unwrap();
        assert_eq!(train.labels, vec![1, 2, 3]);

        // The server has stopped after four requests, so a second call only
        // succeeds by verifying the files already there.
        fetch_mnist(dest.path(), &url, &borrowed(&table)).unwrap();
    }

    #[test]
    fn mnist_download_with_a_wrong_checksum_leaves_no_file() {
        let (files, mut table) = tiny_mnist();
        table[1].1 = "00".repeat(32);
        let url = serve(files, 2);
        let dest = tempfile::tempdir().unwrap();
        let err = fetch_mnist(dest.path(), &url, &borrowed(&table)).unwrap_err();
        match &err {
            DataError::Checksum {
                location,
                expected,
                found,
            } => {
                assert!(location.ends_with("train-labels-idx1-ubyte.gz"), "{err}");
                assert_eq!(expected, &"00".repeat(32));
                assert_eq!(found, &table_hash_of_labels());
            }
            other => panic!("expected a checksum error, got {other}"),
        }
        // The first file was good and stays; the bad one left nothing, not
        // even its temporary file.
        assert_eq!(entries(dest.path()), vec!["train-images-idx3-ubyte.gz"]);
    }

    fn table_hash_of_labels() -> String {
        sha256_hex(&idx::encode(&[3], &[1, 2, 3]))
    }

    #[test]
    fn a_corrupt_file_already_present_is_reported_not_replaced() {
        let (_, table) = tiny_mnist();
        let dest = tempfile::tempdir().unwrap();
        let path = dest.path().join("train-images-idx3-ubyte");
        std::fs::write(&path, b"not mnist").unwrap();
        let err = fetch_mnist(dest.path(), "http://127.0.0.1:9/", &borrowed(&table)).unwrap_err();
        assert!(
            matches!(&err, DataError::Checksum { location, .. } if location.contains("train-images")),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"not mnist");
    }

    #[test]
    fn a_missing_remote_file_is_a_download_error() {
        let (mut files, table) = tiny_mnist();
        files.remove("train-images-idx3-ubyte.gz");
        let url = serve(files, 1);
        let dest = tempfile::tempdir().unwrap();
        let err = fetch_mnist(dest.path(), &url, &borrowed(&table)).unwrap_err();
        assert!(
            matches!(&err, DataError::Download { url, .. } if url.ends_with("train-images-idx3-ubyte.gz")),
            "{err}"
        );
        assert!(entries(dest.path()).is_empty());
    }

    /// A CIFAR-10-format archive with one record per file.
    fn tiny_cifar10_archive() -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (k, name) in CIFAR10_LAYOUT.all_files().enumerate() {
            let mut record = vec![k as u8];
            record.extend(std::iter::repeat_n(k as u8 * 10, 3072));
            let mut header = tar::Header::new_gnu();
            header.set_size(record.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(
                    &mut header,
                    format!("cifar-10-batches-bin/{name}"),
                    record.as_slice(),
                )
                .unwrap();
        }
        gzip(&builder.into_inner().unwrap())
    }

    #[test]
    fn cifar_download_verifies_and_unpacks() {
        let archive = tiny_cifar10_archive();
        let md5 = hex(&Md5::digest(&archive));
        let url = serve(HashMap::from([("c10.tar.gz".to_string(), archive)]), 1);
        let dest = tempfile::tempdir().unwrap();
        // The tiny archive has one record per file, so the size check of an
        // unpacked folder expects one.
        let layout = CifarLayout {
            train_records_per_file: 1,
            test_records_per_file: 1,
            ..CIFAR10_LAYOUT
        };
        fetch_cifar(
            dest.path(),
            &format!("{url}c10.tar.gz"),
            DatasetKind::Cifar10.spec(),
            &layout,
            &md5,
        )
        .unwrap();
        // The downloaded archive is gone; the unpacked folder loads.
        assert_eq!(entries(dest.path()), vec!["cifar-10-batches-bin"]);
        let train = load_cifar10(dest.path(), Split::Train).unwrap();
        assert_eq!(train.labels, vec![0, 1, 2, 3, 4]);
        let test = load_cifar10(dest.path(), Split::Test).unwrap();
        assert_eq!(test.labels, vec![5]);
        // Present now, so nothing is fetched (the server is gone), but the
        // files are checked: one cut short is reported by name.
        fetch_cifar(
            dest.path(),
            &format!("{url}c10.tar.gz"),
            DatasetKind::Cifar10.spec(),
            &layout,
            &md5,
        )
        .unwrap();
        let batch = dest.path().join("cifar-10-batches-bin/data_batch_3.bin");
        std::fs::write(&batch, [2u8; 100]).unwrap();
        let err = fetch_cifar(
            dest.path(),
            &format!("{url}c10.tar.gz"),
            DatasetKind::Cifar10.spec(),
            &layout,
            &md5,
        )
        .unwrap_err();
        assert!(
            matches!(&err, DataError::Truncated { path, .. } if path.ends_with("data_batch_3.bin")),
            "{err}"
        );
    }

    #[test]
    fn cifar_download_with_a_wrong_checksum_leaves_no_file() {
        let url = serve(
            HashMap::from([("c10.tar.gz".to_string(), tiny_cifar10_archive())]),
            1,
        );
        let dest = tempfile::tempdir().unwrap();
        let err = fetch_cifar(
            dest.path(),
            &format!("{url}c10.tar.gz"),
            DatasetKind::Cifar10.spec(),
            &CIFAR10_LAYOUT,
            CIFAR10_MD5,
        )
        .unwrap_err();
        assert!(
            matches!(&err, DataError::Checksum { expected, .. } if expected == CIFAR10_MD5),
            "{err}"
        );
        assert!(entries(dest.path()).is_empty());
    }

    #[test]
    fn join_url_uses_one_slash() {
        assert_eq!(join_url("http://h/m/", "f.gz"), "http://h/m/f.gz");
        assert_eq!(join_url("http://h/m", "f.gz"), "http://h/m/f.gz");
    }

    /// Checks the shared real MNIST files against the published table.
    #[test]
    #[ignore = "needs real MNIST: set NOPROP_DATA or have ../shared/data"]
    fn real_mnist_matches_the_published_checksums() {
        let dir = std::env::var_os(crate::DATA_ENV)
            .map(|root| PathBuf::from(root).join("mnist"))
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/mnist")
            });
        for (name, expected) in MNIST_SHA256 {
            let path = find_raw_or_gz(&dir, name).expect("the MNIST file is present");
            check(path.display(), expected, sha256_of_content(&path).unwrap()).unwrap();
        }
    }
}

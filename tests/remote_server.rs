//! The S3 server of the remote tier's tests (`s3s-fs`, see `common/s3.rs`)
//! does what the remote tier relies on, through `object_store`'s S3 client:
//! create-only and compare-and-swap puts, multipart uploads (streamed,
//! part by part, aborted), ranged reads, listing and deleting, and data
//! that outlive a killed and restarted server.
#![cfg(feature = "remote")]

mod common;

use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{
    BackoffConfig, Error, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutPayload, RetryConfig, UpdateVersion,
    WriteMultipart,
};

use common::s3::{S3Server, ACCESS_KEY, BUCKET, REGION, SECRET_KEY};

const MIB: usize = 1 << 20;

/// A client for `server`'s bucket (path-style requests, conditional puts
/// by ETag: the builder's defaults), with `retry`.
fn store_with(server: &S3Server, retry: RetryConfig) -> AmazonS3 {
    AmazonS3Builder::new()
        .with_endpoint(server.endpoint())
        .with_allow_http(true)
        .with_bucket_name(BUCKET)
        .with_access_key_id(ACCESS_KEY)
        .with_secret_access_key(SECRET_KEY)
        .with_region(REGION)
        .with_retry(retry)
        .build()
        .expect("build the S3 client")
}

fn store(server: &S3Server) -> AmazonS3 {
    store_with(server, RetryConfig::default())
}

/// Gives up after one retry within 2 s: a dead server fails fast.
fn short_retry() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig { init_backoff: Duration::from_millis(50), max_backoff: Duration::from_millis(200), base: 2.0 },
        max_retries: 1,
        retry_timeout: Duration::from_secs(2),
    }
}

/// `len` deterministic bytes that differ for each `seed`.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn read(store: &AmazonS3, path: &Path) -> Vec<u8> {
    store.get(path).await.expect("get").bytes().await.expect("read the body").to_vec()
}

/// The object's file in the server's data folder.
fn object_file(server: &S3Server, path: &Path) -> std::path::PathBuf {
    server.data.join(BUCKET).join(path.as_ref())
}

#[tokio::test]
async fn create_only_put_succeeds_once() {
    let server = S3Server::start();
    let store = store(&server);
    let path = Path::from("create/object");

    let first = store.put_opts(&path, PutPayload::from(bytes(100, 1)), PutMode::Create.into()).await.expect("the first create");
    assert!(first.e_tag.is_some(), "a put returns the ETag");

    let second = store.put_opts(&path, PutPayload::from(bytes(100, 2)), PutMode::Create.into()).await;
    assert!(matches!(second, Err(Error::AlreadyExists { .. })), "the second create: {second:?}");
    assert_eq!(read(&store, &path).await, bytes(100, 1), "the first object stays");
    assert_eq!(std::fs::read(object_file(&server, &path)).unwrap(), bytes(100, 1), "stored as a file under the bucket's folder");
}

#[tokio::test]
async fn update_needs_the_current_etag() {
    let server = S3Server::start();
    let store = store(&server);
    let path = Path::from("update/object");

    let v1 = store.put(&path, PutPayload::from(bytes(64, 1))).await.unwrap();
    assert_eq!(store.head(&path).await.unwrap().e_tag, v1.e_tag, "head reports the ETag that the put returned");

    let update = |e_tag: Option<String>| PutMode::Update(UpdateVersion { e_tag, version: None });
    let v2 =
        store.put_opts(&path, PutPayload::from(bytes(64, 2)), update(v1.e_tag.clone()).into()).await.expect("update with the current ETag");
    assert_ne!(v2.e_tag, v1.e_tag);
    assert_eq!(read(&store, &path).await, bytes(64, 2));

    let stale = store.put_opts(&path, PutPayload::from(bytes(64, 3)), update(v1.e_tag.clone()).into()).await;
    assert!(matches!(stale, Err(Error::Precondition { .. })), "update with a stale ETag: {stale:?}");
    assert_eq!(read(&store, &path).await, bytes(64, 2), "a refused update changes nothing");

    let missing = store.put_opts(&Path::from("update/missing"), PutPayload::from(bytes(8, 4)), update(v2.e_tag.clone()).into()).await;
    assert!(matches!(missing, Err(Error::Precondition { .. })), "update of a missing object: {missing:?}");
}

#[tokio::test]
async fn streamed_multipart_upload_round_trips() {
    let server = S3Server::start();
    let store = store(&server);
    let path = Path::from("multipart/streamed");
    let data = bytes(12 * MIB + 12345, 7);

    let upload = store.put_multipart(&path).await.expect("start the upload");
    let mut writer = WriteMultipart::new_with_chunk_size(upload, 5 * MIB);
    // Written in uneven pieces: the writer cuts them into 5 MiB parts.
    for piece in data.chunks(MIB + 999) {
        writer.wait_for_capacity(4).await.unwrap();
        writer.write(piece);
    }
    let done = writer.finish().await.expect("complete the upload");

    let e_tag = done.e_tag.expect("a completed upload returns the ETag");
    assert!(e_tag.trim_matches('"').ends_with("-3"), "a multipart ETag names its part count (3 parts of at most 5 MiB): {e_tag}");
    let meta = store.head(&path).await.unwrap();
    assert_eq!(meta.size, data.len() as u64);
    assert_eq!(meta.e_tag.as_deref(), Some(e_tag.as_str()));
    assert!(read(&store, &path).await == data, "the object differs from what was uploaded");
}

#[tokio::test]
async fn multipart_store_completes_and_aborts() {
    let server = S3Server::start();
    let store = store(&server);

    // Part by part, then complete: every part but the last has at least 5 MiB.
    let path = Path::from("parts/completed");
    let id = store.create_multipart(&path).await.unwrap();
    let (a, b) = (bytes(5 * MIB, 1), bytes(1000, 2));
    let parts = vec![
        store.put_part(&path, &id, 0, PutPayload::from(a.clone())).await.unwrap(),
        store.put_part(&path, &id, 1, PutPayload::from(b.clone())).await.unwrap(),
    ];
    store.complete_multipart(&path, &id, parts).await.expect("complete");
    assert!(read(&store, &path).await == [a, b].concat());

    // Part by part, then abort: no object, and the parts are gone from the server.
    let path = Path::from("parts/aborted");
    let id = store.create_multipart(&path).await.unwrap();
    store.put_part(&path, &id, 0, PutPayload::from(bytes(5 * MIB, 3))).await.unwrap();
    store.put_part(&path, &id, 1, PutPayload::from(bytes(1000, 4))).await.unwrap();
    store.abort_multipart(&path, &id).await.expect("abort");

    let head = store.head(&path).await;
    assert!(matches!(head, Err(Error::NotFound { .. })), "head after abort: {head:?}");
    let listed: Vec<_> = store.list(Some(&Path::from("parts"))).try_collect().await.unwrap();
    assert_eq!(listed.iter().map(|m| m.location.as_ref()).collect::<Vec<_>>(), ["parts/completed"]);
    let leftovers: Vec<_> = std::fs::read_dir(&server.data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(id.as_str()))
        .collect();
    assert!(leftovers.is_empty(), "files of the aborted upload: {leftovers:?}");
}

#[tokio::test]
async fn ranged_reads_return_the_right_bytes() {
    let server = S3Server::start();
    let store = store(&server);
    let path = Path::from("range/object");
    let data = bytes(100_000, 5);
    store.put(&path, PutPayload::from(data.clone())).await.unwrap();

    assert_eq!(store.get_range(&path, 1000..5096).await.unwrap(), data[1000..5096]);
    assert_eq!(store.get_range(&path, 0..1).await.unwrap(), data[..1]);
    assert_eq!(store.get_range(&path, 99_000..100_000).await.unwrap(), data[99_000..]);
    let ranges = store.get_ranges(&path, &[10..20, 50_000..50_100]).await.unwrap();
    assert_eq!(ranges[0], data[10..20]);
    assert_eq!(ranges[1], data[50_000..50_100]);

    // The tail (a zip's central directory) and everything from an offset.
    let suffix = GetOptions { range: Some(GetRange::Suffix(300)), ..Default::default() };
    let tail = store.get_opts(&path, suffix).await.unwrap();
    assert_eq!(tail.range, 99_700..100_000);
    assert_eq!(tail.meta.size, 100_000);
    assert_eq!(tail.bytes().await.unwrap(), data[99_700..]);
    let offset = GetOptions { range: Some(GetRange::Offset(98_765)), ..Default::default() };
    assert_eq!(store.get_opts(&path, offset).await.unwrap().bytes().await.unwrap(), data[98_765..]);
}

#[tokio::test]
async fn list_by_prefix_and_delete() {
    let server = S3Server::start();
    let store = store(&server);
    for (i, key) in ["run/a/1", "run/a/2", "run/a/sub/3", "run/ab/4", "other/5"].iter().enumerate() {
        store.put(&Path::from(*key), PutPayload::from(bytes(10 + i, i as u64))).await.unwrap();
    }
    let keys = |metas: Vec<object_store::ObjectMeta>| {
        let mut keys: Vec<String> = metas.into_iter().map(|m| m.location.to_string()).collect();
        keys.sort();
        keys
    };

    // A prefix is whole path segments: run/a holds neither run/ab/4 nor other/5.
    let listed: Vec<_> = store.list(Some(&Path::from("run/a"))).try_collect().await.unwrap();
    assert_eq!(listed.iter().find(|m| m.location.as_ref() == "run/a/2").unwrap().size, 11);
    assert_eq!(keys(listed), ["run/a/1", "run/a/2", "run/a/sub/3"]);
    let level = store.list_with_delimiter(Some(&Path::from("run/a"))).await.unwrap();
    assert_eq!(keys(level.objects), ["run/a/1", "run/a/2"]);
    assert_eq!(level.common_prefixes, [Path::from("run/a/sub")]);

    store.delete(&Path::from("run/a/1")).await.unwrap();
    store.delete(&Path::from("run/a/sub/3")).await.unwrap();
    store.delete(&Path::from("run/a/never")).await.expect("deleting a missing object succeeds, as on S3");
    let head = store.head(&Path::from("run/a/1")).await;
    assert!(matches!(head, Err(Error::NotFound { .. })), "head after delete: {head:?}");
    let get = store.get(&Path::from("run/a/1")).await;
    assert!(matches!(get, Err(Error::NotFound { .. })), "get after delete: {get:?}");
    let listed: Vec<_> = store.list(Some(&Path::from("run"))).try_collect().await.unwrap();
    assert_eq!(keys(listed), ["run/a/2", "run/ab/4"]);
    let level = store.list_with_delimiter(Some(&Path::from("run/a"))).await.unwrap();
    assert!(level.common_prefixes.is_empty(), "a deleted object's folder is no prefix: {:?}", level.common_prefixes);
}

#[tokio::test]
async fn data_survive_a_killed_and_restarted_server() {
    let mut server = S3Server::start();
    let store = store_with(&server, short_retry());
    let path = Path::from("restart/object");
    let data = bytes(4096, 9);
    store.put(&path, PutPayload::from(data.clone())).await.unwrap();
    assert!(server.is_running());
    let port = server.port;

    server.kill();
    assert!(!server.is_running());
    // The get gives up after its one retry; the deadline only keeps a
    // client that retried on forever from hanging the test.
    let down =
        tokio::time::timeout(Duration::from_secs(120), store.get(&path)).await.expect("a get from a dead server gave up after its retry");
    assert!(down.is_err(), "get from a killed server: {down:?}");
    let put = store.put(&Path::from("restart/other"), PutPayload::from(bytes(10, 1))).await;
    assert!(put.is_err(), "put to a killed server: {put:?}");

    server.restart();
    assert!(server.is_running());
    assert_eq!(server.port, port, "the same endpoint");
    assert_eq!(read(&store, &path).await, data, "the same client reads the earlier object");
    let update = PutMode::Update(UpdateVersion { e_tag: store.head(&path).await.unwrap().e_tag, version: None });
    store.put_opts(&path, PutPayload::from(bytes(4096, 10)), update.into()).await.expect("compare-and-swap after the restart");
    assert_eq!(read(&store, &path).await, bytes(4096, 10));
}

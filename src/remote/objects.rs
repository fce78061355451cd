//! The object-store layer that the remote tier and sharded checkpoints
//! share: small JSON objects read with their version, puts whose condition
//! (create-if-absent, update-if-unchanged) is an outcome rather than an
//! error, listings, deletes, and moving a `LATEST` pointer forward.
//!
//! Every failure names the store's location; refused credentials and a
//! missing bucket are named as such, with the variables that hold the
//! credentials (see [`Access`]). Keys and what lives under them are the
//! callers' layouts ([`super::manifest::Layout`], `sharded`'s layout).

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use super::manifest::Latest;
use crate::config::RemoteConfig;
use crate::error::{Error, Result, StoreError};

/// Retries of a conditional update of `LATEST` that lost a race.
const LATEST_RETRIES: usize = 16;

/// What a conditional put found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Put {
    /// The object was written.
    Written,
    /// The condition did not hold: the object exists (create-if-absent) or
    /// changed since it was read (update-if-unchanged).
    Lost,
    /// The store has no such condition (a local folder has no
    /// update-if-unchanged; S3 with conditional puts turned off has neither).
    Unsupported,
}

/// One object store, with what its messages name.
pub(crate) struct Objects {
    store: Arc<dyn ObjectStore>,
    /// `<url>/<model>` (or the folder sharded checkpoints live in), for messages.
    location: String,
    access: Access,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Objects").field("location", &self.location).finish_non_exhaustive()
    }
}

/// An object-store failure on `what`, naming it, with the store's error as
/// its source. For requests made outside an [`Objects`] (a ranged reader's
/// own closure).
pub(crate) fn remote_err(op: &'static str, what: impl std::fmt::Display, e: object_store::Error) -> Error {
    Error::Remote { op, target: what.to_string(), source: StoreError(e) }
}

/// `value` as the JSON of an object at `key`: indented for what people
/// read (manifests), on one line for records and `LATEST`.
///
/// # Errors
/// [`Error::Encode`] naming `key` when it cannot be written as JSON (a map
/// with keys that are not strings; none of modelio's records has one).
pub(crate) fn to_json<T: serde::Serialize + ?Sized>(key: &Key, value: &T, indented: bool) -> Result<Vec<u8>> {
    let json = if indented { serde_json::to_vec_pretty(value) } else { serde_json::to_vec(value) };
    json.map_err(|e| Error::Encode { target: key.to_string(), detail: e.to_string() })
}

/// A create-if-absent the store cannot do: what depends on it (a commit
/// that must not replace another's) is refused rather than done unsafely.
pub(crate) fn unsupported(op: &'static str, key: &Key) -> Error {
    Error::RemoteUnsupported { op, target: key.to_string() }
}

impl Objects {
    /// `store`, built from `config`, whose messages name `location`.
    pub fn new(store: Arc<dyn ObjectStore>, config: &RemoteConfig, location: String) -> Objects {
        Objects { store, location, access: Access::of(config) }
    }

    /// The store itself, for what this layer does not wrap (multipart uploads).
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    /// A failed request `op` on `what`, classified (see [`Access::err`]).
    pub fn err(&self, op: &'static str, what: impl std::fmt::Display, e: object_store::Error) -> Error {
        self.access.err(&self.location, op, what, e)
    }

    /// An object that does not hold what it should.
    pub fn damaged(&self, checkpoint: impl std::fmt::Display, object: &str, detail: impl Into<String>) -> Error {
        Error::RemoteDamaged {
            location: self.location.clone(),
            checkpoint: checkpoint.to_string(),
            object: object.to_string(),
            detail: detail.into(),
        }
    }

    /// A key stored as text in a manifest, a record or `LATEST`, as written
    /// (not escaped again).
    ///
    /// # Errors
    /// [`Error::RemoteDamaged`] when it is not a valid key.
    pub fn stored_key(&self, text: &str) -> Result<Key> {
        Key::parse(text).map_err(|e| self.damaged(text, "key", e.to_string()))
    }

    /// A small object's bytes and version, `None` when absent.
    ///
    /// # Errors
    /// [`Error::Remote`] (or a refusal) when it cannot be read.
    pub async fn get_raw(&self, key: &Key) -> Result<Option<(Vec<u8>, UpdateVersion)>> {
        let got = match self.store.get(key).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err("read", key, e)),
        };
        let version = UpdateVersion { e_tag: got.meta.e_tag.clone(), version: got.meta.version.clone() };
        let bytes = got.bytes().await.map_err(|e| self.err("read", key, e))?;
        Ok(Some((bytes.to_vec(), version)))
    }

    /// A small JSON object and its version, `None` when absent.
    ///
    /// # Errors
    /// [`Error::RemoteDamaged`] when it does not parse; as [`Objects::get_raw`].
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, key: &Key) -> Result<Option<(T, UpdateVersion)>> {
        let Some((bytes, version)) = self.get_raw(key).await? else { return Ok(None) };
        let value = serde_json::from_slice(&bytes).map_err(|e| self.damaged(key, "json", e.to_string()))?;
        Ok(Some((value, version)))
    }

    /// Bytes `range` of the object at `key`.
    ///
    /// # Errors
    /// [`Error::Remote`] (or a refusal), a missing object included.
    pub async fn get_range(&self, key: &Key, range: std::ops::Range<u64>) -> Result<Bytes> {
        self.store.get_range(key, range).await.map_err(|e| self.err("read", key, e))
    }

    /// The object's size and version, `None` when absent.
    ///
    /// # Errors
    /// [`Error::Remote`] (or a refusal) when the store cannot be asked.
    pub async fn head(&self, key: &Key) -> Result<Option<ObjectMeta>> {
        match self.store.head(key).await {
            Ok(meta) => Ok(Some(meta)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("look for", key, e)),
        }
    }

    /// Whether an object is at `key`.
    ///
    /// # Errors
    /// As [`Objects::head`].
    pub async fn exists(&self, key: &Key) -> Result<bool> {
        Ok(self.head(key).await?.is_some())
    }

    /// Write `bytes` at `key`, replacing what is there (one request: readers
    /// see the old object or the new one).
    ///
    /// # Errors
    /// [`Error::Remote`] (or a refusal) naming `op`.
    pub async fn put(&self, op: &'static str, key: &Key, bytes: impl Into<PutPayload>) -> Result<()> {
        self.store.put(key, bytes.into()).await.map(drop).map_err(|e| self.err(op, key, e))
    }

    /// Write `bytes` at `key` under `mode`'s condition; whether it held is
    /// the outcome, not an error.
    ///
    /// # Errors
    /// [`Error::Remote`] (or a refusal) naming `op` for any other failure.
    pub async fn put_if(&self, op: &'static str, key: &Key, bytes: impl Into<PutPayload>, mode: PutMode) -> Result<Put> {
        match self.store.put_opts(key, bytes.into(), PutOptions::from(mode)).await {
            Ok(_) => Ok(Put::Written),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(Put::Lost),
            Err(object_store::Error::NotImplemented { .. }) => Ok(Put::Unsupported),
            Err(e) => Err(self.err(op, key, e)),
        }
    }

    /// Every object under `prefix`, in the store's order.
    ///
    /// # Errors
    /// [`Error::Remote`] (or a refusal, a missing bucket included).
    pub async fn list(&self, prefix: &Key) -> Result<Vec<ObjectMeta>> {
        self.collect(prefix, self.store.list(Some(prefix))).await
    }

    /// The objects under `prefix` whose keys sort after `offset`: one
    /// listing of what follows, however much precedes it.
    ///
    /// # Errors
    /// As [`Objects::list`].
    pub async fn list_after(&self, prefix: &Key, offset: &Key) -> Result<Vec<ObjectMeta>> {
        self.collect(prefix, self.store.list_with_offset(Some(prefix), offset)).await
    }

    async fn collect(
        &self,
        prefix: &Key,
        mut listing: futures::stream::BoxStream<'static, object_store::Result<ObjectMeta>>,
    ) -> Result<Vec<ObjectMeta>> {
        let mut out = Vec::new();
        while let Some(meta) = listing.next().await {
            out.push(meta.map_err(|e| self.err("list", prefix, e))?);
        }
        Ok(out)
    }

    /// The keys under `prefix`, sorted.
    ///
    /// # Errors
    /// As [`Objects::list`].
    pub async fn list_keys(&self, prefix: &Key) -> Result<Vec<Key>> {
        let mut keys: Vec<Key> = self.list(prefix).await?.into_iter().map(|m| m.location).collect();
        keys.sort();
        Ok(keys)
    }

    /// Stream the object at `key` through `sink`, chunk by chunk (memory
    /// bounded by a chunk, whatever its size): its size and CRC-32C, or
    /// `None` when it does not exist.
    ///
    /// # Errors
    /// [`Error::Remote`] when the store fails; what `sink` returns.
    pub async fn stream(&self, key: &Key, sink: &mut (dyn FnMut(&[u8]) -> Result<()> + Send)) -> Result<Option<(u64, u32)>> {
        let got = match self.store.get(key).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err("download", key, e)),
        };
        let mut stream = got.into_stream();
        let (mut size, mut crc) = (0u64, 0u32);
        while let Some(chunk) = stream.next().await {
            let chunk: Bytes = chunk.map_err(|e| self.err("download", key, e))?;
            crc = crate::crc::crc32c_append(crc, &chunk);
            size += chunk.len() as u64;
            sink(&chunk)?;
        }
        Ok(Some((size, crc)))
    }

    /// The own manifest of the archive at `key` (`size` bytes), read with
    /// ranged reads through the zip's end records and central directory (a
    /// few small requests whatever the archive's size).
    ///
    /// # Errors
    /// [`Error::Remote`] when the store fails; [`Error::RemoteDamaged`]
    /// when the archive's records or manifest do not read.
    pub async fn archive_manifest(&self, key: &Key, size: u64) -> Result<crate::archive::format::Manifest> {
        // A failed request is the store's failure, not damage: kept aside.
        let failed: Arc<std::sync::Mutex<Option<Error>>> = Arc::default();
        let (store, k, f) = (self.store.clone(), key.clone(), failed.clone());
        let read = move |range: std::ops::Range<u64>| {
            let (store, k, f) = (store.clone(), k.clone(), f.clone());
            async move {
                store.get_range(&k, range).await.map(|b| b.to_vec()).map_err(|e| {
                    let message = e.to_string();
                    if let Ok(mut slot) = f.lock() {
                        *slot = Some(remote_err("read", &k, e));
                    }
                    message
                })
            }
        };
        let ranged = crate::archive::zipread::read_entry_ranged(size, crate::archive::format::MANIFEST_ENTRY, read).await;
        if let Some(e) = failed.lock().ok().and_then(|mut f| f.take()) {
            return Err(e);
        }
        let bytes = ranged.map_err(|detail| self.damaged(key, "archive", detail))?;
        crate::archive::parse_manifest(&bytes).map_err(|detail| self.damaged(key, "archive", detail))
    }

    /// Remove the object at `key`; one that is already gone is fine.
    ///
    /// # Errors
    /// [`Error::Remote`] (or a refusal).
    pub async fn delete(&self, key: &Key) -> Result<()> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }

    /// Remove every object under `prefix`.
    ///
    /// # Errors
    /// As [`Objects::list`] and [`Objects::delete`]; stops at the first failure.
    pub async fn delete_all(&self, prefix: &Key) -> Result<()> {
        for meta in self.list(prefix).await? {
            self.delete(&meta.location).await?;
        }
        Ok(())
    }

    /// Point `latest` at `manifest` (of `iterations`) unless it already names
    /// a newer manifest under `manifests` that exists: a conditional update
    /// (create when absent) that retries when another writer moved it in
    /// between. A `LATEST` that is unreadable, or names a manifest that is
    /// gone or outside `manifests`, is replaced. Stores without conditional
    /// updates (a local folder) get a plain atomic overwrite.
    ///
    /// # Errors
    /// [`Error::Remote`] when the store fails; [`Error::RemoteContended`]
    /// when the update stays contended for [`LATEST_RETRIES`] tries.
    pub async fn advance_latest(&self, latest: &Key, manifests: &Key, manifest: &Key, iterations: u64) -> Result<()> {
        let body = Bytes::from(to_json(latest, &Latest { manifest: manifest.to_string(), iterations }, false)?);
        for _ in 0..LATEST_RETRIES {
            let mode = match self.get_raw(latest).await? {
                None => PutMode::Create,
                Some((bytes, version)) => match serde_json::from_slice::<Latest>(&bytes) {
                    Ok(newer) if newer.iterations > iterations => {
                        let named = Key::parse(newer.manifest.as_str()).ok();
                        match named {
                            Some(named) if named.prefix_match(manifests).is_some() && self.exists(&named).await? => return Ok(()),
                            _ => PutMode::Update(version),
                        }
                    }
                    // Older, or unreadable: replace it, conditionally.
                    _ => PutMode::Update(version),
                },
            };
            match self.put_if("update", latest, body.clone(), mode).await? {
                Put::Written => return Ok(()),
                Put::Lost => continue,
                Put::Unsupported => return self.put("update", latest, body).await,
            }
        }
        Err(Error::RemoteContended { target: latest.to_string(), tries: LATEST_RETRIES })
    }
}

/// Where a store's requests go, its bucket, and the variables that hold its
/// credentials: what a refused request's message names.
#[derive(Debug, Clone)]
struct Access {
    endpoint: String,
    bucket: String,
    variables: &'static str,
}

impl Access {
    fn of(config: &RemoteConfig) -> Access {
        let url = config.url.as_str();
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let bucket = rest.split('/').next().unwrap_or_default().to_string();
        let (default_endpoint, variables) = match scheme {
            "s3" => ("AWS S3", "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
            "gs" => ("Google Cloud Storage", "GOOGLE_APPLICATION_CREDENTIALS (or GOOGLE_SERVICE_ACCOUNT*)"),
            "az" | "abfs" => ("Azure Blob Storage", "AZURE_STORAGE_ACCOUNT_NAME and its key"),
            _ => ("", "the store's credentials"),
        };
        let endpoint = if config.endpoint.is_empty() { default_endpoint.to_string() } else { config.endpoint.clone() };
        Access { endpoint, bucket, variables }
    }

    /// A store failure on `what`: refused credentials and a missing bucket
    /// are named as such (the store's own message is long and puts the
    /// cause last); anything else is an [`Error::Remote`].
    fn err(&self, location: &str, op: &'static str, what: impl std::fmt::Display, e: object_store::Error) -> Error {
        let message = e.to_string();
        let detail = || message.clone().into_boxed_str();
        match http_failure(&message) {
            Some((status @ (401 | 403), code)) => Error::RemoteDenied {
                location: location.to_string(),
                endpoint: self.endpoint.clone(),
                status,
                code,
                variables: self.variables,
                detail: detail(),
            },
            // A listing finds nothing rather than failing when only the
            // prefix is empty: its 404 is the bucket's.
            Some((404, code)) if op == "list" || BUCKET_MISSING.contains(&code.as_str()) => Error::RemoteNoBucket {
                location: location.to_string(),
                endpoint: self.endpoint.clone(),
                bucket: self.bucket.clone(),
                code,
                detail: detail(),
            },
            _ => Error::Remote { op, target: what.to_string(), source: StoreError(e) },
        }
    }
}

/// Error codes of S3 and Azure for a missing bucket (container).
const BUCKET_MISSING: [&str; 2] = ["NoSuchBucket", "ContainerNotFound"];

/// The HTTP status of a failed request and the store's error code (`<Code>`
/// of an S3 or Azure error body; empty when there is none), from the
/// object-store client's message: the client keeps its status type private,
/// and writes `status code: 403 Forbidden: <body>`.
fn http_failure(message: &str) -> Option<(u16, String)> {
    let after = &message[message.find("status code: ")? + "status code: ".len()..];
    let status = after.get(..3).filter(|d| d.bytes().all(|b| b.is_ascii_digit()))?.parse().ok()?;
    let code = after
        .split_once("<Code>")
        .and_then(|(_, rest)| rest.split_once("</Code>"))
        .map(|(code, _)| code.trim())
        .filter(|c| c.len() <= 64 && c.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or_default()
        .to_string();
    Some((status, code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn access() -> Access {
        Access::of(&RemoteConfig { url: "s3://ckpt/runs".into(), endpoint: "http://127.0.0.1:9000".into(), ..RemoteConfig::default() })
    }

    /// How the S3 client words a refused listing (its body shortened).
    const DENIED: &str = "Generic S3 error: Error performing list request: Error performing GET http://127.0.0.1:9000/ckpt?list-type=2 \
        in 3ms - Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code>\
        <Message>The request signature we calculated does not match</Message></Error>";

    #[test]
    fn status_and_code_are_read_from_the_clients_message() {
        assert_eq!(http_failure(DENIED), Some((403, "SignatureDoesNotMatch".into())));
        assert_eq!(http_failure("Server returned non-2xx status code: 404 Not Found: "), Some((404, String::new())));
        assert_eq!(http_failure("connection refused"), None);
        assert_eq!(http_failure("status code: 4x"), None);
    }

    #[test]
    fn refused_credentials_and_a_missing_bucket_lead_with_the_cause() {
        let generic = |m: &str| object_store::Error::Generic { store: "S3", source: m.to_string().into() };
        let e = access().err("s3://ckpt/runs/m", "list", "runs/m/manifests", generic(DENIED));
        assert!(matches!(&e, Error::RemoteDenied { status: 403, .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.starts_with("the remote tier at s3://ckpt/runs/m refused the credentials (HTTP 403, SignatureDoesNotMatch)"),
            "{text}"
        );
        assert!(text.contains("http://127.0.0.1:9000") && text.contains("AWS_SECRET_ACCESS_KEY"), "{text}");
        assert!(text.len() < 300 && !text.contains("<Message>"), "{} chars: {text}", text.len());

        let missing = "Server returned non-2xx status code: 404 Not Found: <Error><Code>NoSuchBucket</Code></Error>";
        let e = access().err("s3://ckpt/runs/m", "read", "runs/m/LATEST", generic(missing));
        let text = e.to_string();
        assert!(
            text.starts_with("the bucket `ckpt` of the remote tier at s3://ckpt/runs/m does not exist on http://127.0.0.1:9000"),
            "{text}"
        );
        // A missing object is not a missing bucket.
        let e = access().err("s3://ckpt/runs/m", "read", "runs/m/x", generic("status code: 404 Not Found: <Code>NoSuchKey</Code>"));
        assert!(matches!(e, Error::Remote { .. }), "{e:?}");
        let e = access().err("s3://ckpt/runs/m", "list", "runs/m", generic("connection refused"));
        assert!(matches!(e, Error::Remote { op: "list", .. }), "{e:?}");
    }

    #[test]
    fn a_failed_request_keeps_the_store_error_as_its_source_and_says_it_once() {
        let e = access().err(
            "s3://ckpt/runs/m",
            "read",
            "runs/m/x",
            object_store::Error::NotFound { path: "runs/m/x".into(), source: "gone".into() },
        );
        let Error::Remote { source, .. } = &e else { panic!("{e:?}") };
        assert!(matches!(source.get(), object_store::Error::NotFound { .. }), "{source:?}");
        assert_eq!(e.kind(), crate::error::ErrorKind::Remote);
        let report = e.report().to_string();
        assert!(report.starts_with("could not read runs/m/x on the remote tier: "), "{report}");
        assert_eq!(report.matches("gone").count(), 1, "{report}");
        assert!(std::error::Error::source(&e).is_some_and(|s| s.source().is_none()), "the store's message ends the chain");
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().map(|rt| rt.block_on(f)).unwrap_or_else(|e| panic!("runtime: {e}"))
    }

    fn objects(store: Arc<dyn ObjectStore>) -> Objects {
        Objects::new(store, &RemoteConfig { url: "memory://objects-test".into(), ..RemoteConfig::default() }, "memory://t".into())
    }

    fn latest_of(o: &Objects) -> Option<Latest> {
        block_on(o.get_json::<Latest>(&Key::from("m/LATEST"))).unwrap_or_else(|e| panic!("{e}")).map(|(l, _)| l)
    }

    fn put(o: &Objects, key: &str, body: &[u8]) {
        block_on(o.put("write", &Key::from(key), body.to_vec())).unwrap_or_else(|e| panic!("{e}"));
    }

    fn advance(o: &Objects, manifest: &str, iterations: u64) {
        let (latest, manifests) = (Key::from("m/LATEST"), Key::from("m/manifests"));
        block_on(o.advance_latest(&latest, &manifests, &Key::from(manifest), iterations)).unwrap_or_else(|e| panic!("{e}"));
    }

    fn pointing(manifest: &str, iterations: u64) -> Option<Latest> {
        Some(Latest { manifest: manifest.into(), iterations })
    }

    /// Both users of the layer (the remote tier and sharded commits) move
    /// `LATEST` with these rules; a copy of it once dropped the check that
    /// a newer `LATEST` names a manifest that exists.
    fn latest_moves_forward_only_to_manifests_that_exist(o: &Objects) {
        assert_eq!(latest_of(o), None);
        put(o, "m/manifests/10.json", b"{}");
        advance(o, "m/manifests/10.json", 10);
        assert_eq!(latest_of(o), pointing("m/manifests/10.json", 10), "created when absent");

        put(o, "m/manifests/5.json", b"{}");
        advance(o, "m/manifests/5.json", 5);
        assert_eq!(latest_of(o), pointing("m/manifests/10.json", 10), "a newer manifest that exists stays");

        put(o, "m/manifests/20.json", b"{}");
        advance(o, "m/manifests/20.json", 20);
        assert_eq!(latest_of(o), pointing("m/manifests/20.json", 20), "an older one is replaced");

        // Newer, but its manifest is gone (removed by retention, or never
        // written by a run killed in between): replaced.
        put(o, "m/LATEST", br#"{"manifest":"m/manifests/99.json","iterations":99}"#);
        advance(o, "m/manifests/20.json", 20);
        assert_eq!(latest_of(o), pointing("m/manifests/20.json", 20), "a newer LATEST whose manifest is missing");

        // Newer, and an object exists there, but not under the manifests.
        put(o, "m/data/99.json", b"{}");
        put(o, "m/LATEST", br#"{"manifest":"m/data/99.json","iterations":99}"#);
        advance(o, "m/manifests/20.json", 20);
        assert_eq!(latest_of(o), pointing("m/manifests/20.json", 20), "a newer LATEST outside the manifests");

        put(o, "m/LATEST", b"not json");
        advance(o, "m/manifests/5.json", 5);
        assert_eq!(latest_of(o), pointing("m/manifests/5.json", 5), "an unreadable LATEST");
    }

    #[test]
    fn latest_moves_forward_with_conditional_updates() {
        latest_moves_forward_only_to_manifests_that_exist(&objects(Arc::new(InMemory::new())));
    }

    #[test]
    fn latest_moves_forward_on_a_store_without_conditional_updates() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let local = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let o = objects(Arc::new(local));
        assert_eq!(
            block_on(o.put_if("update", &Key::from("m/x"), b"1".to_vec(), PutMode::Update(UpdateVersion { e_tag: None, version: None })))
                .unwrap_or_else(|e| panic!("{e}")),
            Put::Unsupported
        );
        latest_moves_forward_only_to_manifests_that_exist(&o);
    }

    #[test]
    fn conditions_are_outcomes() {
        let o = objects(Arc::new(InMemory::new()));
        let key = Key::from("a/b");
        let create = |body: &[u8]| block_on(o.put_if("write", &key, body.to_vec(), PutMode::Create)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(create(b"1"), Put::Written);
        assert_eq!(create(b"2"), Put::Lost);
        let (bytes, version) = block_on(o.get_raw(&key)).unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|| panic!("absent"));
        assert_eq!(bytes, b"1");
        let update = |v: &UpdateVersion| {
            block_on(o.put_if("write", &key, b"3".to_vec(), PutMode::Update(v.clone()))).unwrap_or_else(|e| panic!("{e}"))
        };
        assert_eq!(update(&version), Put::Written);
        assert_eq!(update(&version), Put::Lost, "the version read before the update is stale");
        assert_eq!(block_on(o.head(&Key::from("a/none"))).unwrap_or_else(|e| panic!("{e}")).map(|m| m.size), None);
        block_on(o.delete(&Key::from("a/none"))).unwrap_or_else(|e| panic!("deleting a missing object: {e}"));
        block_on(o.delete_all(&Key::from("a"))).unwrap_or_else(|e| panic!("{e}"));
        assert!(block_on(o.list(&Key::from("a"))).unwrap_or_else(|e| panic!("{e}")).is_empty());
        let damaged = block_on(o.get_json::<Latest>(&Key::from("a/b")));
        assert!(matches!(damaged, Ok(None)), "{damaged:?}");
        block_on(o.put("write", &key, b"{".to_vec())).unwrap_or_else(|e| panic!("{e}"));
        let damaged = block_on(o.get_json::<Latest>(&key));
        match damaged {
            Err(Error::RemoteDamaged { checkpoint, location, .. }) => {
                assert_eq!((checkpoint.as_str(), location.as_str()), ("a/b", "memory://t"))
            }
            other => panic!("{other:?}"),
        }
    }
}

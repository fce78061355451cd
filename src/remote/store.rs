//! Building the object store of `[remote]`: its URL, credentials from the
//! environment, and the S3-compatible server settings. No network traffic:
//! a wrong key shows at the first request, a missing one here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::multipart::MultipartStore;
use object_store::path::Path as Key;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use crate::config::RemoteConfig;
use crate::error::{Error, Result};

pub(crate) struct Built {
    pub store: Arc<dyn ObjectStore>,
    pub multipart: Option<Arc<dyn MultipartStore>>,
    /// The URL's path: every key is under it.
    pub prefix: Key,
}

/// A `memory://name` store of this process.
#[derive(Clone)]
enum Named {
    Memory(Arc<InMemory>),
    Given(Arc<dyn ObjectStore>),
}

/// The `memory://name` stores of this process, by name, so that two handles
/// (a trainer and a "fresh machine" in one test) see the same objects.
fn named() -> std::sync::MutexGuard<'static, HashMap<String, Named>> {
    static STORES: OnceLock<Mutex<HashMap<String, Named>>> = OnceLock::new();
    STORES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner())
}

/// Make `memory://<name>` this process's URL for `store`: any object store
/// (one wrapped with metrics or limits, a client built with settings the
/// URL cannot carry) for the remote tier and sharded checkpoints. Replaces
/// the store registered under `name` before; handles already open keep theirs.
pub fn register_store(name: &str, store: Arc<dyn ObjectStore>) {
    named().insert(name.to_string(), Named::Given(store));
}

/// Requests are retried a few times by the client itself (a reset
/// connection, a 5xx); the uploader retries whole uploads with its own,
/// longer backoff, so a dead server costs seconds here, not minutes.
fn retry() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig { init_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(2), base: 2.0 },
        max_retries: 3,
        retry_timeout: Duration::from_secs(20),
    }
}

/// No limit on a whole request (a large part or download may take long on a
/// slow link); a connection that stalls for a minute fails and is retried.
fn client() -> ClientOptions {
    ClientOptions::new().with_connect_timeout(Duration::from_secs(5)).with_timeout_disabled().with_read_timeout(Duration::from_secs(60))
}

fn bad_url(url: &str, why: impl std::fmt::Display) -> Error {
    Error::ConfigValue {
        key: "remote.url".into(),
        value: format!("{url:?} ({why})"),
        allowed: "s3://bucket/prefix, gs://bucket/prefix, az://container/prefix, file:///absolute/path or memory://name".into(),
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The part of `url` after `scheme://<bucket>/`, as a key prefix.
fn prefix_after_bucket(url: &str, scheme: &str) -> Result<Key> {
    let rest = url.strip_prefix(scheme).unwrap_or_default();
    let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(bad_url(url, "no bucket"));
    }
    Key::parse(path.trim_matches('/')).map_err(|e| bad_url(url, e))
}

pub(crate) fn build(c: &RemoteConfig) -> Result<Built> {
    let url = c.url.as_str();
    if let Some(name) = url.strip_prefix("memory://") {
        let store = named().entry(name.to_string()).or_insert_with(|| Named::Memory(Arc::new(InMemory::new()))).clone();
        return Ok(match store {
            Named::Memory(store) => Built { store: store.clone(), multipart: Some(store), prefix: Key::default() },
            Named::Given(store) => Built { store, multipart: None, prefix: Key::default() },
        });
    }
    if let Some(path) = url.strip_prefix("file://") {
        std::fs::create_dir_all(path).map_err(|e| Error::io("create the remote folder", path, e))?;
        let store = LocalFileSystem::new_with_prefix(path).map_err(|e| bad_url(url, e))?.with_automatic_cleanup(true).with_fsync(true);
        return Ok(Built { store: Arc::new(store), multipart: None, prefix: Key::default() });
    }
    if url.starts_with("s3://") {
        let prefix = prefix_after_bucket(url, "s3://")?;
        // Keys first, so that a half-set pair is named; with none, the
        // instance's own credentials only when asked for.
        let (key, secret) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"));
        match (&key, &secret) {
            (Some(_), None) => return Err(Error::RemoteCredentials { url: url.into(), missing: "AWS_SECRET_ACCESS_KEY".into() }),
            (None, Some(_)) => return Err(Error::RemoteCredentials { url: url.into(), missing: "AWS_ACCESS_KEY_ID".into() }),
            (None, None)
                if !c.instance_credentials
                    && !["AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"]
                        .iter()
                        .any(|v| env(v).is_some()) =>
            {
                return Err(Error::RemoteCredentials { url: url.into(), missing: "AWS_ACCESS_KEY_ID".into() });
            }
            _ => {}
        }
        let mut b = AmazonS3Builder::from_env().with_url(url).with_retry(retry()).with_client_options(client());
        if !c.endpoint.is_empty() {
            // S3-compatible servers are addressed by path, not by bucket host name.
            b = b.with_endpoint(&c.endpoint).with_virtual_hosted_style_request(false);
        }
        b = b.with_allow_http(c.allow_http).with_unsigned_payload(!c.sign_payload.hashes(&c.endpoint));
        let region = if c.region.is_empty() { env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")) } else { Some(c.region.clone()) };
        b = b.with_region(region.unwrap_or_else(|| "us-east-1".into()));
        let store = Arc::new(b.build().map_err(|e| bad_url(url, e))?);
        return Ok(Built { store: store.clone(), multipart: Some(store), prefix });
    }
    if url.starts_with("gs://") {
        let prefix = prefix_after_bucket(url, "gs://")?;
        if !c.instance_credentials
            && !["GOOGLE_SERVICE_ACCOUNT", "GOOGLE_SERVICE_ACCOUNT_PATH", "GOOGLE_SERVICE_ACCOUNT_KEY", "GOOGLE_APPLICATION_CREDENTIALS"]
                .iter()
                .any(|v| env(v).is_some())
        {
            return Err(Error::RemoteCredentials { url: url.into(), missing: "GOOGLE_APPLICATION_CREDENTIALS".into() });
        }
        let b = GoogleCloudStorageBuilder::from_env().with_url(url).with_retry(retry()).with_client_options(client());
        let store = Arc::new(b.build().map_err(|e| bad_url(url, e))?);
        return Ok(Built { store: store.clone(), multipart: Some(store), prefix });
    }
    let scheme = if url.starts_with("az://") { "az://" } else { "abfs://" };
    let prefix = prefix_after_bucket(url, scheme)?;
    if env("AZURE_STORAGE_ACCOUNT_NAME").is_none() {
        return Err(Error::RemoteCredentials { url: url.into(), missing: "AZURE_STORAGE_ACCOUNT_NAME".into() });
    }
    let b = MicrosoftAzureBuilder::from_env().with_url(url).with_retry(retry()).with_client_options(client());
    let store = Arc::new(b.build().map_err(|e| bad_url(url, e))?);
    Ok(Built { store: store.clone(), multipart: Some(store), prefix })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_bad_urls() {
        assert_eq!(prefix_after_bucket("s3://b/runs/a/", "s3://").unwrap().as_ref(), "runs/a");
        assert_eq!(prefix_after_bucket("s3://b", "s3://").unwrap().as_ref(), "");
        let e = prefix_after_bucket("s3:///x", "s3://").unwrap_err().to_string();
        assert!(e.contains("remote.url") && e.contains("no bucket"), "{e}");
    }

    #[test]
    fn memory_stores_are_shared_by_name_and_a_registered_store_is_used() {
        let at = |name: &str| {
            let c = RemoteConfig { url: format!("memory://{name}"), ..RemoteConfig::default() };
            build(&c).map(|b| b.store).unwrap()
        };
        assert!(Arc::ptr_eq(&at("a"), &at("a")));
        assert!(!Arc::ptr_eq(&at("a"), &at("b")));
        let given: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        register_store("given", given.clone());
        assert!(Arc::ptr_eq(&at("given"), &given));
    }
}

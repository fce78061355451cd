//! Typed configuration, read from TOML and validated at start.
//!
//! Every key has a default (see `config/modelio.toml`); an unknown key or a
//! bad value is an error naming the key, the value and what is allowed.
//!
//! modelio's settings may share a file with the application's own: when the
//! file has a `[modelio]` table, modelio reads only that table (its sections
//! become `[modelio.save]`, `[modelio.model]`, ...) and leaves every other
//! table to the application. Otherwise the whole file is modelio's.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelConfig,
    pub save: SaveConfig,
    pub snapshot: SnapshotConfig,
    pub staging: StagingConfig,
    pub load: LoadConfig,
    pub remote: RemoteConfig,
    pub shard: ShardConfig,
}

/// `[shard]`: this process's rank among several that save one sharded
/// checkpoint (see `modelio::sharded`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardConfig {
    /// This process's rank; absent: `RANK` from the environment, else 0.
    pub rank: Option<usize>,
    /// How many ranks; absent: `WORLD_SIZE` from the environment, else 1.
    pub world_size: Option<usize>,
    /// How long the coordinator (rank 0) waits for every rank's shard of a
    /// step before giving that step up, seconds.
    pub commit_deadline_secs: u64,
    /// Committed steps to keep, the newest (0 = keep all).
    pub keep: usize,
    /// This run's id, the same on every rank and new at each launch; a
    /// coordinator commits only its own run's shards (a restarted job never
    /// mixes in a dead run's). Empty: `MODELIO_RUN_ID`, else torchrun's or
    /// Slurm's job id with its restart count; one rank makes one up; several
    /// ranks with none are refused at open ([`crate::Error::RunIdMissing`]).
    pub run_id: String,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig { rank: None, world_size: None, commit_deadline_secs: 60, keep: 3, run_id: String::new() }
    }
}

/// `[model]`: which model, where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Model name: archives are `<dir>/<name>.mio`.
    pub name: String,
    /// The model folder.
    pub dir: PathBuf,
    /// Predict mode: only load; a missing model is an error.
    pub predict: bool,
}

/// When the optimizer state goes into the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerPolicy {
    /// Never store the optimizer.
    Never,
    /// Store it with every save.
    Always,
    /// Store it only with the exit save.
    Exit,
}

impl OptimizerPolicy {
    /// Whether a save with this `is_exit` stores the optimizer.
    pub fn stores(self, is_exit: bool) -> bool {
        match self {
            OptimizerPolicy::Never => false,
            OptimizerPolicy::Always => true,
            OptimizerPolicy::Exit => is_exit,
        }
    }
}

/// `[save]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SaveConfig {
    /// Save on iteration 1 and every `interval` iterations.
    pub interval: u64,
    /// When the optimizer is stored: "never", "always" or "exit".
    pub optimizer: OptimizerPolicy,
    /// Make `.bk` backups and snapshot archives hard links of the live
    /// archive instead of independent copies: no extra disk space, but
    /// damage to the live archive's blocks damages them too.
    pub hard_links: bool,
}

/// `[snapshot]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// Snapshot after saves whose iteration is a multiple of this (0 = never).
    pub interval: u64,
    /// Snapshots to keep, newest by iteration (0 = keep all).
    pub keep: usize,
}

/// What a save does when every staging buffer is busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBusy {
    /// Wait for a buffer (the trainer stalls).
    Wait,
    /// Skip this save and count it (exit saves always wait).
    Skip,
}

/// When the bytes of CPU tensors are copied into the staging buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuCopy {
    /// Before `save` returns (split across threads, about one memcpy of the
    /// state): the save holds the values at the call whatever the caller
    /// does next. The default.
    Immediate,
    /// In the background, after `save` returns, guarded by the [`crate::Fence`].
    /// Contract: every writer of the saved tensors (optimizer steps, EMA
    /// updates, manual edits, and `forward` in training mode, which updates
    /// BatchNorm's running statistics in place) must call `Fence::wait`
    /// first; a writer that does not can tear the checkpoint.
    Deferred,
    /// In the background, with no fence: `save` write-protects the tensors'
    /// pages (Linux userfaultfd) and returns; a write to a page not yet
    /// copied waits while that page is copied. The save holds the values at
    /// the call, like "immediate", for a stall of page-table updates only.
    /// Where userfaultfd is not available (not permitted, seccomp, a kernel
    /// before 6.4) saves copy at the call instead, with a
    /// warning; `modelio::staging::protect_available` says why.
    Protect,
}

/// `[staging]`: host buffers saves are copied into.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StagingConfig {
    /// Saves in flight at once; host memory holds at most this many copies of the state.
    pub max_inflight: usize,
    /// "wait" or "skip".
    pub on_busy: OnBusy,
    /// "immediate", "deferred" or "protect" (CPU tensors only; GPU copies
    /// are always queued at the call in stream order).
    pub cpu_copy: CpuCopy,
}

/// `[load]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadConfig {
    /// Load the newest archive that verifies (`.bk`, then snapshots) when the
    /// live one is damaged or missing.
    pub fallback: bool,
}

/// Which committed saves the remote tier uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UploadPolicy {
    /// Every committed save (the newest wins when the network is slower than saves).
    Every,
    /// Only saves that are backed up, snapshotted, or the exit save.
    Milestones,
}

/// Whether an S3 request's signature covers a SHA-256 of its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignPayload {
    /// Only over plain `http://` to another machine: TLS, or a loopback
    /// address, already keeps the bytes from being changed on the way, and
    /// hashing every byte costs about as much CPU as the rest of an upload.
    Auto,
    /// Every payload, whatever the transport.
    Always,
    /// None (`UNSIGNED-PAYLOAD`): the headers are still signed.
    Never,
}

impl SignPayload {
    /// Whether requests to `endpoint` (empty: AWS, over https) hash their payloads.
    pub fn hashes(self, endpoint: &str) -> bool {
        match self {
            SignPayload::Always => true,
            SignPayload::Never => false,
            SignPayload::Auto => endpoint.strip_prefix("http://").is_some_and(|rest| !is_loopback(rest)),
        }
    }
}

/// Whether the host of `rest` (an address after `http://`) is this machine:
/// `localhost`, 127.0.0.0/8 or `[::1]`.
fn is_loopback(rest: &str) -> bool {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host_port.split(':').next().unwrap_or(""),
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `[remote]`: a copy of committed checkpoints in object storage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfig {
    /// Where: `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`,
    /// `file:///path`, or `memory://name` (this process only, for tests).
    /// Empty: no remote tier.
    pub url: String,
    /// An S3-compatible server's address (`http://127.0.0.1:9000`); empty: AWS.
    pub endpoint: String,
    /// Allow plain `http://` endpoints.
    pub allow_http: bool,
    /// S3 region; empty: `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: String,
    /// S3: "auto" (hash each payload into its signature only over plain
    /// http to another machine), "always" or "never".
    pub sign_payload: SignPayload,
    /// Use the machine's own credentials (an EC2 instance profile, GCE
    /// metadata) when none are in the environment; off, a missing variable
    /// is an error at `open`.
    pub instance_credentials: bool,
    /// "every" or "milestones".
    pub upload: UploadPolicy,
    /// Remote checkpoints to keep, the newest by iteration (0 = keep all).
    pub keep: usize,
    /// When the model folder holds no model, fetch the newest remote checkpoint at `open`.
    pub restore: bool,
    /// Multipart upload part size, MiB (5 to 5120).
    pub part_size_mib: usize,
    /// Parts uploaded at once (1 to 64): memory is at most this many parts.
    pub parts_in_flight: usize,
    /// Longest wait between retries of a failed upload, seconds (>= 1).
    pub retry_max_secs: u64,
    /// How long `finish`/`shutdown` wait for the last upload, seconds.
    pub drain_secs: u64,
    /// A partial upload left by an interrupted run is removed by a later run
    /// once it is this old, seconds (another writer may still be uploading it).
    pub orphan_grace_secs: u64,
}

impl RemoteConfig {
    /// Whether the remote tier is on.
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            url: String::new(),
            endpoint: String::new(),
            allow_http: false,
            region: String::new(),
            sign_payload: SignPayload::Auto,
            instance_credentials: false,
            upload: UploadPolicy::Every,
            keep: 3,
            restore: true,
            part_size_mib: 16,
            parts_in_flight: 4,
            retry_max_secs: 30,
            drain_secs: 120,
            orphan_grace_secs: 3600,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig { name: "model".into(), dir: PathBuf::from("models/model"), predict: false }
    }
}
impl Default for SaveConfig {
    fn default() -> Self {
        SaveConfig { interval: 100, optimizer: OptimizerPolicy::Exit, hard_links: false }
    }
}
impl Default for StagingConfig {
    fn default() -> Self {
        StagingConfig { max_inflight: 1, on_busy: OnBusy::Wait, cpu_copy: CpuCopy::Immediate }
    }
}

/// The table of a shared file that holds modelio's settings.
pub const SECTION: &str = "modelio";

/// A file shared with the application: modelio's table, the rest ignored.
#[derive(Deserialize)]
struct Shared {
    modelio: Config,
}

impl Error {
    /// A parse error inside `[modelio]` says so.
    fn in_section(self) -> Error {
        match self {
            Error::ConfigParse { path, message } => Error::ConfigParse { path, message: format!("in [{SECTION}]: {message}") },
            other => other,
        }
    }
}

/// Longest model name and model folder name, in bytes: temporary files add
/// up to 115 bytes to a name (`.modelio-tmp-<pid>.<start>-<uuid>-`, `_state.json.bk`,
/// `_snapshot_<N>_iters`) and a file name is at most 255 bytes.
pub const MAX_NAME: usize = 128;

impl Config {
    /// Read and validate a TOML file: its `[modelio]` table when it has one
    /// (the rest of the file is the application's), else the whole file.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read, [`Error::ConfigParse`] on bad
    /// TOML or an unknown key in modelio's sections, [`Error::ConfigValue`] on a bad value.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("read config", path, e))?;
        Config::from_toml(&text, path)
    }

    /// Parse and validate TOML text as [`Config::from_file`] does; `path`
    /// only names the source in errors.
    ///
    /// # Errors
    /// As [`Config::from_file`].
    pub fn from_toml(text: &str, path: &Path) -> Result<Config> {
        let parse_err = |e: toml::de::Error| Error::ConfigParse { path: path.to_path_buf(), message: e.to_string() };
        let table: toml::Table = toml::from_str(text).map_err(parse_err)?;
        let config = if table.contains_key(SECTION) {
            // Parsed from the text again (not the table) so errors keep their line.
            toml::from_str::<Shared>(text).map_err(|e| parse_err(e).in_section())?.modelio
        } else {
            toml::from_str(text).map_err(parse_err)?
        };
        config.validate()?;
        Ok(config)
    }

    /// Read modelio's settings from a table of the application's own
    /// configuration (e.g. the value of its `[modelio]` key); `path` only
    /// names the source in errors.
    ///
    /// # Errors
    /// [`Error::ConfigParse`] on an unknown key, [`Error::ConfigValue`] on a bad value.
    pub fn from_table(table: toml::Table, path: &Path) -> Result<Config> {
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| Error::ConfigParse { path: path.to_path_buf(), message: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    /// Check every value.
    ///
    /// # Errors
    /// [`Error::ConfigValue`] naming the first bad key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, value: String, allowed: &str| Err(Error::ConfigValue { key: key.into(), value, allowed: allowed.into() });
        let name = &self.model.name;
        if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\', '\0']) || name.ends_with(".bk") || name.len() > MAX_NAME {
            return bad(
                "model.name",
                format!("{name:?}"),
                &format!("a non-empty file name of at most {MAX_NAME} bytes without '/', not starting with '.'"),
            );
        }
        let dir = &self.model.dir;
        if dir.as_os_str().is_empty() {
            return bad("model.dir", "\"\"".into(), "a folder path");
        }
        // The state file records the config as JSON, which holds text only.
        if dir.to_str().is_none() {
            return bad("model.dir", format!("{:?}", dir.as_os_str()), "a path that is valid UTF-8");
        }
        // Snapshot folders and temporary names add up to 90 bytes to the
        // folder's name; a file name is at most 255 bytes.
        if dir.file_name().is_some_and(|n| n.len() > MAX_NAME) {
            return bad("model.dir", format!("{}", dir.display()), &format!("a folder whose own name is at most {MAX_NAME} bytes"));
        }
        if self.save.interval == 0 {
            return bad("save.interval", "0".into(), "an integer >= 1");
        }
        if self.staging.max_inflight == 0 || self.staging.max_inflight > 64 {
            return bad("staging.max_inflight", self.staging.max_inflight.to_string(), "an integer from 1 to 64");
        }
        let r = &self.remote;
        if r.enabled() {
            const SCHEMES: [&str; 6] = ["s3://", "gs://", "az://", "abfs://", "file:///", "memory://"];
            if !SCHEMES.iter().any(|s| r.url.starts_with(s)) {
                return bad(
                    "remote.url",
                    format!("{:?}", r.url),
                    "s3://bucket/prefix, gs://bucket/prefix, az://container/prefix, file:///absolute/path or memory://name",
                );
            }
            if !(r.endpoint.is_empty() || r.endpoint.starts_with("http://") || r.endpoint.starts_with("https://")) {
                return bad("remote.endpoint", format!("{:?}", r.endpoint), "an http:// or https:// address");
            }
            if r.endpoint.starts_with("http://") && !r.allow_http {
                return bad("remote.endpoint", format!("{:?}", r.endpoint), "an https:// address, or set remote.allow_http = true");
            }
        }
        if !(5..=5120).contains(&r.part_size_mib) {
            return bad("remote.part_size_mib", r.part_size_mib.to_string(), "an integer from 5 to 5120");
        }
        if !(1..=64).contains(&r.parts_in_flight) {
            return bad("remote.parts_in_flight", r.parts_in_flight.to_string(), "an integer from 1 to 64");
        }
        if !(1..=86_400).contains(&self.shard.commit_deadline_secs) {
            return bad("shard.commit_deadline_secs", self.shard.commit_deadline_secs.to_string(), "an integer from 1 to 86400");
        }
        if r.retry_max_secs == 0 {
            return bad("remote.retry_max_secs", "0".into(), "an integer >= 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::from_toml(text, Path::new("test.toml"))
    }

    #[test]
    fn payloads_are_hashed_only_where_nothing_else_protects_them() {
        let auto = SignPayload::Auto;
        assert!(!auto.hashes(""), "AWS itself, over https");
        assert!(!auto.hashes("https://minio.example:9000"));
        for local in ["http://127.0.0.1:9000", "http://localhost", "http://[::1]:80/x", "http://127.3.2.1", "http://u:p@LOCALHOST:1"] {
            assert!(!auto.hashes(local), "{local}");
        }
        for remote in ["http://10.0.0.5:9000", "http://minio:9000", "http://[2001:db8::1]:9000", "http://127.0.0.1.evil.example"] {
            assert!(auto.hashes(remote), "{remote}");
        }
        assert!(SignPayload::Always.hashes("https://s3.example") && !SignPayload::Never.hashes("http://10.0.0.5"));
        let c = parse("[remote]\nsign_payload = \"always\"\n").unwrap();
        assert_eq!(c.remote.sign_payload, SignPayload::Always);
        assert!(parse("[remote]\nsign_payload = \"sometimes\"\n").is_err());
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn shipped_example_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/modelio.toml");
        assert_eq!(Config::from_file(&path).unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("[save]\nintervall = 3\n").unwrap_err().to_string();
        assert!(err.contains("intervall") && err.contains("test.toml"), "{err}");
        let err = parse("[sav]\n").unwrap_err().to_string();
        assert!(err.contains("sav"), "{err}");
    }

    #[test]
    fn bad_values_name_key_value_and_allowed() {
        let err = parse("[save]\noptimizer = \"sometimes\"\n").unwrap_err().to_string();
        assert!(err.contains("sometimes") && err.contains("always") && err.contains("optimizer"), "{err}");
        let err = parse("[save]\ninterval = 0\n").unwrap_err().to_string();
        assert_eq!(err, "config key `save.interval` has value 0, allowed: an integer >= 1");
        let err = parse("[model]\nname = \"a/b\"\n").unwrap_err().to_string();
        assert!(err.contains("model.name") && err.contains("a/b"), "{err}");
        let err = parse("[staging]\nmax_inflight = 0\n").unwrap_err().to_string();
        assert!(err.contains("staging.max_inflight"), "{err}");
        let err = parse("[staging]\non_busy = \"drop\"\n").unwrap_err().to_string();
        assert!(err.contains("drop") && err.contains("skip"), "{err}");
        let err = parse(&format!("[model]\nname = \"{}\"\n", "n".repeat(200))).unwrap_err().to_string();
        assert!(err.contains("model.name") && err.contains("at most 128 bytes"), "{err}");
        let err = parse("[staging]\ncpu_copy = \"later\"\n").unwrap_err().to_string();
        assert!(err.contains("later") && err.contains("deferred") && err.contains("protect"), "{err}");
        assert_eq!(parse("[staging]\ncpu_copy = \"protect\"\n").unwrap().staging.cpu_copy, CpuCopy::Protect);
        let err = parse("[snapshot]\nkeep = -1\n").unwrap_err().to_string();
        assert!(err.contains("keep") || err.contains("-1"), "{err}");
    }

    #[test]
    fn modelio_table_beside_the_applications_own() {
        let text = "[myapp]\nlr = 0.1\n[train]\nbatch_size = 4\n[modelio.save]\ninterval = 7\n";
        let c = parse(text).unwrap();
        assert_eq!(c.save.interval, 7);
        // Unknown keys inside modelio's sections stay errors, naming the key.
        let err = parse("[myapp]\nx = 1\n[modelio.save]\nintervall = 7\n").unwrap_err().to_string();
        assert!(err.contains("intervall") && err.contains("[modelio]"), "{err}");
        let err = parse("[modelio.sav]\ninterval = 7\n").unwrap_err().to_string();
        assert!(err.contains("sav"), "{err}");
        // Without a [modelio] table the whole file is modelio's: strict.
        let err = parse("[myapp]\nx = 1\n").unwrap_err().to_string();
        assert!(err.contains("myapp"), "{err}");
        let table: toml::Table = toml::from_str("[save]\ninterval = 3\n").unwrap();
        assert_eq!(Config::from_table(table, Path::new("app.toml")).unwrap().save.interval, 3);
    }

    #[test]
    fn policy_table() {
        use OptimizerPolicy::*;
        let cases = [
            (Never, false, false),
            (Never, true, false),
            (Always, false, true),
            (Always, true, true),
            (Exit, false, false),
            (Exit, true, true),
        ];
        for (policy, is_exit, stores) in cases {
            assert_eq!(policy.stores(is_exit), stores, "{policy:?} {is_exit}");
        }
    }
}

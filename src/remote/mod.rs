//! The remote tier: committed checkpoints copied to object storage (S3 and
//! S3-compatible servers, GCS, Azure, a local folder, memory) through the
//! `object_store` crate, and read back from there.
//!
//! An upload writes the archive and state file of one committed save under
//! keys of its own, then a manifest (objects, sizes, CRC-32C of each object,
//! the archive's tensors and their checksums) with a create-if-absent put,
//! then moves `LATEST` forward with a conditional update. Readers trust
//! only manifests (see [`manifest`] for the layout). A pull streams each
//! object into a temporary file in the model folder, checking its size and
//! CRC-32C as the bytes arrive, and commits it only when both match; the
//! load that follows checks every tensor.
//!
//! [`Remote`] does the object-store work on a small runtime of its own, so
//! its blocking methods may be called from anywhere, an async task included
//! (they then run on a scoped thread). The uploader actor that feeds it from
//! the saver is in `tier` (crate-private).

pub(crate) mod blocking;
pub mod manifest;
pub(crate) mod objects;
mod parts;
pub mod status;
pub(crate) mod store;
pub use store::register_store;
#[cfg(feature = "torch")]
pub(crate) mod tier;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::{ObjectStoreExt, PutMode, PutPayload, WriteMultipart};

use crate::archive::ArchiveReader;
use crate::config::RemoteConfig;
use crate::error::{Error, IoContext, Result};
use crate::folder::durable::{self, Source};
use crate::folder::ModelPaths;
use manifest::{checkpoint_id, iterations_of, Intent, Layout, ARCHIVE_OBJECT, MANIFEST_FORMAT, STATE_OBJECT};
pub use manifest::{Latest, ObjectEntry, RemoteManifest, TensorSum};
use objects::{Objects, Put};

/// Why a checkpoint is uploaded (recorded in its manifest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Save,
    Backup,
    Snapshot,
    Exit,
    /// A local save newer than the remote, found at open.
    CatchUp,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Save => "save",
            Reason::Backup => "backup",
            Reason::Snapshot => "snapshot",
            Reason::Exit => "exit",
            Reason::CatchUp => "catch-up",
        }
    }
}

/// One model's checkpoints in one object store.
pub struct Remote {
    inner: Arc<Inner>,
    rt: blocking::Blocking,
}

struct Inner {
    objects: Objects,
    /// The same store's multipart API where it has one (S3, GCS, Azure,
    /// memory): its upload ids let a later run abort an upload this one
    /// could not finish.
    multipart: Option<Arc<dyn MultipartStore>>,
    layout: Layout,
    part_size: usize,
    parts_in_flight: usize,
    /// Buffers of uploaded parts, reused by the next parts and uploads (at
    /// most `parts_in_flight` + 1: a fresh buffer costs a page fault per
    /// page, about half a second per GiB measured here).
    part_buffers: parts::FreeBuffers,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("location", &self.inner.objects.location()).finish()
    }
}

impl Remote {
    /// Connect to the remote tier of `config` for model `name`: checks the
    /// URL and credentials, without any network traffic.
    ///
    /// # Errors
    /// [`Error::ConfigValue`] naming `remote.url` when the URL cannot be used;
    /// [`Error::RemoteCredentials`] naming the missing variable.
    pub fn connect(config: &RemoteConfig, name: &str) -> Result<Remote> {
        let built = store::build(config)?;
        // Uploads run in the time training leaves idle, as the saver does.
        let rt = blocking::Blocking::new("modelio-remote", crate::background::lower_priority, &config.url)?;
        let location = format!("{}/{name}", config.url.trim_end_matches('/'));
        let inner = Inner {
            objects: Objects::new(built.store, config, location),
            multipart: built.multipart,
            layout: Layout::new(&built.prefix, name),
            part_size: config.part_size_mib << 20,
            parts_in_flight: config.parts_in_flight,
            part_buffers: parts::FreeBuffers::default(),
        };
        Ok(Remote { inner: Arc::new(inner), rt })
    }

    /// Where this model's checkpoints are: `<url>/<model>`.
    pub fn location(&self) -> &str {
        self.inner.objects.location()
    }

    /// Run `fut` on the remote runtime and wait for it (see [`blocking::Blocking::run`]).
    fn run<F: std::future::Future + Send>(&self, fut: F) -> F::Output
    where
        F::Output: Send,
    {
        self.rt.run(fut)
    }

    /// Every manifested checkpoint, oldest first (by iteration, then time).
    ///
    /// # Errors
    /// [`Error::Remote`] when the store cannot be listed or a manifest read.
    pub fn list(&self) -> Result<Vec<RemoteManifest>> {
        self.run(self.inner.list())
    }

    /// The newest manifested checkpoint, if any: the one `LATEST` names when
    /// its manifest exists, else the newest listed.
    ///
    /// # Errors
    /// [`Error::Remote`] when the store cannot be read.
    pub fn latest(&self) -> Result<Option<RemoteManifest>> {
        self.run(self.inner.latest())
    }

    /// The checkpoint whose id (`<iterations:020>-<upload>`), upload id or
    /// iteration count is `which`; the newest when several match.
    ///
    /// # Errors
    /// [`Error::Remote`] when the store cannot be read or nothing matches.
    pub fn find(&self, which: &str) -> Result<RemoteManifest> {
        let all = self.list()?;
        let found = all.into_iter().rev().find(|m| m.id() == which || m.upload == which || m.iterations.to_string() == which);
        found.ok_or_else(|| Error::RemoteNotFound { location: self.inner.objects.location().to_string(), which: which.to_string() })
    }

    /// Upload the committed archive and state file at `archive` and `state`
    /// (pins that cannot change), then commit the manifest and move `LATEST`.
    /// `stop` is polled between parts: when it returns true the upload is
    /// abandoned (its objects are left to [`Remote::clean_orphans`]).
    ///
    /// # Errors
    /// [`Error::Remote`] on a store failure; [`Error::Damaged`] or
    /// [`Error::Io`] when the local files cannot be read.
    pub fn upload(&self, archive: &Path, state: &Path, reason: Reason, stop: &(dyn Fn() -> bool + Sync)) -> Result<RemoteManifest> {
        self.run(self.inner.upload(archive, state, reason, stop))
    }

    /// Whether the remote's newest checkpoint is older than `iterations`
    /// (or there is none).
    ///
    /// # Errors
    /// [`Error::Remote`] when the store cannot be read.
    pub fn is_behind(&self, iterations: u64) -> Result<bool> {
        Ok(self.latest()?.is_none_or(|m| m.iterations < iterations))
    }

    /// Download checkpoint `m` into the model folder `paths` (archive, then
    /// state file), each committed only once its size and CRC-32C match the
    /// manifest; then check the archive's tensors against the manifest.
    ///
    /// # Errors
    /// [`Error::Remote`] on a store failure, [`Error::RemoteDamaged`] when an
    /// object differs from its manifest; the folder is then unchanged, or
    /// holds the new archive without its state file (which the archive embeds).
    pub fn pull(&self, m: &RemoteManifest, paths: &ModelPaths) -> Result<()> {
        std::fs::create_dir_all(&paths.dir).at("create model folder", &paths.dir)?;
        // Both files are downloaded and checked before either is committed.
        let mut staged = Vec::with_capacity(2);
        let result = self.stage_pull(m, paths, &mut staged).and_then(|()| {
            for (tmp, target) in &staged {
                durable::commit(target, Source::Link(tmp))?;
            }
            Ok(())
        });
        for (tmp, _) in &staged {
            let _ = std::fs::remove_file(tmp);
        }
        result
    }

    /// Download checkpoint `m`'s archive and state file into temporary files
    /// in the model folder (listed in `staged` as they are created), each
    /// checked against its size and CRC-32C as it arrives; then check every
    /// tensor of the archive and its list against the manifest.
    fn stage_pull(&self, m: &RemoteManifest, paths: &ModelPaths, staged: &mut Vec<(std::path::PathBuf, std::path::PathBuf)>) -> Result<()> {
        for (file, target) in [("archive", paths.archive()), ("state", paths.state())] {
            let object = m.object(file).ok_or_else(|| self.damaged(m, file, "the manifest lists no such object".into()))?;
            let tmp = durable::temp_path(&paths.dir, &target);
            let out = durable::create_new(&tmp)?;
            staged.push((tmp.clone(), target.clone()));
            let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
            let written = self.run(self.inner.download(object, &mut |chunk: &[u8]| {
                out.write_all(chunk).map_err(|e| Error::io("write", &tmp, e).no_space(&target, object.size))
            }));
            let (size, crc) = written?;
            self.check_object(m, object, size, crc)?;
            let file = out.into_inner().map_err(|e| Error::io("write", &tmp, e.into_error()))?;
            file.sync_all().at("fsync", &tmp)?;
        }
        let archive = staged.first().map(|(tmp, _)| tmp.clone()).unwrap_or_default();
        let reader = ArchiveReader::open(&archive)?;
        if let Some(problem) = reader.verify().into_iter().next() {
            return Err(self.damaged(m, "archive", problem));
        }
        if tensor_sums(&reader) != m.tensors {
            return Err(self.damaged(m, "archive", "its tensors or their checksums differ from the manifest's".into()));
        }
        Ok(())
    }

    /// Check checkpoint `m` where it is: stream every object, checking its
    /// size and CRC-32C against the manifest (nothing is written anywhere),
    /// and read the archive's own manifest with ranged reads to check its
    /// tensors against the remote manifest's. Returns the problems found
    /// (none: it verifies).
    ///
    /// # Errors
    /// [`Error::Remote`] when the store cannot be read.
    pub fn verify(&self, m: &RemoteManifest) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        for object in &m.objects {
            let (size, crc) = self.run(self.inner.download(object, &mut |_| Ok(())))?;
            if let Err(e) = self.check_object(m, object, size, crc) {
                problems.push(e.report().to_string());
            }
        }
        if problems.is_empty() {
            if let Some(archive) = m.object("archive") {
                match self.run(self.inner.archive_manifest(archive)) {
                    Ok(inner) => {
                        let mut listed: Vec<TensorSum> = inner.model.iter().map(|t| TensorSum::of("model", t)).collect();
                        if let Some(o) = &inner.optimizer {
                            listed.extend(o.tensors.iter().map(|t| TensorSum::of("optimizer", t)));
                        }
                        if listed != m.tensors || inner.iterations != m.iterations {
                            problems.push(format!("{}: the archive's manifest differs from the remote manifest", archive.key));
                        }
                    }
                    Err(e) => problems.push(e.report().to_string()),
                }
            }
        }
        Ok(problems)
    }

    /// Keep the newest `keep` checkpoints (0 = all), the one `LATEST` names
    /// and checkpoint `protect` (an upload just made, even when the remote
    /// holds newer ones); delete each older one's manifest first, then its objects.
    /// Returns how many were deleted.
    ///
    /// # Errors
    /// [`Error::Remote`] on a store failure.
    pub fn apply_retention(&self, keep: usize, protect: Option<&str>) -> Result<usize> {
        self.run(self.inner.apply_retention(keep, protect))
    }

    /// Remove what interrupted uploads left, once older than `grace`: abort
    /// their multipart uploads and delete objects no manifest names. Returns
    /// how many uploads were cleaned up.
    ///
    /// # Errors
    /// [`Error::Remote`] on a store failure.
    pub fn clean_orphans(&self, grace: Duration) -> Result<usize> {
        self.run(self.inner.clean_orphans(grace))
    }

    fn check_object(&self, m: &RemoteManifest, o: &ObjectEntry, size: u64, crc: u32) -> Result<()> {
        if size != o.size {
            return Err(self.damaged(m, &o.file, format!("{} bytes, the manifest says {}", size, o.size)));
        }
        if crc != o.crc32c {
            return Err(self.damaged(m, &o.file, format!("CRC-32C {crc:08x}, the manifest says {:08x}", o.crc32c)));
        }
        Ok(())
    }

    fn damaged(&self, m: &RemoteManifest, file: &str, detail: String) -> Error {
        self.inner.objects.damaged(m.id(), file, detail)
    }
}

/// The tensors of an archive as a manifest lists them.
fn tensor_sums(reader: &ArchiveReader) -> Vec<TensorSum> {
    let mut sums: Vec<TensorSum> = reader.manifest.model.iter().map(|t| TensorSum::of("model", t)).collect();
    if let Some(o) = &reader.manifest.optimizer {
        sums.extend(o.tensors.iter().map(|t| TensorSum::of("optimizer", t)));
    }
    sums
}

/// How often an upload under way rewrites its record (keep
/// `remote.orphan_grace_secs` well above it).
const INTENT_REFRESH: Duration = Duration::from_secs(300);

impl Inner {
    async fn list(&self) -> Result<Vec<RemoteManifest>> {
        let mut found = Vec::new();
        for meta in self.objects.list(&self.layout.manifests()).await? {
            // A manifest deleted between the listing and the read is skipped.
            match self.objects.get_json::<RemoteManifest>(&meta.location).await {
                Ok(Some((m, _))) => found.push(m),
                Ok(None) => {}
                Err(e @ Error::RemoteDamaged { .. }) => tracing::warn!(target: "modelio", "skipping {}: {}", meta.location, e.report()),
                Err(e) => return Err(e),
            }
        }
        found.sort_by(|a, b| (a.iterations, &a.created).cmp(&(b.iterations, &b.created)));
        Ok(found)
    }

    /// The newest manifest by its key (keys sort by iteration), read from a
    /// listing: never stale, unlike `LATEST` after a run killed between its
    /// manifest and moving `LATEST`.
    async fn latest(&self) -> Result<Option<RemoteManifest>> {
        let newest = self.objects.list_keys(&self.layout.manifests()).await?.pop();
        if let Some(key) = newest {
            if let Ok(Some((m, _))) = self.objects.get_json::<RemoteManifest>(&key).await {
                return Ok(Some(m));
            }
        }
        Ok(self.list().await?.pop())
    }

    async fn upload(&self, archive: &Path, state: &Path, reason: Reason, stop: &(dyn Fn() -> bool + Sync)) -> Result<RemoteManifest> {
        // The archive's structure and its manifest (cheap: no tensor is read).
        let reader = ArchiveReader::open(archive)?;
        let iterations = reader.manifest.iterations;
        let with_optimizer = reader.manifest.optimizer.is_some();
        let tensors = tensor_sums(&reader);
        drop(reader);
        let upload = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
        let id = checkpoint_id(iterations, &upload);
        let mut intent = Intent { upload: upload.clone(), iterations, multipart: Vec::new() };
        self.write_intent(&intent).await?;

        let state_bytes = durable::read_regular(state)?;
        let state_key = self.layout.data(&id, STATE_OBJECT);
        let state_entry = ObjectEntry {
            file: "state".into(),
            key: state_key.to_string(),
            size: state_bytes.len() as u64,
            crc32c: crate::crc::crc32c(&state_bytes),
        };
        self.objects.put("upload", &state_key, state_bytes).await?;
        let archive_key = self.layout.data(&id, ARCHIVE_OBJECT);
        let (size, crc) = self.upload_file(archive, &archive_key, &mut intent, stop).await?;
        let archive_entry = ObjectEntry { file: "archive".into(), key: archive_key.to_string(), size, crc32c: crc };

        let manifest = RemoteManifest {
            format: MANIFEST_FORMAT,
            model: self.layout.root().filename().unwrap_or_default().to_string(),
            iterations,
            upload: upload.clone(),
            created: chrono::Utc::now().to_rfc3339(),
            kind: reason.name().into(),
            with_optimizer,
            objects: vec![archive_entry, state_entry],
            tensors,
        };
        let key = self.layout.manifest(&id);
        let json = objects::to_json(&key, &manifest, true)?;
        match self.objects.put_if("commit manifest", &key, json.clone(), PutMode::Create).await? {
            Put::Written => {}
            // A retried create whose first try went through: it is ours if it
            // holds what we wrote (the key is unique to this upload).
            Put::Lost if self.objects.get_raw(&key).await?.is_some_and(|(b, _)| b == json) => {}
            Put::Lost => {
                return Err(Error::RemoteExists {
                    op: "commit manifest",
                    target: key.to_string(),
                    detail: "another manifest is already at this upload's key",
                })
            }
            // No create-if-absent on this store: the key is unique to this
            // upload, so an overwrite cannot replace another's manifest.
            Put::Unsupported => self.objects.put("commit manifest", &key, json).await?,
        }
        // The checkpoint exists now; `LATEST` is a hint that readers check,
        // so failing to move it is logged, not a failed upload.
        if let Err(e) = self.objects.advance_latest(&self.layout.latest(), &self.layout.manifests(), &key, iterations).await {
            tracing::warn!(target: "modelio", "remote: {} (readers find the checkpoint by listing)", e.report());
        }
        // The upload is complete: its record is no longer needed (a leftover
        // record of a manifested upload is removed by the next cleanup).
        let _ = self.objects.delete(&self.layout.intent(&upload)).await;
        Ok(manifest)
    }

    async fn write_intent(&self, intent: &Intent) -> Result<()> {
        let key = self.layout.intent(&intent.upload);
        let json = objects::to_json(&key, intent, false)?;
        self.objects.put("record upload", &key, json).await
    }

    /// Rewrite the upload record every [`INTENT_REFRESH`] during a long
    /// upload, so that another run's cleanup (which removes records older
    /// than `orphan_grace_secs`) sees it is still under way. A failure here
    /// only costs that protection.
    async fn refresh_intent(&self, intent: &Intent, refreshed: &mut std::time::Instant) {
        if refreshed.elapsed() < INTENT_REFRESH {
            return;
        }
        *refreshed = std::time::Instant::now();
        if let Err(e) = self.write_intent(intent).await {
            tracing::warn!(target: "modelio", "remote: {}", e.report());
        }
    }

    /// Upload the file at `path` to `key`: one put when it fits in a part,
    /// else a multipart upload with at most `parts_in_flight` parts in
    /// memory. Returns its size and CRC-32C.
    async fn upload_file(&self, path: &Path, key: &Key, intent: &mut Intent, stop: &(dyn Fn() -> bool + Sync)) -> Result<(u64, u32)> {
        let file = parts::PartReader::open(path, &self.part_buffers)?;
        let size = file.size();
        let part = self.part_size as u64;
        let abandoned = || Error::UploadAbandoned { target: key.to_string() };
        if size <= part {
            let bytes = file.read(0, size as usize).await?;
            let crc = crate::crc::crc32c(&bytes);
            self.objects.put("upload", key, bytes).await?;
            return Ok((size, crc));
        }
        let mut crc = 0u32;
        let mut offset = 0u64;
        let mut refreshed = std::time::Instant::now();
        match &self.multipart {
            Some(mp) => {
                let id = mp.create_multipart(key).await.map_err(|e| self.objects.err("start multipart upload of", key, e))?;
                intent.multipart.push((key.to_string(), id.clone()));
                self.write_intent(intent).await?;
                let mut in_flight = futures::stream::FuturesOrdered::new();
                let mut parts: Vec<PartId> = Vec::new();
                let mut index = 0usize;
                while offset < size || !in_flight.is_empty() {
                    if offset < size && in_flight.len() < self.parts_in_flight {
                        if stop() {
                            let _ = mp.abort_multipart(key, &id).await;
                            return Err(abandoned());
                        }
                        let len = part.min(size - offset) as usize;
                        let bytes = file.read(offset, len).await?;
                        crc = crate::crc::crc32c_append(crc, &bytes);
                        let (mp, key, id) = (mp.clone(), key.clone(), id.clone());
                        let i = index;
                        in_flight.push_back(async move { mp.put_part(&key, &id, i, PutPayload::from(bytes)).await });
                        offset += len as u64;
                        index += 1;
                        self.refresh_intent(intent, &mut refreshed).await;
                        continue;
                    }
                    match in_flight.next().await {
                        Some(Ok(p)) => parts.push(p),
                        Some(Err(e)) => {
                            let _ = mp.abort_multipart(key, &id).await;
                            return Err(self.objects.err("upload part of", key, e));
                        }
                        None => break,
                    }
                }
                mp.complete_multipart(key, &id, parts).await.map_err(|e| self.objects.err("complete multipart upload of", key, e))?;
            }
            None => {
                let upload =
                    self.objects.store().put_multipart(key).await.map_err(|e| self.objects.err("start multipart upload of", key, e))?;
                let mut writer = WriteMultipart::new_with_chunk_size(upload, self.part_size);
                while offset < size {
                    if stop() {
                        let _ = writer.abort().await;
                        return Err(abandoned());
                    }
                    if let Err(e) = writer.wait_for_capacity(self.parts_in_flight).await {
                        return Err(self.objects.err("upload part of", key, e));
                    }
                    let len = part.min(size - offset) as usize;
                    let bytes = file.read(offset, len).await?;
                    crc = crate::crc::crc32c_append(crc, &bytes);
                    writer.put(bytes);
                    offset += len as u64;
                    self.refresh_intent(intent, &mut refreshed).await;
                }
                writer.finish().await.map_err(|e| self.objects.err("complete multipart upload of", key, e))?;
            }
        }
        Ok((size, crc))
    }

    /// Stream object `o` through `sink`; its size and CRC-32C.
    async fn download(&self, o: &ObjectEntry, sink: &mut (dyn FnMut(&[u8]) -> Result<()> + Send)) -> Result<(u64, u32)> {
        let key = self.objects.stored_key(&o.key)?;
        // An object its manifest names is gone: the checkpoint is incomplete.
        self.objects.stream(&key, sink).await?.ok_or_else(|| self.objects.damaged(&key, &o.file, "the object is missing"))
    }

    /// The archive's own manifest, by ranged reads.
    async fn archive_manifest(&self, o: &ObjectEntry) -> Result<crate::archive::format::Manifest> {
        self.objects.archive_manifest(&self.objects.stored_key(&o.key)?, o.size).await
    }

    async fn apply_retention(&self, keep: usize, protect: Option<&str>) -> Result<usize> {
        if keep == 0 {
            return Ok(0);
        }
        // Manifest keys sort by iteration (`<iterations:020>-<upload>.json`):
        // a listing is enough, no manifest is read.
        let mut ids: Vec<String> = self
            .objects
            .list_keys(&self.layout.manifests())
            .await?
            .into_iter()
            .filter_map(|k| k.filename().and_then(|f| f.strip_suffix(".json")).map(str::to_string))
            .filter(|id| iterations_of(id).is_some())
            .collect();
        ids.sort();
        let latest = self.objects.get_json::<Latest>(&self.layout.latest()).await.ok().flatten().map(|(l, _)| l.manifest);
        let excess = ids.len().saturating_sub(keep);
        let mut deleted = 0;
        for id in ids.into_iter().take(excess) {
            let key = self.layout.manifest(&id);
            if latest.as_deref() == Some(key.as_ref()) || protect == Some(id.as_str()) {
                continue;
            }
            // The manifest first: from then on the checkpoint does not exist
            // for readers, and its objects are orphans whatever happens next.
            self.objects.delete(&key).await?;
            self.objects.delete_all(&self.layout.data_dir(&id)).await?;
            deleted += 1;
        }
        Ok(deleted)
    }

    async fn clean_orphans(&self, grace: Duration) -> Result<usize> {
        let now = chrono::Utc::now();
        let old = |t: chrono::DateTime<chrono::Utc>| (now - t).to_std().is_ok_and(|age| age >= grace);
        let mut cleaned = 0;
        // Records of uploads: abort their multipart uploads once old enough.
        let mut live = std::collections::HashSet::new();
        for meta in self.objects.list(&self.layout.uploads()).await? {
            let Some((intent, _)) = self.objects.get_json::<Intent>(&meta.location).await.ok().flatten() else { continue };
            if !old(meta.last_modified) {
                live.insert(intent.upload);
                continue;
            }
            if let Some(mp) = &self.multipart {
                for (key, id) in &intent.multipart {
                    if let Ok(key) = Key::parse(key.as_str()) {
                        let _ = mp.abort_multipart(&key, &id.clone()).await;
                    }
                }
            }
            let _ = self.objects.delete(&meta.location).await;
        }
        // Data without a manifest, not under way, and old enough.
        let mut dirs: BTreeMap<String, bool> = BTreeMap::new();
        let data_root = self.layout.data_root();
        for meta in self.objects.list(&data_root).await? {
            let Some(id) = meta.location.prefix_match(&data_root).and_then(|mut p| p.next()).map(|p| p.as_ref().to_string()) else {
                continue;
            };
            let all_old = dirs.entry(id).or_insert(true);
            *all_old &= old(meta.last_modified);
        }
        for (id, all_old) in dirs {
            let upload = id.split_once('-').map(|(_, u)| u.to_string()).unwrap_or_default();
            if !all_old || live.contains(&upload) || iterations_of(&id).is_none() || self.objects.exists(&self.layout.manifest(&id)).await?
            {
                continue;
            }
            self.objects.delete_all(&self.layout.data_dir(&id)).await?;
            cleaned += 1;
        }
        Ok(cleaned)
    }
}

//! Reading an archive: [`ArchiveReader`] opens and checks one, and hands
//! out its tensors ([`Located`]) in place, checked as they are read.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use super::format::*;
use super::safetensors;
use super::zipread::{self, Directory};
use crate::error::{Error, IoContext, Result};

/// JSON entries larger than this are refused as damaged.
const MAX_JSON: u64 = 256 << 20;

/// Which tensor entry a tensor lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Model,
    Optimizer,
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct Located {
    pub meta: TensorMeta,
    /// Absolute offset of the tensor's first byte in the file.
    pub offset: usize,
    pub len: usize,
    /// The entry it is in, and its index in that entry's list: where reads
    /// record the tensor's CRC-32 for the entry's check.
    part: Part,
    index: usize,
}

/// What checking a safetensors entry's zip CRC-32 needs besides its tensors:
/// the CRC-32 of the bytes before the first tensor, the stored CRC-32, the
/// tensors in file order, and the CRC-32 of each tensor read so far.
#[derive(Debug)]
struct TensorEntry {
    name: &'static str,
    stored: u32,
    /// CRC-32 and length of the 8-byte length and the JSON header.
    prefix: (u32, u64),
    /// Indices into the entry's `Located` list, by file offset.
    file_order: Vec<usize>,
    /// The CRC-32 of each tensor (by index) once read and found intact.
    /// Reads may come from several threads, hence the lock.
    read: Mutex<Vec<Option<u32>>>,
}

impl TensorEntry {
    /// The entry's CRC-32 from the prefix and every tensor's CRC-32, in file order.
    fn combined(&self, located: &[Located], crcs: &[Option<u32>]) -> Option<u32> {
        let mut crc = crc32fast::Hasher::new_with_initial_len(self.prefix.0, self.prefix.1);
        for &i in &self.file_order {
            let t = located.get(i)?;
            crc.combine(&crc32fast::Hasher::new_with_initial_len((*crcs.get(i)?)?, t.len as u64));
        }
        Some(crc.finalize())
    }
}

/// An opened, structurally checked archive: the zip layer as strictly as
/// Python's `zipfile` or more, the manifest's own checksum, and the small
/// entries' checksums are checked on opening. Tensor bytes are checked
/// against their CRC-32C, and each tensor entry against its zip CRC-32, by
/// [`ArchiveReader::verify`], or as they are read with
/// [`ArchiveReader::read_checked_into`] and [`ArchiveReader::checked_data`]
/// (the entry's CRC-32 when the last of its tensors is read).
pub struct ArchiveReader {
    path: PathBuf,
    name: String,
    map: Backing,
    pub manifest: Manifest,
    pub model: Vec<Located>,
    pub optimizer: Option<(Vec<Located>, serde_json::Value)>,
    /// The state file as of this save (absent in archives written without one).
    pub state: Option<Vec<u8>>,
    model_entry: TensorEntry,
    optimizer_entry: Option<TensorEntry>,
}

/// The bytes of an archive: a mapping of the file, or bytes in memory.
enum Backing {
    /// The mapping, and the file for reading tensors with `pread`.
    Mapped(memmap2::Mmap, File),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Mapped(m, _) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// Tensors are read this many bytes at a time, each chunk checksummed once
/// read (by a helper thread for large tensors: [`read_checksummed`]).
const READ_CHUNK: usize = 4 << 20;
/// Tensors of at least this many bytes are checksummed by a helper thread
/// while they are read ([`read_checksummed`]).
const PIPELINE_MIN: usize = 2 * READ_CHUNK;

/// Entries an archive may hold; any other is refused, so that no entry goes
/// unchecked (`zipfile.testzip()` would read it).
const KNOWN_ENTRIES: [&str; 5] = [MANIFEST_ENTRY, MODEL_ENTRY, OPTIMIZER_ENTRY, OPTIMIZER_JSON_ENTRY, STATE_ENTRY];

/// Read `dst.len()` bytes of `file` at `offset` into `dst` with `pread`,
/// [`READ_CHUNK`] at a time; the (CRC-32C, zip CRC-32) of what was read.
/// From [`PIPELINE_MIN`] bytes on, on a machine with a second core, a helper
/// thread checksums each chunk while the next one is read, so the checksums
/// cost no time beside the read. Without a helper (one core, or it cannot
/// be started) the caller checksums each chunk after reading it; if the
/// helper dies, the caller checksums the whole of `dst` once it is read.
fn read_checksummed(file: &File, offset: u64, dst: &mut [u8]) -> std::io::Result<(u32, u32)> {
    use std::os::unix::fs::FileExt;
    let mut sums = crate::crc::Both::new();
    if dst.len() < PIPELINE_MIN || crate::cores() < 2 {
        for (i, chunk) in dst.chunks_mut(READ_CHUNK).enumerate() {
            file.read_exact_at(chunk, offset + (i * READ_CHUNK) as u64)?;
            sums.update(chunk);
        }
        return Ok(sums.finalize());
    }
    let helped = std::thread::scope(|scope| -> std::io::Result<Option<(u32, u32)>> {
        // Chunks read and not yet checksummed: at most two waiting, besides
        // the one being checksummed.
        let (to_sum, read) = std::sync::mpsc::sync_channel::<&[u8]>(2);
        let helper = std::thread::Builder::new().name("modelio-load-crc".into()).spawn_scoped(scope, move || {
            let mut sums = crate::crc::Both::new();
            for chunk in read {
                sums.update(chunk);
            }
            sums.finalize()
        });
        let mut to_sum = helper.is_ok().then_some(to_sum);
        let mut lost = false;
        for (i, chunk) in dst.chunks_mut(READ_CHUNK).enumerate() {
            file.read_exact_at(chunk, offset + (i * READ_CHUNK) as u64)?;
            let chunk: &[u8] = chunk;
            match &to_sum {
                Some(tx) => lost |= tx.send(chunk).is_err(),
                None => sums.update(chunk),
            }
        }
        // Hang up so the helper finishes; its sums cover every chunk it was sent.
        to_sum.take();
        match helper.map(|h| h.join()) {
            Ok(Ok(sums)) if !lost => Ok(Some(sums)),
            // The helper died: its sums are incomplete.
            Ok(_) => Ok(None),
            // No helper was started: the caller summed every chunk.
            Err(_) => Ok(Some(sums.finalize())),
        }
    })?;
    Ok(helped.unwrap_or_else(|| crate::crc::both(dst)))
}

impl std::fmt::Debug for ArchiveReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveReader").field("path", &self.path).field("manifest", &self.manifest).finish()
    }
}

impl ArchiveReader {
    /// Open the archive at `path` and check its structure, its manifest and
    /// its small entries. Refuses a FIFO, device or folder without blocking.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read, [`Error::NotRegular`] when
    /// it is not a regular file, [`Error::Damaged`] naming the broken part otherwise.
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::folder::durable::open_regular(path)?;
        // SAFETY: modelio never modifies a committed file in place (files are
        // replaced by rename), so the mapping's bytes do not change under us.
        let map = unsafe { memmap2::Mmap::map(&file) }.at("map", path)?;
        // Loads read the file front to back: ask for aggressive readahead.
        let _ = map.advise(memmap2::Advice::Sequential);
        let _ = map.advise(memmap2::Advice::WillNeed);
        Self::parse(path, Backing::Mapped(map, file))
    }

    /// Check an archive held in memory; `path` only names it in errors.
    ///
    /// # Errors
    /// [`Error::Damaged`] naming the broken part.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(path, Backing::Owned(bytes))
    }

    fn parse(path: &Path, map: Backing) -> Result<Self> {
        // The model's name, for the restore hint: `m` for `m.mio` and `m.mio.bk`.
        let file = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let stem = file.strip_suffix(".bk").unwrap_or(&file);
        let name = stem.strip_suffix(&format!(".{EXTENSION}")).unwrap_or(stem).to_string();
        let damaged = |what: &str, detail: String| Error::damaged(path, &name, what, detail);

        let dir = zipread::read(&map).map_err(|d| damaged("zip structure", d))?;
        if let Some(e) = dir.entries.iter().find(|e| !KNOWN_ENTRIES.contains(&e.name.as_str())) {
            return Err(damaged("zip structure", format!("entry `{}` is not part of the format", e.name)));
        }
        let manifest_bytes = read_small(&map, &dir, MANIFEST_ENTRY).map_err(|d| damaged(MANIFEST_ENTRY, d))?;
        let manifest = parse_manifest(manifest_bytes).map_err(|d| damaged(MANIFEST_ENTRY, d))?;
        let v2 = manifest.format_version >= 2;

        let (model, model_entry) = locate(&map, &dir, MODEL_ENTRY, &manifest.model, Part::Model).map_err(|d| damaged(MODEL_ENTRY, d))?;
        let (optimizer, optimizer_entry) = match &manifest.optimizer {
            None => {
                if let Some(e) = [OPTIMIZER_ENTRY, OPTIMIZER_JSON_ENTRY].into_iter().find(|e| dir.get(e).is_some()) {
                    return Err(damaged(MANIFEST_ENTRY, format!("lists no optimizer, but the archive holds {e}")));
                }
                (None, None)
            }
            Some(meta) => {
                let (located, entry) =
                    locate(&map, &dir, OPTIMIZER_ENTRY, &meta.tensors, Part::Optimizer).map_err(|d| damaged(OPTIMIZER_ENTRY, d))?;
                let bytes = read_small(&map, &dir, OPTIMIZER_JSON_ENTRY).map_err(|d| damaged(OPTIMIZER_JSON_ENTRY, d))?;
                check_listed(bytes, meta.json_crc32c, v2).map_err(|d| damaged(OPTIMIZER_JSON_ENTRY, d))?;
                let json = serde_json::from_slice(bytes).map_err(|e| damaged(OPTIMIZER_JSON_ENTRY, e.to_string()))?;
                (Some((located, json)), Some(entry))
            }
        };
        let state = match dir.get(STATE_ENTRY) {
            Some(_) => {
                let bytes = read_small(&map, &dir, STATE_ENTRY).map_err(|d| damaged(STATE_ENTRY, d))?;
                check_listed(bytes, manifest.state_crc32c, v2).map_err(|d| damaged(STATE_ENTRY, d))?;
                check_state(bytes, &manifest).map_err(|d| damaged(STATE_ENTRY, d))?;
                Some(bytes.to_vec())
            }
            None if manifest.state_crc32c.is_some() => {
                return Err(damaged(STATE_ENTRY, "listed in the manifest but missing".into()));
            }
            None => None,
        };
        let reader = ArchiveReader { path: path.to_path_buf(), name, map, manifest, model, optimizer, state, model_entry, optimizer_entry };
        // An entry without tensors is all header: check it now, as no read will.
        for (entry, located) in reader.tensor_entries() {
            if located.is_empty() {
                reader.check_entry(entry, located, &[])?;
            }
        }
        Ok(reader)
    }

    /// The file this archive was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The archive's bytes (a copy when it is a mapped file).
    pub fn into_bytes(self) -> Vec<u8> {
        match self.map {
            Backing::Owned(v) => v,
            Backing::Mapped(m, _) => m.to_vec(),
        }
    }

    /// The tensor entries and their tensors.
    fn tensor_entries(&self) -> impl Iterator<Item = (&TensorEntry, &[Located])> {
        let optimizer = self.optimizer_entry.iter().zip(self.optimizer.iter().map(|(l, _)| &l[..]));
        std::iter::once((&self.model_entry, &self.model[..])).chain(optimizer)
    }

    /// The entry `t` is in and its tensors, when `t` was located by this reader.
    fn entry_of(&self, t: &Located) -> Result<(&TensorEntry, &[Located])> {
        let (entry, located) = match t.part {
            Part::Model => (Some(&self.model_entry), Some(&self.model[..])),
            Part::Optimizer => (self.optimizer_entry.as_ref(), self.optimizer.as_ref().map(|(l, _)| &l[..])),
        };
        match (entry, located) {
            (Some(e), Some(l)) if l.get(t.index).is_some_and(|own| own.offset == t.offset && own.len == t.len && own.meta == t.meta) => {
                Ok((e, l))
            }
            _ => Err(Error::Mismatch {
                path: self.path.clone(),
                tensor: t.meta.name.clone(),
                expected: "a tensor located by this reader".into(),
                found: "a tensor of another archive".into(),
            }),
        }
    }

    /// Copy a tensor's bytes into `dst` (exactly its length), checking its
    /// CRC-32C on the way. An archive opened from disk is read with `pread`
    /// straight into `dst`, chunk by chunk, with no page faults on the
    /// mapping; from 8 MiB on a helper thread checksums each chunk while the
    /// next one is read. The zip CRC-32 is
    /// computed in the same pass; once every tensor of the entry has been
    /// read, the entry's CRC-32 is checked, so a caller that reads them all
    /// has checked everything `zipfile.testzip()` would.
    ///
    /// # Errors
    /// [`Error::Damaged`] naming the tensor when its checksum fails or `dst`
    /// has the wrong length, or naming the entry when this was its last
    /// tensor and the entry's zip CRC-32 fails; [`Error::Io`] when the file
    /// cannot be read; [`Error::Mismatch`] when `t` comes from another reader.
    pub fn read_checked_into(&self, t: &Located, dst: &mut [u8]) -> Result<()> {
        let (entry, located) = self.entry_of(t)?;
        if dst.len() != t.len {
            return Err(Error::damaged(
                &self.path,
                &self.name,
                format!("tensor `{}`", t.meta.name),
                format!("{} bytes stored, {} expected for its dtype and shape", t.len, dst.len()),
            ));
        }
        let (crc32c, crc32) = match &self.map {
            Backing::Mapped(_, file) => read_checksummed(file, t.offset as u64, dst).at("read", &self.path)?,
            Backing::Owned(bytes) => {
                // `entry_of` matched `t` to a located tensor, which lies inside the bytes.
                dst.copy_from_slice(&bytes[t.offset..t.offset + t.len]);
                crate::crc::both(dst)
            }
        };
        self.check_read(entry, located, t, crc32c, crc32)
    }

    /// Check a tensor's CRC-32C, record its CRC-32, and check the entry's
    /// CRC-32 when every tensor of the entry has been recorded.
    fn check_read(&self, entry: &TensorEntry, located: &[Located], t: &Located, crc32c: u32, crc32: u32) -> Result<()> {
        self.check_crc(t, crc32c)?;
        let crcs = {
            let mut read = entry.read.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(slot) = read.get_mut(t.index) {
                *slot = Some(crc32);
            }
            if read.iter().any(Option::is_none) {
                return Ok(());
            }
            read.clone()
        };
        self.check_entry(entry, located, &crcs)
    }

    /// A damaged-entry error unless the prefix and the tensors' CRC-32s
    /// (`crcs`, by index) combine to the entry's stored CRC-32.
    fn check_entry(&self, entry: &TensorEntry, located: &[Located], crcs: &[Option<u32>]) -> Result<()> {
        match entry.combined(located, crcs) {
            Some(found) if found == entry.stored => Ok(()),
            found => Err(Error::damaged(
                &self.path,
                &self.name,
                entry.name,
                format!("zip CRC-32 {} != stored {:08x}", found.map_or("incomplete".into(), |f| format!("{f:08x}")), entry.stored),
            )),
        }
    }

    /// A damaged-tensor error unless `found` is the tensor's stored CRC-32C.
    fn check_crc(&self, t: &Located, found: u32) -> Result<()> {
        if found == t.meta.crc32c {
            return Ok(());
        }
        Err(Error::damaged(
            &self.path,
            &self.name,
            format!("tensor `{}`", t.meta.name),
            format!("checksum {found:08x} != stored {:08x}", t.meta.crc32c),
        ))
    }

    /// A tensor's bytes in place, unchecked (empty for a tensor this reader
    /// did not locate that lies outside the file).
    pub fn data(&self, t: &Located) -> &[u8] {
        self.map.get(t.offset..t.offset.saturating_add(t.len)).unwrap_or_default()
    }

    /// A tensor's bytes in place after checking its CRC-32C (and, as with
    /// [`ArchiveReader::read_checked_into`], its entry's zip CRC-32 once every
    /// tensor of the entry has been checked).
    ///
    /// # Errors
    /// As [`ArchiveReader::read_checked_into`].
    pub fn checked_data(&self, t: &Located) -> Result<&[u8]> {
        let (entry, located) = self.entry_of(t)?;
        let data = self.data(t);
        let (crc32c, crc32) = crate::crc::both(data);
        self.check_read(entry, located, t, crc32c, crc32)?;
        Ok(data)
    }

    /// Check every tensor's CRC-32C and every tensor entry's zip CRC-32
    /// (one pass over the data); returns the damaged parts: the names of the
    /// tensors that fail, and an entry's description when its CRC-32 fails
    /// though its tensors pass (its safetensors header was changed). The
    /// manifest and the small entries were checked when the archive was opened.
    pub fn verify(&self) -> Vec<String> {
        let mut damaged = Vec::new();
        for (entry, located) in self.tensor_entries() {
            let mut crcs = Vec::with_capacity(located.len());
            let mut tensors_ok = true;
            for t in located {
                let (crc32c, crc32) = crate::crc::both(self.data(t));
                if crc32c != t.meta.crc32c {
                    damaged.push(t.meta.name.clone());
                    tensors_ok = false;
                }
                crcs.push(Some(crc32));
            }
            if tensors_ok {
                if let Err(e) = self.check_entry(entry, located, &crcs) {
                    damaged.push(match e {
                        Error::Damaged { what, detail, .. } => format!("{what} ({detail})"),
                        other => other.to_string(),
                    });
                }
            }
        }
        damaged
    }

    /// Total bytes of tensor data.
    pub fn tensor_bytes(&self) -> u64 {
        let optimizer = self.optimizer.iter().flat_map(|(t, _)| t.iter());
        self.model.iter().chain(optimizer).map(|t| t.len as u64).sum()
    }
}

/// Parse the manifest and check its format, version and own checksum.
pub(crate) fn parse_manifest(bytes: &[u8]) -> Result<Manifest, String> {
    let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if manifest.format != FORMAT_NAME || !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&manifest.format_version) {
        return Err(format!(
            "format {} version {} is not {FORMAT_NAME} version {MIN_FORMAT_VERSION} to {FORMAT_VERSION}",
            manifest.format, manifest.format_version
        ));
    }
    match manifest.checksum {
        Some(value) => {
            let (stored, computed) = manifest_checksum(bytes)?;
            if stored != value || computed != stored {
                return Err(format!("checksum {computed} != stored {value}"));
            }
        }
        None if manifest.format_version >= 2 => return Err("has no checksum (required from version 2)".into()),
        None => {}
    }
    let optimizer = manifest.optimizer.iter().flat_map(|o| o.tensors.iter());
    for (list, tensors) in [("model", manifest.model.iter().collect::<Vec<_>>()), ("optimizer", optimizer.collect())] {
        let mut seen = HashSet::new();
        if let Some(t) = tensors.iter().find(|t| !seen.insert(t.name.as_str())) {
            return Err(format!("tensor `{}` is listed twice in the {list}", t.name));
        }
        for t in &tensors {
            check_rank(&t.name, &t.shape)?;
        }
    }
    Ok(manifest)
}

/// Check that the embedded state is a state file that agrees with the
/// manifest. A resume continues from this state (its iteration count, lowest
/// loss and sessions) when the state file beside the archive is behind or
/// lost, so a state that does not parse, or that counts other iterations than
/// the tensors were saved at, is damage, not something to skip silently. The
/// iteration count is what both record; the model name is not compared (a
/// model copied under a new name keeps its old name in the state).
fn check_state(bytes: &[u8], manifest: &Manifest) -> Result<(), String> {
    let state: crate::policy::state::State = serde_json::from_slice(bytes).map_err(|e| format!("not a valid state file ({e})"))?;
    if state.total_iterations != manifest.iterations {
        return Err(format!(
            "it records {} iterations, the manifest {}: one of them was changed after the save",
            state.total_iterations, manifest.iterations
        ));
    }
    Ok(())
}

/// Check a small entry's bytes against the CRC-32C the manifest lists for
/// it; version 2 manifests must list one.
fn check_listed(bytes: &[u8], listed: Option<u32>, v2: bool) -> Result<(), String> {
    match listed {
        Some(stored) => {
            let found = crate::crc::crc32c(bytes);
            if found != stored {
                return Err(format!("checksum {found:08x} != stored {stored:08x} in the manifest"));
            }
        }
        None if v2 => return Err("the manifest lists no checksum for it".into()),
        None => {}
    }
    Ok(())
}

/// An entry's data, its offset in the file and its stored zip CRC-32.
fn entry_bytes<'a>(map: &'a [u8], dir: &Directory, entry: &str) -> Result<(&'a [u8], usize, u32), String> {
    let e = dir.get(entry).ok_or("missing")?;
    // `zipread` checked the data lies inside the file.
    let start = usize::try_from(e.data_offset).map_err(|_| "offset does not fit in memory")?;
    let len = usize::try_from(e.size).map_err(|_| "size does not fit in memory")?;
    let bytes = map.get(start..start.saturating_add(len)).ok_or("runs past the end of the file")?;
    Ok((bytes, start, e.crc32))
}

/// A small entry whole, after checking its zip CRC-32.
fn read_small<'a>(map: &'a [u8], dir: &Directory, entry: &str) -> Result<&'a [u8], String> {
    let (bytes, _, stored) = entry_bytes(map, dir, entry)?;
    if bytes.len() as u64 > MAX_JSON {
        return Err(format!("{} bytes is more than the {MAX_JSON} allowed", bytes.len()));
    }
    let found = crc32fast::hash(bytes);
    if found != stored {
        return Err(format!("zip CRC-32 {found:08x} != stored {stored:08x}"));
    }
    Ok(bytes)
}

/// Find every tensor of a safetensors entry in the file and check that the
/// entry agrees with the manifest (see [`safetensors::locate`]).
fn locate(
    map: &[u8],
    dir: &Directory,
    entry: &'static str,
    metas: &[TensorMeta],
    part: Part,
) -> Result<(Vec<Located>, TensorEntry), String> {
    let (blob, start, stored) = entry_bytes(map, dir, entry)?;
    let safetensors::Layout { prefix_len, tensors, file_order } = safetensors::locate(blob, start, metas)?;
    let located: Vec<Located> = metas
        .iter()
        .zip(tensors)
        .enumerate()
        .map(|(index, (meta, (offset, len)))| Located { meta: meta.clone(), offset, len, part, index })
        .collect();
    let prefix = (crc32fast::hash(&blob[..prefix_len]), prefix_len as u64);
    let read = Mutex::new(vec![None; located.len()]);
    Ok((located, TensorEntry { name: entry, stored, prefix, file_order, read }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::test_support::t;
    use crate::archive::writer::write_entry;
    use crate::archive::{commit_archive, write_archive};

    #[test]
    fn tensors_larger_than_a_read_chunk_are_read_whole() {
        let len = 2 * READ_CHUNK + 1000;
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        let shape = [len / 4];
        let tensors = [t("big", DType::F32, &shape, &data)];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.mio");
        let bytes = write_archive(Vec::new(), &path, "m", 1, &tensors, None, None).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        for reader in [ArchiveReader::open(&path).unwrap(), ArchiveReader::from_bytes(&path, bytes.clone()).unwrap()] {
            let mut out = vec![0u8; len];
            reader.read_checked_into(&reader.model[0], &mut out).unwrap();
            assert!(out == data);
        }
        // A byte changed in any chunk (read while a helper thread checksums
        // the chunks before it) is found.
        let offset = ArchiveReader::open(&path).unwrap().model[0].offset;
        for at in [0, READ_CHUNK + 7, len - 1] {
            let mut damaged = bytes.clone();
            damaged[offset + at] ^= 0x40;
            std::fs::write(&path, &damaged).unwrap();
            let reader = ArchiveReader::open(&path).unwrap();
            let mut out = vec![0u8; len];
            let e = reader.read_checked_into(&reader.model[0], &mut out).unwrap_err();
            assert!(matches!(&e, Error::Damaged { what, .. } if what.contains("tensor `big`")), "byte {at}: {e:?}");
        }
    }

    #[test]
    fn a_tensor_whose_crc32c_differs_from_the_manifest_is_damaged_even_when_its_entry_checks() {
        // The manifest's CRC-32C is wrong, the zip's CRC-32 right.
        let a = [5u8; 64];
        let mut bad = t("a", DType::F32, &[16], &a);
        bad.crc32c = Some(crate::crc::crc32c(&a) ^ 1);
        let path = Path::new("m.mio");
        let bytes = write_archive(Vec::new(), path, "m", 1, &[bad], None, None).unwrap();
        let r = ArchiveReader::from_bytes(path, bytes).unwrap();
        let mut out = vec![0u8; 64];
        let e = r.read_checked_into(&r.model[0], &mut out).unwrap_err();
        assert!(matches!(&e, Error::Damaged { what, .. } if what.contains("tensor `a`")), "{e:?}");
        assert_eq!(r.verify().len(), 1);
    }

    #[test]
    fn tensor_bytes_counts_the_model_and_the_optimizer() {
        let (a, b) = ([1u8; 12], [2u8; 20]);
        let model = [t("a", DType::F32, &[3], &a)];
        let opt = [t("a.m", DType::F32, &[5], &b)];
        let json = serde_json::json!({});
        let optimizer = OptimizerRef { kind: "adam", json: &json, tensors: &opt };
        let path = Path::new("m.mio");
        let bytes = write_archive(Vec::new(), path, "m", 1, &model, Some(optimizer), None).unwrap();
        assert_eq!(ArchiveReader::from_bytes(path, bytes).unwrap().tensor_bytes(), 32);
    }

    #[test]
    fn a_manifest_of_another_format_or_version_is_refused_first() {
        let a = [1u8; 4];
        let bytes = write_archive(Vec::new(), Path::new("m.mio"), "m", 1, &[t("a", DType::F32, &[1], &a)], None, None).unwrap();
        let manifest = ArchiveReader::from_bytes(Path::new("m.mio"), bytes).unwrap().manifest;
        let mut other = manifest.clone();
        other.format = "zip".into();
        let e = parse_manifest(&serde_json::to_vec(&other).unwrap()).unwrap_err();
        assert!(e.starts_with("format zip version"), "{e}");
        let mut newer = manifest;
        newer.format_version = FORMAT_VERSION + 1;
        let e = parse_manifest(&serde_json::to_vec(&newer).unwrap()).unwrap_err();
        assert!(e.starts_with("format ") && e.contains(&format!("version {}", FORMAT_VERSION + 1)), "{e}");
    }

    #[test]
    fn an_embedded_state_of_other_iterations_is_damage() {
        let a = [1u8; 4];
        let tensors = [t("a", DType::F32, &[1], &a)];
        let mut state = crate::policy::state::State::new("m");
        state.total_iterations = 1000;
        let json = serde_json::to_vec(&state).unwrap();
        let path = Path::new("m.mio");
        let bytes = write_archive(Vec::new(), path, "m", 7, &tensors, None, Some(&json)).unwrap();
        let e = ArchiveReader::from_bytes(path, bytes).unwrap_err();
        assert!(matches!(&e, Error::Damaged { detail, .. } if detail.contains("1000 iterations")), "{e:?}");
        state.total_iterations = 7;
        let json = serde_json::to_vec(&state).unwrap();
        let bytes = write_archive(Vec::new(), path, "m", 7, &tensors, None, Some(&json)).unwrap();
        assert!(ArchiveReader::from_bytes(path, bytes).is_ok());
    }

    /// The archive `bytes` written again entry by entry, without the entries
    /// in `drop` and with `manifest` (its checksum made right) as its manifest.
    fn rebuilt(bytes: &[u8], manifest: &Manifest, drop: &[&str]) -> Vec<u8> {
        let mut m = manifest.clone();
        m.checksum = Some(0);
        m.checksum = Some(crate::crc::crc32c(&serde_json::to_vec(&m).unwrap()));
        let manifest_json = serde_json::to_vec(&m).unwrap();
        let dir = crate::archive::zipread::read(bytes).unwrap();
        let mut zip = rawzip::ZipArchiveWriter::new(Vec::new());
        for e in dir.entries.iter().filter(|e| !drop.contains(&e.name.as_str())) {
            let data = if e.name == MANIFEST_ENTRY {
                &manifest_json[..]
            } else {
                &bytes[e.data_offset as usize..(e.data_offset + e.size) as usize]
            };
            write_entry(&mut zip, &e.name, &[(data, None)]).unwrap();
        }
        zip.finish().unwrap()
    }

    #[test]
    fn small_entries_and_the_manifest_s_list_of_them_must_agree() {
        let a = [1u8; 4];
        let tensors = [t("a", DType::F32, &[1], &a)];
        let mut state = crate::policy::state::State::new("m");
        state.total_iterations = 7;
        let json = serde_json::to_vec(&state).unwrap();
        let path = Path::new("m.mio");
        let bytes = write_archive(Vec::new(), path, "m", 7, &tensors, None, Some(&json)).unwrap();
        let manifest = ArchiveReader::from_bytes(path, bytes.clone()).unwrap().manifest;
        assert!(ArchiveReader::from_bytes(path, rebuilt(&bytes, &manifest, &[])).is_ok(), "rebuilt unchanged");
        // Listed in the manifest, but not in the archive.
        let e = ArchiveReader::from_bytes(path, rebuilt(&bytes, &manifest, &[STATE_ENTRY])).unwrap_err();
        assert!(matches!(&e, Error::Damaged { detail, .. } if detail.contains("listed in the manifest but missing")), "{e:?}");
        // In the archive, but a version 2 manifest lists no checksum for it.
        let mut unlisted = manifest.clone();
        unlisted.state_crc32c = None;
        let e = ArchiveReader::from_bytes(path, rebuilt(&bytes, &unlisted, &[])).unwrap_err();
        assert!(matches!(&e, Error::Damaged { detail, .. } if detail.contains("lists no checksum")), "{e:?}");
    }

    #[test]
    fn a_reader_gives_back_the_archive_s_bytes() {
        let a = [7u8; 40];
        let tensors = [t("a", DType::F32, &[10], &a)];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.mio");
        let bytes = write_archive(Vec::new(), &path, "m", 3, &tensors, None, None).unwrap();
        let owned = ArchiveReader::from_bytes(&path, bytes.clone()).unwrap();
        assert!(format!("{owned:?}").contains("m.mio"));
        assert!(owned.into_bytes() == bytes);
        std::fs::write(&path, &bytes).unwrap();
        assert!(ArchiveReader::open(&path).unwrap().into_bytes() == bytes, "a mapped file");
    }

    fn sample(path: &Path) {
        let a: Vec<u8> = (0..64u8).collect();
        let b = [1u8, 0, 1];
        let tensors = [t("a", DType::F32, &[4, 4], &a), t("b", DType::Bool, &[3], &b), t("e", DType::F16, &[0], &[])];
        let json = serde_json::json!({"step": 2});
        let opt = [t("a.m", DType::F32, &[16], &a)];
        let optimizer = OptimizerRef { kind: "adam", json: &json, tensors: &opt };
        commit_archive(path, "m", 5, &tensors, Some(optimizer), Some(SAMPLE_STATE)).unwrap();
    }

    /// The state `sample` embeds: a state file of its 5 iterations.
    const SAMPLE_STATE: &[u8] = br#"{"model_name":"m","total_iterations":5,"sessions":[],"lowest_average_loss":1.0,"config":null}"#;

    /// The archive with one entry's bytes replaced by `data` (same length)
    /// and its zip CRC-32 recomputed, as a forger would.
    fn forge(bytes: &[u8], entry: &str, edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
        let dir = zipread::read(bytes).unwrap();
        let e = dir.get(entry).unwrap();
        let mut out = bytes.to_vec();
        let range = e.data_offset as usize..(e.data_offset + e.size) as usize;
        edit(&mut out[range.clone()]);
        let crc = crc32fast::hash(&out[range]).to_le_bytes();
        out[e.central_offset as usize + 16..][..4].copy_from_slice(&crc);
        out[e.descriptor_offset.unwrap() as usize + 4..][..4].copy_from_slice(&crc);
        out
    }

    #[test]
    fn version_2_manifest_covers_itself_and_the_small_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.mio");
        sample(&path);
        let r = ArchiveReader::open(&path).unwrap();
        assert_eq!(r.manifest.format_version, 2);
        assert!(r.manifest.checksum.is_some() && r.manifest.state_crc32c.is_some());
        assert!(r.manifest.optimizer.as_ref().unwrap().json_crc32c.is_some());
        drop(r);
        let bytes = std::fs::read(&path).unwrap();
        let replace = |from: &'static str, to: &'static str| {
            move |d: &mut [u8]| {
                let s = String::from_utf8(d.to_vec()).unwrap().replacen(from, to, 1);
                assert_eq!(s.len(), d.len());
                d.copy_from_slice(s.as_bytes());
            }
        };
        for (entry, from, to) in
            [(MANIFEST_ENTRY, "\"iterations\": 5", "\"iterations\": 6"), (OPTIMIZER_JSON_ENTRY, "2", "3"), (STATE_ENTRY, "1", "2")]
        {
            let forged = forge(&bytes, entry, replace(from, to));
            let err = ArchiveReader::from_bytes(&path, forged).unwrap_err().to_string();
            assert!(err.contains(entry) && err.contains("checksum"), "{err}");
        }
    }

    #[test]
    fn version_1_archives_still_read_and_a_present_checksum_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.mio");
        sample(&path);
        let bytes = std::fs::read(&path).unwrap();
        let as_v1 = |checksum: Option<u32>| {
            forge(&bytes, MANIFEST_ENTRY, |d| {
                let mut m: Manifest = serde_json::from_slice(d).unwrap();
                m.format_version = 1;
                m.state_crc32c = None;
                m.checksum = checksum;
                if let Some(o) = m.optimizer.as_mut() {
                    o.json_crc32c = None;
                }
                let mut v1 = serde_json::to_vec_pretty(&m).unwrap();
                v1.resize(d.len(), b' ');
                d.copy_from_slice(&v1);
            })
        };
        let r = ArchiveReader::from_bytes(&path, as_v1(None)).unwrap();
        assert_eq!(r.manifest.format_version, 1);
        assert!(r.verify().is_empty());
        assert_eq!(r.state.as_deref(), Some(SAMPLE_STATE));
        // A checksum field is checked whatever the version (this one cannot be right).
        let err = ArchiveReader::from_bytes(&path, as_v1(Some(7))).unwrap_err().to_string();
        assert!(err.contains(MANIFEST_ENTRY) && err.contains("checksum"), "{err}");
        // Version 2 without checksums is refused.
        let v2_bare = forge(&bytes, MANIFEST_ENTRY, |d| {
            let mut m: Manifest = serde_json::from_slice(d).unwrap();
            m.checksum = None;
            let mut out = serde_json::to_vec_pretty(&m).unwrap();
            out.resize(d.len(), b' ');
            d.copy_from_slice(&out);
        });
        let err = ArchiveReader::from_bytes(&path, v2_bare).unwrap_err().to_string();
        assert!(err.contains("has no checksum"), "{err}");
    }

    #[test]
    fn loading_every_tensor_checks_the_entry_crc() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.mio");
        sample(&path);
        let bytes = std::fs::read(&path).unwrap();
        // A space of the header's padding becomes a tab: valid JSON, same
        // tensors, but not the bytes the zip CRC-32 covers.
        let model = zipread::read(&bytes).unwrap().get(MODEL_ENTRY).unwrap().clone();
        let mut damaged = bytes.clone();
        let pad = (model.data_offset as usize..).find(|&i| damaged[i] == b' ').unwrap();
        damaged[pad] = b'\t';
        std::fs::write(&path, &damaged).unwrap();
        let r = ArchiveReader::open(&path).unwrap();
        assert_eq!(
            r.verify(),
            vec![format!(
                "{MODEL_ENTRY} (zip CRC-32 {:08x} != stored {:08x})",
                crc32fast::hash(&damaged[model.data_offset as usize..(model.data_offset + model.size) as usize]),
                model.crc32
            )]
        );
        let mut results = Vec::new();
        for l in &r.model {
            let mut dst = vec![0u8; l.len];
            results.push(r.read_checked_into(l, &mut dst).map_err(|e| e.to_string()));
        }
        // Each tensor is intact; the last one read completes the entry and fails it.
        assert!(results[..results.len() - 1].iter().all(Result::is_ok), "{results:?}");
        let last = results.last().unwrap().as_ref().unwrap_err();
        assert!(last.contains(MODEL_ENTRY) && last.contains("zip CRC-32"), "{last}");
        // The optimizer entry is intact and reads clean, through either path.
        let (opt, _) = r.optimizer.as_ref().unwrap();
        assert!(r.checked_data(&opt[0]).is_ok());
        let mut dst = vec![0u8; opt[0].len];
        assert!(r.read_checked_into(&opt[0], &mut dst).is_ok());
        // A tensor located by another reader is refused, not read.
        let mut foreign = r.model[0].clone();
        foreign.offset += 1;
        let mut dst = vec![0u8; foreign.len];
        assert!(matches!(r.read_checked_into(&foreign, &mut dst), Err(Error::Mismatch { .. })));
        assert!(matches!(r.checked_data(&foreign), Err(Error::Mismatch { .. })));
    }

    #[test]
    fn a_fifo_named_like_an_archive_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.mio");
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let opener = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(ArchiveReader::open(&opener).map(|_| ()));
        });
        // Opening a FIFO for reading blocks until a writer comes, unless the reader refuses it first.
        let result = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("opening a FIFO blocked");
        assert!(matches!(result, Err(Error::NotRegular { kind: "a FIFO", .. })), "{result:?}");
    }
}

//! Writing and reading archives (format v1, see `docs/FORMAT.md`).
//!
//! Plain functions over bytes, free of actors and libtorch. The reader maps
//! the file and hands out tensor bytes in place; it treats the file as hostile:
//! every offset and size is checked, every allocation is bounded, and every
//! problem is an [`Error::Damaged`] naming the file and the part.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Cursor, Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zip::{CompressionMethod, ZipArchive};

use crate::error::{Error, IoContext, Result};
use crate::format::*;

/// JSON entries and safetensors headers larger than this are refused as damaged.
const MAX_JSON: u64 = 256 << 20;

/// Write a complete archive to `out`.
///
/// Entries are streamed with data descriptors (CRC and sizes after the
/// data), so nothing already written is ever rewritten: seeking back to patch
/// a header would touch pages the kernel is writing back and, measured here,
/// halves the write speed of large archives.
///
/// # Errors
/// [`Error::Io`] when writing fails; [`Error::DuplicateTensor`] on duplicate tensor names.
pub fn write_archive<W: Write>(
    out: W,
    path: &Path,
    name: &str,
    iterations: u64,
    model: &[TensorRef<'_>],
    optimizer: Option<OptimizerRef<'_>>,
    state: Option<&[u8]>,
) -> Result<W> {
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        name: name.into(),
        iterations,
        created: chrono::Utc::now().to_rfc3339(),
        model: metas(model)?,
        optimizer: match optimizer {
            Some(o) => Some(OptimizerMeta { kind: o.kind.into(), tensors: metas(o.tensors)? }),
            None => None,
        },
    };
    let write_err = |e: std::io::Error| Error::io("write", path, e);
    let mut zip = rawzip::ZipArchiveWriter::new(out);
    let manifest_json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::io("encode manifest for", path, e.into()))?;
    write_entry(&mut zip, MANIFEST_ENTRY, &[(&manifest_json, None)]).map_err(write_err)?;
    write_safetensors(&mut zip, MODEL_ENTRY, model).map_err(write_err)?;
    if let Some(o) = optimizer {
        write_safetensors(&mut zip, OPTIMIZER_ENTRY, o.tensors).map_err(write_err)?;
        let json = serde_json::to_vec_pretty(o.json).map_err(|e| Error::io("encode optimizer state for", path, e.into()))?;
        write_entry(&mut zip, OPTIMIZER_JSON_ENTRY, &[(&json, None)]).map_err(write_err)?;
    }
    if let Some(state) = state {
        write_entry(&mut zip, STATE_ENTRY, &[(state, None)]).map_err(write_err)?;
    }
    zip.finish().map_err(|e| write_err(zip_io(e)))
}

/// The IO error inside a zip writer error (so a full disk stays recognisable).
fn zip_io(e: rawzip::Error) -> std::io::Error {
    match e.into_kind() {
        rawzip::ErrorKind::IO(io) => io,
        other => std::io::Error::other(format!("{other}")),
    }
}

/// Extra field id of the padding that aligns entry data (as Android's zipalign uses).
const ALIGN_EXTRA_ID: u16 = 0xD935;

/// One STORED entry whose data starts at a multiple of [`ALIGN`] in the file,
/// written from `parts` in order. A part's CRC-32, when given, is combined
/// into the entry's instead of being computed again while writing.
fn write_entry<W: Write>(zip: &mut rawzip::ZipArchiveWriter<W>, name: &str, parts: &[(&[u8], Option<u32>)]) -> std::io::Result<()> {
    let io = zip_io;
    // Local header: 30 fixed bytes, the name, then our one extra field (4 + pad).
    let before_data = zip.stream_offset() + 30 + name.len() as u64 + 4;
    let pad = ((ALIGN - before_data % ALIGN) % ALIGN) as usize;
    let (mut entry, _config) = zip
        .new_file(name)
        .compression_method(rawzip::CompressionMethod::STORE)
        .extra_field(rawzip::extra_fields::ExtraFieldId::new(ALIGN_EXTRA_ID), &[0u8; ALIGN as usize][..pad], rawzip::Header::LOCAL)
        .and_then(|b| b.start())
        .map_err(io)?;
    let mut crc = crc32fast::Hasher::new();
    let mut size = 0u64;
    for (part, known) in parts {
        match known {
            Some(c) => {
                crc.combine(&crc32fast::Hasher::new_with_initial_len(*c, part.len() as u64));
                entry.write_all(part)?;
            }
            None => {
                for chunk in part.chunks(8 << 20) {
                    crc.update(chunk);
                    entry.write_all(chunk)?;
                }
            }
        }
        size += part.len() as u64;
    }
    entry.finish(rawzip::DataDescriptorOutput::new(crc.finalize(), size)).map_err(io)?;
    Ok(())
}

/// Write an archive atomically to `target` (through [`crate::durable::commit`]).
///
/// # Errors
/// As [`write_archive`] and [`crate::durable::commit`].
pub fn commit_archive(
    target: &Path,
    name: &str,
    iterations: u64,
    model: &[TensorRef<'_>],
    optimizer: Option<OptimizerRef<'_>>,
    state: Option<&[u8]>,
) -> Result<u64> {
    let size: u64 = model.iter().chain(optimizer.iter().flat_map(|o| o.tensors.iter())).map(|t| t.data.len() as u64).sum();
    let mut write = |out: &mut BufWriter<crate::durable::StreamingFile>| write_archive(out, target, name, iterations, model, optimizer, state).map(|_| ());
    match crate::durable::commit(target, crate::durable::Source::Write { size_hint: size, write: &mut write }) {
        Ok(()) => Ok(size),
        Err(Error::NoSpace { free, .. }) => {
            // Report the archive's real size: lay it out again into a sink
            // that only counts (the tensor bytes are not touched).
            let mut counter = Counter(0);
            let needed = write_archive(&mut counter, target, name, iterations, model, optimizer, state).map_or(size, |c| c.0);
            Err(Error::NoSpace { path: target.to_path_buf(), needed: Some(needed), free })
        }
        Err(e) => Err(e),
    }
}

/// A writer that counts bytes and keeps none.
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn metas(tensors: &[TensorRef<'_>]) -> Result<Vec<TensorMeta>> {
    let mut seen = HashSet::new();
    tensors
        .iter()
        .map(|t| {
            if !seen.insert(t.name) {
                return Err(Error::DuplicateTensor { tensor: t.name.to_string() });
            }
            let crc32c = t.crc32c.unwrap_or_else(|| crc32c::crc32c(t.data));
            Ok(TensorMeta { name: t.name.into(), dtype: t.dtype, shape: t.shape.to_vec(), crc32c })
        })
        .collect()
}

#[derive(Serialize, Deserialize)]
struct StEntry {
    dtype: DType,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// The order tensors are laid out in: larger elements first, so that with
/// the data starting 64-aligned every tensor starts aligned to its element size
/// (safetensors allows no gaps between tensors).
fn layout_order<'a>(tensors: &'a [TensorRef<'a>]) -> Vec<&'a TensorRef<'a>> {
    let mut order: Vec<&TensorRef> = tensors.iter().collect();
    order.sort_by(|a, b| b.dtype.size().cmp(&a.dtype.size()).then(a.name.cmp(b.name)));
    order
}

/// A safetensors blob header whose length (plus the 8-byte prefix) is a
/// multiple of [`ALIGN`], padded with spaces as the format allows.
fn safetensors_header(order: &[&TensorRef<'_>]) -> Vec<u8> {
    let mut map = BTreeMap::new();
    let mut offset = 0usize;
    for t in order {
        let end = offset + t.data.len();
        map.insert(t.name.to_string(), StEntry { dtype: t.dtype, shape: t.shape.to_vec(), data_offsets: [offset, end] });
        offset = end;
    }
    // Serializing a map of plain structs cannot fail.
    let mut header = serde_json::to_vec(&map).unwrap_or_else(|_| b"{}".to_vec());
    let total = 8 + header.len() as u64;
    let padded = total.div_ceil(ALIGN) * ALIGN;
    header.resize((padded - 8) as usize, b' ');
    header
}

fn write_safetensors<W: Write>(zip: &mut rawzip::ZipArchiveWriter<W>, entry: &str, tensors: &[TensorRef<'_>]) -> std::io::Result<()> {
    let order = layout_order(tensors);
    let header = safetensors_header(&order);
    let len = (header.len() as u64).to_le_bytes();
    let mut parts: Vec<(&[u8], Option<u32>)> = Vec::with_capacity(order.len() + 2);
    parts.push((&len, None));
    parts.push((&header, None));
    parts.extend(order.iter().map(|t| (t.data, t.crc32)));
    write_entry(zip, entry, &parts)
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct Located {
    pub meta: TensorMeta,
    /// Absolute offset of the tensor's first byte in the file.
    pub offset: usize,
    pub len: usize,
}

/// An opened, structurally checked archive. Tensor bytes are checked against
/// their checksums by [`ArchiveReader::verify`] or when read with
/// [`ArchiveReader::checked_data`].
pub struct ArchiveReader {
    path: PathBuf,
    name: String,
    map: Backing,
    pub manifest: Manifest,
    pub model: Vec<Located>,
    pub optimizer: Option<(Vec<Located>, serde_json::Value)>,
    /// The state file as of this save (absent in archives written without one).
    pub state: Option<Vec<u8>>,
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

/// Tensors are read and checksummed this many bytes at a time (each chunk
/// is checksummed while still in the CPU's cache).
const READ_CHUNK: usize = 4 << 20;

impl std::fmt::Debug for ArchiveReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveReader").field("path", &self.path).field("manifest", &self.manifest).finish()
    }
}

impl ArchiveReader {
    /// Open and check the structure of the archive at `path`.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read, [`Error::Damaged`] naming the
    /// broken part otherwise.
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::durable::open_regular(path)?;
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
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let damaged = |what: &str, detail: String| Error::damaged(path, &name, what, detail);

        let mut zip = ZipArchive::new(Cursor::new(&map[..])).map_err(|e| damaged("zip structure", e.to_string()))?;
        check_names(&mut zip, &map).map_err(|d| damaged("zip structure", d))?;

        let manifest_bytes = read_small(&mut zip, MANIFEST_ENTRY).map_err(|d| damaged(MANIFEST_ENTRY, d))?;
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes).map_err(|e| damaged(MANIFEST_ENTRY, e.to_string()))?;
        if manifest.format != FORMAT_NAME || manifest.format_version != FORMAT_VERSION {
            return Err(damaged(
                MANIFEST_ENTRY,
                format!("format {} version {} is not {FORMAT_NAME} version {FORMAT_VERSION}", manifest.format, manifest.format_version),
            ));
        }
        let model = locate(&mut zip, &map, MODEL_ENTRY, &manifest.model).map_err(|d| damaged(MODEL_ENTRY, d))?;
        let optimizer = match &manifest.optimizer {
            None => None,
            Some(meta) => {
                let located = locate(&mut zip, &map, OPTIMIZER_ENTRY, &meta.tensors).map_err(|d| damaged(OPTIMIZER_ENTRY, d))?;
                let json = read_small(&mut zip, OPTIMIZER_JSON_ENTRY).map_err(|d| damaged(OPTIMIZER_JSON_ENTRY, d))?;
                let json = serde_json::from_slice(&json).map_err(|e| damaged(OPTIMIZER_JSON_ENTRY, e.to_string()))?;
                Some((located, json))
            }
        };
        let state = if zip.index_for_name(STATE_ENTRY).is_some() {
            Some(read_small(&mut zip, STATE_ENTRY).map_err(|d| damaged(STATE_ENTRY, d))?)
        } else {
            None
        };
        drop(zip);
        Ok(ArchiveReader { path: path.to_path_buf(), name, map, manifest, model, optimizer, state })
    }

    /// The file this archive was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Copy a tensor's bytes into `dst` (exactly its length), checking its
    /// checksum on the way. An archive opened from disk is read with `pread`
    /// straight into `dst`, chunk by chunk, each chunk checksummed while in
    /// cache: one pass, with no page faults on the mapping.
    ///
    /// # Errors
    /// [`Error::Damaged`] naming the tensor when the checksum fails or `dst`
    /// has the wrong length; [`Error::Io`] when the file cannot be read.
    pub fn read_checked_into(&self, t: &Located, dst: &mut [u8]) -> Result<()> {
        if dst.len() != t.len {
            return Err(Error::damaged(
                &self.path,
                &self.name,
                format!("tensor `{}`", t.meta.name),
                format!("{} bytes stored, {} expected for its dtype and shape", t.len, dst.len()),
            ));
        }
        let mut found = 0;
        for (i, chunk) in dst.chunks_mut(READ_CHUNK).enumerate() {
            let offset = t.offset + i * READ_CHUNK;
            match &self.map {
                Backing::Mapped(_, file) => {
                    use std::os::unix::fs::FileExt;
                    file.read_exact_at(chunk, offset as u64).at("read", &self.path)?;
                }
                Backing::Owned(bytes) => chunk.copy_from_slice(&bytes[offset..offset + chunk.len()]),
            }
            found = crc32c::crc32c_append(found, chunk);
        }
        self.check_crc(t, found)
    }

    /// A damaged-tensor error unless `found` is the tensor's stored CRC-32C.
    fn check_crc(&self, t: &Located, found: u32) -> Result<()> {
        if found == t.meta.crc32c {
            return Ok(());
        }
        Err(Error::damaged(&self.path, &self.name, format!("tensor `{}`", t.meta.name), format!("checksum {found:08x} != stored {:08x}", t.meta.crc32c)))
    }

    /// A tensor's bytes in place, unchecked.
    pub fn data(&self, t: &Located) -> &[u8] {
        // `locate` checked the range against the file size.
        &self.map[t.offset..t.offset + t.len]
    }

    /// A tensor's bytes after checking its checksum.
    ///
    /// # Errors
    /// [`Error::Damaged`] naming the tensor when the checksum fails.
    pub fn checked_data(&self, t: &Located) -> Result<&[u8]> {
        let data = self.data(t);
        self.check_crc(t, crc32c::crc32c(data))?;
        Ok(data)
    }

    /// Check every tensor's checksum; returns the names of the damaged ones.
    pub fn verify(&self) -> Vec<String> {
        let optimizer = self.optimizer.iter().flat_map(|(t, _)| t.iter());
        self.model.iter().chain(optimizer).filter(|t| self.checked_data(t).is_err()).map(|t| t.meta.name.clone()).collect()
    }

    /// Total bytes of tensor data.
    pub fn tensor_bytes(&self) -> u64 {
        let optimizer = self.optimizer.iter().flat_map(|(t, _)| t.iter());
        self.model.iter().chain(optimizer).map(|t| t.len as u64).sum()
    }
}

/// Refuse entry names that could escape a folder when extracted, and duplicates.
fn check_names<R: Read + Seek>(zip: &mut ZipArchive<R>, map: &[u8]) -> Result<(), String> {
    let mut seen = HashSet::new();
    for i in 0..zip.len() {
        let entry = zip.by_index_raw(i).map_err(|e| e.to_string())?;
        let name = entry.name().to_string();
        let bad = name.starts_with('/') || name.starts_with('\\') || name.split(['/', '\\']).any(|c| c == "..") || name.contains(':');
        if bad {
            return Err(format!("entry name `{name}` is not a plain relative name"));
        }
        if !seen.insert(name.clone()) {
            return Err(format!("entry `{name}` appears twice"));
        }
    }
    // The zip reader keeps one entry per name: count the central directory's
    // records to find names that appear twice.
    let records = central_records(map, zip.central_directory_start());
    if records != zip.len() {
        return Err(format!("central directory holds {records} records for {} distinct names: an entry name appears twice", zip.len()));
    }
    Ok(())
}

/// Number of consecutive central directory records starting at `start`.
fn central_records(map: &[u8], start: u64) -> usize {
    const SIG: [u8; 4] = [0x50, 0x4b, 0x01, 0x02];
    let field = |at: usize| -> Option<usize> { Some(u16::from_le_bytes([*map.get(at)?, *map.get(at + 1)?]) as usize) };
    let mut at = usize::try_from(start).unwrap_or(usize::MAX);
    let mut count = 0;
    while map.get(at..at + 4) == Some(&SIG[..]) {
        let (Some(name), Some(extra), Some(comment)) = (field(at + 28), field(at + 30), field(at + 32)) else { break };
        count += 1;
        at += 46 + name + extra + comment;
    }
    count
}

/// Read a small entry whole (its zip CRC-32 is checked by the zip reader).
fn read_small<R: Read + Seek>(zip: &mut ZipArchive<R>, entry: &str) -> Result<Vec<u8>, String> {
    let mut file = zip.by_name(entry).map_err(|e| format!("missing or unreadable: {e}"))?;
    if file.size() > MAX_JSON {
        return Err(format!("{} bytes is more than the {MAX_JSON} allowed", file.size()));
    }
    let mut out = Vec::with_capacity(file.size() as usize);
    file.read_to_end(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Find every tensor of a safetensors entry in the file and check that the
/// entry's header agrees with the manifest.
fn locate<R: Read + Seek>(zip: &mut ZipArchive<R>, map: &[u8], entry: &str, metas: &[TensorMeta]) -> Result<Vec<Located>, String> {
    let file = zip.by_name(entry).map_err(|e| format!("missing or unreadable: {e}"))?;
    if file.compression() != CompressionMethod::Stored {
        return Err(format!("stored compressed ({:?}); tensor entries must be stored", file.compression()));
    }
    let start = file.data_start();
    let size = file.size();
    let end = start.checked_add(size).filter(|&e| e <= map.len() as u64).ok_or("entry runs past the end of the file")?;
    let blob = &map[start as usize..end as usize];
    if blob.len() < 8 {
        return Err("shorter than a safetensors header".into());
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&blob[..8]);
    let n = u64::from_le_bytes(n);
    if n > MAX_JSON || n > (blob.len() - 8) as u64 {
        return Err(format!("safetensors header length {n} does not fit the entry"));
    }
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&blob[8..8 + n as usize]).map_err(|e| format!("safetensors header: {e}"))?;
    let data_start = start as usize + 8 + n as usize;
    let data_len = blob.len() - 8 - n as usize;
    let mut located = Vec::with_capacity(metas.len());
    for meta in metas {
        let raw = header.get(&meta.name).ok_or_else(|| format!("tensor `{}` is in the manifest but not in the entry", meta.name))?;
        let st: StEntry =
            serde_json::from_value(raw.clone()).map_err(|e| format!("tensor `{}`: bad header entry: {e}", meta.name))?;
        if st.dtype != meta.dtype || st.shape != meta.shape {
            return Err(format!("tensor `{}`: header says {} {:?}, manifest says {} {:?}", meta.name, st.dtype, st.shape, meta.dtype, meta.shape));
        }
        let [b, e] = st.data_offsets;
        let len = meta.byte_len().ok_or_else(|| format!("tensor `{}`: shape overflows", meta.name))?;
        if b > e || e > data_len || e - b != len {
            return Err(format!("tensor `{}`: data offsets {b}..{e} do not fit {len} bytes in {data_len}", meta.name));
        }
        located.push(Located { meta: meta.clone(), offset: data_start + b, len });
    }
    let listed = header.keys().filter(|k| k.as_str() != "__metadata__").count();
    if listed != metas.len() {
        return Err(format!("entry holds {listed} tensors, manifest lists {}", metas.len()));
    }
    Ok(located)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t<'a>(name: &'a str, dtype: DType, shape: &'a [usize], data: &'a [u8]) -> TensorRef<'a> {
        TensorRef { name, dtype, shape, data, crc32c: None, crc32: None }
    }

    #[test]
    fn layout_aligns_every_tensor_to_its_element_size() {
        let a = [1u8; 3];
        let b = [2u8; 8];
        let c = [3u8; 6];
        let tensors = [t("a", DType::U8, &[3], &a), t("b", DType::F64, &[1], &b), t("c", DType::F16, &[3], &c)];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.mio");
        commit_archive(&path, "m", 7, &tensors, None, None).unwrap();
        let r = ArchiveReader::open(&path).unwrap();
        assert_eq!(r.manifest.iterations, 7);
        for l in &r.model {
            assert_eq!(l.offset % l.meta.dtype.size(), 0, "{}", l.meta.name);
        }
        let first = r.model.iter().map(|l| l.offset).min().unwrap();
        assert_eq!(first as u64 % ALIGN, 0);
        assert!(r.verify().is_empty());
        assert!(r.optimizer.is_none());
    }

    #[test]
    fn precomputed_zip_crcs_are_combined_correctly() {
        let a: Vec<u8> = (0..200u8).collect();
        let b: Vec<u8> = (0..40u8).rev().collect();
        let with = |name, data: &'static [u8], dtype, shape: &'static [usize]| TensorRef {
            name,
            dtype,
            shape,
            data,
            crc32c: Some(crc32c::crc32c(data)),
            crc32: Some(crc32fast::hash(data)),
        };
        let a: &'static [u8] = Box::leak(a.into_boxed_slice());
        let b: &'static [u8] = Box::leak(b.into_boxed_slice());
        let tensors = [with("a", a, DType::F32, &[50]), with("b", b, DType::I64, &[5])];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.mio");
        commit_archive(&path, "m", 1, &tensors, None, None).unwrap();
        // The zip reader checks each entry's CRC-32 when it is read to the end.
        let mut zip = ZipArchive::new(File::open(&path).unwrap()).unwrap();
        for i in 0..zip.len() {
            let mut entry = zip.by_index(i).unwrap();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
        }
        assert!(ArchiveReader::open(&path).unwrap().verify().is_empty());
    }
}

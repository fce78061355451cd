//! Writing an archive: the manifest, the two safetensors entries and the
//! small entries, each a STORED zip entry whose data starts aligned.

use std::collections::HashSet;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::format::*;
use super::safetensors;
use crate::error::{Error, Result};

/// Write a complete archive to `out`.
///
/// Entries are streamed with data descriptors (CRC and sizes after the
/// data), so nothing already written is ever rewritten: seeking back to patch
/// a header would touch pages the kernel is writing back and, measured here,
/// halves the write speed of large archives.
///
/// # Errors
/// [`Error::Io`] when writing fails; [`Error::DuplicateTensor`] on duplicate tensor names;
/// [`Error::TooManyDims`] for a tensor of more than [`MAX_RANK`] dimensions.
pub fn write_archive<W: Write>(
    out: W,
    path: &Path,
    name: &str,
    iterations: u64,
    model: &[TensorRef<'_>],
    optimizer: Option<OptimizerRef<'_>>,
    state: Option<&[u8]>,
) -> Result<W> {
    write_archive_located(out, path, name, iterations, model, optimizer, state).map(|(out, _)| out)
}

/// Where a model tensor's bytes lie in an archive: what a ranged read of it
/// asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub name: String,
    pub offset: u64,
    pub len: u64,
    /// CRC-32C of the bytes.
    pub crc32c: u32,
}

/// [`write_archive`], also saying where each model tensor's bytes were
/// written (in `model`'s order), so that a writer streaming the archive
/// away need not read it back to find them.
///
/// # Errors
/// As [`write_archive`].
pub fn write_archive_located<W: Write>(
    out: W,
    path: &Path,
    name: &str,
    iterations: u64,
    model: &[TensorRef<'_>],
    optimizer: Option<OptimizerRef<'_>>,
    state: Option<&[u8]>,
) -> Result<(W, Vec<Span>)> {
    let optimizer_json = match optimizer {
        Some(o) => Some(serde_json::to_vec_pretty(o.json).map_err(|e| Error::io("encode optimizer state for", path, e.into()))?),
        None => None,
    };
    let mut manifest = Manifest {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        name: name.into(),
        iterations,
        created: chrono::Utc::now().to_rfc3339(),
        model: metas(path, model)?,
        optimizer: match optimizer {
            Some(o) => Some(OptimizerMeta {
                kind: o.kind.into(),
                tensors: metas(path, o.tensors)?,
                json_crc32c: optimizer_json.as_deref().map(crate::crc::crc32c),
            }),
            None => None,
        },
        state_crc32c: state.map(crate::crc::crc32c),
        checksum: Some(0),
    };
    let encode = |m: &Manifest| serde_json::to_vec_pretty(m).map_err(|e| Error::io("encode manifest for", path, e.into()));
    // Serialized with `"checksum": 0` this is exactly what the checksum covers.
    manifest.checksum = Some(crate::crc::crc32c(&encode(&manifest)?));
    let manifest_json = encode(&manifest)?;
    let write_err = |e: std::io::Error| Error::io("write", path, e);
    let mut zip = rawzip::ZipArchiveWriter::new(out);
    write_entry(&mut zip, MANIFEST_ENTRY, &[(&manifest_json, None)]).map_err(write_err)?;
    let offsets = write_safetensors(&mut zip, MODEL_ENTRY, model).map_err(write_err)?;
    let spans = model
        .iter()
        .zip(&manifest.model)
        .map(|(t, meta)| Span {
            name: t.name.into(),
            offset: offsets.get(t.name).copied().unwrap_or(0),
            len: t.data.len() as u64,
            crc32c: meta.crc32c,
        })
        .collect();
    if let (Some(o), Some(json)) = (optimizer, &optimizer_json) {
        write_safetensors(&mut zip, OPTIMIZER_ENTRY, o.tensors).map_err(write_err)?;
        write_entry(&mut zip, OPTIMIZER_JSON_ENTRY, &[(json, None)]).map_err(write_err)?;
    }
    if let Some(state) = state {
        write_entry(&mut zip, STATE_ENTRY, &[(state, None)]).map_err(write_err)?;
    }
    zip.finish().map(|out| (out, spans)).map_err(|e| write_err(zip_io(e)))
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
/// into the entry's instead of being computed again while writing. Returns
/// where its data starts in the file.
pub(super) fn write_entry<W: Write>(
    zip: &mut rawzip::ZipArchiveWriter<W>,
    name: &str,
    parts: &[(&[u8], Option<u32>)],
) -> std::io::Result<u64> {
    write_entry_at(zip, name, parts, ALIGN)
}

/// [`write_entry`] with the data at a multiple of `align` (at most [`TENSOR_ALIGN`]).
fn write_entry_at<W: Write>(
    zip: &mut rawzip::ZipArchiveWriter<W>,
    name: &str,
    parts: &[(&[u8], Option<u32>)],
    align: u64,
) -> std::io::Result<u64> {
    static PAD: [u8; TENSOR_ALIGN as usize] = [0; TENSOR_ALIGN as usize];
    let io = zip_io;
    // Local header: 30 fixed bytes, the name, then our one extra field (4 + pad).
    let before_data = zip.stream_offset() + 30 + name.len() as u64 + 4;
    let pad = ((align - before_data % align) % align) as usize;
    let (mut entry, _config) = zip
        .new_file(name)
        .compression_method(rawzip::CompressionMethod::STORE)
        .extra_field(rawzip::extra_fields::ExtraFieldId::new(ALIGN_EXTRA_ID), &PAD[..pad], rawzip::Header::LOCAL)
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
    Ok(before_data + pad as u64)
}

/// Write an archive atomically to `target` (through the one commit helper in `durable`).
///
/// # Errors
/// As `write_archive` and `crate::folder::durable::commit`.
pub fn commit_archive(
    target: &Path,
    name: &str,
    iterations: u64,
    model: &[TensorRef<'_>],
    optimizer: Option<OptimizerRef<'_>>,
    state: Option<&[u8]>,
) -> Result<u64> {
    let size: u64 = model.iter().chain(optimizer.iter().flat_map(|o| o.tensors.iter())).map(|t| t.data.len() as u64).sum();
    let mut write = |out: &mut BufWriter<crate::folder::durable::StreamingFile>| {
        write_archive(out, target, name, iterations, model, optimizer, state).map(|_| ())
    };
    match crate::folder::durable::commit(target, crate::folder::durable::Source::Write { size_hint: size, write: &mut write }) {
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

fn metas(path: &Path, tensors: &[TensorRef<'_>]) -> Result<Vec<TensorMeta>> {
    let mut seen = HashSet::new();
    tensors
        .iter()
        .map(|t| {
            if !seen.insert(t.name) {
                return Err(Error::DuplicateTensor { tensor: t.name.to_string() });
            }
            if t.shape.len() > MAX_RANK {
                return Err(Error::TooManyDims {
                    path: path.to_path_buf(),
                    tensor: t.name.to_string(),
                    rank: t.shape.len(),
                    max: MAX_RANK,
                });
            }
            let crc32c = t.crc32c.unwrap_or_else(|| crate::crc::crc32c(t.data));
            Ok(TensorMeta { name: t.name.into(), dtype: t.dtype, shape: t.shape.to_vec(), crc32c })
        })
        .collect()
}

/// The safetensors entry `entry` of `tensors`: the header's length, the
/// header, then the tensors in layout order. Returns where each tensor's
/// bytes start in the file, by name.
fn write_safetensors<'a, W: Write>(
    zip: &mut rawzip::ZipArchiveWriter<W>,
    entry: &str,
    tensors: &'a [TensorRef<'a>],
) -> std::io::Result<std::collections::HashMap<&'a str, u64>> {
    let order = safetensors::layout_order(tensors);
    let header = safetensors::header(&order);
    let len = (header.len() as u64).to_le_bytes();
    let mut parts: Vec<(&[u8], Option<u32>)> = Vec::with_capacity(order.len() + 2);
    parts.push((&len, None));
    parts.push((&header, None));
    parts.extend(order.iter().map(|t| (t.data, t.crc32)));
    let start = write_entry_at(zip, entry, &parts, TENSOR_ALIGN)?;
    let mut at = start + 8 + header.len() as u64;
    Ok(order
        .iter()
        .map(|t| {
            let here = at;
            at += t.data.len() as u64;
            (t.name, here)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::test_support::t;
    use crate::archive::zipread;
    use crate::archive::ArchiveReader;

    #[test]
    fn the_size_a_full_disk_reports_is_the_archive_s_size() {
        let a = [1u8; 300];
        let tensors = [t("a", DType::F32, &[75], &a)];
        let path = Path::new("m.mio");
        let bytes = write_archive(Vec::new(), path, "m", 3, &tensors, None, Some(b"{}")).unwrap();
        let counted = write_archive(Counter(0), path, "m", 3, &tensors, None, Some(b"{}")).unwrap();
        assert_eq!(counted.0, bytes.len() as u64);
    }

    #[test]
    fn a_tensor_may_have_max_rank_dimensions_and_no_more() {
        let a = [0u8; 4];
        let ok = [1usize; MAX_RANK];
        let too_many = [1usize; MAX_RANK + 1];
        let path = Path::new("m.mio");
        assert!(write_archive(Vec::new(), path, "m", 1, &[t("a", DType::F32, &ok, &a)], None, None).is_ok());
        let e = write_archive(Vec::new(), path, "m", 1, &[t("a", DType::F32, &too_many, &a)], None, None).unwrap_err();
        assert!(matches!(e, Error::TooManyDims { rank, .. } if rank == MAX_RANK + 1), "{e:?}");
    }

    #[test]
    fn the_spans_written_are_where_a_reader_finds_each_tensor() {
        let (a, b, c) = (vec![7u8; 12], vec![1u8; 0], vec![9u8; 6]);
        let model = [
            TensorRef { name: "w", dtype: DType::F32, shape: &[3], data: &a, crc32c: None, crc32: None },
            TensorRef { name: "empty", dtype: DType::F64, shape: &[0], data: &b, crc32c: None, crc32: None },
            TensorRef { name: "h", dtype: DType::F16, shape: &[3], data: &c, crc32c: None, crc32: None },
        ];
        let (bytes, spans) = write_archive_located(Vec::new(), Path::new("x.mio"), "m", 1, &model, None, None).unwrap();
        let r = ArchiveReader::from_bytes(Path::new("x.mio"), bytes).unwrap();
        assert_eq!(spans.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["w", "empty", "h"], "in the order given");
        for s in &spans {
            let located = r.model.iter().find(|l| l.meta.name == s.name).unwrap();
            assert_eq!((s.offset, s.len, s.crc32c), (located.offset as u64, located.len as u64, located.meta.crc32c), "{}", s.name);
        }
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
            crc32c: Some(crate::crc::crc32c(data)),
            crc32: Some(crc32fast::hash(data)),
        };
        let a: &'static [u8] = Box::leak(a.into_boxed_slice());
        let b: &'static [u8] = Box::leak(b.into_boxed_slice());
        let tensors = [with("a", a, DType::F32, &[50]), with("b", b, DType::I64, &[5])];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.mio");
        commit_archive(&path, "m", 1, &tensors, None, None).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for e in zipread::read(&bytes).unwrap().entries {
            let data = &bytes[e.data_offset as usize..(e.data_offset + e.size) as usize];
            assert_eq!(crc32fast::hash(data), e.crc32, "{}", e.name);
        }
        assert!(ArchiveReader::open(&path).unwrap().verify().is_empty());
    }
}

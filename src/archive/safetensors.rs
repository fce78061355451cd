//! The safetensors header of a tensor entry: built for the tensors being
//! written, and parsed and checked, against the manifest, for the tensors
//! being read.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::format::{DType, TensorMeta, TensorRef, ALIGN, TENSOR_ALIGN};

/// Safetensors headers larger than this are refused, as the safetensors
/// library refuses them.
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// One tensor in a safetensors header. Unknown fields and duplicate fields
/// are refused (the safetensors library refuses duplicates).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StEntry {
    dtype: DType,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// What a tensor's place in a safetensors entry depends on: its bytes
/// need not exist yet (a save places its staging buffers by it).
#[cfg_attr(not(feature = "torch"), allow(dead_code))]
pub(crate) trait Laid {
    fn name(&self) -> &str;
    fn dtype(&self) -> DType;
    fn shape(&self) -> &[usize];
    fn byte_len(&self) -> usize;
}

impl Laid for TensorRef<'_> {
    fn name(&self) -> &str {
        self.name
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn byte_len(&self) -> usize {
        self.data.len()
    }
}

/// The order tensors are laid out in: larger elements first, so that with
/// the data starting 64-aligned every tensor starts aligned to its element size
/// (safetensors allows no gaps between tensors).
pub(super) fn layout_order<T: Laid>(tensors: &[T]) -> Vec<&T> {
    let mut order: Vec<&T> = tensors.iter().collect();
    order.sort_by(|a, b| b.dtype().size().cmp(&a.dtype().size()).then(a.name().cmp(b.name())));
    order
}

/// A safetensors blob header whose length (plus the 8-byte prefix) is a
/// multiple of [`ALIGN`], padded with spaces as the format allows.
pub(super) fn header<T: Laid>(order: &[&T]) -> Vec<u8> {
    let mut map = BTreeMap::new();
    let mut offset = 0usize;
    for t in order {
        let end = offset + t.byte_len();
        map.insert(t.name().to_string(), StEntry { dtype: t.dtype(), shape: t.shape().to_vec(), data_offsets: [offset, end] });
        offset = end;
    }
    // Serializing a map of plain structs cannot fail.
    let mut header = serde_json::to_vec(&map).unwrap_or_else(|_| b"{}".to_vec());
    let total = 8 + header.len() as u64;
    let padded = total.div_ceil(ALIGN) * ALIGN;
    header.resize((padded - 8) as usize, b' ');
    header
}

/// Where each of `tensors` (in the order given) starts within a
/// [`TENSOR_ALIGN`] block of the file once written as one safetensors entry:
/// the same in every save of tensors of the same names, dtypes and shapes.
#[cfg_attr(not(feature = "torch"), allow(dead_code))]
pub(crate) fn block_offsets<T: Laid>(tensors: &[T]) -> Vec<usize> {
    let order = layout_order(tensors);
    let mut at = 8 + header(&order).len();
    let mut by_name = std::collections::HashMap::with_capacity(order.len());
    for t in &order {
        by_name.insert(t.name(), at % TENSOR_ALIGN as usize);
        at += t.byte_len();
    }
    tensors.iter().map(|t| by_name.get(t.name()).copied().unwrap_or(0)).collect()
}

/// A safetensors header: its tensors in file order of appearance, refusing
/// duplicate keys (which a plain map would silently resolve to the last).
struct StHeader(Vec<(String, StEntry)>);

impl<'de> Deserialize<'de> for StHeader {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = StHeader;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a safetensors header object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<StHeader, A::Error> {
                let mut keys = HashSet::new();
                let mut tensors = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !keys.insert(key.clone()) {
                        return Err(serde::de::Error::custom(format!("key `{key}` appears twice")));
                    }
                    if key == "__metadata__" {
                        // Free-form strings, as the safetensors library requires.
                        map.next_value::<Option<BTreeMap<String, String>>>()?;
                    } else {
                        tensors.push((key, map.next_value::<StEntry>()?));
                    }
                }
                Ok(StHeader(tensors))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Where the tensors of a safetensors entry lie, as [`locate`] finds them.
pub(super) struct Layout {
    /// Bytes before the first tensor: the 8-byte length and the JSON header.
    pub(super) prefix_len: usize,
    /// Each tensor's offset in the file and length, in the manifest's order.
    pub(super) tensors: Vec<(usize, usize)>,
    /// Indices into `tensors`, by offset in the file.
    pub(super) file_order: Vec<usize>,
}

/// Find every tensor of the safetensors entry `blob`, whose first byte is at
/// `start` in the file, and check that the entry is a valid safetensors file
/// (as the safetensors library checks it) that agrees with the manifest's
/// `metas`: the same tensors with the same dtypes and shapes, laid end to end
/// over the whole data area.
pub(super) fn locate(blob: &[u8], start: usize, metas: &[TensorMeta]) -> Result<Layout, String> {
    if blob.len() < 8 {
        return Err("shorter than a safetensors header".into());
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&blob[..8]);
    let n = u64::from_le_bytes(n);
    if n > MAX_SAFETENSORS_HEADER || n > (blob.len() - 8) as u64 {
        return Err(format!("safetensors header length {n} does not fit the entry"));
    }
    let header_bytes = &blob[8..8 + n as usize];
    if header_bytes.first() != Some(&b'{') {
        return Err("safetensors header does not start with `{`".into());
    }
    let header_text = std::str::from_utf8(header_bytes).map_err(|e| format!("safetensors header: {e}"))?;
    let header: StHeader = serde_json::from_str(header_text).map_err(|e| format!("safetensors header: {e}"))?;
    let data_start = start + 8 + n as usize;
    let data_len = blob.len() - 8 - n as usize;
    let mut tensors = Vec::with_capacity(metas.len());
    for meta in metas {
        let st = header.0.iter().find(|(k, _)| k == &meta.name).map(|(_, st)| st);
        let st = st.ok_or_else(|| format!("tensor `{}` is in the manifest but not in the entry", meta.name))?;
        if st.dtype != meta.dtype || st.shape != meta.shape {
            return Err(format!(
                "tensor `{}`: header says {} {:?}, manifest says {} {:?}",
                meta.name, st.dtype, st.shape, meta.dtype, meta.shape
            ));
        }
        let [b, e] = st.data_offsets;
        let len = meta.byte_len().ok_or_else(|| format!("tensor `{}`: shape overflows", meta.name))?;
        if b > e || e > data_len || e - b != len {
            return Err(format!("tensor `{}`: data offsets {b}..{e} do not fit {len} bytes in {data_len}", meta.name));
        }
        tensors.push((data_start + b, len));
    }
    if header.0.len() != metas.len() {
        return Err(format!("entry holds {} tensors, manifest lists {}", header.0.len(), metas.len()));
    }
    // Tensors lie end to end from the data's start to the entry's end, as
    // safetensors requires: every byte of the entry is a header or tensor byte.
    let mut file_order: Vec<usize> = (0..tensors.len()).collect();
    file_order.sort_by_key(|&i| tensors[i]);
    let mut at = data_start;
    for &i in &file_order {
        let (offset, len) = tensors[i];
        if offset != at {
            return Err(format!(
                "tensor `{}` starts at {}, where {at} was expected: tensors must lie end to end",
                metas[i].name,
                offset - data_start
            ));
        }
        at += len;
    }
    if at != data_start + data_len {
        return Err(format!("tensors end at {}, the entry's data at {data_len}", at - data_start));
    }
    Ok(Layout { prefix_len: 8 + n as usize, tensors, file_order })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::test_support::t;
    use crate::archive::{commit_archive, ArchiveReader};

    /// [`locate`] on a safetensors entry `blob` whose data starts 64 bytes
    /// into the file (where the writer puts the model entry's), against the
    /// manifest's `metas`: how many tensors it located.
    fn locate_blob(blob: &[u8], metas: &[TensorMeta]) -> std::result::Result<usize, String> {
        locate(blob, ALIGN as usize, metas).map(|layout| layout.tensors.len())
    }

    /// [`locate_blob`] of a header length `n` (which may differ from the
    /// header's own), a safetensors `header`, then `data` zero bytes.
    fn locate_in(header: &str, n: usize, data: usize, metas: &[TensorMeta]) -> std::result::Result<usize, String> {
        let mut blob = (n as u64).to_le_bytes().to_vec();
        blob.extend_from_slice(header.as_bytes());
        blob.resize(blob.len() + data, 0);
        locate_blob(&blob, metas)
    }

    #[test]
    fn a_tensor_entry_too_short_for_its_safetensors_header_is_refused() {
        for len in [0usize, 5, 7] {
            assert_eq!(locate_blob(&[b'{'; 8][..len], &[]), Err("shorter than a safetensors header".into()), "{len} bytes");
        }
        // Exactly the length's 8 bytes: a header length, however wrong.
        let e = locate_blob(&[b'{'; 8], &[]).unwrap_err();
        assert!(e.contains("does not fit the entry"), "{e}");
        // A header length past the end of the entry.
        assert_eq!(locate_in("{}      ", 1000, 0, &[]), Err("safetensors header length 1000 does not fit the entry".into()));
    }

    fn meta(name: &str, dtype: DType, shape: &[usize]) -> TensorMeta {
        TensorMeta { name: name.into(), dtype, shape: shape.to_vec(), crc32c: 0 }
    }

    #[test]
    fn safetensors_headers_must_agree_with_the_manifest() {
        let w = [meta("w", DType::F32, &[2])];
        let ok = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        assert_eq!(locate_in(ok, ok.len(), 8, &w), Ok(1));
        // A header that fills the entry: no tensors, no data.
        assert_eq!(locate_in("{}      ", 8, 0, &[]), Ok(0));
        // A header length a little past the entry's end.
        assert!(locate_in("{}      ", 12, 0, &[]).is_err_and(|e| e.contains("does not fit")));
        let shape = r#"{"w":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]}}"#;
        assert!(locate_in(shape, shape.len(), 8, &w).is_err_and(|e| e.contains("header says")), "same dtype, other shape");
        let dtype = r#"{"w":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}}"#;
        assert!(locate_in(dtype, dtype.len(), 8, &w).is_err_and(|e| e.contains("header says")), "same shape, other dtype");
        let short = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
        assert!(locate_in(short, short.len(), 8, &w).is_err_and(|e| e.contains("do not fit")), "offsets of fewer bytes");
        let past = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        assert!(locate_in(past, past.len(), 8, &w).is_err_and(|e| e.contains("do not fit")), "offsets past the data");
        let reversed = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#;
        assert!(locate_in(reversed, reversed.len(), 8, &w).is_err_and(|e| e.contains("do not fit")), "offsets reversed");
    }

    #[test]
    fn safetensors_headers_are_padded_to_the_next_alignment_only() {
        for n in [1usize, 2, 5, 17] {
            let names: Vec<String> = (0..n).map(|i| format!("tensor.{i}")).collect();
            let data = [0u8; 8];
            let tensors: Vec<TensorRef<'_>> = names.iter().map(|name| t(name, DType::F64, &[1], &data)).collect();
            let order = layout_order(&tensors);
            let header = header(&order);
            let json = header.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
            assert_eq!((8 + header.len() as u64) % ALIGN, 0, "{n} tensors");
            assert!(((header.len() - json) as u64) < ALIGN, "{n} tensors: {} bytes of padding", header.len() - json);
        }
    }

    #[test]
    fn block_offsets_are_where_the_tensors_land_in_the_file() {
        let (a, b, c, d) = (vec![1u8; 10_000], vec![2u8; 8], vec![3u8; 6_002], vec![4u8; 40_000]);
        let model = [t("z", DType::U8, &[10_000], &a), t("b", DType::F64, &[1], &b), t("c", DType::F16, &[3_001], &c)];
        let opt = [t("exp_avg.z", DType::F32, &[10_000], &d)];
        let json = serde_json::json!({});
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.mio");
        let optimizer = Some(crate::archive::format::OptimizerRef { kind: "adam", json: &json, tensors: &opt });
        commit_archive(&path, "m", 7, &model, optimizer, None).unwrap();
        let r = ArchiveReader::open(&path).unwrap();
        let at = |name: &str, located: &[crate::archive::Located]| located.iter().find(|l| l.meta.name == name).unwrap().offset % 4096;
        let offsets = block_offsets(&model);
        for (t, want) in model.iter().zip(&offsets) {
            assert_eq!(at(t.name, &r.model), *want, "{}", t.name);
        }
        let (opt_located, _) = r.optimizer.as_ref().unwrap();
        assert_eq!(at("exp_avg.z", opt_located), block_offsets(&opt)[0]);
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
}

//! Archive format v2: the types of the manifest and of tensors (see `docs/FORMAT.md`).
//!
//! Independent of libtorch so the format can be tested and fuzzed alone.

use serde::{Deserialize, Serialize};

/// File extension of model archives: `<model_dir>/<name>.mio`.
pub const EXTENSION: &str = "mio";
/// Archive format version of new archives: 2 adds the manifest's own
/// checksum and the checksums of `optimizer.json` and `state.json`.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest version a reader still accepts (version 1: no manifest checksum).
pub const MIN_FORMAT_VERSION: u32 = 1;
/// The `format` field of every manifest.
pub const FORMAT_NAME: &str = "modelio";

/// Zip entry names.
pub const MANIFEST_ENTRY: &str = "manifest.json";
pub const MODEL_ENTRY: &str = "model.safetensors";
pub const OPTIMIZER_ENTRY: &str = "optimizer.safetensors";
pub const OPTIMIZER_JSON_ENTRY: &str = "optimizer.json";
/// A copy of the state file as of this save: the archive is the source of
/// truth when a crash left the state file one save behind.
pub const STATE_ENTRY: &str = "state.json";

/// Alignment of every zip entry's data and of the first tensor in it.
pub const ALIGN: u64 = 64;
/// The safetensors entries' data start at a multiple of this (a block of
/// the disk and a page of memory): a tensor lies at the same offset within a
/// block in every save of the same state, so its staging buffer can be
/// placed for a write around the page cache.
pub const TENSOR_ALIGN: u64 = 4096;

/// The most dimensions a tensor of an archive may have: NumPy's limit
/// (`NPY_MAXDIMS`, 64 since NumPy 2; it was 32 before), through which Python
/// readers (`safetensors.numpy`, and `.numpy()` of a loaded tensor) go. An
/// archive holding more could be written and checksummed but not used.
pub const MAX_RANK: usize = 64;

/// A message naming `tensor` when its shape has more than [`MAX_RANK`] dimensions.
pub fn check_rank(tensor: &str, shape: &[usize]) -> Result<(), String> {
    if shape.len() > MAX_RANK {
        return Err(format!(
            "tensor `{tensor}` has {} dimensions, more than the {MAX_RANK} an archive may hold (readers such as NumPy accept no more)",
            shape.len()
        ));
    }
    Ok(())
}

/// Element types an archive can hold (safetensors spelling on disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    #[serde(rename = "F64")]
    F64,
    #[serde(rename = "F32")]
    F32,
    #[serde(rename = "F16")]
    F16,
    #[serde(rename = "BF16")]
    BF16,
    #[serde(rename = "I64")]
    I64,
    #[serde(rename = "I32")]
    I32,
    #[serde(rename = "I16")]
    I16,
    #[serde(rename = "I8")]
    I8,
    #[serde(rename = "U8")]
    U8,
    #[serde(rename = "BOOL")]
    Bool,
}

impl DType {
    pub const ALL: [DType; 10] =
        [DType::F64, DType::F32, DType::F16, DType::BF16, DType::I64, DType::I32, DType::I16, DType::I8, DType::U8, DType::Bool];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// The safetensors name ("F32", "BOOL", ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    /// The dtype of a safetensors name.
    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor's description in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// CRC-32C of the tensor's bytes.
    pub crc32c: u32,
}

impl TensorMeta {
    /// Number of bytes, or `None` on overflow (a damaged manifest).
    pub fn byte_len(&self) -> Option<usize> {
        self.shape.iter().try_fold(self.dtype.size(), |acc, &d| acc.checked_mul(d))
    }
}

/// The optimizer part of a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerMeta {
    /// The optimizer's kind, e.g. "adamw".
    pub kind: String,
    pub tensors: Vec<TensorMeta>,
    /// CRC-32C of the `optimizer.json` entry's bytes (version 2; absent in version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_crc32c: Option<u32>,
}

/// `manifest.json`: what the archive holds and the checksum of every part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub name: String,
    pub iterations: u64,
    /// RFC 3339 creation time.
    pub created: String,
    pub model: Vec<TensorMeta>,
    pub optimizer: Option<OptimizerMeta>,
    /// CRC-32C of the `state.json` entry's bytes, when the archive has one
    /// (version 2; absent in version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_crc32c: Option<u32>,
    /// The manifest's own checksum (see [`manifest_checksum`]); it must stay
    /// the last field, which is where serde writes it. Without it an edited
    /// manifest (`"optimizer": null`, another shape) whose zip CRC-32 was
    /// recomputed would read as a good one. Required from version 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<u32>,
}

/// The checksum of a manifest's bytes: the CRC-32C of `raw` with the digits
/// of its `checksum` value replaced by the single digit `0`.
///
/// The `checksum` member must be the last one of the manifest object, so the
/// file ends with `"checksum": <decimal>` and `}`, with only JSON whitespace
/// around the `:` and before the `}`. This covers every byte of the file but
/// the value itself, and any writer that puts the field last can produce it:
/// serialize with `"checksum": 0`, take the CRC-32C, write the number.
///
/// Returns `(stored, computed)`.
///
/// # Errors
/// A message when `raw` does not end with a `checksum` member.
pub fn manifest_checksum(raw: &[u8]) -> Result<(u32, u32), String> {
    let not_last = || "its `checksum` is not the last field, written as a decimal number".to_string();
    let ws = |c: &u8| matches!(c, b' ' | b'\t' | b'\n' | b'\r');
    let mut end = raw.len();
    while end > 0 && ws(&raw[end - 1]) {
        end -= 1;
    }
    if end == 0 || raw[end - 1] != b'}' {
        return Err(not_last());
    }
    end -= 1;
    while end > 0 && ws(&raw[end - 1]) {
        end -= 1;
    }
    let digits_end = end;
    while end > 0 && raw[end - 1].is_ascii_digit() {
        end -= 1;
    }
    let digits_start = end;
    let digits = &raw[digits_start..digits_end];
    // Canonical decimal only: no sign, no leading zero, fits in 32 bits.
    let stored = std::str::from_utf8(digits)
        .ok()
        .filter(|d| !d.is_empty() && (d.len() == 1 || !d.starts_with('0')))
        .and_then(|d| d.parse::<u32>().ok());
    let Some(stored) = stored else { return Err(not_last()) };
    while end > 0 && ws(&raw[end - 1]) {
        end -= 1;
    }
    if end == 0 || raw[end - 1] != b':' {
        return Err(not_last());
    }
    end -= 1;
    while end > 0 && ws(&raw[end - 1]) {
        end -= 1;
    }
    if !raw[..end].ends_with(b"\"checksum\"") {
        return Err(not_last());
    }
    let computed = crate::crc::crc32c_append(crate::crc::crc32c_append(crate::crc::crc32c(&raw[..digits_start]), b"0"), &raw[digits_end..]);
    Ok((stored, computed))
}

/// A borrowed tensor: what the archive writer takes.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
    /// The CRC-32C of `data` when already known (computed while staging);
    /// computed by the writer otherwise.
    pub crc32c: Option<u32>,
    /// The zip CRC-32 of `data` when already known; computed by the writer otherwise.
    pub crc32: Option<u32>,
}

/// Optimizer content of a save: its kind, JSON hyper-parameters and step
/// counts, and its state tensors.
#[derive(Debug, Clone, Copy)]
pub struct OptimizerRef<'a> {
    pub kind: &'a str,
    pub json: &'a serde_json::Value,
    pub tensors: &'a [TensorRef<'a>],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_checksum_covers_everything_but_its_value() {
        let zeroed = b"{\n  \"a\": 1,\n  \"checksum\": 0\n}";
        let crc = crate::crc::crc32c(zeroed);
        let raw = format!("{{\n  \"a\": 1,\n  \"checksum\": {crc}\n}}");
        assert_eq!(manifest_checksum(raw.as_bytes()).unwrap(), (crc, crc));
        let edited = raw.replace("\"a\": 1", "\"a\": 2");
        let (stored, computed) = manifest_checksum(edited.as_bytes()).unwrap();
        assert_ne!(stored, computed);
        for bad in [
            "{\"checksum\": 1, \"a\": 2}",
            "{\"checksum\": 01}",
            "{\"checksum\": -1}",
            "{\"x\": 1}",
            "{\"checksum\": 99999999999}",
            "",
            "}",
        ] {
            assert!(manifest_checksum(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn whitespace_around_the_checksum_s_colon_is_json_too() {
        // As other JSON writers may put it: `"checksum" : N`, with tabs or newlines.
        for sep in [" : ", "\t:\n", ":"] {
            let zeroed = format!("{{\"a\": 1, \"checksum\"{sep}0 }}\n\t ");
            let crc = crate::crc::crc32c(zeroed.as_bytes());
            let raw = format!("{{\"a\": 1, \"checksum\"{sep}{crc} }}\n\t ");
            assert_eq!(manifest_checksum(raw.as_bytes()), Ok((crc, crc)), "{sep:?}");
        }
        // Something other than a colon between the name and the number.
        assert!(manifest_checksum(b"{\"checksum\"x5}").is_err());
        assert!(manifest_checksum(b"{\"checksum\" 5}").is_err());
        // Nothing but whitespace, or a colon, before the number: refused, not read past the start.
        for bad in [&b"  5}"[..], b":5}", b" : 5}", b"5}"] {
            assert!(manifest_checksum(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn dtypes_print_as_their_safetensors_names() {
        for d in DType::ALL {
            assert_eq!(d.to_string(), d.name());
        }
        assert_eq!(DType::F32.to_string(), "F32");
    }

    #[test]
    fn rank_is_limited_to_what_readers_accept() {
        assert!(check_rank("w", &[1; MAX_RANK]).is_ok());
        assert!(check_rank("w", &[]).is_ok());
        let e = check_rank("w", &[1; MAX_RANK + 1]).unwrap_err();
        assert!(e.contains("`w`") && e.contains("65 dimensions"), "{e}");
    }
}

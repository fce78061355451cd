//! Archive format v1: the types of the manifest and of tensors (see `docs/FORMAT.md`).
//!
//! Independent of libtorch so the format can be tested and fuzzed alone.

use serde::{Deserialize, Serialize};

/// File extension of model archives: `<model_dir>/<name>.mio`.
pub const EXTENSION: &str = "mio";
/// Current archive format version.
pub const FORMAT_VERSION: u32 = 1;
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
}

/// `manifest.json`: what the archive holds and the checksum of every tensor.
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

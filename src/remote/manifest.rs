//! What a remote checkpoint is: its keys, its manifest, and the `LATEST`
//! pointer.
//!
//! Layout under `<prefix>/<model>/`:
//!
//! ```text
//! data/<iterations:020>-<upload>/archive.mio   the archive, as committed locally
//! data/<iterations:020>-<upload>/state.json    the state file of the same save
//! manifests/<iterations:020>-<upload>.json     written last, create-if-absent
//! LATEST                                       names the newest manifest
//! uploads/<upload>.json                        an upload under way (multipart ids)
//! ```
//!
//! A checkpoint exists for readers only once its manifest does; the data
//! objects of an upload are under keys of that upload alone, so a partial
//! upload is never seen and never overwrites anything. `LATEST` is a hint
//! that saves a listing: readers check that the manifest it names exists,
//! and fall back to the newest manifest listed.

use object_store::path::Path as Key;
use serde::{Deserialize, Serialize};

use crate::archive::format::TensorMeta;

/// The format of remote manifests.
pub const MANIFEST_FORMAT: u32 = 1;

/// One uploaded object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectEntry {
    /// `archive` or `state`.
    pub file: String,
    /// Its key in the store.
    pub key: String,
    pub size: u64,
    /// CRC-32C of the whole object, computed from the local file as it was uploaded.
    pub crc32c: u32,
}

/// One tensor of the archive and its checksum, as the archive's own manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSum {
    pub name: String,
    /// `model` or `optimizer`.
    pub part: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub crc32c: u32,
}

impl TensorSum {
    pub(crate) fn of(part: &str, t: &TensorMeta) -> TensorSum {
        TensorSum { name: t.name.clone(), part: part.into(), dtype: t.dtype.name().into(), shape: t.shape.clone(), crc32c: t.crc32c }
    }
}

/// A remote checkpoint's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteManifest {
    pub format: u32,
    /// The model's name.
    pub model: String,
    pub iterations: u64,
    /// The upload's id (part of every key it wrote).
    pub upload: String,
    /// When the upload finished (RFC 3339).
    pub created: String,
    /// Why it was uploaded: `save`, `backup`, `snapshot`, `exit`, or `catch-up`
    /// (a local save newer than the remote, found at open).
    pub kind: String,
    pub with_optimizer: bool,
    pub objects: Vec<ObjectEntry>,
    pub tensors: Vec<TensorSum>,
}

impl RemoteManifest {
    /// The object holding `file` (`archive` or `state`).
    pub fn object(&self, file: &str) -> Option<&ObjectEntry> {
        self.objects.iter().find(|o| o.file == file)
    }

    /// Total bytes of its objects.
    pub fn bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.size).sum()
    }

    /// Its name in listings: `<iterations:020>-<upload>`.
    pub fn id(&self) -> String {
        checkpoint_id(self.iterations, &self.upload)
    }
}

/// What `LATEST` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latest {
    /// The manifest's key.
    pub manifest: String,
    pub iterations: u64,
}

/// A record of an upload under way, written before its first object: a
/// later run aborts its multipart uploads and removes its objects when the
/// upload never got a manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub upload: String,
    pub iterations: u64,
    /// `(key, multipart upload id)` of each multipart upload started.
    pub multipart: Vec<(String, String)>,
}

/// `<iterations:020>-<upload>`: sorts by iteration as text.
pub fn checkpoint_id(iterations: u64, upload: &str) -> String {
    format!("{iterations:020}-{upload}")
}

/// The iteration count of a checkpoint id.
pub fn iterations_of(id: &str) -> Option<u64> {
    id.split_once('-').and_then(|(n, _)| n.parse().ok())
}

/// The keys of one model's remote checkpoints.
#[derive(Debug, Clone)]
pub struct Layout {
    root: Key,
}

impl Layout {
    /// Under `prefix` (the URL's path), the model `name`.
    pub fn new(prefix: &Key, name: &str) -> Layout {
        Layout { root: prefix.clone().join(name) }
    }

    pub fn root(&self) -> &Key {
        &self.root
    }

    pub fn data_dir(&self, id: &str) -> Key {
        self.root.clone().join("data").join(id)
    }

    pub fn data(&self, id: &str, file: &str) -> Key {
        self.data_dir(id).join(file)
    }

    pub fn data_root(&self) -> Key {
        self.root.clone().join("data")
    }

    pub fn manifests(&self) -> Key {
        self.root.clone().join("manifests")
    }

    pub fn manifest(&self, id: &str) -> Key {
        self.manifests().join(format!("{id}.json"))
    }

    pub fn latest(&self) -> Key {
        self.root.clone().join("LATEST")
    }

    pub fn uploads(&self) -> Key {
        self.root.clone().join("uploads")
    }

    pub fn intent(&self, upload: &str) -> Key {
        self.uploads().join(format!("{upload}.json"))
    }
}

/// The object names of a checkpoint's files.
pub const ARCHIVE_OBJECT: &str = "archive.mio";
pub const STATE_OBJECT: &str = "state.json";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_iteration_and_parse_back() {
        let a = checkpoint_id(9, "x");
        let b = checkpoint_id(10, "a");
        assert!(a < b, "{a} {b}");
        assert_eq!(iterations_of(&b), Some(10));
        assert_eq!(iterations_of("nonsense"), None);
        let l = Layout::new(&Key::from("runs/a"), "m");
        assert_eq!(l.manifest(&b).as_ref(), "runs/a/m/manifests/00000000000000000010-a.json");
        assert_eq!(l.data(&b, ARCHIVE_OBJECT).as_ref(), "runs/a/m/data/00000000000000000010-a/archive.mio");
        assert_eq!(Layout::new(&Key::from(""), "m").latest().as_ref(), "m/LATEST");
    }
}

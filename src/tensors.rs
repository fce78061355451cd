//! Between libtorch tensors and archive bytes.

use tch::{Kind, Tensor};

use crate::archive::format::{DType, MAX_RANK};
use crate::archive::{ArchiveReader, Located};
use crate::error::{Error, Result};

/// The archive dtype of a libtorch kind.
///
/// # Errors
/// [`Error::UnsupportedDtype`] for kinds the format does not store (complex, quantized...).
pub fn dtype_of(name: &str, kind: Kind) -> Result<DType> {
    Ok(match kind {
        Kind::Double => DType::F64,
        Kind::Float => DType::F32,
        Kind::Half => DType::F16,
        Kind::BFloat16 => DType::BF16,
        Kind::Int64 => DType::I64,
        Kind::Int => DType::I32,
        Kind::Int16 => DType::I16,
        Kind::Int8 => DType::I8,
        Kind::Uint8 => DType::U8,
        Kind::Bool => DType::Bool,
        other => return Err(Error::UnsupportedDtype { tensor: name.into(), dtype: format!("{other:?}") }),
    })
}

/// The libtorch kind of an archive dtype.
pub fn kind_of(dtype: DType) -> Kind {
    match dtype {
        DType::F64 => Kind::Double,
        DType::F32 => Kind::Float,
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        DType::I64 => Kind::Int64,
        DType::I32 => Kind::Int,
        DType::I16 => Kind::Int16,
        DType::I8 => Kind::Int8,
        DType::U8 => Kind::Uint8,
        DType::Bool => Kind::Bool,
    }
}

/// Shape of a tensor as archive dimensions.
pub fn shape_of(t: &Tensor) -> Vec<usize> {
    t.size().iter().map(|&d| d.max(0) as usize).collect()
}

/// Shape of tensor `name` as archive dimensions, for a save to `path`.
///
/// # Errors
/// [`Error::TooManyDims`] when it has more than [`MAX_RANK`] dimensions.
pub fn checked_shape(path: &std::path::Path, name: &str, t: &Tensor) -> Result<Vec<usize>> {
    let shape = shape_of(t);
    if shape.len() > MAX_RANK {
        return Err(Error::TooManyDims { path: path.to_path_buf(), tensor: name.into(), rank: shape.len(), max: MAX_RANK });
    }
    Ok(shape)
}

/// The bytes of a CPU tensor in place, borrowed for as long as the tensor;
/// `None` when it is not a contiguous CPU tensor.
///
/// # Safety
/// Nothing may write the tensor's storage while the slice lives: not through
/// `t`, nor through any other tensor sharing its storage (a shallow clone, a
/// view, the `VarStore`'s copy), on any thread. The borrow of `t` cannot
/// enforce that, since tch lets every holder of a shallow clone write.
pub(crate) unsafe fn host_bytes(t: &Tensor) -> Option<&[u8]> {
    if t.device() != tch::Device::Cpu || !t.is_contiguous() {
        return None;
    }
    let len = byte_len(t);
    if len == 0 {
        return Some(&[]);
    }
    // SAFETY: `t` is a contiguous CPU tensor of exactly `len` bytes, and the
    // slice borrows `t`, so the storage outlives it; the caller promises that
    // nothing writes it meanwhile.
    Some(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) })
}

/// The bytes of a contiguous CPU tensor, mutably; `None` otherwise.
///
/// # Safety
/// Nothing else may read or write the tensor's storage while the slice
/// lives: no other tensor may share it (as `&mut t` cannot rule out a
/// shallow clone), on any thread.
pub(crate) unsafe fn host_bytes_mut(t: &mut Tensor) -> Option<&mut [u8]> {
    if t.device() != tch::Device::Cpu || !t.is_contiguous() {
        return None;
    }
    let len = byte_len(t);
    if len == 0 {
        return Some(&mut []);
    }
    // SAFETY: as in `host_bytes`; the slice borrows `t` mutably, so no other
    // borrow through this handle exists while it lives, and the caller
    // promises no other tensor shares the storage.
    Some(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, len) })
}

/// A contiguous CPU view or copy of `t` (no copy when it already is one).
fn on_host(t: &Tensor) -> Result<Tensor> {
    let cpu = if t.device() == tch::Device::Cpu { t.shallow_clone() } else { t.f_to_device(tch::Device::Cpu)? };
    Ok(cpu.f_contiguous()?)
}

/// Copy a tensor's bytes into `dst`, reusing its capacity (one memcpy for a
/// contiguous CPU tensor). Works for tensors on any device; blocks until the
/// bytes are in `dst`.
///
/// # Errors
/// [`Error::Torch`] when libtorch fails.
pub fn copy_bytes(t: &Tensor, dst: &mut Vec<u8>) -> Result<()> {
    let cpu = on_host(t)?;
    dst.clear();
    // SAFETY: `cpu` is `t` itself or a copy of it, read while the caller
    // lends `t`; modelio writes neither. A write from another thread
    // meanwhile would be the caller's race, as with any read through tch.
    dst.extend_from_slice(unsafe { host_bytes(&cpu) }.unwrap_or_default());
    Ok(())
}

/// The CRC-32C and the zip CRC-32 of `bytes`, both in one pass over it.
pub fn checksums(bytes: &[u8]) -> (u32, u32) {
    crate::crc::both(bytes)
}

/// Bytes of a tensor.
pub fn byte_len(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// A libtorch tensor holding a copy of `data`.
///
/// # Errors
/// [`Error::Torch`] when libtorch fails.
pub fn to_tensor(dtype: DType, shape: &[usize], data: &[u8]) -> Result<Tensor> {
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_data_size(data, &shape, kind_of(dtype))?)
}

/// Read a checked tensor out of an archive.
///
/// # Errors
/// [`Error::Damaged`] when its checksum fails.
pub fn read_tensor(reader: &ArchiveReader, t: &Located) -> Result<Tensor> {
    let shape: Vec<i64> = t.meta.shape.iter().map(|&d| d as i64).collect();
    let mut out = Tensor::f_empty(&shape, (kind_of(t.meta.dtype), tch::Device::Cpu))?;
    // SAFETY: `out` was just created here and shares its storage with no one.
    let dst = unsafe { host_bytes_mut(&mut out) }
        .ok_or_else(|| Error::Torch(tch::TchError::Torch(format!("tensor `{}`: a new CPU tensor is not contiguous", t.meta.name))))?;
    reader.read_checked_into(t, dst)?;
    Ok(out)
}

/// Copy the archive's model tensors into the variables of `vs`. Every variable
/// must be in the archive with the same dtype and shape, and every archive
/// tensor must be a variable; checksums are verified before anything is copied.
///
/// # Errors
/// [`Error::Mismatch`] naming the tensor, [`Error::Damaged`] on a bad checksum.
pub fn load_varstore(reader: &ArchiveReader, vs: &tch::nn::VarStore) -> Result<()> {
    let model = reader.model.iter().map(|t| Ok((t.meta.name.clone(), read_tensor(reader, t)?))).collect::<Result<_>>()?;
    apply_to_varstore(reader.path(), &model, vs)
}

/// Copy tensors read from `path` into the variables of `vs`. Every variable
/// must be there with the same dtype and shape, and every tensor must be a
/// variable; nothing is copied unless all fit.
///
/// # Errors
/// [`Error::Mismatch`] naming the tensor; [`Error::Torch`] when a copy fails.
pub fn apply_to_varstore(path: &std::path::Path, model: &std::collections::BTreeMap<String, Tensor>, vs: &tch::nn::VarStore) -> Result<()> {
    let vars = vs.variables();
    let mismatch = |tensor: &str, expected: String, found: String| Error::Mismatch {
        path: path.to_path_buf(),
        tensor: tensor.into(),
        expected,
        found,
    };
    if let Some(extra) = model.keys().find(|k| !vars.contains_key(*k)) {
        return Err(mismatch(extra, "no such variable in the model".into(), "a tensor in the archive".into()));
    }
    let mut pairs = Vec::with_capacity(vars.len());
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        let stored = model.get(name).ok_or_else(|| mismatch(name, "a tensor in the archive".into(), "none".into()))?;
        let want = (dtype_of(name, var.kind())?, shape_of(var));
        let found = (dtype_of(name, stored.kind())?, shape_of(stored));
        if want != found {
            return Err(mismatch(name, format!("{} {:?}", want.0, want.1), format!("{} {:?}", found.0, found.1)));
        }
        pairs.push((var, stored));
    }
    tch::no_grad(|| -> Result<()> {
        for (var, value) in pairs {
            var.shallow_clone().f_copy_(value)?;
        }
        Ok(())
    })
}

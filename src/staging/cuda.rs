//! GPU staging primitives tch does not expose, from the C++ shim in
//! `csrc/cuda_stage.cpp`: a non-blocking copy into a preallocated pinned
//! buffer, and an event recorded after one save's copies so that another
//! thread waits for exactly those copies.
//!
//! Nothing here is called unless a tensor lives on a CUDA device.

use std::ffi::{c_char, c_int, c_void, CStr};

use crate::error::{Error, Result};

extern "C" {
    fn modelio_copy_async(dst: *mut c_void, src: *const c_void) -> *mut c_char;
    fn modelio_event_record(device: c_int, out: *mut *mut c_void) -> *mut c_char;
    fn modelio_event_wait(event: *mut c_void) -> *mut c_char;
    fn modelio_event_free(event: *mut c_void);
    fn modelio_free_error(error: *mut c_char);
}

/// Turn the shim's error string (null on success) into a result.
fn check(error: *mut c_char) -> Result<()> {
    if error.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string malloc'd by the
    // shim, read once and freed once here.
    let msg = unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned();
    unsafe { modelio_free_error(error) };
    Err(Error::Torch(tch::TchError::Torch(msg)))
}

/// Queue `dst.copy_(src, non_blocking = true)` on the current stream of
/// `src`'s device. `dst` must be pinned host memory of `src`'s dtype and shape,
/// and must not be read or reused before an [`Event`] recorded after this
/// call has completed.
///
/// # Errors
/// [`Error::Torch`] with libtorch's message (shapes or dtypes differ, ...).
pub fn copy_async(dst: &mut tch::Tensor, src: &tch::Tensor) -> Result<()> {
    // SAFETY: both pointers are live `at::Tensor*` owned by tch for the
    // duration of the call; the shim catches every C++ exception.
    check(unsafe { modelio_copy_async(dst.as_mut_ptr().cast(), src.as_ptr().cast()) })
}

/// A CUDA event recorded on a device's current stream. Waiting on it blocks
/// until everything queued on that stream before the record has run.
pub struct Event {
    raw: *mut c_void,
}

// SAFETY: a c10::Event (a CUDA event handle) may be synchronized and destroyed
// from any thread; this type gives no shared access (`wait` takes `&self` but
// cudaEventSynchronize is thread-safe).
unsafe impl Send for Event {}

impl Event {
    /// Record an event on the current stream of CUDA device `device`.
    ///
    /// # Errors
    /// [`Error::Torch`] when there is no such device or CUDA is unavailable.
    pub fn record(device: usize) -> Result<Event> {
        let device =
            c_int::try_from(device).map_err(|_| Error::Torch(tch::TchError::Torch(format!("CUDA device index {device} out of range"))))?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; on error the shim leaves it null.
        check(unsafe { modelio_event_record(device, &mut raw) })?;
        Ok(Event { raw })
    }

    /// Block the calling thread until the event has completed.
    ///
    /// # Errors
    /// [`Error::Torch`] when CUDA reports an error (for instance a failed copy).
    pub fn wait(&self) -> Result<()> {
        // SAFETY: `raw` came from `modelio_event_record` and is freed only in Drop.
        check(unsafe { modelio_event_wait(self.raw) })
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: freed exactly once; the shim accepts the pointer it created.
        unsafe { modelio_event_free(self.raw) }
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;

    /// The shim's copy is libtorch's `copy_`: it works between host tensors
    /// too, so it is exercised on every machine.
    #[test]
    fn shim_copy_works_on_host_tensors_and_reports_errors() {
        let src = Tensor::arange(24, (Kind::Float, Device::Cpu)).reshape([4, 6]);
        let mut dst = Tensor::zeros([4, 6], (Kind::Float, Device::Cpu));
        copy_async(&mut dst, &src).unwrap();
        assert!(dst.equal(&src));

        let mut wrong = Tensor::zeros([5], (Kind::Float, Device::Cpu));
        let err = copy_async(&mut wrong, &src).unwrap_err();
        assert!(matches!(err, Error::Torch(_)), "{err}");
        assert!(!err.to_string().is_empty());
    }

    /// Without a GPU, recording an event is a typed error, not a crash.
    #[test]
    fn shim_event_without_cuda_is_an_error() {
        if tch::Cuda::is_available() {
            let e = Event::record(0).unwrap();
            e.wait().unwrap();
            return;
        }
        let err = Event::record(0).err().unwrap();
        println!("without CUDA: {err}");
        assert!(matches!(err, Error::Torch(_)));
    }
}

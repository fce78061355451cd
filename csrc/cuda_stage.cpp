// Device-to-host staging for GPU tensors: the two things tch does not expose.
//
// 1. `copy_(src, /*non_blocking=*/true)` into a preallocated pinned buffer,
//    queued on the current stream of the source's device.
// 2. A `c10::Event` recorded on that stream after the copies of one save, so
//    another thread can wait for exactly those copies (not the whole device).
//
// Only generic c10/ATen APIs are used, so this compiles against libtorch's
// headers without the CUDA toolkit. Every function catches C++ exceptions and
// returns a malloc'd message instead (freed with `modelio_free_error`).

#include <ATen/core/Tensor.h>
#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace {

char *message(const char *what) {
  size_t n = std::strlen(what);
  char *out = static_cast<char *>(std::malloc(n + 1));
  if (out != nullptr) {
    std::memcpy(out, what, n + 1);
  }
  return out;
}

template <typename F>
char *guarded(F f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error &e) {
    return message(e.what_without_backtrace());
  } catch (const std::exception &e) {
    return message(e.what());
  } catch (...) {
    return message("unknown C++ exception");
  }
}

}  // namespace

extern "C" {

// Queue `dst.copy_(src, non_blocking=true)`. `dst` must be pinned host memory
// of the same dtype and shape as `src`.
char *modelio_copy_async(at::Tensor *dst, const at::Tensor *src) {
  return guarded([&] { dst->copy_(*src, /*non_blocking=*/true); });
}

// Record a new event on the current stream of CUDA device `device`.
char *modelio_event_record(int device, void **out) {
  *out = nullptr;
  return guarded([&] {
    c10::Device dev(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
    c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
    c10::Stream stream = impl.getStream(dev);
    auto *event = new c10::Event(c10::DeviceType::CUDA);
    try {
      event->record(stream);
    } catch (...) {
      delete event;
      throw;
    }
    *out = event;
  });
}

// Block the calling thread until everything queued before the event ran.
char *modelio_event_wait(void *event) {
  return guarded([&] { static_cast<c10::Event *>(event)->synchronize(); });
}

void modelio_event_free(void *event) {
  try {
    delete static_cast<c10::Event *>(event);
  } catch (...) {
  }
}

void modelio_free_error(char *error) { std::free(error); }

}  // extern "C"

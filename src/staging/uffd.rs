//! The few parts of Linux's userfaultfd that write-protection needs
//! (`linux/userfaultfd.h`; the `libc` crate has only the syscall number),
//! behind small functions that return `io::Error`s.
//!
//! Nothing here allocates, locks or logs: the protect handler calls these
//! while other threads may be blocked on a fault inside `malloc`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The API version `UFFDIO_API` agrees on.
const UFFD_API: u64 = 0xAA;
/// The ioctl type of every `UFFDIO_*` request.
const UFFDIO: u64 = 0xAA;

/// `_IOWR(UFFDIO, nr, size)`: the argument is read and written.
const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}

/// `_IOR(UFFDIO, nr, size)`: the argument is read by the kernel's
/// convention of the header (it reads a range).
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}

const NR_REGISTER: u64 = 0x00;
const NR_UNREGISTER: u64 = 0x01;
const NR_WRITEPROTECT: u64 = 0x06;
const NR_API: u64 = 0x3F;

const UFFDIO_API: u64 = iowr(NR_API, size_of::<Api>());
const UFFDIO_REGISTER: u64 = iowr(NR_REGISTER, size_of::<Register>());
const UFFDIO_UNREGISTER: u64 = ior(NR_UNREGISTER, size_of::<Range>());
const UFFDIO_WRITEPROTECT: u64 = iowr(NR_WRITEPROTECT, size_of::<WriteProtect>());
/// `_IO(0xAA, 0)` on `/dev/userfaultfd`: a new userfaultfd, for processes
/// that may open the device but not call the syscall.
const USERFAULTFD_IOC_NEW: u64 = 0xAA << 8;

/// Write-protect faults are reported (`UFFD_FEATURE_PAGEFAULT_FLAG_WP`).
const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// Pages never touched are protected too (`UFFD_FEATURE_WP_UNPOPULATED`,
/// Linux 6.4): without it a write to a page that was never populated would
/// pass unseen.
const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const REGISTER_MODE_WP: u64 = 1 << 1;
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct WriteProtect {
    range: Range,
    mode: u64,
}

/// `struct uffd_msg`: 32 bytes; for a page fault `arg` holds the flags, the
/// address and the thread id.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct Msg {
    event: u8,
    _reserved1: u8,
    _reserved2: u16,
    _reserved3: u32,
    arg: [u64; 3],
}

impl Msg {
    /// The faulting address when this reports a page fault.
    pub fn fault_address(&self) -> Option<usize> {
        (self.event == EVENT_PAGEFAULT).then_some(self.arg[1] as usize)
    }
}

/// A userfaultfd that reports write-protect faults, non-blocking.
pub(crate) struct Uffd {
    fd: OwnedFd,
}

/// The errno of a failed call.
fn errno() -> io::Error {
    io::Error::last_os_error()
}

impl Uffd {
    /// A userfaultfd of this process with write-protect faults (kernel
    /// faults included, so a `read(2)` into protected memory waits like any
    /// write), from the syscall or, where that is refused, `/dev/userfaultfd`.
    ///
    /// # Errors
    /// Why neither gives one, or why the kernel's lacks write-protection.
    pub fn open() -> Result<Uffd, String> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the userfaultfd syscall takes one integer of flags and
        // returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = if fd >= 0 {
            fd as i32
        } else {
            let syscall = errno();
            Self::from_device(flags).map_err(|device| {
                format!("userfaultfd is not available ({syscall}; /dev/userfaultfd: {device}): it needs root, CAP_SYS_PTRACE, vm.unprivileged_userfaultfd = 1 or access to /dev/userfaultfd, and a seccomp profile that allows it")
            })?
        };
        // SAFETY: `fd` is a descriptor just created and owned by nothing else.
        let uffd = Uffd { fd: unsafe { OwnedFd::from_raw_fd(fd) } };
        let mut api = Api { api: UFFD_API, features: FEATURE_PAGEFAULT_FLAG_WP | FEATURE_WP_UNPOPULATED, ioctls: 0 };
        uffd.ioctl(UFFDIO_API, &mut api).map_err(|e| {
            format!("the kernel's userfaultfd lacks write-protection of anonymous memory (UFFD_FEATURE_PAGEFAULT_FLAG_WP and UFFD_FEATURE_WP_UNPOPULATED, Linux 6.4+): {e}")
        })?;
        Ok(uffd)
    }

    /// A userfaultfd from `/dev/userfaultfd`.
    fn from_device(flags: i32) -> io::Result<i32> {
        // SAFETY: a NUL-terminated path; open returns a new descriptor or -1.
        let dev = unsafe { libc::open(c"/dev/userfaultfd".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if dev < 0 {
            return Err(errno());
        }
        // SAFETY: `dev` was just opened and is owned here.
        let dev = unsafe { OwnedFd::from_raw_fd(dev) };
        // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument
        // and returns a new descriptor or -1.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as libc::Ioctl, flags) };
        if fd < 0 {
            return Err(errno());
        }
        Ok(fd)
    }

    /// One ioctl whose argument is `arg`, retried when interrupted or when
    /// the kernel asks to try again.
    fn ioctl<T>(&self, request: u64, arg: &mut T) -> io::Result<()> {
        loop {
            // SAFETY: every request used here takes a pointer to the
            // `repr(C)` struct of its size (the sizes are encoded in the
            // request numbers, which the tests check against the kernel's),
            // valid for the call.
            let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), request as libc::Ioctl, arg as *mut T) };
            if rc == 0 {
                return Ok(());
            }
            let e = errno();
            if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) {
                return Err(e);
            }
        }
    }

    /// Register `[start, start + len)` (page-aligned) for write-protect faults.
    ///
    /// # Errors
    /// The kernel's refusal: memory that is not private anonymous (a file
    /// mapping, pinned or device memory), or memory another userfaultfd
    /// holds; also when the range registered but cannot be write-protected.
    pub fn register(&self, start: usize, len: usize) -> io::Result<()> {
        let range = Range { start: start as u64, len: len as u64 };
        let mut reg = Register { range, mode: REGISTER_MODE_WP, ioctls: 0 };
        self.ioctl(UFFDIO_REGISTER, &mut reg)?;
        if reg.ioctls & (1 << NR_WRITEPROTECT) == 0 {
            let _ = self.unregister(start, len);
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        Ok(())
    }

    /// Unregister a range; this also lifts its protection and wakes threads
    /// waiting on it.
    ///
    /// # Errors
    /// The kernel's refusal.
    pub fn unregister(&self, start: usize, len: usize) -> io::Result<()> {
        let mut range = Range { start: start as u64, len: len as u64 };
        self.ioctl(UFFDIO_UNREGISTER, &mut range)
    }

    /// Write-protect a registered range, or lift its protection (which
    /// wakes the threads waiting on it).
    ///
    /// # Errors
    /// The kernel's refusal.
    pub fn write_protect(&self, start: usize, len: usize, protect: bool) -> io::Result<()> {
        let range = Range { start: start as u64, len: len as u64 };
        let mut wp = WriteProtect { range, mode: if protect { WRITEPROTECT_MODE_WP } else { 0 } };
        self.ioctl(UFFDIO_WRITEPROTECT, &mut wp)
    }

    /// Read the pending messages into `msgs`; 0 when none is pending.
    ///
    /// # Errors
    /// A failed read other than "nothing pending".
    pub fn read(&self, msgs: &mut [Msg]) -> io::Result<usize> {
        loop {
            // SAFETY: `msgs` is valid for writes of its whole length in
            // bytes, and `Msg` is plain data of the kernel's layout.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), msgs.as_mut_ptr().cast(), std::mem::size_of_val(msgs)) };
            if n >= 0 {
                return Ok(n as usize / size_of::<Msg>());
            }
            let e = errno();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => return Ok(0),
                Some(libc::EINTR) => continue,
                _ => return Err(e),
            }
        }
    }
}

/// The page size.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf only reads a system value.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 && (n as usize).is_power_of_two() {
        n as usize
    } else {
        4096
    }
}

/// Anonymous memory of its own mapping, zeroed; unmapped on drop. The
/// protect handler's bookkeeping lives here because a `malloc`ed block may
/// share a page with a tensor, and the handler must never write to a page
/// it protects.
pub(crate) struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a private mapping owned by this value alone; what is shared
// through it (atomics) is synchronised by its users.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// At least `len` bytes (one page for 0).
    ///
    /// # Errors
    /// mmap's.
    pub fn new(len: usize) -> io::Result<Mapping> {
        let len = len.max(1).next_multiple_of(page_size());
        // SAFETY: a new private anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(errno());
        }
        Ok(Mapping { ptr: ptr.cast(), len })
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; nothing borrows
        // it past `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU8, Ordering};

    #[test]
    fn request_numbers_match_the_kernel_headers() {
        // The values of linux/userfaultfd.h on every 64-bit architecture
        // that uses the generic ioctl encoding.
        assert_eq!(UFFDIO_API, 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_AA01);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xC018_AA06);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xAA00);
        assert_eq!(size_of::<Msg>(), 32);
    }

    /// A write to a protected page waits for its fault to be served, and
    /// the fault names the page: the constants and structs work.
    #[test]
    fn a_write_to_a_protected_page_waits_for_its_fault() {
        let uffd = match Uffd::open() {
            Ok(u) => u,
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        };
        let page = page_size();
        let map = Mapping::new(2 * page).unwrap();
        let start = map.ptr() as usize;
        // SAFETY (test): the mapping's bytes, written through atomics only.
        let cells = unsafe { std::slice::from_raw_parts(map.ptr() as *const AtomicU8, map.len()) };
        cells[page].store(1, Ordering::SeqCst);
        uffd.register(start, 2 * page).unwrap();
        uffd.write_protect(start, 2 * page, true).unwrap();
        std::thread::scope(|s| {
            let writer = s.spawn(|| cells[page + 7].store(2, Ordering::SeqCst));
            let mut msgs = [Msg::default(); 4];
            let addr = loop {
                if uffd.read(&mut msgs).unwrap() > 0 {
                    break msgs[0].fault_address().unwrap();
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            };
            assert_eq!(addr & !(page - 1), start + page);
            assert_eq!(cells[page + 7].load(Ordering::SeqCst), 0, "the write waits");
            uffd.write_protect(start + page, page, false).unwrap();
            writer.join().unwrap();
        });
        assert_eq!(cells[page + 7].load(Ordering::SeqCst), 2, "the write went through");
        uffd.unregister(start, 2 * page).unwrap();
    }
}

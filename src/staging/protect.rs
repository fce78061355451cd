//! `staging.cpu_copy = "protect"`: a save's CPU tensors are write-protected
//! at the call and copied in the background; a write to a page not yet
//! copied waits while that page is copied first. The save holds the values
//! at the call with no fence and a stall of a few page-table updates.
//!
//! One process-wide userfaultfd and one handler thread (`modelio-protect`),
//! started on first use. [`copy_protected`], on the trainer's thread,
//! registers and write-protects the pages of the pieces and hands the job to
//! the handler; the handler serves faults (the faulting page first, then its
//! window) and copies the rest window by window, lifting each window's
//! protection once its pages are copied. One job runs at a time: a new one
//! waits for the one before to finish.
//!
//! The handler's rule: while any page is protected it neither allocates, nor
//! locks, nor logs, and it writes only its own stack, its bookkeeping (in a
//! mapping of its own) and staging buffers that share no page with the
//! protected ones. A thread blocked on a fault may hold `malloc`'s lock or
//! any other, and a write of the handler to a protected page would wait for
//! itself.
//!
//! Where userfaultfd cannot be used (not permitted, seccomp, an old kernel,
//! a forked child) every piece is copied at the call, as `"immediate"`
//! does; [`protect_available`] says why, once, and in a warning.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use super::uffd::{page_size, Mapping, Msg, Uffd};
use crate::background::lock;

/// What the handler copies and unprotects at a time, aligned: a fault
/// waits for at most about two such copies (a fraction of a millisecond), a
/// loop that overwrites the state as it goes faults once per window, and a
/// window is a huge page, which its protection covers with one page-table
/// entry (lifting part of one would split it into 512).
const WINDOW: usize = 2 << 20;

/// One contiguous copy: `len` bytes from `src` to `dst`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Piece {
    pub src: *const u8,
    pub dst: *mut u8,
    pub len: usize,
}

impl Piece {
    fn src_end(&self) -> usize {
        self.src as usize + self.len
    }

    /// Copy the part of this piece whose source lies in `[lo, hi)`.
    ///
    /// # Safety
    /// As for [`copy_protected`]: `src` and `dst` valid for `len` bytes and
    /// not overlapping.
    unsafe fn copy_between(&self, lo: usize, hi: usize) {
        let (a, b) = (lo.max(self.src as usize), hi.min(self.src_end()));
        if a < b {
            let at = a - self.src as usize;
            // SAFETY: `[a, b)` lies inside the piece, the caller's promise
            // covers the whole piece.
            unsafe { std::ptr::copy_nonoverlapping(self.src.add(at), self.dst.add(at), b - a) };
        }
    }

    /// Copy the whole piece now.
    ///
    /// # Safety
    /// As for [`Piece::copy_between`].
    unsafe fn copy_now(&self) {
        // SAFETY: the caller's promise.
        unsafe { self.copy_between(self.src as usize, self.src_end()) };
    }
}

/// A run of protected pages `[start, end)`; its pages' bits in the job's
/// bookkeeping begin at `first_bit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
    first_bit: usize,
}

/// The page ranges of `pieces` (sorted by source), page-aligned, pages
/// shared by neighbours merged: a page holding pieces of two tensors is
/// protected and copied once.
fn spans(pieces: &[Piece], page: usize) -> Vec<Span> {
    let mut out: Vec<Span> = Vec::new();
    for p in pieces {
        let (start, end) = ((p.src as usize) & !(page - 1), p.src_end().next_multiple_of(page));
        match out.last_mut() {
            Some(last) if start <= last.end => last.end = last.end.max(end),
            _ => out.push(Span { start, end, first_bit: 0 }),
        }
    }
    let mut bit = 0;
    for s in &mut out {
        s.first_bit = bit;
        bit += (s.end - s.start) / page;
    }
    out
}

/// Whether `[lo, hi)` touches a page of `spans`.
fn touches(spans: &[Span], lo: usize, hi: usize) -> bool {
    let i = spans.partition_point(|s| s.end <= lo);
    spans.get(i).is_some_and(|s| s.start < hi)
}

/// One protected save, handed to the handler by address. Read-only once its
/// pages are protected, but for `copied`, which the handler alone writes.
struct Job {
    page: usize,
    spans: Vec<Span>,
    /// Sorted by source.
    pieces: Vec<Piece>,
    /// `reach[k]`: the furthest source end of `pieces[..=k]` (pieces may
    /// overlap, two views of one storage), so the pieces that reach into a
    /// page are found by a binary search.
    reach: Vec<usize>,
    /// One bit per page of `spans`: copied (and unprotected) or not.
    copied: Mapping,
    pages: usize,
    done: Arc<Done>,
}

// SAFETY: the raw pointers are the caller's pieces, which `copy_protected`'s
// contract keeps valid until the job is finished; the handler is the only
// thread that writes through them.
unsafe impl Send for Job {}
// SAFETY: as above; shared reads only, `copied` is atomics.
unsafe impl Sync for Job {}

impl Job {
    fn bits(&self) -> &[AtomicU64] {
        // SAFETY: the mapping holds `len / 8` zeroed, aligned u64s and lives
        // as long as the job; they are only accessed as atomics.
        unsafe { std::slice::from_raw_parts(self.copied.ptr() as *const AtomicU64, self.copied.len() / 8) }
    }

    fn is_copied(&self, bit: usize) -> bool {
        self.bits().get(bit / 64).is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (bit % 64)) != 0)
    }

    fn mark(&self, bit: usize) {
        if let Some(w) = self.bits().get(bit / 64) {
            w.fetch_or(1 << (bit % 64), Ordering::Relaxed);
        }
    }

    /// The span holding `addr`.
    fn span_of(&self, addr: usize) -> Option<usize> {
        let i = self.spans.partition_point(|s| s.end <= addr);
        self.spans.get(i).filter(|s| s.start <= addr).map(|_| i)
    }

    /// Copy the bytes of every piece that lie in `[lo, hi)`.
    fn copy_range(&self, lo: usize, hi: usize) {
        let first = self.reach.partition_point(|&r| r <= lo);
        for p in self.pieces.iter().skip(first).take_while(|p| (p.src as usize) < hi) {
            // SAFETY: the pieces' contract (`copy_protected`).
            unsafe { p.copy_between(lo, hi) };
        }
    }

    /// Copy the pages of `[lo, hi)` (inside span `s`) not yet copied, then
    /// lift the range's protection, which wakes the threads waiting on it;
    /// `wake`: lift it even when nothing was left to copy. Returns how many
    /// pages it copied.
    fn serve(&self, uffd: &Uffd, s: &Span, lo: usize, hi: usize, wake: bool) -> io::Result<usize> {
        let bit_of = |addr: usize| s.first_bit + (addr - s.start) / self.page;
        let mut newly = 0;
        let mut at = lo;
        while at < hi {
            if self.is_copied(bit_of(at)) {
                at += self.page;
                continue;
            }
            let run = at;
            while at < hi && !self.is_copied(bit_of(at)) {
                at += self.page;
            }
            self.copy_range(run, at);
            for page in (run..at).step_by(self.page) {
                self.mark(bit_of(page));
            }
            newly += (at - run) / self.page;
        }
        if newly > 0 || wake {
            uffd.write_protect(lo, hi - lo, false)?;
        }
        Ok(newly)
    }

    /// The window around `addr` in span `s`.
    fn window(&self, s: &Span, addr: usize) -> (usize, usize) {
        let lo = (addr & !(WINDOW - 1)).max(s.start);
        (lo, ((addr & !(WINDOW - 1)) + WINDOW).min(s.end))
    }

    /// The window after `hi` (in span `s`, else the next span, wrapping).
    fn next(&self, s: usize, hi: usize) -> (usize, usize) {
        match self.spans.get(s) {
            Some(span) if hi < span.end => (s, hi),
            _ => {
                let s = if s + 1 < self.spans.len() { s + 1 } else { 0 };
                (s, self.spans.get(s).map_or(0, |span| span.start))
            }
        }
    }

    /// Copy everything, faults first, lifting each window's protection once
    /// its pages are copied: the handler's work on one job. Allocates,
    /// locks and logs nothing.
    fn run(&self, uffd: &Uffd, msgs: &mut [Msg]) -> io::Result<()> {
        let mut copied = 0;
        let mut cursor = (0, self.spans.first().map_or(0, |s| s.start));
        while copied < self.pages {
            // Pending faults first: each waited at most for one window.
            loop {
                let n = uffd.read(msgs)?;
                for addr in msgs.iter().take(n).filter_map(Msg::fault_address) {
                    let addr = addr & !(self.page - 1);
                    let Some(s) = self.span_of(addr) else {
                        // Not this job's: nothing to copy, let it go.
                        let _ = uffd.write_protect(addr, self.page, false);
                        continue;
                    };
                    FAULTS.fetch_add(1, Ordering::Relaxed);
                    // The page's whole window: the writer is likely to
                    // write the rest next, and lifting whole windows keeps
                    // a huge page whole. Then go on after it.
                    let span = &self.spans[s];
                    let (lo, hi) = self.window(span, addr);
                    copied += self.serve(uffd, span, lo, hi, true)?;
                    cursor = self.next(s, hi);
                }
                if n < msgs.len() {
                    break;
                }
            }
            if copied >= self.pages {
                break;
            }
            let (s, addr) = cursor;
            let Some(span) = self.spans.get(s) else { break };
            let (_, hi) = self.window(span, addr);
            copied += self.serve(uffd, span, addr, hi, false)?;
            cursor = self.next(s, hi);
        }
        Ok(())
    }

    /// Lift every protection and registration (after an error, or an
    /// aborted job, too); the first error.
    fn release(&self, uffd: &Uffd, lift: bool) -> io::Result<()> {
        let mut first = Ok(());
        for s in &self.spans {
            let lifted = if lift { uffd.write_protect(s.start, s.end - s.start, false) } else { Ok(()) };
            let r = lifted.and(uffd.unregister(s.start, s.end - s.start));
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// A job's end, told by the handler once nothing of it is protected.
#[derive(Default)]
struct Done {
    /// `None` until finished; then the outcome, taken once by its waiter.
    state: Mutex<Option<Option<io::Error>>>,
    finished: Condvar,
}

impl Done {
    fn finish(&self, outcome: io::Result<()>) {
        *lock(&self.state) = Some(outcome.err());
        self.finished.notify_all();
    }

    /// Wait for the end; the outcome the first time it is asked.
    fn wait(&self) -> io::Result<()> {
        let mut state = lock(&self.state);
        loop {
            match &mut *state {
                Some(outcome) => return outcome.take().map_or(Ok(()), Err),
                None => state = self.finished.wait(state).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

/// A protected copy in flight. The staged bytes are complete once [`wait`]
/// returns `Ok`; dropping it waits too, so the buffers it writes into are
/// never handed on while it still writes.
///
/// [`wait`]: Protected::wait
pub(crate) struct Protected {
    job: Option<Box<Job>>,
}

impl Protected {
    /// Wait until every piece is copied and nothing is protected any more.
    ///
    /// # Errors
    /// A userfaultfd call that failed mid-copy: the staged bytes are
    /// incomplete (every protection was lifted all the same).
    pub fn wait(mut self) -> io::Result<()> {
        self.finish()
    }

    /// Whether pieces are being copied under protection (else every piece
    /// was copied at the call).
    #[cfg(test)]
    pub fn under_protection(&self) -> bool {
        self.job.is_some()
    }

    fn finish(&mut self) -> io::Result<()> {
        match self.job.take() {
            Some(job) => job.done.wait(),
            None => Ok(()),
        }
    }
}

impl Drop for Protected {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// The process's userfaultfd and handler, once.
struct Engine {
    uffd: Arc<Uffd>,
    /// The write end of the pipe jobs are handed over by: a write(2) from a
    /// buffer on the stack, which touches no memory that may be protected.
    jobs: OwnedFd,
    /// The job in flight; a new one waits for it. Held through a whole
    /// hand-over, so jobs are handed over one at a time.
    current: Mutex<Option<Arc<Done>>>,
    /// The process that started the handler: a forked child has no handler
    /// and its own memory, and must not use this userfaultfd.
    pid: u32,
    page: usize,
}

static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();
/// Set by the handler once it runs its own code; statics, so never on a
/// protected page.
static STARTED: Mutex<bool> = Mutex::new(false);
static STARTED_CHANGED: Condvar = Condvar::new();
static PROTECTED_SAVES: AtomicU64 = AtomicU64::new(0);
/// Faults the handler served (a static: never on a protected page).
static FAULTS: AtomicU64 = AtomicU64::new(0);
static WARNED_PIECE: AtomicBool = AtomicBool::new(false);

#[cfg(test)]
thread_local! {
    /// Tests: act as if userfaultfd were unavailable, on this thread.
    static SIMULATE_UNAVAILABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether `staging.cpu_copy = "protect"` works in this process (it starts
/// the handler on first call); the reason when it does not, in which case
/// saves copy CPU tensors at the call, as `"immediate"` does.
///
/// # Errors
/// Why userfaultfd cannot write-protect memory here.
pub fn protect_available() -> Result<(), &'static str> {
    engine().map(|_| ())
}

/// How many saves of this process copied their CPU tensors under write
/// protection (the rest of the `"protect"` saves fell back to copying at the
/// call).
pub fn protected_saves() -> u64 {
    PROTECTED_SAVES.load(Ordering::Relaxed)
}

fn engine() -> Result<&'static Engine, &'static str> {
    #[cfg(test)]
    if SIMULATE_UNAVAILABLE.with(std::cell::Cell::get) {
        return Err("simulated unavailability (tests)");
    }
    let engine = ENGINE
        .get_or_init(|| {
            let engine = Engine::start();
            if let Err(why) = &engine {
                tracing::warn!(target: "modelio", "staging.cpu_copy = \"protect\" copies at the call instead (as \"immediate\"): {why}");
            }
            engine
        })
        .as_ref()
        .map_err(String::as_str)?;
    if engine.pid != std::process::id() {
        return Err("a forked child cannot use its parent's userfaultfd");
    }
    Ok(engine)
}

impl Engine {
    fn start() -> Result<Engine, String> {
        let uffd = Arc::new(Uffd::open()?);
        let page = page_size();
        probe(&uffd, page)?;
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array or fails.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(format!("no pipe for the protect handler: {}", io::Error::last_os_error()));
        }
        // SAFETY: both descriptors were just created and are owned here.
        let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let handler = uffd.clone();
        std::thread::Builder::new()
            .name("modelio-protect".into())
            .spawn(move || {
                // The thread's start-up writes to the heap (its handle's
                // count): it must be over before any page is protected.
                *lock(&STARTED) = true;
                STARTED_CHANGED.notify_all();
                handle(&handler, &rx)
            })
            .map_err(|e| format!("the protect handler thread cannot start: {e}"))?;
        let mut started = lock(&STARTED);
        while !*started {
            started = STARTED_CHANGED.wait(started).unwrap_or_else(|p| p.into_inner());
        }
        Ok(Engine { uffd, jobs: tx, current: Mutex::new(None), pid: std::process::id(), page })
    }
}

/// Register, protect, lift and unregister a page of our own: the kernel
/// write-protects anonymous memory.
fn probe(uffd: &Uffd, page: usize) -> Result<(), String> {
    let map = Mapping::new(page).map_err(|e| format!("no memory to test userfaultfd on: {e}"))?;
    let start = map.ptr() as usize;
    uffd.register(start, page)
        .and_then(|()| uffd.write_protect(start, page, true))
        .and_then(|()| uffd.write_protect(start, page, false))
        .and_then(|()| uffd.unregister(start, page))
        .map_err(|e| format!("userfaultfd cannot write-protect anonymous memory here: {e}"))
}

/// The handler thread: one job after another, until the process ends.
fn handle(uffd: &Uffd, jobs: &OwnedFd) {
    let mut msgs = [Msg::default(); 32];
    loop {
        let mut handed = [0usize; 2];
        // SAFETY: reads at most the array's size into it.
        let n = unsafe { libc::read(jobs.as_raw_fd(), handed.as_mut_ptr().cast(), size_of_val(&handed)) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n != size_of_val(&handed) as isize {
            return;
        }
        let [addr, aborted] = handed;
        // SAFETY: `copy_protected` sent the address of a boxed job that its
        // `Protected` keeps alive until `done` is finished below.
        let job = unsafe { &*(addr as *const Job) };
        let outcome = if aborted != 0 { Ok(()) } else { job.run(uffd, &mut msgs) };
        let released = job.release(uffd, aborted != 0 || outcome.is_err());
        // Nothing is protected now: writing to the heap is safe again. Hold
        // the `Done` while telling it, since the waiter may free the job.
        let done = job.done.clone();
        done.finish(outcome.and(released));
    }
}

/// Copy every piece's `src` into its `dst`: under write protection when
/// userfaultfd allows (returning at once while the copy goes on in the
/// background), else before returning. Pieces it cannot protect (a staging
/// buffer sharing a page with a protected one, memory the kernel cannot
/// protect) are copied before it returns too.
///
/// # Safety
/// Until the returned [`Protected`] is waited for or dropped: every `src`
/// and `dst` stays valid for `len` bytes, nothing else reads or writes a
/// `dst`, no `dst` overlaps a `src`, and the memory of every `src` stays
/// mapped as it is (the tensors it belongs to stay alive).
pub(crate) unsafe fn copy_protected(pieces: Vec<Piece>) -> Protected {
    let mut pieces: Vec<Piece> = pieces.into_iter().filter(|p| p.len > 0).collect();
    let none = Protected { job: None };
    let copy_now = |pieces: &[Piece]| {
        for p in pieces {
            // SAFETY: the caller's promise.
            unsafe { p.copy_now() };
        }
    };
    let engine = match engine() {
        Ok(e) if !pieces.is_empty() => e,
        _ => {
            copy_now(&pieces);
            return none;
        }
    };
    let page = engine.page;
    let mut current = lock(&engine.current);
    if let Some(earlier) = current.take() {
        // Its outcome is its own save's; here only its end matters.
        let _ = earlier.wait();
    }
    pieces.sort_by_key(|p| p.src as usize);
    // A staging buffer on a page that will be protected would make the
    // handler wait for itself: copy those pieces now.
    let all = spans(&pieces, page);
    let (mut kept, near): (Vec<Piece>, Vec<Piece>) =
        pieces.into_iter().partition(|p| !touches(&all, p.dst as usize, p.dst as usize + p.len));
    copy_now(&near);
    // Register each span; a span the kernel refuses is copied now.
    for s in spans(&kept, page) {
        match engine.uffd.register(s.start, s.end - s.start) {
            Ok(()) => {}
            Err(e) => {
                if !WARNED_PIECE.swap(true, Ordering::Relaxed) {
                    tracing::warn!(target: "modelio", "a CPU tensor's memory cannot be write-protected ({e}); such tensors are copied at the call");
                }
                let (refused, rest): (Vec<Piece>, Vec<Piece>) =
                    kept.into_iter().partition(|p| s.start <= p.src as usize && (p.src as usize) < s.end);
                copy_now(&refused);
                kept = rest;
            }
        }
    }
    if kept.is_empty() {
        return none;
    }
    let spans = spans(&kept, page);
    let pages = spans.last().map_or(0, |s| s.first_bit + (s.end - s.start) / page);
    let copied = match Mapping::new(pages.div_ceil(64) * 8) {
        Ok(m) => m,
        Err(_) => {
            for s in &spans {
                let _ = engine.uffd.unregister(s.start, s.end - s.start);
            }
            copy_now(&kept);
            return none;
        }
    };
    let reach = kept
        .iter()
        .scan(0, |r: &mut usize, p| {
            *r = (*r).max(p.src_end());
            Some(*r)
        })
        .collect();
    let done = Arc::new(Done::default());
    *current = Some(done.clone());
    let job = Box::new(Job { page, spans, pieces: kept, reach, copied, pages, done });
    // From the first protection until the hand-over this thread writes
    // only its stack: a write to a protected page now would wait for a
    // handler that does not have the job yet.
    let aborted = job.spans.iter().any(|s| engine.uffd.write_protect(s.start, s.end - s.start, true).is_err());
    let handed = [&*job as *const Job as usize, usize::from(aborted)];
    // SAFETY: writes the array's bytes from the stack to the pipe.
    let sent = unsafe { libc::write(engine.jobs.as_raw_fd(), handed.as_ptr().cast(), size_of_val(&handed)) };
    if sent != size_of_val(&handed) as isize {
        // The handler never got it: lift everything here.
        let _ = job.release(&engine.uffd, true);
        job.done.finish(Ok(()));
    }
    if aborted || sent != size_of_val(&handed) as isize {
        // Once nothing is protected, copy here.
        let _ = job.done.wait();
        copy_now(&job.pieces);
        tracing::warn!(target: "modelio", "a save's CPU tensors could not be write-protected; they were copied at the call");
        return none;
    }
    let protected = Protected { job: Some(job) };
    PROTECTED_SAVES.fetch_add(1, Ordering::Relaxed);
    protected
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(src: &[u8], dst: &mut [u8]) -> Piece {
        assert_eq!(src.len(), dst.len());
        Piece { src: src.as_ptr(), dst: dst.as_mut_ptr(), len: src.len() }
    }

    /// Page-aligned memory of its own (a `Mapping`), as bytes.
    fn region(len: usize) -> (Mapping, &'static mut [u8]) {
        let m = Mapping::new(len).unwrap();
        // SAFETY (test): the mapping outlives every use in the test that made it.
        let bytes = unsafe { std::slice::from_raw_parts_mut(m.ptr(), m.len()) };
        (m, bytes)
    }

    fn available() -> bool {
        match protect_available() {
            Ok(()) => true,
            Err(why) => {
                eprintln!("skipped: {why}");
                false
            }
        }
    }

    #[test]
    fn spans_merge_shared_pages_and_keep_apart_distant_ones() {
        let p = |src: usize, len: usize| Piece { src: src as *const u8, dst: std::ptr::null_mut(), len };
        let got = spans(&[p(4096 + 10, 100), p(4096 + 200, 5000), p(5 * 4096, 4096), p(9 * 4096 + 1, 1)], 4096);
        let want = vec![
            Span { start: 4096, end: 3 * 4096, first_bit: 0 },
            Span { start: 5 * 4096, end: 6 * 4096, first_bit: 2 },
            Span { start: 9 * 4096, end: 10 * 4096, first_bit: 3 },
        ];
        assert_eq!(got, want);
        assert!(touches(&want, 3 * 4096 - 1, 3 * 4096) && !touches(&want, 3 * 4096, 5 * 4096));
    }

    /// Writes from another thread right after the call: the staged copy
    /// holds the bytes at the call, and every write lands.
    #[test]
    fn a_write_right_after_the_call_waits_for_its_page_to_be_copied() {
        if !available() {
            return;
        }
        let len = 64 << 20;
        let (_m, src) = region(len);
        for (i, b) in src.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let mut dst = vec![0u8; len];
        let pieces = vec![piece(src, &mut dst)];
        let before = protected_saves();
        // SAFETY (test): src and dst outlive the wait below.
        let protected = unsafe { copy_protected(pieces) };
        assert!(protected.under_protection() && protected_saves() > before, "copied under protection, not at the call");
        let (src_at, faults) = (src.as_mut_ptr() as usize, FAULTS.load(Ordering::Relaxed));
        std::thread::spawn(move || {
            // SAFETY (test): the mapping lives until the test ends; the
            // writes race only with the protection, which is the point.
            let src = unsafe { std::slice::from_raw_parts_mut(src_at as *mut u8, len) };
            for i in (0..len).rev().step_by(1000) {
                src[i] = 255;
            }
        })
        .join()
        .unwrap();
        protected.wait().unwrap();
        assert!(FAULTS.load(Ordering::Relaxed) > faults, "the writes were faults served by the handler");
        assert!(dst.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8), "the copy holds the bytes at the call");
        assert!((0..len).rev().step_by(1000).all(|i| src[i] == 255), "the writes landed");
    }

    /// Two pieces on one page (two small tensors on one heap page), a
    /// zero-length piece, and a write to the shared page right away.
    #[test]
    fn pieces_sharing_a_page_and_empty_pieces() {
        if !available() {
            return;
        }
        let page = page_size();
        let (_m, src) = region(2 * page);
        src.fill(7);
        let (a, b) = src.split_at_mut(100);
        let (mut da, mut db, mut de) = (vec![0u8; 100], vec![0u8; 300], Vec::<u8>::new());
        let pieces = vec![piece(&a[..100], &mut da), piece(&b[..300], &mut db), Piece { src: b.as_ptr(), dst: de.as_mut_ptr(), len: 0 }];
        // SAFETY (test): the buffers outlive the wait below.
        let protected = unsafe { copy_protected(pieces) };
        src[50] = 1; // a's bytes
        src[150] = 2; // b's, same page
        src[page + 1] = 3; // neither's, the page after
        protected.wait().unwrap();
        assert!(da.iter().all(|&x| x == 7) && db.iter().all(|&x| x == 7), "both pieces hold the bytes at the call");
        assert_eq!((src[50], src[150], src[page + 1]), (1, 2, 3));
        // SAFETY (test): nothing at all to copy.
        unsafe { copy_protected(Vec::new()) }.wait().unwrap();
    }

    /// A staging buffer on a page that would be protected is copied at the
    /// call, so the handler never writes to a page it protects.
    #[test]
    fn a_buffer_on_a_protected_page_is_copied_at_the_call() {
        if !available() {
            return;
        }
        let (_m, mem) = region(4 * page_size());
        mem.fill(9);
        let (src, dst) = mem.split_at_mut(1000);
        let pieces = vec![piece(src, &mut dst[..1000])];
        // SAFETY (test): the mapping outlives the wait.
        let protected = unsafe { copy_protected(pieces) };
        assert!(!protected.under_protection(), "nothing was protected");
        protected.wait().unwrap();
        assert!(dst[..1000].iter().all(|&x| x == 9));
    }

    #[test]
    fn without_userfaultfd_pieces_are_copied_at_the_call() {
        SIMULATE_UNAVAILABLE.with(|s| s.set(true));
        assert!(protect_available().is_err());
        let src = vec![5u8; 10_000];
        let mut dst = vec![0u8; 10_000];
        // SAFETY (test): the buffers outlive the call, which copies at once.
        let protected = unsafe { copy_protected(vec![piece(&src, &mut dst)]) };
        assert!(!protected.under_protection());
        protected.wait().unwrap();
        assert_eq!(dst, src);
        SIMULATE_UNAVAILABLE.with(|s| s.set(false));
    }
}

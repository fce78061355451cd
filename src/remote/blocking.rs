//! A small runtime of its own for object-store work, which blocking code
//! may wait on from anywhere, an async task included.

use std::future::Future;

use crate::error::{Error, Result};

/// A two-thread runtime, shut down in the background when dropped (so that
/// dropping it inside an async task does not panic).
pub(crate) struct Blocking(Option<tokio::runtime::Runtime>);

impl Blocking {
    /// Start it, its threads named `name`; `on_start` runs on each.
    ///
    /// # Errors
    /// [`Error::Io`] naming `what` when the threads cannot start.
    pub fn new(name: &str, on_start: fn(), what: &str) -> Result<Blocking> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(name)
            .on_thread_start(on_start)
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the object-store runtime for", what, e))?;
        Ok(Blocking(Some(rt)))
    }

    /// Enter the runtime on this thread (until the guard drops), so that
    /// what spawns tasks (a multipart writer's parts) spawns them on it.
    #[cfg_attr(not(feature = "torch"), allow(dead_code))]
    pub fn enter(&self) -> Option<tokio::runtime::EnterGuard<'_>> {
        self.0.as_ref().map(|rt| rt.enter())
    }

    /// Run `fut` on this runtime and wait for it. From inside another
    /// runtime it runs on a scoped thread (a runtime cannot be blocked on
    /// from one of its own or another runtime's threads).
    pub fn run<F: Future + Send>(&self, fut: F) -> F::Output
    where
        F::Output: Send,
    {
        let Some(rt) = &self.0 else { unreachable!("the runtime is only taken by drop") };
        if tokio::runtime::Handle::try_current().is_err() {
            return rt.block_on(fut);
        }
        std::thread::scope(|s| match s.spawn(|| rt.block_on(fut)).join() {
            Ok(out) => out,
            Err(panic) => std::panic::resume_unwind(panic),
        })
    }
}

impl Drop for Blocking {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

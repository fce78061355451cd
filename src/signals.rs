//! Signal-driven exit saves: the first SIGINT or SIGTERM asks the training
//! loop to stop (it then makes its exit save and drains); a second one
//! aborts the process at once with exit code 130.
//!
//! Aborting loses nothing committed: every file is replaced atomically, so
//! the folder holds the last committed save, and only the exit save in
//! progress is lost. tokio's signal handlers replace the default action for
//! the rest of the process, which is why the second signal is handled here
//! rather than left to the default.

use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// A token the first SIGINT or SIGTERM cancels; a second one exits the
/// process with code 130. Each signal is announced on standard error.
///
/// Must be called inside a tokio runtime (it spawns the task that waits for
/// the signals). The loop checks `token.is_cancelled()` once per iteration
/// and ends with [`crate::ModelIo::finish`].
///
/// ```no_run
/// # async fn run(mut io: modelio::ModelIo, vs: tch::nn::VarStore) -> modelio::Result<()> {
/// let token = modelio::signals::cancel_on_signals()?;
/// while !token.is_cancelled() {
///     // one training iteration ...
/// #   break;
/// }
/// let finished = io.finish(&vs, None).await?; // exit save, then drain every actor
/// for e in &finished.unreported {
///     eprintln!("warning: {}", e.report()); // a backup or snapshot that failed near the end
/// }
/// # Ok(()) }
/// ```
///
/// # Errors
/// [`Error::Signals`] outside a tokio runtime or when the handlers cannot be installed.
pub fn cancel_on_signals() -> Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = tokio::runtime::Handle::try_current().map_err(|e| Error::Signals { detail: e.to_string() })?;
    let _guard = runtime.enter();
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::Signals { detail: e.to_string() })?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::Signals { detail: e.to_string() })?;
    let token = CancellationToken::new();
    let cancel = token.clone();
    runtime.spawn(async move {
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        eprintln!("\nstopping: finishing the iteration, then the exit save (press Ctrl-C again to abort)");
        tracing::warn!(target: "modelio", "stop requested by a signal: exit save, then drain");
        cancel.cancel();
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        eprintln!("aborted: committed files are intact; the exit save in progress is lost");
        std::process::exit(130);
    });
    Ok(token)
}

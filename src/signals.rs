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
/// The signals are awaited on a thread of their own (with a small runtime of
/// its own), so the token is cancelled even when the training loop never
/// yields to its runtime: a loop on a current-thread runtime, or ranks that
/// each run one on a thread. Call it once per process and share the token
/// (it is `Clone` and `Send`); every call installs its own listener.
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
/// [`Error::Signals`] when the listener's thread or runtime cannot be
/// started or the handlers cannot be installed.
pub fn cancel_on_signals() -> Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let cancel = token.clone();
    let (ready, installed) = std::sync::mpsc::channel::<Result<()>>();
    let failed = |detail: String| Error::Signals { detail };
    std::thread::Builder::new()
        .name("modelio-signals".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready.send(Err(Error::Signals { detail: e.to_string() }));
                    return;
                }
            };
            runtime.block_on(async move {
                let handlers = signal(SignalKind::interrupt()).and_then(|int| Ok((int, signal(SignalKind::terminate())?)));
                let (mut int, mut term) = match handlers {
                    Ok(h) => h,
                    Err(e) => {
                        let _ = ready.send(Err(Error::Signals { detail: e.to_string() }));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
                eprintln!("\nstopping: finishing the iteration, then the exit save (press Ctrl-C again to abort)");
                tracing::warn!(target: "modelio", "stop requested by a signal: exit save, then drain");
                cancel.cancel();
                tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
                eprintln!("aborted: committed files are intact; the exit save in progress is lost");
                std::process::exit(130);
            });
        })
        .map_err(|e| failed(e.to_string()))?;
    installed.recv().map_err(|e| failed(e.to_string()))??;
    Ok(token)
}

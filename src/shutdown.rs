//! Turning SIGINT / SIGTERM into one cancellation that every task listens to.

use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGINT or SIGTERM (or when the token is cancelled otherwise).
pub async fn cancel_on_signal(token: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = token.cancelled() => return,
            }
            token.cancel();
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = token.cancelled() => return,
    }
    token.cancel();
}

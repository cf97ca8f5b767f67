//! What every request handler shares: configuration, store, Lightning node, engine.

use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::Engine;
use crate::lightning::Lightning;
use crate::session::Live;
use crate::store::Store;

pub struct App {
    pub config: Config,
    pub store: Store,
    pub lightning: Arc<Lightning>,
    pub engine: Engine,
    /// Live Generate sessions (bounded by `limits.max_sessions`).
    pub live: Live,
    /// Running sessions a dropped client can `Resume`.
    pub resumable: crate::session::Resumable,
    /// Cancelled when the server shuts down: sessions halt and fail back what they hold.
    pub shutdown: CancellationToken,
    pub metrics: crate::metrics::Metrics,
    /// Recent payment latencies on this node: a new session's first lookahead.
    pub payment_latency: Arc<crate::session::pace::Recent>,
}

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
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Recent payment latencies on this node: a new session's first lookahead.
    pub payment_latency: Arc<crate::session::pace::Recent>,
    /// How clients are told apart (address prefixes, trusted proxies).
    pub clients: crate::net::ClientKeys,
    /// Unpaid TopUp invoices per client.
    pub topups: crate::topups::OpenTopUps,
}

impl App {
    /// Who sent `r`, as the per-client caps count it: the peer's address prefix (from a
    /// trusted proxy, the forwarded client's).
    pub fn client_key<T>(&self, r: &tonic::Request<T>) -> Option<std::net::IpAddr> {
        let peer = r.remote_addr()?.ip();
        let forwarded = r
            .metadata()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        Some(self.clients.key(self.clients.client(peer, forwarded)))
    }
}

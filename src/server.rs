//! Starting and stopping the whole server: store → Lightning node → event loop → gRPC.
//! Stopping runs the same steps backwards so nothing is half-written: gRPC stops taking
//! requests, the event loop finishes its current event (commit, then ack), the node stops,
//! the store checkpoints its WAL.

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::Config;
use crate::engine::Engine;
use crate::grpc::admin::AdminService;
use crate::grpc::auth::{load_or_create_token, AdminAuth};
use crate::grpc::inference::InferenceService;
use crate::grpc::proto::{admin_server::AdminServer, inference_server::InferenceServer};
use crate::lightning::{events, Lightning, LightningError};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("store {path}: {source}")]
    Store { path: String, source: StoreError },
    #[error("admin token file {path}: {source}")]
    Token {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Lightning(#[from] LightningError),
    #[error("cannot listen for gRPC on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot listen for HTTP on {addr}: {source}")]
    BindHttp {
        addr: String,
        source: std::io::Error,
    },
    #[error("L402 key: {0}")]
    L402(std::io::Error),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error("reflection: {0}")]
    Reflection(String),
    #[error(transparent)]
    Exposed(#[from] crate::files::ExposedSecret),
    #[error("data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("config: {0}")]
    Config(String),
}

pub struct RunningServer {
    pub app: Arc<App>,
    /// Where gRPC actually listens (the config may say port 0).
    pub grpc_addr: SocketAddr,
    pub admin_token: String,
    /// The certificate clients should trust, when TLS is on.
    pub tls: Option<crate::tls::ServerTls>,
    /// Where Prometheus metrics are served, when on.
    pub metrics_addr: Option<SocketAddr>,
    /// Where the HTTP face listens, when on.
    pub http_addr: Option<SocketAddr>,
    http: Option<JoinHandle<()>>,
    shutdown: CancellationToken,
    events_stop: CancellationToken,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    events: JoinHandle<()>,
    watchdog: JoinHandle<()>,
}

/// Starts everything; returns once gRPC is accepting connections.
pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
    lock_down(&config)?;
    let store_path = config.store_path();
    let store = Store::open(&store_path).map_err(|source| ServerError::Store {
        path: store_path.display().to_string(),
        source,
    })?;
    for f in ["", "-wal", "-shm"] {
        let p = std::path::PathBuf::from(format!("{}{f}", store_path.display()));
        crate::files::make_private(&p).map_err(|source| ServerError::DataDir {
            path: p.display().to_string(),
            source,
        })?;
    }
    let token_path = config.admin_token_path();
    let admin_token = load_or_create_token(&token_path).map_err(|source| ServerError::Token {
        path: token_path.display().to_string(),
        source,
    })?;
    store.record_start().map_err(|source| ServerError::Store {
        path: store_path.display().to_string(),
        source,
    })?;
    let faults = Arc::new(crate::fault::Faults::from_env());
    let lightning = {
        let (config, store) = (config.clone(), store.clone());
        // ldk-node's start blocks (chain sync, block_on): keep it off the async workers.
        tokio::task::spawn_blocking(move || Lightning::start(&config, store, faults))
            .await
            .expect("Lightning start panicked")?
    };
    tracing::info!(node_id = %lightning.node_id(), "Lightning node started");
    // ldk-node creates its files with the process umask: make the seed and its store private.
    let ldk = config.ldk_dir();
    let seed = if config.lightning.seed_file.as_os_str().is_empty() {
        ldk.join("keys_seed")
    } else {
        config.lightning.seed_file.clone()
    };
    let private = crate::files::private_dir(&ldk)
        .and_then(|_| crate::files::make_private(&seed))
        .and_then(|_| {
            crate::files::make_private(&ldk.join(ldk_node::io::sqlite_store::SQLITE_DB_FILE_NAME))
        });
    if let Err(source) = private {
        lightning.stop();
        return Err(ServerError::DataDir {
            path: ldk.display().to_string(),
            source,
        });
    }

    let engine = match Engine::load(&config.models).await {
        Ok(e) => e,
        Err(e) => {
            let ln = lightning.clone();
            let _ = tokio::task::spawn_blocking(move || ln.stop()).await;
            return Err(e.into());
        }
    };

    let shutdown = CancellationToken::new();
    // Sessions stop first (they fail back what they hold), then the event loop.
    let sessions_stop = shutdown.child_token();
    let events_stop = CancellationToken::new();
    let retry = events::Retry {
        max_attempts: config.payments.event_max_attempts,
        ..Default::default()
    };
    let events = tokio::spawn(events::run(lightning.clone(), events_stop.clone(), retry));
    let watchdog = tokio::spawn(watchdog(
        lightning.clone(),
        events_stop.clone(),
        std::time::Duration::from_secs(config.payments.claim_confirm_timeout_secs),
    ));

    let app = Arc::new(App {
        config: config.clone(),
        store,
        lightning,
        engine,
        live: Default::default(),
        resumable: Default::default(),
        shutdown: sessions_stop,
        metrics: Default::default(),
        payment_latency: Default::default(),
        clients: crate::net::ClientKeys::from_config(&config)
            .map_err(|e| ServerError::Config(e.to_string()))?,
        topups: Default::default(),
    });

    let metrics_addr = match config.server.metrics_listen.as_str() {
        "" => None,
        a => Some(
            crate::metrics::prometheus::install(a)
                .map_err(|e| ServerError::Metrics(e.to_string()))?,
        ),
    };
    let http_tls = config.http_addr().is_some_and(|a| config.tls_on(a));
    let tls = if config.plaintext() && !http_tls {
        None
    } else {
        let t = crate::tls::load_or_create(&config).map_err(|e| ServerError::Tls(e.to_string()))?;
        tracing::info!(fingerprint = %t.fingerprint, trust = %t.trust_path.display(), "TLS on: clients trust this certificate");
        Some(t)
    };
    // Admin is never served in plaintext off loopback (its bearer token would cross the
    // network in the clear).
    let serve_admin = !config.plaintext() || config.grpc_addr().ip().is_loopback();
    if !serve_admin {
        tracing::warn!("plaintext on a public address: the Admin service is not served");
    }

    let listener = tokio::net::TcpListener::bind(&config.server.grpc_listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.server.grpc_listen.clone(),
            source,
        })?;
    let grpc_addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: config.server.grpc_listen.clone(),
        source,
    })?;

    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<InferenceServer<InferenceService>>()
        .await;
    health.set_serving::<AdminServer<AdminService>>().await;
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(crate::grpc::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    // grpcurl 1.8 speaks only v1alpha reflection.
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;

    let auth = AdminAuth::new(admin_token.clone());
    let admin = serve_admin.then(|| {
        AdminServer::with_interceptor(AdminService::new(app.clone()), move |r| auth.check(r))
    });
    let inference = InferenceServer::new(InferenceService::new(app.clone()));

    let sv = &config.server;
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(
            sv.http2_keepalive_secs,
        )))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .max_concurrent_streams(Some(sv.max_streams_per_connection))
        .timeout(std::time::Duration::from_secs(sv.request_timeout_secs))
        .tcp_nodelay(true);
    // TLS is ours, not tonic's: the front door (crate::net) bounds the handshake's time and
    // the connections each client holds.
    let acceptor = match &tls {
        Some(t) if !config.plaintext() => {
            Some(crate::net::acceptor(t, &[b"h2"]).map_err(ServerError::Tls)?)
        }
        _ => None,
    };
    let keys = app.clients.clone();
    let caps = crate::net::Caps {
        max_connections: sv.max_connections,
        max_per_client: sv.max_connections_per_client,
        handshake: std::time::Duration::from_secs(sv.handshake_timeout_secs),
    };
    let incoming = crate::net::incoming(listener, acceptor, caps, keys, shutdown.clone());
    let stop = shutdown.clone();
    let grpc = tokio::spawn(
        builder
            .add_service(health_svc)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(inference)
            .add_optional_service(admin)
            .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }),
    );
    tracing::info!(%grpc_addr, tls = !config.plaintext(), "gRPC serving");
    let (http_addr, http) = match config.http_addr() {
        None => (None, None),
        Some(a) => {
            let bind = |source| ServerError::BindHttp {
                addr: config.server.http_listen.clone(),
                source,
            };
            let listener = tokio::net::TcpListener::bind(a).await.map_err(bind)?;
            let acceptor = match &tls {
                Some(t) if config.tls_on(a) => {
                    Some(crate::net::acceptor(t, &[b"h2", b"http/1.1"]).map_err(ServerError::Tls)?)
                }
                _ => None,
            };
            let l402 = crate::http::l402::L402::load_or_create(&config.server.data_dir)
                .map_err(ServerError::L402)?;
            let http = Arc::new(crate::http::Http {
                app: app.clone(),
                l402,
            });
            let (local, task) =
                crate::http::serve(http, listener, acceptor, caps, shutdown.clone())
                    .map_err(bind)?;
            tracing::info!(http_addr = %local, tls = config.tls_on(a), "HTTP serving");
            (Some(local), Some(task))
        }
    };
    if metrics_addr.is_some() {
        tokio::spawn(refresh_gauges(app.clone(), events_stop.clone()));
    }
    Ok(RunningServer {
        app,
        grpc_addr,
        admin_token,
        tls: if config.plaintext() { None } else { tls },
        metrics_addr,
        http_addr,
        http,
        shutdown,
        events_stop,
        grpc,
        events,
        watchdog,
    })
}

/// Keeps the exported gauges (invoices by state, liquidity, queue...) current. The live
/// figures every 2 s; the ones that scan history (invoices by state, refundable money) every
/// 10 s, through the store's read-only connection (they never hold up a money commit). The
/// channel monitors' size is the watchdog's (it reads them each round to compact them).
async fn refresh_gauges(app: Arc<App>, stop: CancellationToken) {
    const SCAN_EVERY: u32 = 5;
    let mut scanned: Option<(Vec<(&'static str, u64)>, u64)> = None;
    for tick in 0u32.. {
        let a = app.clone();
        let scan = tick % SCAN_EVERY == 0 || scanned.is_none();
        let previous = scanned.clone();
        let r = tokio::task::spawn_blocking(move || {
            let scanned = match previous {
                Some(p) if !scan => p,
                _ => (
                    a.store
                        .invoice_counts()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(s, n)| (s.as_str(), n))
                        .collect(),
                    a.store.total_refundable_msat().unwrap_or(0),
                ),
            };
            let (mut queued, mut running) = (0, 0);
            for m in a.engine.models() {
                if let Some(s) = a.engine.stats(&m.id) {
                    queued += s.queued;
                    running += s.running;
                }
            }
            crate::metrics::set_gauges(&crate::metrics::Gauges {
                invoices_by_state: scanned.0.clone(),
                inbound_liquidity_msat: a.lightning.inbound_liquidity_msat(),
                refundable_msat: scanned.1,
                live_sessions: a.live.count(),
                engine_queue_depth: queued,
                engine_running: running,
            });
            scanned
        })
        .await;
        if let Ok(s) = r {
            scanned = Some(s);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
        }
    }
}

/// The data dir is private (0700), and no secret that exists is readable by others: the
/// server refuses to start, saying what to chmod.
fn lock_down(config: &Config) -> Result<(), ServerError> {
    let dir = &config.server.data_dir;
    crate::files::private_dir(dir).map_err(|source| ServerError::DataDir {
        path: dir.display().to_string(),
        source,
    })?;
    crate::files::check_private(&config.admin_token_path(), "the admin token")?;
    let seed = if config.lightning.seed_file.as_os_str().is_empty() {
        config.ldk_dir().join("keys_seed")
    } else {
        config.lightning.seed_file.clone()
    };
    crate::files::check_private(&seed, "the Lightning node's seed")?;
    crate::files::check_private(
        &crate::http::l402::key_path(&config.server.data_dir),
        "the L402 root key",
    )?;
    if !config.server.tls_key_file.as_os_str().is_empty() {
        crate::files::check_private(&config.server.tls_key_file, "the TLS key")?;
    }
    Ok(())
}

/// Periodic reconciliation with LDK: decided claims LDK never completed, refunds whose outcome
/// LDK recorded but never reported (or never had), parked keysends, expired invoices,
/// force-closed channels whose claims can now be classified, the node's records of payments
/// final for the retention window (removed, so its memory stays bounded) and channel monitors
/// grown past their limit (spliced, so they drop their history).
async fn watchdog(
    ln: Arc<Lightning>,
    stop: CancellationToken,
    confirm_timeout: std::time::Duration,
) {
    let every = (confirm_timeout / 4).clamp(
        std::time::Duration::from_millis(500),
        std::time::Duration::from_secs(5),
    );
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let ln = ln.clone();
        let r = tokio::task::spawn_blocking(move || {
            // Each on its own: one that fails (a busy store, a bad record) must not stop the
            // others from running.
            type Step = fn(&Lightning) -> Result<usize, LightningError>;
            let steps: [(&str, Step); 7] = [
                ("claims", Lightning::confirm_claims),
                ("refunds", Lightning::confirm_refunds),
                ("parked keysends", Lightning::book_parked_keysends),
                ("expired invoices", Lightning::sweep_expired),
                ("closures", Lightning::resolve_closures),
                ("payment records pruned", Lightning::prune_payments),
                ("channel monitors compacted", Lightning::compact_monitors),
            ];
            for (what, step) in steps {
                match step(&ln) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(what, resolved = n, "reconciled with LDK"),
                    Err(e) => tracing::warn!(what, error = %e, "reconciling with LDK"),
                }
            }
        })
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "reconciliation task failed");
        }
    }
}

impl RunningServer {
    /// Token that stops the server when cancelled (wire it to signals).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Resolves when shutdown has been requested.
    pub async fn cancelled(&self) {
        self.shutdown.cancelled().await
    }

    /// Stops in order, within `server.shutdown_timeout_secs` whatever clients do: sessions
    /// halt (failing back what they hold), gRPC stops, the event loop finishes its event.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let limit = std::time::Duration::from_secs(self.app.config.server.shutdown_timeout_secs);
        let deadline = tokio::time::Instant::now() + limit;
        let grpc_abort = self.grpc.abort_handle();
        match tokio::time::timeout_at(deadline, self.grpc).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server ended with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "gRPC task failed"),
            Ok(Ok(Ok(()))) => {}
            Err(_) => {
                tracing::warn!(
                    ?limit,
                    "streams still open at the shutdown deadline: closing them"
                );
                grpc_abort.abort();
            }
        }
        if let Some(http) = self.http {
            let abort = http.abort_handle();
            if tokio::time::timeout_at(deadline, http).await.is_err() {
                abort.abort();
            }
        }
        // Let halting sessions commit and fail back their HTLCs before the loop stops. A
        // session ends within its send timeout; the deadline bounds it anyway.
        let ended = self.app.live.wait_empty();
        let at_least = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        if tokio::time::timeout_at(deadline.max(at_least), ended)
            .await
            .is_err()
        {
            tracing::warn!(
                live = self.app.live.count(),
                "sessions still live at the shutdown deadline"
            );
        }
        self.events_stop.cancel();
        let _ = self.events.await;
        let _ = self.watchdog.await;
        let app = self.app.clone();
        let _ = tokio::task::spawn_blocking(move || app.lightning.stop()).await;
        if let Err(e) = self.app.store.checkpoint() {
            tracing::warn!(error = %e, "WAL checkpoint at shutdown");
        }
        tracing::info!("stopped");
    }
}

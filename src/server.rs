//! Starting and stopping the whole server: store → Lightning node → event loop → gRPC.
//! Stopping runs the same steps backwards so nothing is half-written: gRPC stops taking
//! requests, the event loop finishes its current event (commit, then ack), the node stops,
//! the store checkpoints its WAL.

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
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
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error("reflection: {0}")]
    Reflection(String),
}

pub struct RunningServer {
    pub app: Arc<App>,
    /// Where gRPC actually listens (the config may say port 0).
    pub grpc_addr: SocketAddr,
    pub admin_token: String,
    shutdown: CancellationToken,
    events_stop: CancellationToken,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    events: JoinHandle<()>,
}

/// Starts everything; returns once gRPC is accepting connections.
pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
    let store_path = config.store_path();
    let store = Store::open(&store_path).map_err(|source| ServerError::Store {
        path: store_path.display().to_string(),
        source,
    })?;
    let token_path = config.admin_token_path();
    let admin_token = load_or_create_token(&token_path).map_err(|source| ServerError::Token {
        path: token_path.display().to_string(),
        source,
    })?;
    let lightning = {
        let (config, store) = (config.clone(), store.clone());
        // ldk-node's start blocks (chain sync, block_on): keep it off the async workers.
        tokio::task::spawn_blocking(move || Lightning::start(&config, store))
            .await
            .expect("Lightning start panicked")?
    };
    tracing::info!(node_id = %lightning.node_id(), "Lightning node started");

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
    let events = tokio::spawn(events::run(lightning.clone(), events_stop.clone()));

    let app = Arc::new(App {
        config: config.clone(),
        store,
        lightning,
        engine,
        live: Default::default(),
        shutdown: sessions_stop,
        metrics: Default::default(),
    });

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
    let admin =
        AdminServer::with_interceptor(AdminService::new(app.clone()), move |r| auth.check(r));
    let inference = InferenceServer::new(InferenceService::new(app.clone()));

    let stop = shutdown.clone();
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_svc)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(inference)
            .add_service(admin)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                stop.cancelled().await
            }),
    );
    tracing::info!(%grpc_addr, "gRPC serving");
    Ok(RunningServer {
        app,
        grpc_addr,
        admin_token,
        shutdown,
        events_stop,
        grpc,
        events,
    })
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

    pub async fn stop(self) {
        self.shutdown.cancel();
        match self.grpc.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server ended with an error"),
            Err(e) => tracing::warn!(error = %e, "gRPC task failed"),
            Ok(Ok(())) => {}
        }
        // Let halting sessions commit and fail back their HTLCs before the loop stops.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.app.live.count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.events_stop.cancel();
        let _ = self.events.await;
        let app = self.app.clone();
        let _ = tokio::task::spawn_blocking(move || app.lightning.stop()).await;
        if let Err(e) = self.app.store.checkpoint() {
            tracing::warn!(error = %e, "WAL checkpoint at shutdown");
        }
        tracing::info!("stopped");
    }
}

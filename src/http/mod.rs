//! The HTTP face: OpenAI-compatible endpoints and L402, for the clients people already have.
//!
//! It is another front door to the same house, never a second money path: requests are
//! validated by the gRPC handlers' own checks (`grpc::inference::request`), sessions are
//! opened with [`crate::session::open`] in mode PREPAID and metered by the same meter, and
//! top-ups and refunds are the gRPC handlers' (`top_up::issue`, `refund::pay`). What is here
//! is only translation: OpenAI's request and response shapes, SSE, and who the caller is.
//!
//! - [`completions`]: `POST /v1/chat/completions` and `/v1/completions`, streamed or not.
//! - [`account`]: `GET /v1/account`, top-up, refund, `GET /v1/receipts/{session_id}`.
//! - [`models`]: `GET /v1/models`, with our prices.
//! - [`l402`]: the macaroon, the challenge and the credential (bLIP-26).
//! - [`error`]: OpenAI's error JSON and the status each refusal gets.
//! - [`page`]: the chat page at `/` (assets compiled in, strict CSP) and `/qr.svg`; a client of
//!   the endpoints above, like any other.
//!
//! Credentials: `Authorization: Bearer <account token>` (the token TopUp returns is the API
//! key), or `Authorization: L402 <macaroon>:<preimage>`, which speaks for the account its
//! invoice topped up. A request that cannot pay its first chunk gets a `402` whose L402
//! challenge tops up that account (or a new one).
//!
//! The listener is the gRPC one's front door ([`crate::net`]): the same connection caps,
//! handshake deadline and certificate; ALPN offers h2 and http/1.1.

pub mod account;
pub mod completions;
pub mod error;
pub mod l402;
pub mod models;
pub mod page;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Router;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::store::{Account, InvoicePurpose, InvoiceState};
pub use error::ApiError;
use l402::{Credential, L402};

/// Longest an L402 credential waits for its top-up to be booked (the payer holds the preimage
/// as soon as LDK claims; the credit is committed when LDK reports the claim).
const TOPUP_SETTLE_WAIT: Duration = Duration::from_secs(10);

/// What every HTTP handler shares.
pub struct Http {
    pub app: Arc<App>,
    pub l402: L402,
}

pub type State = axum::extract::State<Arc<Http>>;

/// The caller's address, as the per-client caps count it.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

impl Connected<axum::serve::IncomingStream<'_, Incoming>> for Peer {
    fn connect_info(s: axum::serve::IncomingStream<'_, Incoming>) -> Self {
        Peer(*s.remote_addr())
    }
}

impl Http {
    /// The client key of a request from `peer` (a trusted proxy's `x-forwarded-for` believed).
    pub fn client(&self, peer: Peer, headers: &HeaderMap) -> Option<IpAddr> {
        let fwd = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
        let c = &self.app.clients;
        Some(c.key(c.client(peer.0.ip(), fwd)))
    }

    /// The account the request's credentials speak for; None without credentials.
    pub async fn caller(&self, headers: &HeaderMap) -> Result<Option<Account>, ApiError> {
        let h = headers
            .get(axum::http::header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or("\u{0}"));
        match l402::credential(h) {
            Credential::None => Ok(None),
            Credential::Malformed(m) => Err(ApiError::unauthorized(m)),
            Credential::Bearer(t) => crate::grpc::inference::owner::account(&self.app, &t)
                .await
                .map(Some)
                .map_err(|s| {
                    ApiError::unauthorized(match s.code() {
                        tonic::Code::InvalidArgument => {
                            "the API key is not an account token: a token is 64 hex digits, \
                                 as TopUp (or POST /v1/account/topup) issued it"
                        }
                        _ => "no account has this API key",
                    })
                }),
            Credential::L402 { macaroon, preimage } => {
                let hash = self
                    .l402
                    .verify(&macaroon, &preimage, crate::store::now_unix())
                    .map_err(|e| ApiError::unauthorized(format!("L402: {e}")))?;
                self.l402_account(hash).await.map(Some)
            }
        }
    }

    /// The account topped up by the invoice `hash`, once its credit is booked.
    async fn l402_account(&self, hash: [u8; 32]) -> Result<Account, ApiError> {
        let app = &self.app;
        // Listen before reading: the credit may be booked in between.
        let mut notices = app.lightning.subscribe();
        let deadline = tokio::time::Instant::now() + TOPUP_SETTLE_WAIT;
        loop {
            let store = app.store.clone();
            let inv = tokio::task::spawn_blocking(move || store.invoice(&hash))
                .await
                .map_err(|e| ApiError::from(tonic::Status::internal(e.to_string())))?
                .map_err(|e| ApiError::from(tonic::Status::from(e)))?;
            let inv = match inv {
                Some(i) if i.purpose == InvoicePurpose::TopUp && i.account_id.is_some() => i,
                _ => {
                    return Err(ApiError::unauthorized(
                        "L402: no top-up has this macaroon's invoice",
                    ))
                }
            };
            match inv.state {
                InvoiceState::Claimed => {
                    let id = inv.account_id.expect("checked");
                    let store = app.store.clone();
                    return tokio::task::spawn_blocking(move || store.account(&id))
                        .await
                        .map_err(|e| ApiError::from(tonic::Status::internal(e.to_string())))?
                        .map_err(|e| ApiError::from(tonic::Status::from(e)))?
                        .ok_or_else(|| ApiError::unauthorized("L402: the account is gone"));
                }
                InvoiceState::Held | InvoiceState::Claiming => {}
                s => {
                    return Err(ApiError::unauthorized(format!(
                        "L402: the macaroon's invoice is {s}, not paid"
                    )))
                }
            }
            // Claimed by LDK (the payer has the preimage) but not booked yet: wait for it.
            match tokio::time::timeout_at(deadline, notices.recv()).await {
                Err(_) => {
                    return Err(ApiError::new(
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "L402: the top-up is being settled; retry in a few seconds",
                    ))
                }
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                    return Err(ApiError::new(
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "the server is stopping",
                    ))
                }
                Ok(_) => {}
            }
        }
    }

    /// A `402` whose L402 challenge tops up `account` (None: a new account) by the configured
    /// amount, and at least `first_msat` (the request's first payment).
    pub async fn challenge(
        &self,
        account: Option<&Account>,
        first_msat: u64,
        client: Option<IpAddr>,
        why: String,
    ) -> ApiError {
        let p = &self.app.config.payments;
        let amount = p.l402_topup_msat.max(first_msat).max(p.topup_min_msat);
        if amount > p.topup_max_msat {
            return ApiError::bad(
                "max_tokens",
                format!(
                    "the first payment of this request ({first_msat} msat) is more than one top-up \
                     may be ({} msat): ask for fewer tokens or a shorter prompt",
                    p.topup_max_msat
                ),
            );
        }
        let issued = match crate::grpc::inference::top_up::issue(
            &self.app,
            amount,
            client,
            account.map(|a| a.id),
        )
        .await
        {
            Ok(i) => i,
            Err(s) => return ApiError::from(s),
        };
        let inv = issued.invoice;
        let valid_until = crate::store::now_unix() + p.l402_valid_secs;
        let macaroon = self.l402.mint(&inv.payment_hash, valid_until);
        ApiError {
            challenge: Some(Box::new(error::Challenge {
                macaroon,
                invoice: inv.bolt11,
                payment_hash: hex::encode(inv.payment_hash),
                amount_msat: inv.amount_msat,
                expires_at_unix: inv.expires_at_unix,
            })),
            ..ApiError::new(
                axum::http::StatusCode::PAYMENT_REQUIRED,
                format!(
                    "{why}: pay the invoice in WWW-Authenticate (L402) and retry with \
                     `Authorization: L402 <macaroon>:<preimage>`; it tops up the account by {} msat",
                    inv.amount_msat
                ),
            )
        }
    }
}

/// The routes.
pub fn router(http: Arc<Http>) -> Router {
    Router::new()
        .route("/", get(page::index))
        .route("/app.js", get(page::app_js))
        .route("/app.css", get(page::app_css))
        .route("/icon.svg", get(page::icon))
        .route("/qr.svg", get(page::qr))
        .route("/v1/models", get(models::list))
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/completions", post(completions::text))
        .route("/v1/account", get(account::get))
        .route("/v1/account/topup", post(account::topup))
        .route("/v1/account/refund", post(account::refund))
        .route("/v1/receipts/{session_id}", get(account::receipt))
        .fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "no such endpoint: this server serves its chat page at /, and /v1/models, \
                 /v1/chat/completions, /v1/completions, /v1/account[/topup|/refund] and \
                 /v1/receipts/{session_id}",
            )
        })
        .with_state(http)
}

/// The front door's connections as an axum listener.
pub struct Incoming {
    conns: tokio_stream::wrappers::ReceiverStream<std::io::Result<crate::net::Conn>>,
    local: SocketAddr,
}

impl axum::serve::Listener for Incoming {
    type Io = crate::net::Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.conns.next().await {
                Some(Ok(c)) => {
                    let a = c.remote_addr();
                    return (c, a);
                }
                Some(Err(_)) => continue,
                // The front door stopped (shutdown): accept nothing more.
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Serves the HTTP face on `listener` until `stop`.
pub fn serve(
    http: Arc<Http>,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    caps: crate::net::Caps,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let local = listener.local_addr()?;
    let keys = http.app.clients.clone();
    let conns = crate::net::incoming(listener, tls, caps, keys, stop.clone());
    let app = router(http).into_make_service_with_connect_info::<Peer>();
    let task = tokio::spawn(async move {
        let r = axum::serve(Incoming { conns, local }, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "HTTP server ended with an error");
        }
    });
    Ok((local, task))
}

/// Reads a JSON body of at most `limit` bytes. A type error names its field (`max_tokens:
/// invalid type: string "x", expected u32`); unknown fields are ignored, as OpenAI-compatible
/// servers do.
pub async fn read_json<T: serde::de::DeserializeOwned>(
    body: axum::body::Body,
    limit: usize,
) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than this server accepts ({limit} bytes)"),
        )
    })?;
    if bytes.is_empty() {
        return Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "the request body is empty: send a JSON object",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                format!("the request body is not valid JSON: {inner}"),
            )
        } else if matches!(path.as_str(), "." | "?" | "") {
            ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                format!("the request body is not the JSON object expected: {inner}"),
            )
        } else {
            ApiError::bad(&path, inner)
        }
    })
}

/// A receipt as JSON (the proto's fields, same names).
pub fn receipt_json(r: &crate::wire::proto::Receipt) -> serde_json::Value {
    serde_json::json!({
        "session_id": r.session_id,
        "model": r.model,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "paid_msat": r.paid_msat,
        "refundable_msat": r.refundable_msat,
        "finished_at_unix": r.finished_at_unix,
        "output_sha256": r.output_sha256,
        "prompt_sha256": r.prompt_sha256,
        "node_id": r.node_id,
        "signed_text": r.signed_text,
        "signature": r.signature,
    })
}

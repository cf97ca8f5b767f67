//! Opening a session: what every front door (gRPC's Generate, and any other) calls once it has
//! validated a request. Here are the decisions that open one: can the node receive its first
//! payment, may this client take a slot (and an engine slot, for a free prompt), the session's
//! row and its secret, its pace, and the meter's task. The caller maps [`OpenError`] to its
//! own status codes and reads the stream of events.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::app::App;
use crate::config::ModelConfig;
use crate::engine::{GenerateParams, Prompt};
use crate::pricing::Price;
use crate::session::{Mode, Refused, SessionCaps, SessionSpec};
use crate::store::{Account, NewSession};
use crate::wire::proto::{self, generate_event::Event as Ev, GenerateEvent};

/// Events buffered towards a slow client; beyond, writes wait at most
/// `payments.client_send_timeout_secs` (the engine never waits: it has its own buffer and is
/// paced by payment).
pub const CLIENT_BUFFER: usize = 64;

/// A balance-funded chunk (KEYSEND, PREPAID) is drawn as it is queued for the client: its
/// buffer holds two chunks (their Tokens and Balance events), so that a client that goes away
/// was charged for at most those beyond what its connection took. Invoiced chunks are paid
/// before they are queued; their buffer can be deep.
pub const BALANCE_BUFFER: usize = 4;

/// The buffer towards the client of a session in `mode`.
pub fn client_buffer(mode: Mode) -> usize {
    match mode {
        Mode::Keysend | Mode::Prepaid => BALANCE_BUFFER,
        Mode::Bolt11 | Mode::Atomic => CLIENT_BUFFER,
    }
}

/// The cap on unpaid tokens per session when `payments.max_unpaid_msat` is 0.
const AUTO_UNPAID_TOKENS: u32 = 256;

/// Longest the end of a session waits for LDK to report its last claims.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A validated request for a session.
pub struct Opening {
    pub model: ModelConfig,
    pub mode: Mode,
    /// Raw (0..=4 on the wire), echoed in `Accepted`.
    pub wire_mode: i32,
    /// The prompt, tokenized once.
    pub prompt: Vec<u32>,
    pub price: Price,
    pub max_tokens: u32,
    pub temperature: f64,
    pub top_p: f64,
    pub repetition_penalty: f64,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub window_chunks: u32,
    /// PREPAID: the account drawn on.
    pub account: Option<Account>,
    /// The receipt's commitment to the prompt as priced.
    pub prompt_sha256: [u8; 32],
    /// Who asks (its client key), for the per-client caps.
    pub client: Option<IpAddr>,
    /// A dropped stream may be resumed (gRPC); false: a client that goes away ends the
    /// session at once (HTTP, which has no Resume).
    pub resumable: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "the server can receive {inbound_msat} msat now but the first payment is {first_msat} \
         msat: open a channel to {node}"
    )]
    NoInbound {
        inbound_msat: u64,
        first_msat: u64,
        /// `node_id@address`.
        node: String,
    },
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("internal: {0}")]
    Internal(String),
}

impl From<Refused> for OpenError {
    fn from(r: Refused) -> OpenError {
        OpenError::Refused(match r {
            Refused::Full(n) => format!("{n} sessions are live, the server's limit; retry later"),
            Refused::UnpaidFull(n) => format!(
                "{n} sessions are waiting for their first payment, all this server serves at once \
                 (the other slots are kept for sessions that have paid); retry later"
            ),
            Refused::UnpaidPerClient(n) => format!(
                "this address already has {n} sessions waiting for their first payment: pay (or \
                 end) one of them first"
            ),
        })
    }
}

/// A session that is running: its id, and its events (the first is `Accepted`, carrying the
/// session's token; KEYSEND's second is `SessionOpened`).
pub struct Opened {
    pub session_id: [u8; 16],
    pub events: tokio::sync::mpsc::Receiver<Result<GenerateEvent, tonic::Status>>,
}

/// Opens a session for `o` and starts its meter.
pub async fn open(app: Arc<App>, o: Opening) -> Result<Opened, OpenError> {
    let price = o.price;
    let prompt_tokens = o.prompt.len() as u32;
    let prompt_price = price.prompt(prompt_tokens);
    let first = price.first_payment(prompt_tokens, o.max_tokens);
    if o.mode != Mode::Prepaid {
        let inbound = app.lightning.inbound_liquidity().await;
        if inbound < first {
            return Err(OpenError::NoInbound {
                inbound_msat: inbound,
                first_msat: first,
                node: format!(
                    "{}@{}",
                    app.lightning.node_id(),
                    app.lightning.public_address()
                ),
            });
        }
    }
    // A funded account brings its money with it: such a session may take a slot kept for
    // sessions that have paid.
    let paid = o
        .account
        .as_ref()
        .is_some_and(|a| a.available_msat() >= first);
    let live = app.live.enter(
        &SessionCaps::from_config(&app.config.limits),
        o.client,
        paid,
    )?;
    // A free prompt's prefill starts now: take the engine slot now, so that a full queue is
    // refused here. A priced prompt takes its slot once it is paid.
    let admission = if prompt_price == 0 {
        Some(app.engine.admit(&o.model.id).await?)
    } else {
        None
    };

    let mut session_id = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut session_id);
    let (token, token_hex) = crate::session::secret::new_secret();
    let new = NewSession {
        id: session_id,
        token_hash: crate::session::secret::hash_secret(&token),
        model: o.model.id.clone(),
        mode: o.mode.as_str(),
        prompt_tokens,
        prompt_price_msat: prompt_price,
        msat_per_token: price.msat_per_token,
        chunk_tokens: price.chunk_tokens,
        max_tokens: o.max_tokens,
        account_id: o.account.as_ref().map(|a| a.id),
        prompt_sha256: Some(o.prompt_sha256),
    };
    let store = app.store.clone();
    tokio::task::spawn_blocking(move || store.insert_session(&new))
        .await
        .map_err(|e| OpenError::Internal(e.to_string()))??;

    let p = &app.config.payments;
    let resume_grace_secs = if o.resumable { p.resume_grace_secs } else { 0 };
    let invoiced = matches!(o.mode, Mode::Bolt11 | Mode::Atomic);
    let cap_tokens = match p.max_unpaid_msat {
        0 => AUTO_UNPAID_TOKENS,
        m => (m / price.msat_per_token.max(1)).min(u32::MAX as u64) as u32,
    };
    let pace = crate::session::Pace::new(
        invoiced && p.adaptive_lookahead,
        o.window_chunks,
        price.chunk_tokens,
        cap_tokens,
    )
    .with_node(app.payment_latency.clone());
    let (tx, rx) = tokio::sync::mpsc::channel(client_buffer(o.mode));
    let send = |e: Ev| Ok::<_, tonic::Status>(GenerateEvent { event: Some(e) });
    let accepted = proto::Accepted {
        session_id: hex::encode(session_id),
        session_token: String::new(),
        model: o.model.id.clone(),
        mode: o.wire_mode.max(1),
        prompt_tokens,
        prompt_price_msat: prompt_price,
        chunk_tokens: price.chunk_tokens,
        msat_per_token: price.msat_per_token,
        window_chunks: o.window_chunks,
        payment_timeout_secs: p.payment_timeout_secs as u32,
        node_id: app.lightning.node_id(),
        first_payment_timeout_secs: p.first_payment_timeout_secs as u32,
        max_chunk_tokens: pace.max_chunk_tokens(),
        resume_grace_secs: resume_grace_secs.min(u32::MAX as u64) as u32,
    };
    let _ = tx
        .send(send(Ev::Accepted(proto::Accepted {
            session_token: token_hex,
            ..accepted.clone()
        })))
        .await;
    if o.mode == Mode::Keysend {
        let _ = tx
            .send(send(Ev::SessionOpened(proto::SessionOpened {
                session_id: hex::encode(session_id),
                node_id: app.lightning.node_id(),
                node_address: app.lightning.public_address().to_string(),
                tlv_type: app.lightning.keysend_tlv_type(),
            })))
            .await;
    }
    let spec = SessionSpec {
        session_id,
        mode: o.mode,
        model: o.model.id.clone(),
        price,
        window_chunks: o.window_chunks,
        prompt_tokens,
        prompt_price_msat: prompt_price,
        payment_timeout: Duration::from_secs(p.payment_timeout_secs),
        first_payment_timeout: Duration::from_secs(p.first_payment_timeout_secs),
        send_timeout: Duration::from_secs(p.client_send_timeout_secs),
        settle_timeout: SETTLE_TIMEOUT,
        invoice_expiry_secs: p.invoice_expiry_secs,
        account_id: o.account.map(|a| a.id),
        params: GenerateParams {
            prompt: Prompt::Tokens(o.prompt),
            max_tokens: o.max_tokens,
            temperature: o.temperature,
            top_p: o.top_p,
            repetition_penalty: o.repetition_penalty,
            seed: o.seed,
            stop: o.stop,
            allowance: 0,
        },
        pace,
        resume_grace: Duration::from_secs(resume_grace_secs),
        max_resumes: p.max_resumes,
        max_lifetime: Duration::from_secs(p.max_session_secs),
        first_chunk_tokens: p.first_chunk_tokens,
        accepted,
    };
    let shutdown = app.shutdown.clone();
    tokio::spawn(crate::session::run(
        app.clone(),
        spec,
        admission,
        tx,
        shutdown,
        live,
    ));
    Ok(Opened {
        session_id,
        events: rx,
    })
}

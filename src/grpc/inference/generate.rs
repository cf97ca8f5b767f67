use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::app::App;
use crate::engine::{GenerateParams, Prompt};
use crate::grpc::proto::{self, generate_event::Event as Ev, GenerateEvent, GenerateRequest};
use crate::session::{self, Mode, SessionSpec};
use crate::store::NewSession;

/// Events buffered towards a slow client; beyond, writes wait at most
/// `payments.client_send_timeout_secs` (the engine never waits: it has its own buffer and is
/// paced by payment).
pub(super) const CLIENT_BUFFER: usize = 64;

/// The cap on unpaid tokens per session when `payments.max_unpaid_msat` is 0.
const AUTO_UNPAID_TOKENS: u32 = 256;

/// Longest the end of a session waits for LDK to report its last claims.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn handle(
    app: Arc<App>,
    req: GenerateRequest,
    client: Option<std::net::IpAddr>,
) -> Result<super::EventStream, Status> {
    let c = super::request::check(
        &app,
        &req.model,
        &req.messages,
        &req.prompt,
        req.max_tokens,
        req.mode,
    )
    .await?;
    let sampling = req.sampling.clone().unwrap_or_default();
    let temperature = sampling.temperature.unwrap_or(0.7);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(Status::invalid_argument(
            "sampling.temperature: must be between 0 and 2",
        ));
    }
    let top_p = sampling.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(Status::invalid_argument(
            "sampling.top_p: must be in (0, 1]",
        ));
    }
    if let Some(i) = sampling.stop.iter().position(|s| s.is_empty()) {
        return Err(Status::invalid_argument(format!(
            "sampling.stop[{i}]: must not be empty"
        )));
    }
    let max_window = app.config.payments.window_chunks.max(1);
    let window = match req.window_chunks {
        None => max_window,
        Some(0) => {
            return Err(Status::invalid_argument(
                "window_chunks: must be at least 1",
            ))
        }
        Some(w) if w > max_window => {
            return Err(Status::invalid_argument(format!(
                "window_chunks: at most {max_window} on this server (got {w})"
            )))
        }
        Some(w) => w,
    };
    let price = c.price;
    let prompt_tokens = c.prompt_tokens();
    let prompt_price = price.prompt(prompt_tokens);
    let account = match c.mode {
        Mode::Prepaid => Some(super::owner::account(&app, &req.account_token).await?),
        _ if !req.account_token.is_empty() => {
            return Err(Status::invalid_argument(
                "account_token: only for mode PREPAID",
            ))
        }
        _ => None,
    };
    if c.mode != Mode::Prepaid {
        // Can we receive the first payment at all?
        let first = if prompt_price > 0 {
            prompt_price
        } else {
            price.chunk(price.chunk_tokens.min(req.max_tokens))
        };
        let inbound = app.lightning.inbound_liquidity_msat();
        if inbound < first {
            return Err(Status::failed_precondition(format!(
                "the server can receive {inbound} msat now but the first payment is {first} msat: \
                 open a channel to {}@{}",
                app.lightning.node_id(),
                app.lightning.public_address()
            )));
        }
    }
    let limits = &app.config.limits;
    let live = app
        .live
        .enter(
            limits.max_sessions,
            client,
            limits.max_unpaid_sessions_per_client,
        )
        .map_err(|r| match r {
            crate::session::Refused::Full(n) => Status::resource_exhausted(format!(
                "{n} sessions are live, the server's limit; retry later"
            )),
            crate::session::Refused::UnpaidPerClient(n) => Status::resource_exhausted(format!(
                "this address already has {n} sessions waiting for their first payment: pay \
                 (or end) one of them first"
            )),
        })?;
    // A free prompt's prefill starts now: take the engine slot now, so that a full queue is
    // ResourceExhausted here. A priced prompt takes its slot once it is paid.
    let admission = if prompt_price == 0 {
        Some(app.engine.admit(&c.model.id).await?)
    } else {
        None
    };

    let mut session_id = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut session_id);
    let (token, token_hex) = super::owner::new_secret();
    let new = NewSession {
        id: session_id,
        token_hash: super::owner::hash_secret(&token),
        model: c.model.id.clone(),
        mode: c.mode.as_str(),
        prompt_tokens,
        prompt_price_msat: prompt_price,
        msat_per_token: price.msat_per_token,
        chunk_tokens: price.chunk_tokens,
        max_tokens: req.max_tokens,
        account_id: account.as_ref().map(|a| a.id),
        prompt_sha256: Some(crate::wire::receipt::prompt_sha256(
            &req.messages,
            &req.prompt,
        )),
    };
    let store = app.store.clone();
    tokio::task::spawn_blocking(move || store.insert_session(&new))
        .await
        .map_err(|e| Status::internal(e.to_string()))??;

    let p = &app.config.payments;
    let invoiced = matches!(c.mode, Mode::Bolt11 | Mode::Atomic);
    let cap_tokens = match p.max_unpaid_msat {
        0 => AUTO_UNPAID_TOKENS,
        m => (m / price.msat_per_token.max(1)).min(u32::MAX as u64) as u32,
    };
    let pace = crate::session::Pace::new(
        invoiced && p.adaptive_lookahead,
        window,
        price.chunk_tokens,
        cap_tokens,
    )
    .with_node(app.payment_latency.clone());
    let (tx, rx) = tokio::sync::mpsc::channel(CLIENT_BUFFER);
    let send = |e: Ev| Ok::<_, Status>(GenerateEvent { event: Some(e) });
    let accepted = proto::Accepted {
        session_id: hex::encode(session_id),
        session_token: String::new(),
        model: c.model.id.clone(),
        mode: req.mode.max(1),
        prompt_tokens,
        prompt_price_msat: prompt_price,
        chunk_tokens: price.chunk_tokens,
        msat_per_token: price.msat_per_token,
        window_chunks: window,
        payment_timeout_secs: p.payment_timeout_secs as u32,
        node_id: app.lightning.node_id(),
        first_payment_timeout_secs: p.first_payment_timeout_secs as u32,
        max_chunk_tokens: pace.max_chunk_tokens(),
        resume_grace_secs: p.resume_grace_secs.min(u32::MAX as u64) as u32,
    };
    let _ = tx
        .send(send(Ev::Accepted(proto::Accepted {
            session_token: token_hex,
            ..accepted.clone()
        })))
        .await;
    if c.mode == Mode::Keysend {
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
        mode: c.mode,
        model: c.model.id.clone(),
        price,
        window_chunks: window,
        prompt_tokens,
        prompt_price_msat: prompt_price,
        payment_timeout: Duration::from_secs(p.payment_timeout_secs),
        first_payment_timeout: Duration::from_secs(p.first_payment_timeout_secs),
        send_timeout: Duration::from_secs(p.client_send_timeout_secs),
        settle_timeout: SETTLE_TIMEOUT,
        invoice_expiry_secs: p.invoice_expiry_secs,
        account_id: account.map(|a| a.id),
        params: GenerateParams {
            prompt: Prompt::Tokens(c.prompt),
            max_tokens: req.max_tokens,
            temperature,
            top_p,
            stop: sampling.stop.clone(),
            allowance: 0,
        },
        pace,
        resume_grace: Duration::from_secs(p.resume_grace_secs),
        max_resumes: p.max_resumes,
        max_lifetime: Duration::from_secs(p.max_session_secs),
        accepted,
    };
    let shutdown = app.shutdown.clone();
    tokio::spawn(session::run(
        app.clone(),
        spec,
        admission,
        tx,
        shutdown,
        live,
    ));
    Ok(Box::pin(ReceiverStream::new(rx)))
}

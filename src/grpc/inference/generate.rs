use rand::RngCore;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::app::App;
use crate::engine::GenerateParams;
use crate::grpc::proto::{
    self, generate_event::Event as Ev, GenerateEvent, GenerateRequest, PaymentMode,
};
use crate::pricing::Price;
use crate::session::{self, Mode, SessionSpec};
use crate::store::NewSession;

/// Events buffered towards a slow client; the meter waits beyond this (the engine never does:
/// it has its own buffer and is paced by payment).
const CLIENT_BUFFER: usize = 64;

pub(super) async fn handle(
    app: Arc<App>,
    req: GenerateRequest,
) -> Result<super::EventStream, Status> {
    let model = super::model_config(&app, &req.model)?.clone();
    let prompt = super::prompt_of(&req.messages, &req.prompt)?;
    if req.max_tokens == 0 {
        return Err(Status::invalid_argument("max_tokens: must be at least 1"));
    }
    let mode = match PaymentMode::try_from(req.mode) {
        Ok(PaymentMode::Unspecified | PaymentMode::Bolt11) => Mode::Bolt11,
        Ok(PaymentMode::Atomic) => Mode::Atomic,
        Ok(PaymentMode::Keysend) => Mode::Keysend,
        Ok(PaymentMode::Prepaid) => {
            return Err(Status::unimplemented(
                "mode PREPAID needs TopUp, which this version does not offer; use BOLT11, ATOMIC or KEYSEND",
            ))
        }
        Err(_) => return Err(Status::invalid_argument(format!("mode: unknown value {}", req.mode))),
    };
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
    let price = Price::from_model(&model);
    if price.msat_per_prompt_token > 0 {
        return Err(Status::unimplemented(format!(
            "model {:?} prices prompts; paid prompts are not supported by this version",
            model.id
        )));
    }
    // Can we receive the first chunk's price at all?
    let first = price.chunk(price.chunk_tokens.min(req.max_tokens));
    let inbound = app.lightning.inbound_liquidity_msat();
    if inbound < first {
        return Err(Status::failed_precondition(format!(
            "the server can receive {inbound} msat now but the first chunk costs {first} msat: \
             open a channel to {}@{}",
            app.lightning.node_id(),
            app.lightning.public_address()
        )));
    }
    let live = app
        .live
        .try_enter(app.config.limits.max_sessions)
        .ok_or_else(|| {
            Status::resource_exhausted(format!(
                "{} sessions are live, the server's limit; retry later",
                app.config.limits.max_sessions
            ))
        })?;
    let prompt_tokens = app.engine.count_prompt_tokens(&model.id, &prompt).await?;
    let cap = app.config.limits.max_prompt_tokens;
    if cap > 0 && prompt_tokens > cap {
        return Err(Status::invalid_argument(format!(
            "prompt: {prompt_tokens} tokens, this server accepts at most {cap}"
        )));
    }
    let gen = app
        .engine
        .generate(
            &model.id,
            GenerateParams {
                prompt,
                max_tokens: req.max_tokens,
                temperature,
                top_p,
                stop: sampling.stop.clone(),
                allowance: window * price.chunk_tokens,
            },
        )
        .await?;

    let mut session_id = [0u8; 16];
    let mut token = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut session_id);
    rand::thread_rng().fill_bytes(&mut token);
    app.store.insert_session(&NewSession {
        id: session_id,
        token_hash: Sha256::digest(token).into(),
        model: model.id.clone(),
        mode: mode.as_str(),
        prompt_tokens,
        prompt_price_msat: 0,
        msat_per_token: price.msat_per_token,
        chunk_tokens: price.chunk_tokens,
        max_tokens: req.max_tokens,
    })?;

    let (tx, rx) = tokio::sync::mpsc::channel(CLIENT_BUFFER);
    let send = |e: Ev| Ok::<_, Status>(GenerateEvent { event: Some(e) });
    let _ = tx
        .send(send(Ev::Accepted(proto::Accepted {
            session_id: hex::encode(session_id),
            session_token: hex::encode(token),
            model: model.id.clone(),
            mode: req.mode.max(1),
            prompt_tokens,
            prompt_price_msat: 0,
            chunk_tokens: price.chunk_tokens,
            msat_per_token: price.msat_per_token,
            window_chunks: window,
            payment_timeout_secs: app.config.payments.payment_timeout_secs as u32,
        })))
        .await;
    if mode == Mode::Keysend {
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
        mode,
        price,
        window_chunks: window,
        prompt_tokens,
        payment_timeout: Duration::from_secs(app.config.payments.payment_timeout_secs),
        invoice_expiry_secs: app.config.payments.invoice_expiry_secs,
    };
    let shutdown = app.shutdown.clone();
    tokio::spawn(session::run(app.clone(), spec, gen, tx, shutdown, live));
    Ok(Box::pin(ReceiverStream::new(rx)))
}

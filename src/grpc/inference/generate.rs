//! Generate: validates the request (every field, with a message naming it) and maps what
//! [`session::open`] decides to a status; the session itself is the meter's.

use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::app::App;
use crate::grpc::proto::GenerateRequest;
use crate::session::{self, Mode, OpenError, Opening};

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
    let top_p = sampling.top_p.unwrap_or(1.0);
    let repetition_penalty = sampling.repetition_penalty.unwrap_or(1.0);
    crate::engine::check_sampling(
        c.model.backend,
        temperature,
        top_p,
        repetition_penalty,
        sampling.seed,
    )
    .map_err(|r| Status::invalid_argument(format!("sampling.{}: {}", r.field, r.message)))?;
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
    let account = match c.mode {
        Mode::Prepaid => Some(super::owner::account(&app, &req.account_token).await?),
        _ if !req.account_token.is_empty() => {
            return Err(Status::invalid_argument(
                "account_token: only for mode PREPAID",
            ))
        }
        _ => None,
    };
    let opening = Opening {
        model: c.model,
        mode: c.mode,
        wire_mode: req.mode,
        prompt: c.prompt,
        price: c.price,
        max_tokens: req.max_tokens,
        temperature,
        top_p,
        repetition_penalty,
        seed: sampling.seed,
        stop: sampling.stop,
        window_chunks: window,
        account,
        prompt_sha256: crate::wire::receipt::prompt_sha256(&req.messages, &req.prompt),
        client,
        resumable: true,
    };
    let opened = session::open(app, opening).await.map_err(|e| match e {
        OpenError::NoInbound { .. } => Status::failed_precondition(e.to_string()),
        OpenError::Refused(m) => Status::resource_exhausted(m),
        OpenError::Engine(e) => e.into(),
        OpenError::Store(e) => e.into(),
        OpenError::Internal(m) => Status::internal(m),
    })?;
    Ok(Box::pin(ReceiverStream::new(opened.events)))
}

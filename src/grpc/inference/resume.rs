use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::EventStream;
use crate::app::App;
use crate::grpc::proto::{GenerateEvent, ResumeRequest};
use crate::session::receipt::IssueError;
use crate::session::{Attach, Mode};
use crate::store::SessionState;

/// How long Resume waits for the session's meter to take the new stream.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest Resume waits for an ending session's meter to commit its end.
const END_TIMEOUT: Duration = Duration::from_secs(30);

/// Reattaches the owner's new stream to a running session, or replays an ended one (see the
/// proto for what each sends).
pub(super) async fn handle(app: &Arc<App>, req: ResumeRequest) -> Result<EventStream, Status> {
    let s = super::owner::session(app, &req.session_id, &req.session_token).await?;
    // The client's next chunk not yet shown can be at most the next one to be delivered.
    if req.from_chunk > s.chunks_delivered {
        return Err(Status::invalid_argument(format!(
            "from_chunk: {} is past what the session delivered ({} chunks): give the first chunk \
             you have not shown, 0 to {}",
            req.from_chunk, s.chunks_delivered, s.chunks_delivered
        )));
    }
    if s.state == SessionState::Open {
        // Taken before attaching: the meter may end at any moment.
        let closed = app.resumable.closed(&s.id);
        let mode = Mode::from_name(&s.mode).unwrap_or(Mode::Bolt11);
        let (tx, rx) = tokio::sync::mpsc::channel(crate::session::open::client_buffer(mode));
        let (reply, answer) = tokio::sync::oneshot::channel();
        let a = Attach {
            out: tx,
            from_chunk: req.from_chunk,
            reply,
        };
        if app.resumable.attach(&s.id, a).is_ok() {
            match tokio::time::timeout(ATTACH_TIMEOUT, answer).await {
                Ok(Ok(Ok(()))) => return Ok(Box::pin(ReceiverStream::new(rx))),
                Ok(Ok(Err(status))) => return Err(status),
                // The meter ended before it answered: replay it once its end is committed.
                Ok(Err(_)) => {}
                Err(_) => {
                    return Err(Status::unavailable(
                        "the session did not take the stream in time; retry",
                    ))
                }
            }
        }
        if tokio::time::timeout(END_TIMEOUT, closed).await.is_err() {
            return Err(Status::unavailable(
                "the session is ending and its end is not recorded yet; retry",
            ));
        }
    }
    let (store, ln, sid, from) = (
        app.store.clone(),
        app.lightning.clone(),
        s.id,
        req.from_chunk,
    );
    let events = tokio::task::spawn_blocking(move || {
        crate::session::replay::ended_session(&store, &ln, &sid, from)
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
    .map_err(|e| match e {
        // Its end is not committed yet (a meter that never registered, or a race): retry.
        IssueError::Running(_) => Status::unavailable(format!("{e}; retry")),
        e => super::get_receipt::status(e),
    })?;
    tracing::info!(session = %req.session_id, events = events.len(), "replayed an ended session");
    Ok(Box::pin(tokio_stream::iter(
        events
            .into_iter()
            .map(|e| Ok(GenerateEvent { event: Some(e) })),
    )))
}

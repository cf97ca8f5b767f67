use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::EventStream;
use crate::app::App;
use crate::grpc::proto::ResumeRequest;
use crate::session::Attach;
use crate::store::SessionState;

/// How long Resume waits for the session's meter to take the new stream.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

/// Reattaches the owner's new stream to a running session (see the proto for what it sends).
pub(super) async fn handle(app: &Arc<App>, req: ResumeRequest) -> Result<EventStream, Status> {
    let s = super::owner::session(app, &req.session_id, &req.session_token).await?;
    let ended = |why: Option<&str>| {
        Status::failed_precondition(format!(
            "session {} has ended ({}): it can no longer be resumed; GetReceipt shows what it \
             delivered, Refund returns what is refundable",
            req.session_id,
            why.unwrap_or("ended")
        ))
    };
    if s.state != SessionState::Open {
        return Err(ended(s.end_reason.as_deref()));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(super::generate::CLIENT_BUFFER);
    let (reply, answer) = tokio::sync::oneshot::channel();
    let a = Attach {
        out: tx,
        from_chunk: req.from_chunk,
        reply,
    };
    if app.resumable.attach(&s.id, a).is_err() {
        return Err(ended(Some("its meter stopped")));
    }
    match tokio::time::timeout(ATTACH_TIMEOUT, answer).await {
        Ok(Ok(Ok(()))) => Ok(Box::pin(ReceiverStream::new(rx))),
        Ok(Ok(Err(status))) => Err(status),
        // The meter ended before it answered.
        Ok(Err(_)) => Err(ended(None)),
        Err(_) => Err(Status::unavailable(
            "the session did not take the stream in time; retry",
        )),
    }
}

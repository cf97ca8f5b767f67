use std::sync::Arc;
use tonic::Status;

use crate::app::App;
use crate::grpc::proto::{EndSessionRequest, EndSessionResponse};
use crate::store::SessionState;

/// Ends the owner's running session now (as a disconnect without the grace for Resume).
pub(super) async fn handle(
    app: &Arc<App>,
    req: EndSessionRequest,
) -> Result<EndSessionResponse, Status> {
    let s = super::owner::session(app, &req.session_id, &req.session_token).await?;
    let ended_now = s.state == SessionState::Open && app.resumable.end(&s.id);
    Ok(EndSessionResponse { ended_now })
}

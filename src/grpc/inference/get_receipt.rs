use std::sync::Arc;
use tonic::Status;

use crate::app::App;
use crate::grpc::proto::{GetReceiptRequest, Receipt};
use crate::session::receipt::{self, IssueError};

/// The receipt of an ended session, for its owner. Issued here if the session ended without
/// one (a restart halts open sessions; their receipts come from the store's record).
pub(super) async fn handle(app: &Arc<App>, req: GetReceiptRequest) -> Result<Receipt, Status> {
    let s = super::owner::session(app, &req.session_id, &req.session_token).await?;
    let (store, ln) = (app.store.clone(), app.lightning.clone());
    tokio::task::spawn_blocking(move || receipt::issue(&store, &ln, &s.id))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(status)
}

/// A receipt that cannot be had (yet) as the client's status.
pub(crate) fn status(e: IssueError) -> Status {
    match e {
        IssueError::Running(_) => Status::failed_precondition(e.to_string()),
        IssueError::Settling(_) => Status::unavailable(e.to_string()),
        IssueError::NotFound(_) => Status::not_found(e.to_string()),
        IssueError::Store(e) => e.into(),
        IssueError::Receipt(e) => Status::internal(e.to_string()),
    }
}

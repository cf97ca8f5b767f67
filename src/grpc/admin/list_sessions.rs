use tonic::Status;

use crate::app::App;
use crate::grpc::page_size;
use crate::grpc::proto::{ListSessionsRequest, ListSessionsResponse};
use crate::store::SessionState;

pub(super) fn handle(app: &App, req: ListSessionsRequest) -> Result<ListSessionsResponse, Status> {
    let state = match req.state.as_str() {
        "" => None,
        s => Some(SessionState::parse(s).ok_or_else(|| {
            Status::invalid_argument(format!(
                "state: {s:?} is not one of \"open\", \"finished\", \"halted\""
            ))
        })?),
    };
    let page = app
        .store
        .list_sessions(page_size(req.page_size), &req.page_token, state)?;
    Ok(ListSessionsResponse {
        sessions: page.items.iter().map(super::session_summary).collect(),
        next_page_token: page.next_page_token.unwrap_or_default(),
    })
}

use tonic::Status;

use crate::app::App;
use crate::grpc::page_size;
use crate::grpc::proto::{ListParkedEventsRequest, ListParkedEventsResponse, ParkedEvent};

pub(super) fn handle(
    app: &App,
    req: ListParkedEventsRequest,
) -> Result<ListParkedEventsResponse, Status> {
    let page = app
        .store
        .parked_events(page_size(req.page_size), &req.page_token)?;
    Ok(ListParkedEventsResponse {
        events: page
            .items
            .into_iter()
            .map(|e| ParkedEvent {
                id: e.id,
                at_unix: e.at_unix,
                kind: e.kind,
                payment_hash: e.payment_hash.map(hex::encode).unwrap_or_default(),
                attempts: e.attempts,
                error: e.error,
                event: e.event,
            })
            .collect(),
        next_page_token: page.next_page_token.unwrap_or_default(),
    })
}

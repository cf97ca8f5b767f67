use tonic::Status;

use crate::app::App;
use crate::grpc::page_size;
use crate::grpc::proto::{ChannelClosure, ListLossesRequest, ListLossesResponse, Loss};

pub(super) fn handle(app: &App, req: ListLossesRequest) -> Result<ListLossesResponse, Status> {
    let page = app
        .store
        .settlement_losses(page_size(req.page_size), &req.page_token)?;
    Ok(ListLossesResponse {
        losses: page
            .items
            .into_iter()
            .map(|l| Loss {
                payment_hash: hex::encode(l.payment_hash),
                session_id: l.session_id.map(hex::encode).unwrap_or_default(),
                kind: l.kind,
                channel_id: l.channel_id.map(hex::encode).unwrap_or_default(),
                amount_msat: l.amount_msat,
                delivered: l.delivered,
                reason: l.reason,
                at_unix: l.at_unix,
            })
            .collect(),
        next_page_token: page.next_page_token.unwrap_or_default(),
        total_lost_msat: app.store.total_lost_msat()?,
        closures: app
            .store
            .closures()?
            .into_iter()
            .map(|c| ChannelClosure {
                channel_id: hex::encode(c.channel_id),
                counterparty_node_id: c.counterparty,
                reason: c.reason,
                forced: c.forced,
                closed_at_unix: c.closed_at_unix,
                resolved_at_unix: c.resolved_at_unix.unwrap_or(0),
                detail: c.detail,
            })
            .collect(),
    })
}

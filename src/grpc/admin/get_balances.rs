use tonic::Status;

use crate::app::App;
use crate::grpc::proto::{GetBalancesRequest, GetBalancesResponse};

pub(super) fn handle(app: &App, _req: GetBalancesRequest) -> Result<GetBalancesResponse, Status> {
    let node = app.lightning.node();
    let b = node.list_balances();
    let usable: Vec<_> = node
        .list_channels()
        .into_iter()
        .filter(|c| c.is_usable)
        .collect();
    Ok(GetBalancesResponse {
        onchain_total_sat: b.total_onchain_balance_sats,
        onchain_spendable_sat: b.spendable_onchain_balance_sats,
        lightning_sat: b.total_lightning_balance_sats,
        inbound_capacity_msat: usable.iter().map(|c| c.inbound_capacity_msat).sum(),
        outbound_capacity_msat: usable.iter().map(|c| c.outbound_capacity_msat).sum(),
        refundable_msat: app.store.total_refundable_msat()?,
        refunded_msat: app.store.total_refunded_msat()?,
        lost_msat: app.store.total_lost_msat()?,
    })
}

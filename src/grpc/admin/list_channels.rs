use tonic::Status;

use crate::app::App;
use crate::grpc::proto::{Channel, ListChannelsRequest, ListChannelsResponse};

pub(super) fn handle(app: &App, _req: ListChannelsRequest) -> Result<ListChannelsResponse, Status> {
    let channels = app
        .lightning
        .node()
        .list_channels()
        .into_iter()
        .map(|c| Channel {
            channel_id: c.channel_id.to_string(),
            user_channel_id: format!("{:032x}", c.user_channel_id.0),
            counterparty_node_id: c.counterparty_node_id.to_string(),
            funding_txid: c
                .funding_txo
                .map(|o| o.txid.to_string())
                .unwrap_or_default(),
            channel_value_sat: c.channel_value_sats,
            outbound_capacity_msat: c.outbound_capacity_msat,
            inbound_capacity_msat: c.inbound_capacity_msat,
            confirmations: c.confirmations.unwrap_or(0),
            is_channel_ready: c.is_channel_ready,
            is_usable: c.is_usable,
            is_outbound: c.is_outbound,
            is_announced: c.is_announced,
        })
        .collect();
    Ok(ListChannelsResponse { channels })
}

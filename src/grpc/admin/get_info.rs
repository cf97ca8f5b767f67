use tonic::Status;

use crate::app::App;
use crate::grpc::proto::{GetInfoRequest, GetInfoResponse};

pub(super) fn handle(app: &App, _req: GetInfoRequest) -> Result<GetInfoResponse, Status> {
    let node = app.lightning.node();
    let status = node.status();
    let channels = node.list_channels();
    Ok(GetInfoResponse {
        node_id: node.node_id().to_string(),
        listening_addresses: node
            .listening_addresses()
            .unwrap_or_default()
            .iter()
            .map(|a| a.to_string())
            .collect(),
        network: format!("{:?}", app.config.lightning.network).to_lowercase(),
        best_block_height: status.current_best_block.height,
        best_block_hash: status.current_best_block.block_hash.to_string(),
        latest_wallet_sync_unix: status.latest_onchain_wallet_sync_timestamp.unwrap_or(0),
        latest_lightning_sync_unix: status.latest_lightning_wallet_sync_timestamp.unwrap_or(0),
        num_channels: channels.len() as u32,
        num_usable_channels: channels.iter().filter(|c| c.is_usable).count() as u32,
        num_peers: node.list_peers().iter().filter(|p| p.is_connected).count() as u32,
        version: env!("CARGO_PKG_VERSION").to_string(),
    })
}

use ldk_node::UserChannelId;
use tonic::Status;

use crate::app::App;
use crate::grpc::proto::{CloseChannelRequest, CloseChannelResponse};
use crate::lightning::{parse_node_id, LightningError};

pub(super) fn handle(app: &App, req: CloseChannelRequest) -> Result<CloseChannelResponse, Status> {
    let ucid = u128::from_str_radix(&req.user_channel_id, 16).map_err(|_| {
        Status::invalid_argument("user_channel_id: expected the hex id from ListChannels")
    })?;
    let peer = parse_node_id(&req.counterparty_node_id)?;
    let node = app.lightning.node();
    let ucid = UserChannelId(ucid);
    if !node
        .list_channels()
        .iter()
        .any(|c| c.user_channel_id == ucid && c.counterparty_node_id == peer)
    {
        return Err(Status::not_found(format!(
            "no channel {} with {}; ListChannels shows the ids",
            req.user_channel_id, req.counterparty_node_id
        )));
    }
    if req.force {
        node.force_close_channel(&ucid, peer, None)
    } else {
        node.close_channel(&ucid, peer)
    }
    .map_err(LightningError::from)?;
    Ok(CloseChannelResponse {})
}

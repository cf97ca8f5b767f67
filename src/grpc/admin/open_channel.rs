use tonic::Status;

use crate::app::App;
use crate::grpc::proto::{OpenChannelRequest, OpenChannelResponse};
use crate::lightning::{parse_address, parse_node_id, LightningError};

pub(super) fn handle(app: &App, req: OpenChannelRequest) -> Result<OpenChannelResponse, Status> {
    let id = parse_node_id(&req.node_id)?;
    let addr = parse_address(&req.address)?;
    if req.amount_sat == 0 {
        return Err(Status::invalid_argument("amount_sat: must be > 0"));
    }
    if req.push_msat > req.amount_sat * 1000 {
        return Err(Status::invalid_argument(
            "push_msat: cannot exceed the channel amount",
        ));
    }
    let push = (req.push_msat > 0).then_some(req.push_msat);
    let node = app.lightning.node();
    let ucid = if req.announce {
        node.open_announced_channel(id, addr, req.amount_sat, push, None)
    } else {
        node.open_channel(id, addr, req.amount_sat, push, None)
    }
    .map_err(LightningError::from)?;
    Ok(OpenChannelResponse {
        user_channel_id: format!("{:032x}", ucid.0),
    })
}

use tonic::Status;

use crate::app::App;
use crate::grpc::proto::{ConnectPeerRequest, ConnectPeerResponse};
use crate::lightning::{parse_address, parse_node_id, LightningError};

pub(super) fn handle(app: &App, req: ConnectPeerRequest) -> Result<ConnectPeerResponse, Status> {
    let id = parse_node_id(&req.node_id)?;
    let addr = parse_address(&req.address)?;
    app.lightning
        .node()
        .connect(id, addr, req.persist)
        .map_err(LightningError::from)?;
    Ok(ConnectPeerResponse {})
}

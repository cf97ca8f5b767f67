use tonic::Status;

use crate::app::App;
use crate::grpc::proto::{NewAddressRequest, NewAddressResponse};
use crate::lightning::LightningError;

pub(super) fn handle(app: &App, _req: NewAddressRequest) -> Result<NewAddressResponse, Status> {
    let addr = app
        .lightning
        .node()
        .onchain_payment()
        .new_address()
        .map_err(LightningError::from)?;
    Ok(NewAddressResponse {
        address: addr.to_string(),
    })
}

use std::sync::Arc;
use tonic::Status;

use crate::app::App;
use crate::grpc::proto::{Account, GetAccountRequest};

pub(super) async fn handle(app: &Arc<App>, req: GetAccountRequest) -> Result<Account, Status> {
    let a = super::owner::account(app, &req.account_token).await?;
    Ok(Account {
        credited_msat: a.credited_msat,
        spent_msat: a.spent_msat,
        refunded_msat: a.refunded_msat,
        reserved_msat: a.reserved_msat,
        available_msat: a.available_msat(),
        created_at_unix: a.created_at_unix,
    })
}

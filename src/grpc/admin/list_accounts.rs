use tonic::Status;

use crate::app::App;
use crate::grpc::page_size;
use crate::grpc::proto::{AccountInfo, ListAccountsRequest, ListAccountsResponse};

pub(super) fn handle(app: &App, req: ListAccountsRequest) -> Result<ListAccountsResponse, Status> {
    let page = app
        .store
        .list_accounts(page_size(req.page_size), &req.page_token)?;
    let totals = app.store.account_totals()?;
    Ok(ListAccountsResponse {
        accounts: page
            .items
            .iter()
            .map(|a| AccountInfo {
                account_id: hex::encode(a.id),
                credited_msat: a.credited_msat,
                spent_msat: a.spent_msat,
                refunded_msat: a.refunded_msat,
                reserved_msat: a.reserved_msat,
                available_msat: a.available_msat(),
                created_at_unix: a.created_at_unix,
            })
            .collect(),
        next_page_token: page.next_page_token.unwrap_or_default(),
        total_accounts: totals.accounts,
        total_available_msat: totals.available_msat,
    })
}

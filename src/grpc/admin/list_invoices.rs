use tonic::Status;

use crate::app::App;
use crate::grpc::proto::{ListInvoicesRequest, ListInvoicesResponse};
use crate::grpc::{page_size, parse_hex};
use crate::store::InvoiceState;

pub(super) fn handle(app: &App, req: ListInvoicesRequest) -> Result<ListInvoicesResponse, Status> {
    let state = match req.state.as_str() {
        "" => None,
        s => Some(InvoiceState::parse(s).ok_or_else(|| {
            let all: Vec<_> = InvoiceState::ALL.iter().map(|s| s.as_str()).collect();
            Status::invalid_argument(format!("state: {s:?} is not one of {all:?}"))
        })?),
    };
    let session = match req.session_id.as_str() {
        "" => None,
        s => Some(parse_hex::<16>("session_id", s)?),
    };
    let page = app.store.list_invoices(
        page_size(req.page_size),
        &req.page_token,
        state,
        session.as_ref(),
    )?;
    Ok(ListInvoicesResponse {
        invoices: page.items.iter().map(super::invoice_info).collect(),
        next_page_token: page.next_page_token.unwrap_or_default(),
    })
}

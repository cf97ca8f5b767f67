use ldk_node::lightning_invoice::Bolt11Invoice;
use std::str::FromStr;
use tonic::Status;

use crate::app::App;
use crate::grpc::proto::{PayInvoiceRequest, PayInvoiceResponse};
use crate::lightning::LightningError;

pub(super) fn handle(app: &App, req: PayInvoiceRequest) -> Result<PayInvoiceResponse, Status> {
    let inv = Bolt11Invoice::from_str(req.bolt11.trim())
        .map_err(|e| Status::invalid_argument(format!("bolt11: not a valid invoice ({e})")))?;
    let pay = app.lightning.node().bolt11_payment();
    let id = match (inv.amount_milli_satoshis(), req.amount_msat) {
        (Some(_), 0) => pay.send(&inv, None),
        (Some(a), n) if a == n => pay.send(&inv, None),
        (Some(a), n) => {
            return Err(Status::invalid_argument(format!(
                "amount_msat: the invoice is for {a} msat; leave amount_msat 0 or equal (got {n})"
            )))
        }
        (None, 0) => {
            return Err(Status::invalid_argument(
                "amount_msat: required, the invoice has no amount",
            ))
        }
        (None, n) => pay.send_using_amount(&inv, n, None),
    }
    .map_err(LightningError::from)?;
    Ok(PayInvoiceResponse {
        payment_hash: hex::encode(id.0),
    })
}

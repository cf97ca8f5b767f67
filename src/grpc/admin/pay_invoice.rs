use ldk_node::lightning_invoice::Bolt11Invoice;
use std::str::FromStr;
use tonic::Status;

use crate::app::App;
use crate::grpc::parse_hex;
use crate::grpc::proto::{PayInvoiceRequest, PayInvoiceResponse};
use crate::lightning::refunds::RefundError;
use crate::lightning::LightningError;
use crate::store::{Owner, StoreError};

pub(super) fn handle(app: &App, req: PayInvoiceRequest) -> Result<PayInvoiceResponse, Status> {
    let owner = match (req.session_id.trim(), req.account_id.trim()) {
        ("", "") => None,
        (s, "") => Some(Owner::Session(parse_hex("session_id", s)?)),
        ("", a) => Some(Owner::Account(parse_hex("account_id", a)?)),
        _ => {
            return Err(Status::invalid_argument(
                "give session_id or account_id (whose balance is refunded), not both",
            ))
        }
    };
    if let Some(owner) = owner {
        if req.amount_msat != 0 {
            return Err(Status::invalid_argument(
                "amount_msat: not for refunds; the invoice's amount (or, amountless, the whole balance) is refunded",
            ));
        }
        return match app.lightning.pay_refund(owner, &req.bolt11, "admin") {
            Ok(r) => Ok(PayInvoiceResponse {
                payment_hash: hex::encode(r.payment_hash),
                refund_msat: r.amount_msat,
            }),
            Err(RefundError::Invoice(m)) => Err(Status::invalid_argument(format!("bolt11: {m}"))),
            Err(RefundError::Duplicate(r)) => Err(Status::already_exists(format!(
                "bolt11: this invoice was already used for a refund ({})",
                r.state.as_str()
            ))),
            Err(RefundError::Store(StoreError::InsufficientBalance {
                available_msat,
                needed_msat,
                ..
            })) => Err(Status::failed_precondition(format!(
                "refused: the owner's refundable balance is {available_msat} msat, the invoice asks for {needed_msat} msat"
            ))),
            Err(RefundError::Store(e)) => Err(e.into()),
            Err(RefundError::Send(e)) => Err(LightningError::from(e).into()),
        };
    }
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
    tracing::info!(payment_hash = %hex::encode(id.0), "operator payment sent");
    Ok(PayInvoiceResponse {
        payment_hash: hex::encode(id.0),
        refund_msat: 0,
    })
}

use ldk_node::payment::{PaymentDirection, PaymentKind, PaymentStatus};
use tonic::Status;

use crate::app::App;
use crate::grpc::page_size;
use crate::grpc::proto::{ListPaymentsRequest, ListPaymentsResponse, NodePayment};

pub(super) fn handle(app: &App, req: ListPaymentsRequest) -> Result<ListPaymentsResponse, Status> {
    let size = page_size(req.page_size) as usize;
    let offset: usize = match req.page_token.as_str() {
        "" => 0,
        t => t.parse().map_err(|_| {
            Status::invalid_argument(
                "page_token: not a token from a previous response; leave it empty for the first page",
            )
        })?,
    };
    let mut all = app.lightning.node().list_payments();
    all.sort_by(|a, b| {
        b.latest_update_timestamp
            .cmp(&a.latest_update_timestamp)
            .then(a.id.0.cmp(&b.id.0))
    });
    let next = (all.len() > offset + size).then(|| (offset + size).to_string());
    let payments = all
        .into_iter()
        .skip(offset)
        .take(size)
        .map(|p| NodePayment {
            payment_id: hex::encode(p.id.0),
            direction: match p.direction {
                PaymentDirection::Inbound => "inbound",
                PaymentDirection::Outbound => "outbound",
            }
            .into(),
            status: match p.status {
                PaymentStatus::Pending => "pending",
                PaymentStatus::Succeeded => "succeeded",
                PaymentStatus::Failed => "failed",
            }
            .into(),
            amount_msat: p.amount_msat.unwrap_or(0),
            fee_paid_msat: p.fee_paid_msat.unwrap_or(0),
            kind: match p.kind {
                PaymentKind::Bolt11 { .. } => "bolt11",
                PaymentKind::Bolt11Jit { .. } => "bolt11_jit",
                PaymentKind::Spontaneous { .. } => "spontaneous",
                PaymentKind::Onchain { .. } => "onchain",
                _ => "other",
            }
            .into(),
            updated_at_unix: p.latest_update_timestamp,
        })
        .collect();
    Ok(ListPaymentsResponse {
        payments,
        next_page_token: next.unwrap_or_default(),
    })
}

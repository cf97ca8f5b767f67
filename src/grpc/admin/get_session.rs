use tonic::Status;

use crate::app::App;
use crate::grpc::parse_hex;
use crate::grpc::proto::{GetSessionRequest, LedgerEntry, SessionDetail};

pub(super) fn handle(app: &App, req: GetSessionRequest) -> Result<SessionDetail, Status> {
    let id: [u8; 16] = parse_hex("session_id", &req.session_id)?;
    let s = app
        .store
        .session(&id)?
        .ok_or_else(|| Status::not_found(format!("session {} not found", req.session_id)))?;
    // A session has at most a few hundred invoices (max_tokens / chunk_tokens + prompt).
    let invoices = app.store.list_invoices(10_000, "", None, Some(&id))?.items;
    let ledger = app.store.ledger_for_session(&id)?;
    Ok(SessionDetail {
        session: Some(super::session_summary(&s)),
        invoices: invoices.iter().map(super::invoice_info).collect(),
        ledger: ledger
            .into_iter()
            .map(|e| LedgerEntry {
                seq: e.seq,
                at_unix: e.at_unix,
                kind: e.kind,
                session_id: e.session_id.map(hex::encode).unwrap_or_default(),
                payment_hash: e.payment_hash.map(hex::encode).unwrap_or_default(),
                amount_msat: e.amount_msat,
                detail: e.detail,
            })
            .collect(),
    })
}

use std::sync::Arc;
use tonic::Status;

use crate::app::App;
use crate::grpc::proto::{TopUpRequest, TopUpResponse};
use crate::lightning::invoices::HoldInvoice;
use crate::store::InvoicePurpose;

pub(super) async fn handle(
    app: &Arc<App>,
    req: TopUpRequest,
    client: Option<std::net::IpAddr>,
) -> Result<TopUpResponse, Status> {
    let account = if req.account_token.trim().is_empty() {
        None
    } else {
        Some(super::owner::account(app, &req.account_token).await?.id)
    };
    let t = issue(app, req.amount_msat, client, account).await?;
    Ok(TopUpResponse {
        account_token: t
            .token
            .unwrap_or_else(|| req.account_token.trim().to_string()),
        bolt11: t.invoice.bolt11,
        payment_hash: hex::encode(t.invoice.payment_hash),
        amount_msat: t.invoice.amount_msat,
        expires_at_unix: t.invoice.expires_at_unix,
    })
}

/// A top-up invoice issued: for a new account (its token, shown once) or an existing one.
pub(crate) struct Issued {
    pub token: Option<String>,
    pub invoice: crate::store::Invoice,
}

/// Issues a top-up invoice of `amount_msat` for `account` (None: a new account), under the
/// per-client cap on unpaid top-ups. gRPC's TopUp and the HTTP face's top-up and L402
/// challenge all come here.
pub(crate) async fn issue(
    app: &Arc<App>,
    amount_msat: u64,
    client: Option<std::net::IpAddr>,
    account: Option<[u8; 16]>,
) -> Result<Issued, Status> {
    let p = &app.config.payments;
    if amount_msat < p.topup_min_msat || amount_msat > p.topup_max_msat {
        return Err(Status::invalid_argument(format!(
            "amount_msat: must be between {} and {} msat on this server (got {})",
            p.topup_min_msat, p.topup_max_msat, amount_msat
        )));
    }
    let inbound = app.lightning.inbound_liquidity().await;
    if inbound < amount_msat {
        return Err(Status::failed_precondition(format!(
            "the server can receive {inbound} msat now, less than {} msat: open a channel to {}@{}",
            amount_msat,
            app.lightning.node_id(),
            app.lightning.public_address()
        )));
    }
    // A place among this client's open TopUps, held until the invoice is paid or expires.
    let slot = match client {
        Some(c) => {
            let a = app.clone();
            let max = app.config.limits.max_open_topups_per_client;
            let slot = tokio::task::spawn_blocking(move || a.topups.reserve(&a.store, c, max))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|max| {
                    Status::resource_exhausted(format!(
                        "this address has {max} unpaid top-up invoices open, the limit: pay one, \
                         or wait for one to expire ({} s after it was issued)",
                        p.invoice_expiry_secs
                    ))
                })?;
            Some(slot)
        }
        None => None,
    };
    let (account_id, token) = match account {
        None => {
            let (raw, hex_token) = super::owner::new_secret();
            let mut id = [0u8; 16];
            rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut id);
            let store = app.store.clone();
            let hash = super::owner::hash_secret(&raw);
            tokio::task::spawn_blocking(move || store.create_account(id, hash))
                .await
                .map_err(|e| Status::internal(e.to_string()))??;
            (id, Some(hex_token))
        }
        Some(id) => (id, None),
    };
    let spec = HoldInvoice {
        amount_msat,
        description: "satstream prepaid top-up".into(),
        expiry_secs: p.invoice_expiry_secs,
        purpose: InvoicePurpose::TopUp,
        session_id: None,
        account_id: Some(account_id),
        chunk_index: None,
        preimage: None,
    };
    let ln = app.lightning.clone();
    // No listener: the event loop claims a top-up as soon as it is held.
    let inv = tokio::task::spawn_blocking(move || ln.create_hold_invoice(&spec, None))
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
    if let Some(slot) = slot {
        slot.issued(inv.payment_hash, inv.expires_at_unix);
    }
    tracing::info!(account = %hex::encode(account_id), amount_msat, "top-up invoice issued");
    Ok(Issued {
        token,
        invoice: inv,
    })
}

use std::sync::Arc;
use std::time::Duration;
use tonic::Status;

use crate::app::App;
use crate::grpc::proto::{RefundRequest, RefundResponse};
use crate::lightning::refunds::RefundError;
use crate::lightning::NodeNotice;
use crate::store::{Owner, Refund, RefundState};

const DEFAULT_WAIT: Duration = Duration::from_secs(30);
const MAX_WAIT: Duration = Duration::from_secs(120);

pub(super) async fn handle(app: &Arc<App>, req: RefundRequest) -> Result<RefundResponse, Status> {
    let owner = match (
        req.session_id.trim().is_empty(),
        req.account_token.trim().is_empty(),
    ) {
        (false, true) => Owner::Session(
            super::owner::session(app, req.session_id.trim(), &req.session_token)
                .await?
                .id,
        ),
        (true, false) => Owner::Account(super::owner::account(app, &req.account_token).await?.id),
        (false, false) => {
            return Err(Status::invalid_argument(
                "give either session_id (with session_token) or account_token, not both",
            ))
        }
        (true, true) => {
            return Err(Status::unauthenticated(
                "give session_id with session_token (a session's balance) or account_token (a prepaid account's)",
            ))
        }
    };
    pay(app, owner, &req.bolt11, req.wait_secs).await
}

/// Refunds `owner`'s balance to `bolt11` (gRPC's Refund and the HTTP face's), waiting at most
/// `wait_secs` (0: the default) for the outcome.
pub(crate) async fn pay(
    app: &Arc<App>,
    owner: Owner,
    bolt11: &str,
    wait_secs: u32,
) -> Result<RefundResponse, Status> {
    if bolt11.trim().is_empty() {
        return Err(Status::invalid_argument(
            "bolt11: required, an invoice of your wallet (no amount: the whole balance)",
        ));
    }
    let wait = match wait_secs {
        0 => DEFAULT_WAIT,
        s if Duration::from_secs(s as u64) > MAX_WAIT => {
            return Err(Status::invalid_argument(format!(
                "wait_secs: at most {} (0: the default, {} s); the refund goes on after the reply \
                 either way",
                MAX_WAIT.as_secs(),
                DEFAULT_WAIT.as_secs()
            )))
        }
        s => Duration::from_secs(s as u64),
    };
    // Listen before paying: the outcome may come at once.
    let mut notices = app.lightning.subscribe();
    let (ln, invoice) = (app.lightning.clone(), bolt11.to_string());
    let paid = tokio::task::spawn_blocking(move || ln.pay_refund(owner, &invoice, "api"))
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
    let refund = match paid {
        Ok(r) => r,
        Err(RefundError::Duplicate(r)) if r.owner == owner => *r,
        Err(RefundError::Duplicate(_)) => {
            return Err(Status::already_exists(
                "bolt11: this invoice was already used for another refund; create a new one",
            ))
        }
        Err(RefundError::Invoice(m)) => {
            return Err(Status::invalid_argument(format!("bolt11: {m}")))
        }
        Err(RefundError::Store(crate::store::StoreError::InsufficientBalance {
            available_msat,
            needed_msat,
            ..
        })) => {
            return Err(Status::failed_precondition(if available_msat == 0 {
                "nothing to refund: the refundable balance is 0 msat".to_string()
            } else {
                format!(
                    "the refundable balance is {available_msat} msat; the invoice asks for {needed_msat} msat \
                     (an invoice without an amount takes the whole balance)"
                )
            }))
        }
        Err(RefundError::Store(e)) => return Err(e.into()),
        Err(RefundError::Send(e)) => {
            let hash = crate::lightning::refunds::invoice_hash(bolt11);
            return respond(
                app,
                owner,
                hash,
                Some(format!("the node could not pay: {e}")),
            )
            .await;
        }
    };
    let hash = refund.payment_hash;
    if refund.state == RefundState::Pending {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, notices.recv()).await {
                Ok(Ok(NodeNotice::PaymentSent { payment_hash, .. })) if payment_hash == hash => {
                    break
                }
                Ok(Ok(_)) => {}
                // Missed notices: the store has the truth.
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                    if refund_state(app, hash).await? != RefundState::Pending {
                        break;
                    }
                }
                Ok(Err(_)) | Err(_) => break,
            }
        }
    }
    respond(app, owner, Some(hash), None).await
}

async fn refund_state(app: &Arc<App>, hash: [u8; 32]) -> Result<RefundState, Status> {
    let store = app.store.clone();
    Ok(tokio::task::spawn_blocking(move || store.refund(&hash))
        .await
        .map_err(|e| Status::internal(e.to_string()))??
        .map(|r| r.state)
        .unwrap_or(RefundState::Failed))
}

/// The refund as recorded now, and the owner's remaining balance.
async fn respond(
    app: &Arc<App>,
    owner: Owner,
    hash: Option<[u8; 32]>,
    detail: Option<String>,
) -> Result<RefundResponse, Status> {
    let store = app.store.clone();
    let (refund, balance): (Option<Refund>, u64) = tokio::task::spawn_blocking(move || {
        let r = match hash {
            Some(h) => store.refund(&h)?,
            None => None,
        };
        Ok::<_, crate::store::StoreError>((r, store.refundable_of(&owner)?))
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))??;
    let Some(r) = refund else {
        return Ok(RefundResponse {
            state: RefundState::Failed.as_str().into(),
            detail: detail.unwrap_or_default(),
            balance_msat: balance,
            ..Default::default()
        });
    };
    Ok(RefundResponse {
        refunded_msat: if r.state == RefundState::Failed {
            0
        } else {
            r.amount_msat
        },
        payment_hash: hex::encode(r.payment_hash),
        state: r.state.as_str().into(),
        detail: detail.unwrap_or(r.detail),
        balance_msat: balance,
        fee_msat: r.fee_msat.unwrap_or(0),
    })
}

//! The account over HTTP: balance, top-up, refund and receipts, with the gRPC RPCs' rules
//! (they are the same handlers).

use axum::extract::{ConnectInfo, Path};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, Peer, State};
use crate::store::{Account, Owner};

/// Largest account request body.
const BODY_LIMIT: usize = 16 * 1024;

/// The caller's account, or 401 saying how to have one.
async fn required(h: &super::Http, headers: &HeaderMap) -> Result<Account, ApiError> {
    h.caller(headers).await?.ok_or_else(|| {
        ApiError::unauthorized(
            "credentials required: `Authorization: Bearer <account token>` (POST \
             /v1/account/topup without credentials opens an account) or `L402 \
             <macaroon>:<preimage>`",
        )
    })
}

fn account_json(a: &Account) -> Value {
    json!({
        "object": "account",
        "credited_msat": a.credited_msat,
        "spent_msat": a.spent_msat,
        "refunded_msat": a.refunded_msat,
        "reserved_msat": a.reserved_msat,
        "available_msat": a.available_msat(),
        "created_at_unix": a.created_at_unix,
    })
}

pub async fn get(
    axum::extract::State(h): State,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(account_json(&required(&h, &headers).await?)))
}

#[derive(Deserialize)]
struct TopUp {
    amount_msat: u64,
}

/// A top-up invoice for the caller's account; without credentials, for a new account whose
/// token (the API key) is in the response, once.
pub async fn topup(
    axum::extract::State(h): State,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<Value>, ApiError> {
    let req: TopUp = super::read_json(body, BODY_LIMIT).await?;
    let account = h.caller(&headers).await?;
    let t = crate::grpc::inference::top_up::issue(
        &h.app,
        req.amount_msat,
        h.client(peer, &headers),
        account.map(|a| a.id),
    )
    .await?;
    Ok(Json(json!({
        "object": "topup",
        "account_token": t.token,
        "bolt11": t.invoice.bolt11,
        "payment_hash": hex::encode(t.invoice.payment_hash),
        "amount_msat": t.invoice.amount_msat,
        "expires_at_unix": t.invoice.expires_at_unix,
    })))
}

#[derive(Deserialize)]
struct Refund {
    bolt11: String,
    #[serde(default)]
    wait_secs: u32,
}

/// Pays the account's available balance (or the invoice's amount) to the caller's invoice.
pub async fn refund(
    axum::extract::State(h): State,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<Value>, ApiError> {
    let req: Refund = super::read_json(body, BODY_LIMIT).await?;
    let a = required(&h, &headers).await?;
    let r = crate::grpc::inference::refund::pay(
        &h.app,
        Owner::Account(a.id),
        &req.bolt11,
        req.wait_secs,
    )
    .await?;
    Ok(Json(json!({
        "object": "refund",
        "state": r.state,
        "refunded_msat": r.refunded_msat,
        "fee_msat": r.fee_msat,
        "payment_hash": r.payment_hash,
        "detail": r.detail,
        "available_msat": r.balance_msat,
    })))
}

/// The signed receipt of one of the caller's sessions.
pub async fn receipt(
    axum::extract::State(h): State,
    headers: HeaderMap,
    Path(session_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let a = required(&h, &headers).await?;
    let sid: [u8; 16] = crate::grpc::parse_hex("session_id", &session_id)?;
    let store = h.app.store.clone();
    let s = tokio::task::spawn_blocking(move || store.session(&sid))
        .await
        .map_err(|e| ApiError::from(tonic::Status::internal(e.to_string())))?
        .map_err(|e| ApiError::from(tonic::Status::from(e)))?;
    // Another account's session is as absent as one that never was.
    if s.and_then(|s| s.account_id) != Some(a.id) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("this account has no session {session_id}"),
        ));
    }
    let (store, ln) = (h.app.store.clone(), h.app.lightning.clone());
    let r = tokio::task::spawn_blocking(move || crate::session::receipt::issue(&store, &ln, &sid))
        .await
        .map_err(|e| ApiError::from(tonic::Status::internal(e.to_string())))?
        .map_err(|e| match e {
            // Not an error of the request: ask again shortly (the page does).
            crate::session::receipt::IssueError::Running(_) => {
                ApiError::new(StatusCode::CONFLICT, e.to_string())
            }
            e => ApiError::from(crate::grpc::inference::get_receipt::status(e)),
        })?;
    Ok(Json(super::receipt_json(&r)))
}

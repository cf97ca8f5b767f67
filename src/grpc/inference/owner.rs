//! Bearer secrets of sessions and accounts: issued once (only their SHA-256 is stored), and
//! checked in constant time. A missing secret is Unauthenticated; a wrong one PermissionDenied.

use std::sync::Arc;
use tonic::Status;

use crate::app::App;
use crate::store::{Account, Session};

pub(super) use crate::session::secret::{hash_secret, new_secret, same};

/// Parses a presented secret; None when it is absent.
fn presented(field: &str, token: &str) -> Result<Option<[u8; 32]>, Status> {
    let t = token.trim();
    if t.is_empty() {
        return Ok(None);
    }
    let raw = hex::decode(t)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| {
            // Malformed input, not a wrong secret: say what a token looks like (never echo it).
            Status::invalid_argument(format!(
                "{field}: a token is 64 hex digits, as this server issued it (got {} characters)",
                t.chars().count()
            ))
        })?;
    Ok(Some(raw))
}

/// The session `session_id` if `token` is its owner's.
pub(crate) async fn session(
    app: &Arc<App>,
    session_id: &str,
    token: &str,
) -> Result<Session, Status> {
    let sid: [u8; 16] = crate::grpc::parse_hex("session_id", session_id)?;
    let raw = presented("session_token", token)?.ok_or_else(|| {
        Status::unauthenticated("session_token: required (it came in the session's Accepted event)")
    })?;
    let store = app.store.clone();
    let s = tokio::task::spawn_blocking(move || store.session(&sid))
        .await
        .map_err(|e| Status::internal(e.to_string()))??
        .ok_or_else(|| Status::not_found(format!("session {session_id} not found")))?;
    if !same(&hash_secret(&raw), &s.token_hash) {
        return Err(Status::permission_denied(
            "session_token: not this session's token",
        ));
    }
    Ok(s)
}

/// The account whose token `token` is; `required` says how to ask for it.
pub(crate) async fn account(app: &Arc<App>, token: &str) -> Result<Account, Status> {
    let raw = presented("account_token", token)?.ok_or_else(|| {
        Status::unauthenticated(
            "account_token: required (TopUp returns it when it opens the account)",
        )
    })?;
    let hash = hash_secret(&raw);
    let store = app.store.clone();
    let a = tokio::task::spawn_blocking(move || store.account_by_token(&hash))
        .await
        .map_err(|e| Status::internal(e.to_string()))??
        .ok_or_else(|| Status::permission_denied("account_token: no account has this token"))?;
    // The lookup is by hash; compare once more in constant time for form's sake.
    if !same(&hash, &a.token_hash) {
        return Err(Status::permission_denied(
            "account_token: no account has this token",
        ));
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_fresh_and_hash_compare_exactly() {
        let (a, ha) = new_secret();
        let (b, _) = new_secret();
        assert_ne!(a, b);
        assert_eq!(ha.len(), 64);
        assert!(same(&hash_secret(&a), &hash_secret(&a)));
        assert!(!same(&hash_secret(&a), &hash_secret(&b)));
        assert!(presented("t", "").unwrap().is_none());
        assert_eq!(
            presented("t", "zz").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}

//! Issuing a session's receipt: built from what the store recorded once the session ended,
//! signed by the node key, kept in SQLite. Idempotent: a session has one receipt, whoever asks
//! first (the meter at the end, or `GetReceipt` for a session a restart ended) issues it.
//!
//! Blocking (SQLite, and the signature): call it from a blocking thread.

use crate::lightning::Lightning;
use crate::store::{SessionState, Store, StoreError};
use crate::wire::proto;
use crate::wire::receipt::{self, ReceiptBody, ReceiptChunk, ReceiptError};

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("session {0} not found")]
    NotFound(String),
    #[error("session {0} is still running: its receipt is issued when it ends")]
    Running(String),
    #[error("receipt: {0}")]
    Receipt(#[from] ReceiptError),
    /// A claim of the session is decided and LDK has not reported it yet: its totals are not
    /// final, and a signed receipt is never re-issued.
    #[error("session {0} has a payment still settling: its receipt is issued once LDK reports it (within seconds); retry")]
    Settling(String),
}

/// The receipt of an ended session, issued now if it has none yet.
pub fn issue(
    store: &Store,
    ln: &Lightning,
    session_id: &[u8; 16],
) -> Result<proto::Receipt, IssueError> {
    let sid = hex::encode(session_id);
    let stored = match store.receipt(session_id)? {
        Some(r) => r,
        None => {
            // Built first: a running session is Running, whatever its invoices are doing.
            let body = build(store, &ln.node_id(), session_id)?;
            if store.audit_session(session_id)?.unresolved_invoices > 0 {
                return Err(IssueError::Settling(sid));
            }
            let text = body.encode()?;
            let signature = ln.node().sign_message(text.as_bytes());
            store.insert_receipt(session_id, &text, &signature)?
        }
    };
    let (text, signature) = stored;
    let body = ReceiptBody::parse(&text)
        .map_err(|e| StoreError::Corrupt(format!("stored receipt of session {sid}: {e}")))?;
    Ok(body.to_proto(text, signature))
}

fn build(store: &Store, node_id: &str, session_id: &[u8; 16]) -> Result<ReceiptBody, IssueError> {
    let sid = hex::encode(session_id);
    let s = store
        .session(session_id)?
        .ok_or_else(|| IssueError::NotFound(sid.clone()))?;
    let state = match s.state {
        SessionState::Open => return Err(IssueError::Running(sid)),
        SessionState::Finished => "finished",
        SessionState::Halted => "halted",
    };
    let chunks = store.delivered_chunks(session_id)?;
    // What the prompt actually cost: a prompt whose hold invoice was failed back (no chunk
    // delivered) cost nothing.
    let chunks_msat: u64 = chunks.iter().map(|c| c.price_msat).sum();
    let prompt_charged = s.spent_msat.saturating_sub(chunks_msat);
    let mut output = Vec::new();
    let chunks = chunks
        .into_iter()
        .map(|c| {
            // Chunks delivered before the store kept text (schema v3) hash as empty.
            let text = c.text.unwrap_or_default();
            output.extend_from_slice(text.as_bytes());
            ReceiptChunk {
                index: c.chunk_index,
                first_token: c.first_token,
                tokens: c.tokens,
                price_msat: c.price_msat,
                payment_hash: c.payment_hash,
                text_sha256: receipt::sha256(text.as_bytes()),
            }
        })
        .collect();
    let reason = s
        .end_reason
        .as_deref()
        .map(|r| r.replace(|c: char| c.is_whitespace() || c.is_control(), "_"))
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "unknown".into());
    Ok(ReceiptBody {
        node_id: node_id.to_string(),
        session_id: sid,
        model: s.model.clone(),
        mode: s.mode.clone(),
        prompt_tokens: s.prompt_tokens,
        prompt_price_msat: prompt_charged,
        prompt_sha256: s.prompt_sha256,
        msat_per_token: s.msat_per_token,
        chunks,
        completion_tokens: s.completion_tokens,
        paid_msat: s.paid_msat,
        spent_msat: s.spent_msat,
        refundable_msat: s.refundable_msat(),
        output_sha256: receipt::sha256(&output),
        state: state.into(),
        reason,
        finished_at_unix: s.ended_at_unix.unwrap_or(s.created_at_unix),
    })
}

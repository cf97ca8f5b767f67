//! What the owner of an ended session can still have: "delivered" means "the client can have
//! it". A chunk is recorded delivered before it is written to the client (and, in ATOMIC, the
//! claim that reveals its key), so a crash, a dropped stream not resumed in time or a restart
//! can leave a client that paid for text it never received. `Resume` on an ended session
//! replays its delivered chunks from the store, then its end (Done or Halted) with the signed
//! receipt.
//!
//! Blocking (SQLite, and the receipt's signature when it is issued now).

use crate::lightning::Lightning;
use crate::store::{SessionState, Store};
use crate::wire::proto::{self, generate_event::Event as Ev};

use super::ending::{last_event, Ending, Totals};
use super::receipt::{self, IssueError};

/// The events that replay ended session `sid` from chunk `from_chunk`: its delivered chunks as
/// Tokens, then Done or Halted (totals from the store, the receipt issued if it had none).
pub fn ended_session(
    store: &Store,
    ln: &Lightning,
    sid: &[u8; 16],
    from_chunk: u32,
) -> Result<Vec<Ev>, IssueError> {
    let s = store
        .session(sid)?
        .ok_or_else(|| IssueError::NotFound(hex::encode(sid)))?;
    if s.state == SessionState::Open {
        return Err(IssueError::Running(hex::encode(sid)));
    }
    // A claim still settling leaves the receipt to GetReceipt; the chunks are replayed now.
    let receipt = match receipt::issue(store, ln, sid) {
        Ok(r) => Some(r),
        Err(IssueError::Settling(_)) => None,
        Err(e) => return Err(e),
    };
    let mut events: Vec<Ev> = store
        .delivered_chunks(sid)?
        .into_iter()
        .filter(|c| c.chunk_index >= from_chunk)
        .map(|c| {
            Ev::Tokens(proto::Tokens {
                chunk_index: c.chunk_index,
                text: c.text.unwrap_or_default(),
                first_token: c.first_token,
                tokens: c.tokens,
            })
        })
        .collect();
    let balance_msat = match &s.account_id {
        Some(a) => store.account(a)?.map(|a| a.available_msat()).unwrap_or(0),
        None => s.refundable_msat(),
    };
    let reason = s.end_reason.clone().unwrap_or_default();
    let ending = match s.state {
        SessionState::Finished => Ending::Done(finish_reason(&reason)),
        _ => Ending::Halted(
            halt_reason(&reason),
            format!("the session has ended ({reason}); replayed from the store"),
        ),
    };
    events.push(last_event(
        ending,
        Totals {
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.completion_tokens,
            chunks: s.chunks_delivered,
            paid_msat: s.paid_msat,
            refundable_msat: s.refundable_msat(),
            balance_msat,
            receipt,
        },
    ));
    Ok(events)
}

/// A finished session's recorded reason (as the meter writes it) as the wire's.
fn finish_reason(reason: &str) -> proto::FinishReason {
    match reason {
        "length" => proto::FinishReason::Length,
        "stop_string" => proto::FinishReason::StopString,
        _ => proto::FinishReason::Stop,
    }
}

/// A halted session's recorded reason as the wire's: the meter writes the enum's name in
/// lower case; a stalled client is gone like a dropped one, a restart is a shutdown.
fn halt_reason(reason: &str) -> proto::HaltReason {
    match reason {
        "client_stalled" => proto::HaltReason::ClientGone,
        "server_restart" => proto::HaltReason::Shutdown,
        r => proto::HaltReason::from_str_name(&format!("HALT_REASON_{}", r.to_uppercase()))
            .unwrap_or(proto::HaltReason::Unspecified),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_reasons_map_to_the_wire() {
        assert_eq!(
            halt_reason("payment_timeout"),
            proto::HaltReason::PaymentTimeout
        );
        assert_eq!(halt_reason("client_gone"), proto::HaltReason::ClientGone);
        assert_eq!(
            halt_reason("ended_by_owner"),
            proto::HaltReason::EndedByOwner
        );
        assert_eq!(halt_reason("server_restart"), proto::HaltReason::Shutdown);
        assert_eq!(halt_reason("nonsense"), proto::HaltReason::Unspecified);
        assert_eq!(finish_reason("length"), proto::FinishReason::Length);
        assert_eq!(finish_reason("stop"), proto::FinishReason::Stop);
    }
}

//! The one consumer of ldk-node's event queue.
//!
//! For every event: commit its effect to SQLite, then `event_handled()`. The handler runs on a
//! blocking thread (SQLite with synchronous=FULL and persisting ldk-node calls must not stall
//! the async workers that drive streams). If it fails, it is retried with backoff; LDK
//! persists the queue, so after a crash the same event comes again, and every handler is
//! idempotent by payment hash. An event whose handler keeps failing is parked (recorded for
//! the operator, Admin ListParkedEvents) and acknowledged, so that one bad event cannot hold
//! up every later payment; an HTLC in a parked event is failed back first, so no money is
//! kept that the ledger does not show.

use ldk_node::Event;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use super::{Lightning, LightningError, NodeNotice};

/// How the loop retries a failing handler.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts before the event is parked (≥ 1).
    pub max_attempts: u32,
    /// Wait after the first failure; doubled after each further one.
    pub first_backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            max_attempts: 5,
            first_backoff: Duration::from_millis(100),
        }
    }
}

/// Runs until `shutdown` is cancelled (the current event is finished first).
pub async fn run(ln: Arc<Lightning>, shutdown: CancellationToken, retry: Retry) {
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = ln.node.next_event_async() => e,
        };
        let kind = event_kind(&event);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = {
                let (ln, ev) = (ln.clone(), event.clone());
                tokio::task::spawn_blocking(move || {
                    let _g = tracing::debug_span!("ln_event", kind).entered();
                    handle(&ln, &ev)
                })
                .await
                .unwrap_or_else(|e| Err(panicked(e)))
            };
            let Err(e) = result else { break };
            if attempt >= retry.max_attempts.max(1) {
                park(&ln, &event, attempt, &e).await;
                break;
            }
            let wait = retry.first_backoff * 2u32.saturating_pow(attempt - 1);
            tracing::warn!(kind, attempt, error = %e, ?wait, "handling an LDK event failed; retrying");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        let node = ln.node.clone();
        // Persists ldk-node's queue: a blocking write.
        match tokio::task::spawn_blocking(move || node.event_handled()).await {
            Ok(Ok(())) => {}
            // The effect is committed; a replay is harmless.
            Ok(Err(e)) => {
                tracing::error!(kind, error = %e, "event_handled failed; the event will be replayed")
            }
            Err(e) => tracing::error!(kind, error = %e, "event_handled panicked"),
        }
    }
}

fn panicked(e: tokio::task::JoinError) -> LightningError {
    LightningError::Invalid {
        what: "event handler",
        reason: format!("panicked: {e}"),
    }
}

/// Gives up on an event: fails back an HTLC it holds, records it, and lets the loop go on.
async fn park(ln: &Arc<Lightning>, event: &Event, attempts: u32, error: &LightningError) {
    let kind = event_kind(event);
    let hash = payment_hash(event);
    tracing::error!(kind, attempts, error = %error, event = %describe(event), "LDK event parked: its handler keeps failing");
    let (ln, error, description) = (ln.clone(), error.to_string(), describe(event));
    let claimable = matches!(event, Event::PaymentClaimable { .. });
    // A keysend's session is only in the event (LDK's payment record has no TLVs): keep it.
    let session = match event {
        Event::PaymentReceived { custom_records, .. } => ln.keysend_session(custom_records),
        _ => None,
    };
    let _ = tokio::task::spawn_blocking(move || {
        if let (true, Some(h)) = (claimable, &hash) {
            ln.fail_in_node(h);
        }
        if let Err(e) = ln.store.park_event(
            kind,
            hash.as_ref(),
            session.as_ref(),
            attempts,
            &error,
            &description,
        ) {
            tracing::error!(kind, error = %e, "cannot even record the parked event");
        }
    })
    .await;
}

fn event_kind(e: &Event) -> &'static str {
    match e {
        Event::PaymentSuccessful { .. } => "payment_successful",
        Event::PaymentFailed { .. } => "payment_failed",
        Event::PaymentReceived { .. } => "payment_received",
        Event::PaymentForwarded { .. } => "payment_forwarded",
        Event::PaymentClaimable { .. } => "payment_claimable",
        Event::ChannelPending { .. } => "channel_pending",
        Event::ChannelReady { .. } => "channel_ready",
        Event::ChannelClosed { .. } => "channel_closed",
        Event::SplicePending { .. } => "splice_pending",
        Event::SpliceFailed { .. } => "splice_failed",
    }
}

fn payment_hash(e: &Event) -> Option<[u8; 32]> {
    match e {
        Event::PaymentSuccessful { payment_hash, .. }
        | Event::PaymentReceived { payment_hash, .. }
        | Event::PaymentClaimable { payment_hash, .. } => Some(payment_hash.0),
        Event::PaymentFailed { payment_hash, .. } => payment_hash.map(|h| h.0),
        _ => None,
    }
}

/// The event without its secrets (a PaymentSuccessful carries the preimage): for logs and
/// the parked-events table.
pub fn describe(e: &Event) -> String {
    let hash = payment_hash(e).map(hex::encode).unwrap_or_default();
    match e {
        Event::PaymentClaimable {
            claimable_amount_msat,
            claim_deadline,
            ..
        } => format!(
            "PaymentClaimable {hash} {claimable_amount_msat} msat, deadline {claim_deadline:?}"
        ),
        Event::PaymentReceived { amount_msat, .. } => {
            format!("PaymentReceived {hash} {amount_msat} msat")
        }
        Event::PaymentSuccessful { fee_paid_msat, .. } => {
            format!("PaymentSuccessful {hash} fee {fee_paid_msat:?} msat")
        }
        Event::PaymentFailed { reason, .. } => format!("PaymentFailed {hash} {reason:?}"),
        Event::ChannelClosed {
            channel_id, reason, ..
        } => format!("ChannelClosed {channel_id} {reason:?}"),
        other => event_kind(other).to_string(),
    }
}

/// Applies one LDK event's effect, committed to the store. Idempotent: LDK replays an event
/// that was not acknowledged (e.g. after a crash), and a replay changes nothing. Public so that
/// tests can replay events and inject HTLCs an ldk-node payer cannot produce (underpayments).
/// Blocking.
pub fn handle(ln: &Lightning, event: &Event) -> Result<(), LightningError> {
    match event {
        Event::PaymentClaimable {
            payment_hash,
            claimable_amount_msat,
            claim_deadline,
            ..
        } => {
            ln.faults.point("event")?;
            ln.on_claimable(&payment_hash.0, *claimable_amount_msat, *claim_deadline)
        }
        Event::PaymentReceived {
            payment_hash,
            amount_msat,
            custom_records,
            ..
        } => {
            ln.faults.point("event")?;
            ln.on_received(&payment_hash.0, *amount_msat, custom_records)
        }
        Event::PaymentSuccessful {
            payment_hash,
            fee_paid_msat,
            ..
        } => ln.on_payment_sent(&payment_hash.0, true, *fee_paid_msat, ""),
        Event::PaymentFailed {
            payment_hash: Some(h),
            reason,
            ..
        } => ln.on_payment_sent(&h.0, false, None, &format!("{reason:?}")),
        Event::ChannelPending {
            counterparty_node_id,
            ..
        } => {
            tracing::info!(counterparty = %counterparty_node_id, "channel pending");
            let _ = ln.notices.send(NodeNotice::ChannelPending {
                counterparty: *counterparty_node_id,
            });
            Ok(())
        }
        Event::ChannelReady {
            counterparty_node_id,
            ..
        } => {
            tracing::info!(counterparty = ?counterparty_node_id, "channel ready");
            let _ = ln.notices.send(NodeNotice::ChannelReady {
                counterparty: *counterparty_node_id,
            });
            Ok(())
        }
        Event::ChannelClosed {
            channel_id,
            counterparty_node_id,
            reason,
            ..
        } => ln.on_channel_closed(&channel_id.0, *counterparty_node_id, reason),
        Event::SplicePending {
            channel_id,
            new_funding_txo,
            ..
        } => {
            tracing::info!(channel = %channel_id, funding = %new_funding_txo, "splice pending");
            Ok(())
        }
        Event::SpliceFailed { channel_id, .. } => {
            ln.refused(channel_id, "the splice failed (LDK's SpliceFailed)");
            Ok(())
        }
        other => {
            tracing::debug!(event = %describe(other), "ignored event");
            Ok(())
        }
    }
}

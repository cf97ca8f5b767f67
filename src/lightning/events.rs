//! The one consumer of ldk-node's event queue.
//!
//! For every event: commit its effect to SQLite, then `event_handled()`. If the commit fails
//! the event is not acknowledged and is retried; LDK persists the queue, so after a crash the
//! same event comes again — every handler is idempotent by payment hash.

use ldk_node::lightning_types::payment::PaymentHash;
use ldk_node::Event;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use super::{HeldHtlc, Lightning, LightningError, NodeNotice};
use crate::store::{InvoiceState, StoreError};

/// Runs until `shutdown` is cancelled.
pub async fn run(ln: Arc<Lightning>, shutdown: CancellationToken) {
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = ln.node.next_event_async() => e,
        };
        let span = tracing::debug_span!("ln_event", kind = event_kind(&event));
        let _g = span.enter();
        match handle(&ln, &event) {
            Ok(()) => {
                if let Err(e) = ln.node.event_handled() {
                    // The effect is committed; a replay is harmless.
                    tracing::error!(error = %e, "event_handled failed; the event will be replayed");
                }
            }
            Err(e) => {
                // Not acknowledged: next_event_async returns the same event again.
                tracing::error!(error = %e, ?event, "handling LDK event failed; retrying");
                drop(_g);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
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

/// Applies one LDK event's effect, committed to the store. Idempotent: LDK replays an event
/// that was not acknowledged (e.g. after a crash), and a replay changes nothing. Public so that
/// tests can replay events and inject HTLCs an ldk-node payer cannot produce (underpayments).
pub fn handle(ln: &Lightning, event: &Event) -> Result<(), LightningError> {
    match event {
        Event::PaymentClaimable {
            payment_hash,
            claimable_amount_msat,
            claim_deadline,
            ..
        } => on_claimable(ln, &payment_hash.0, *claimable_amount_msat, *claim_deadline),
        Event::PaymentReceived {
            payment_hash,
            amount_msat,
            custom_records,
            ..
        } => {
            on_received(ln, payment_hash, *amount_msat, custom_records)?;
            let _ = ln.notices.send(NodeNotice::PaymentReceived {
                payment_hash: payment_hash.0,
                amount_msat: *amount_msat,
            });
            Ok(())
        }
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
            counterparty_node_id,
            reason,
            ..
        } => {
            tracing::info!(counterparty = ?counterparty_node_id, ?reason, "channel closed");
            let _ = ln.notices.send(NodeNotice::ChannelClosed {
                counterparty: *counterparty_node_id,
            });
            Ok(())
        }
        Event::PaymentSuccessful {
            payment_hash,
            fee_paid_msat,
            ..
        } => {
            tracing::info!(payment_hash = %hex::encode(payment_hash.0), ?fee_paid_msat, "outgoing payment succeeded");
            Ok(())
        }
        Event::PaymentFailed {
            payment_hash,
            reason,
            ..
        } => {
            tracing::warn!(payment_hash = ?payment_hash.map(|h| hex::encode(h.0)), ?reason, "outgoing payment failed");
            Ok(())
        }
        other => {
            tracing::debug!(?other, "ignored event");
            Ok(())
        }
    }
}

fn on_claimable(
    ln: &Lightning,
    hash: &[u8; 32],
    amount_msat: u64,
    deadline: Option<u32>,
) -> Result<(), LightningError> {
    let hx = hex::encode(hash);
    let Some(inv) = ln.store.invoice(hash)? else {
        tracing::warn!(payment_hash = %hx, amount_msat, "HTLC for an unknown invoice: failing back");
        ln.store
            .record_rejected_htlc(hash, amount_msat, "unknown invoice")?;
        ln.fail_in_node(hash);
        return Ok(());
    };
    match inv.state {
        InvoiceState::Open => {
            if amount_msat < inv.amount_msat {
                ln.store
                    .transition_invoice(hash, InvoiceState::Held, Some(amount_msat), "")?;
                ln.fail(
                    hash,
                    &format!("underpaid: {amount_msat} < {} msat", inv.amount_msat),
                )?;
                return Ok(());
            }
            ln.store
                .transition_invoice(hash, InvoiceState::Held, Some(amount_msat), "")?;
            tracing::info!(payment_hash = %hx, amount_msat, "HTLC held");
            notify_or_fail(ln, hash, amount_msat, deadline)
        }
        // A replay of an event we had already recorded: tell the issuer again if it is
        // still waiting, else nobody will deliver, so fail.
        InvoiceState::Held => notify_or_fail(ln, hash, amount_msat, deadline),
        // We had claimed it (crash before LDK finished): claim again, LDK dedupes.
        InvoiceState::Claimed => {
            let _ = ln.node.bolt11_payment().claim_for_hash(
                PaymentHash(*hash),
                amount_msat,
                ldk_node::lightning_types::payment::PaymentPreimage(inv.preimage),
            );
            Ok(())
        }
        // Halted, finished, expired or cancelled: never keep it.
        s @ (InvoiceState::Failed | InvoiceState::Expired | InvoiceState::Canceled) => {
            if s != InvoiceState::Failed {
                tracing::info!(payment_hash = %hx, state = %s, "late payment: failing back");
                ln.store
                    .record_rejected_htlc(hash, amount_msat, &format!("invoice {s}"))?;
            }
            ln.fail_in_node(hash);
            Ok(())
        }
    }
}

fn notify_or_fail(
    ln: &Lightning,
    hash: &[u8; 32],
    amount_msat: u64,
    deadline: Option<u32>,
) -> Result<(), LightningError> {
    let held = HeldHtlc {
        payment_hash: *hash,
        received_msat: amount_msat,
        claim_deadline_height: deadline,
        at: std::time::Instant::now(),
    };
    match ln.take_listener(hash) {
        Some(tx) if tx.send(held).is_ok() => Ok(()),
        _ => ln.fail(hash, "no live session for this invoice"),
    }
}

fn on_received(
    ln: &Lightning,
    hash: &PaymentHash,
    amount_msat: u64,
    custom_records: &[ldk_node::CustomTlvRecord],
) -> Result<(), LightningError> {
    match ln.store.invoice(&hash.0)? {
        // One of our hold invoices, now settled. Usually already committed by `claim`.
        Some(inv) => match inv.state {
            InvoiceState::Claimed => Ok(()),
            InvoiceState::Held => {
                ln.store.transition_invoice(
                    &hash.0,
                    InvoiceState::Claimed,
                    None,
                    "settled (recorded from PaymentReceived)",
                )?;
                Ok(())
            }
            s => {
                // LDK settled something we did not mean to claim. Never lose track of money:
                // record it loudly as a credit to the invoice's session.
                tracing::error!(payment_hash = %hash, state = %s, amount_msat, "payment received for an invoice that was not held");
                ln.store
                    .record_keysend_credit(&hash.0, inv.session_id, amount_msat)?;
                Ok(())
            }
        },
        // Spontaneous payment (keysend): credit the session named in our TLV, if any.
        None => {
            let session = ln.keysend_session(custom_records);
            match ln
                .store
                .record_keysend_credit(&hash.0, session, amount_msat)
            {
                Ok(true) => {
                    if let Some(sid) = &session {
                        ln.notify_credit(sid, amount_msat);
                    }
                    Ok(())
                }
                Ok(false) => Ok(()), // a replay: already credited
                Err(StoreError::NotFound { .. }) => {
                    ln.store.record_keysend_credit(&hash.0, None, amount_msat)?;
                    Ok(())
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}

//! Bounded memory over months: ldk-node keeps every payment record in an in-memory map (and
//! loads them all at start) until `Node::remove_payment`, one per chunk invoice. The watchdog
//! removes the records of payments final in the ledger for `lightning.payment_retention_secs`
//! — after checking that LDK's record says the same (succeeded with the booked amount, or
//! failed); a record that disagrees is kept, and logged, for the audit and the operator.
//!
//! Never a record LDK may still act on: only final states are offered (never a held or
//! claiming invoice, never a pending refund), and LDK's record must not be pending. A payer's
//! HTLC for a removed hold invoice's hash is failed back by ldk-node (it has no preimage for a
//! hash it has no record of), so a claimed chunk can still never be paid twice. A removed
//! keysend's repeat (the payer sending the same preimage again) is claimed by LDK as a new
//! payment: the event loop books it (`Store::record_keysend_credit`).

use ldk_node::lightning::ln::channelmanager::PaymentId;
use ldk_node::payment::PaymentStatus;

use super::{Lightning, LightningError};
use crate::store::{now_unix, PaymentRecord};

/// Records offered per query (each removal is a write in ldk-node's store).
const BATCH: u32 = 200;
/// Longest one watchdog round keeps pruning: enough to keep up with ~100 invoices a second,
/// short enough that the round's other steps are not held up.
const ROUND_BUDGET: std::time::Duration = std::time::Duration::from_secs(2);

impl Lightning {
    /// Removes the node's records of payments final for the retention window, batch after
    /// batch within [`ROUND_BUDGET`]; how many.
    pub fn prune_payments(&self) -> Result<usize, LightningError> {
        let started = std::time::Instant::now();
        let mut total = 0;
        loop {
            let (n, full) = self.prune_batch()?;
            total += n;
            if !full || started.elapsed() > ROUND_BUDGET {
                return Ok(total);
            }
        }
    }

    /// One batch: (removed, whether a kind had a full batch and more may wait).
    fn prune_batch(&self) -> Result<(usize, bool), LightningError> {
        let before = now_unix().saturating_sub(self.payment_retention.as_secs());
        let offered = self.store.prunable_payments(before, BATCH)?;
        let full = [
            PaymentRecord::Invoice,
            PaymentRecord::Keysend,
            PaymentRecord::Refund,
        ]
        .iter()
        .any(|k| offered.iter().filter(|p| p.record == *k).count() >= BATCH as usize);
        let (mut pruned, mut kept) = (Vec::new(), Vec::new());
        for p in offered {
            let hash = p.payment_hash;
            let ldk = self.ldk_status(&hash);
            let agrees = match (ldk, p.succeeded_msat) {
                // Gone already (removed before a crash could mark it, or never recorded).
                (None, _) => true,
                // Not final in LDK yet: offered again next round.
                (Some((PaymentStatus::Pending, _)), _) => continue,
                (Some((PaymentStatus::Succeeded, amount)), Some(booked)) => {
                    // A refund's record carries what we sent; an inbound one what we received.
                    amount == Some(booked)
                }
                (Some((PaymentStatus::Failed, _)), None) => true,
                _ => false,
            };
            if !agrees {
                // Kept for the audit and the operator, and not offered again (a growing pile
                // of them at the head of the queue would stop the pruning).
                tracing::warn!(
                    payment_hash = %hex::encode(hash), record = ?p.record,
                    ldk = ?ldk, booked = ?p.succeeded_msat,
                    "ledger and LDK disagree on a final payment: its record is kept"
                );
                kept.push((p.record, hash));
                continue;
            }
            if ldk.is_some() {
                self.node.remove_payment(&PaymentId(hash))?;
            }
            pruned.push((p.record, hash));
        }
        self.store.mark_pruned(&pruned)?;
        self.store.mark_kept(&kept)?;
        Ok((pruned.len(), full))
    }
}

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
use crate::store::now_unix;

/// Records removed per watchdog round at most (each removal is a write in ldk-node's store).
const BATCH: u32 = 200;

impl Lightning {
    /// Removes the node's records of payments final for the retention window; how many.
    pub fn prune_payments(&self) -> Result<usize, LightningError> {
        let before = now_unix().saturating_sub(self.payment_retention.as_secs());
        let mut pruned = Vec::new();
        for p in self.store.prunable_payments(before, BATCH)? {
            let hash = p.payment_hash;
            let agrees = match (self.ldk_status(&hash), p.succeeded_msat) {
                // Gone already (removed before a crash could mark it, or never recorded).
                (None, _) => true,
                (Some((PaymentStatus::Pending, _)), _) => false,
                (Some((PaymentStatus::Succeeded, amount)), Some(booked)) => {
                    // A refund's record carries what we sent; an inbound one what we received.
                    amount == Some(booked)
                }
                (Some((PaymentStatus::Failed, _)), None) => true,
                _ => false,
            };
            if !agrees {
                tracing::warn!(
                    payment_hash = %hex::encode(hash), record = ?p.record,
                    ldk = ?self.ldk_status(&hash), booked = ?p.succeeded_msat,
                    "ledger and LDK disagree on a final payment: its record is kept"
                );
                continue;
            }
            if self.ldk_status(&hash).is_some() {
                self.node.remove_payment(&PaymentId(hash))?;
            }
            pruned.push((p.record, hash));
        }
        self.store.mark_pruned(&pruned)?;
        Ok(pruned.len())
    }
}

//! Paying refundable balances back to their owners, exactly once.
//!
//! The owner sends a BOLT11 invoice of its own: with an amount, that much is refunded; without
//! one, the whole refundable balance. The amount is reserved in the transaction that records
//! the attempt, then the node pays. LDK's outcome (`PaymentSuccessful` / `PaymentFailed`,
//! handled by the event loop, or its payment store at start-up) consumes or releases the
//! reservation. Routing fees are the operator's: the owner receives exactly the amount, and
//! the route may cost at most `max(refund_max_fee_msat, amount × refund_fee_ppm / 10⁶)`, and
//! never more than a tenth of the amount ([`refund_fee_cap`]): what the operator pays in fees
//! for one owner's refunds is at most a tenth of what that owner is refunded, however the
//! refunds are split (a thousand 1-msat refunds may cost nothing in fees, not 10 sat each).
//!
//! A reservation is released only when nothing can have left the node: an error ldk-node
//! returns before it hands the payment to LDK, or LDK's own report that it failed. Anything
//! else (a payment LDK may have dispatched but ldk-node did not record) stays pending until LDK
//! reports it, which it does after a restart too; a success LDK reports for a refund already
//! released is booked, loudly.

use ldk_node::lightning::routing::router::RouteParametersConfig;
use ldk_node::lightning_invoice::Bolt11Invoice;
use ldk_node::payment::PaymentStatus;
use std::str::FromStr;

use super::{Lightning, LightningError, NodeNotice};
use crate::store::{Owner, Refund, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RefundError {
    #[error("bolt11: {0}")]
    Invoice(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the node could not pay the refund: {0}")]
    Send(ldk_node::NodeError),
    /// The invoice was used for a refund before (this is that refund).
    #[error("this invoice was already used for a refund ({})", .0.state.as_str())]
    Duplicate(Box<Refund>),
}

/// The routing fee the operator may pay for a refund of `amount_msat`: the configured cap
/// (`max(floor, amount × ppm / 10⁶)`), never more than a tenth of the amount, so splitting a
/// refund cannot multiply the fees.
pub fn refund_fee_cap(amount_msat: u64, floor_msat: u64, ppm: u64) -> u64 {
    floor_msat
        .max(amount_msat.saturating_mul(ppm) / 1_000_000)
        .min(amount_msat / REFUND_FEE_SHARE)
}

/// The fees of a refund are at most 1/REFUND_FEE_SHARE of its amount.
pub const REFUND_FEE_SHARE: u64 = 10;

/// Whether a send error of ldk-node means the payment never reached LDK's channel manager (so
/// its reservation can be released): it checks these before dispatching. Anything else
/// (a duplicate of a payment in flight, a record it failed to persist after dispatching) may
/// have left the node.
fn nothing_sent(e: &ldk_node::NodeError) -> bool {
    use ldk_node::NodeError as E;
    matches!(
        e,
        E::NotRunning | E::InvalidInvoice | E::InvalidAmount | E::PaymentSendingFailed
    )
}

/// How long a pending refund that LDK has no record of may wait for LDK's report before the
/// watchdog releases it (LDK reports every payment it dispatched, after a restart too; one it
/// never had is never reported).
pub const ORPHAN_REFUND_SECS: u64 = 600;

/// The payment hash of a BOLT11 string, if it parses.
pub fn invoice_hash(bolt11: &str) -> Option<[u8; 32]> {
    Bolt11Invoice::from_str(bolt11.trim())
        .ok()
        .map(|i| *i.payment_hash().as_ref())
}

impl Lightning {
    /// Parses and checks an owner's refund invoice: our network, not expired, payable.
    pub fn parse_refund_invoice(&self, bolt11: &str) -> Result<Bolt11Invoice, RefundError> {
        let inv = Bolt11Invoice::from_str(bolt11.trim())
            .map_err(|e| RefundError::Invoice(format!("not a valid BOLT11 invoice ({e})")))?;
        let want = super::ldk_network(self.network);
        if inv.network() != want {
            return Err(RefundError::Invoice(format!(
                "the invoice is for {:?}, this server runs on {want:?}",
                inv.network()
            )));
        }
        if inv.is_expired() {
            return Err(RefundError::Invoice("the invoice has expired".into()));
        }
        if inv.recover_payee_pub_key() == self.node.node_id() {
            return Err(RefundError::Invoice(
                "the invoice is the server's own: give an invoice of your wallet".into(),
            ));
        }
        Ok(inv)
    }

    /// Reserves and pays a refund of `owner`'s balance to `bolt11`. Returns the refund, still
    /// pending unless the node failed it at once (then the balance is already restored). A
    /// retry with the same invoice returns [`RefundError::Duplicate`] with the first attempt.
    pub fn pay_refund(&self, owner: Owner, bolt11: &str, via: &str) -> Result<Refund, RefundError> {
        let inv = self.parse_refund_invoice(bolt11)?;
        let hash = *inv.payment_hash().as_ref();
        let refund = match self.store.reserve_refund(
            owner,
            inv.amount_milli_satoshis(),
            hash,
            bolt11.trim(),
            via,
        ) {
            Ok(r) => r,
            Err(StoreError::DuplicateRefund { .. }) => {
                let first = self.store.refund(&hash)?.ok_or_else(|| {
                    StoreError::Corrupt("duplicate refund without a record".into())
                })?;
                return Err(RefundError::Duplicate(Box::new(first)));
            }
            Err(e) => return Err(e.into()),
        };
        // Kill-only points (the crash tests): reserved, not yet handed to LDK.
        let _ = self.faults.point("refund_reserved");
        let max_fee = refund_fee_cap(
            refund.amount_msat,
            self.refund_max_fee_msat,
            self.refund_fee_ppm,
        );
        let params = RouteParametersConfig {
            max_total_routing_fee_msat: Some(max_fee),
            ..Default::default()
        };
        let pay = self.node.bolt11_payment();
        let sent = match inv.amount_milli_satoshis() {
            Some(_) => pay.send(&inv, Some(params)),
            None => pay.send_using_amount(&inv, refund.amount_msat, Some(params)),
        };
        match sent {
            Ok(_) => {
                // LDK has the payment; the caller has not heard.
                let _ = self.faults.point("refund_sent");
                tracing::info!(payment_hash = %hex::encode(hash), amount_msat = refund.amount_msat, via, "refund sent");
                Ok(refund)
            }
            Err(e) if nothing_sent(&e) => {
                // Nothing left the node: give the balance back now.
                self.store
                    .finish_refund(&hash, false, None, &format!("not sent: {e}"))?;
                Err(RefundError::Send(e))
            }
            Err(e) => {
                // It may be in flight: LDK's report decides (the watchdog asks LDK too).
                tracing::warn!(payment_hash = %hex::encode(hash), error = %e, via, "refund send returned an error that does not prove nothing was sent: kept pending until LDK reports");
                Ok(refund)
            }
        }
    }

    /// LDK's outcome of an outgoing payment (the event loop): a refund is consumed or released.
    pub(super) fn on_payment_sent(
        &self,
        hash: &[u8; 32],
        succeeded: bool,
        fee_msat: Option<u64>,
        detail: &str,
    ) -> Result<(), LightningError> {
        if let Some(r) = self
            .store
            .finish_refund(hash, succeeded, fee_msat, detail)?
        {
            if succeeded && r.state == crate::store::RefundState::Succeeded {
                crate::metrics::money("refunded", r.amount_msat);
            }
            tracing::info!(payment_hash = %hex::encode(hash), amount_msat = r.amount_msat, state = r.state.as_str(), "refund resolved");
        }
        let _ = self.notices.send(NodeNotice::PaymentSent {
            payment_hash: *hash,
            succeeded,
        });
        Ok(())
    }

    /// Start-up: refunds left pending follow LDK's record of their payment. One LDK has no
    /// record of stays pending: LDK re-emits the outcome of anything it dispatched (the
    /// watchdog releases it once it is an orphan).
    pub(super) fn reconcile_refunds(&self) -> Result<usize, LightningError> {
        self.follow_ldk_refunds(None)
    }

    /// The watchdog of refunds: a pending one whose outcome LDK recorded but never reported to
    /// us (a parked event) is resolved from LDK's record; one LDK has no record of, older than
    /// `orphan_after_secs`, is released. Returns how many it resolved.
    pub fn confirm_refunds(&self) -> Result<usize, LightningError> {
        self.follow_ldk_refunds(Some(ORPHAN_REFUND_SECS))
    }

    /// The watchdog of parked keysends: a `PaymentReceived` that was parked (its credit never
    /// committed) is booked from LDK's record, to the session its TLV named. Returns how many.
    pub fn book_parked_keysends(&self) -> Result<usize, LightningError> {
        let mut booked = 0;
        for (hash, session) in self.store.unbooked_parked_keysends()? {
            let Some(p) = self
                .node
                .payment(&ldk_node::lightning::ln::channelmanager::PaymentId(hash))
            else {
                continue;
            };
            if p.status != PaymentStatus::Succeeded
                || p.direction != ldk_node::payment::PaymentDirection::Inbound
            {
                continue;
            }
            let amount = p.amount_msat.unwrap_or(0);
            if self.credit_keysend(&hash, session, amount)? {
                tracing::warn!(payment_hash = %hex::encode(hash), amount_msat = amount, "a parked keysend booked from LDK's record");
                booked += 1;
            }
        }
        Ok(booked)
    }

    fn follow_ldk_refunds(&self, orphan_after_secs: Option<u64>) -> Result<usize, LightningError> {
        let mut resolved = 0;
        let now = crate::store::now_unix();
        for r in self.store.pending_refunds()? {
            let h = r.payment_hash;
            let payment = self
                .node
                .payment(&ldk_node::lightning::ln::channelmanager::PaymentId(h));
            let outcome = match payment.as_ref().map(|p| p.status) {
                Some(PaymentStatus::Succeeded) => Some((
                    true,
                    payment.and_then(|p| p.fee_paid_msat),
                    "succeeded (from LDK's record)",
                )),
                Some(PaymentStatus::Failed) => Some((false, None, "failed (from LDK's record)")),
                Some(PaymentStatus::Pending) => None,
                None => match orphan_after_secs {
                    Some(after) if now.saturating_sub(r.created_at_unix) >= after => {
                        tracing::warn!(payment_hash = %hex::encode(h), "a pending refund LDK never recorded: released");
                        Some((false, None, "LDK never recorded the payment"))
                    }
                    _ => None,
                },
            };
            if let Some((ok, fee, why)) = outcome {
                self.on_payment_sent(&h, ok, fee, why)?;
                resolved += 1;
            }
        }
        Ok(resolved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitting_a_refund_cannot_multiply_its_fees() {
        let (floor, ppm) = (10_000, 10_000);
        // Before: each refund could cost max(10 sat, 1 %) whatever its size, so 1 000 refunds
        // of 1 msat could cost the operator 10 000 sat. Now at most a tenth of each amount.
        let split: u64 = (0..1_000).map(|_| refund_fee_cap(1, floor, ppm)).sum();
        assert_eq!(split, 0);
        assert_eq!(refund_fee_cap(50_000, floor, ppm), 5_000, "a tenth");
        assert_eq!(refund_fee_cap(200_000, floor, ppm), 10_000, "the floor");
        assert_eq!(refund_fee_cap(10_000_000, floor, ppm), 100_000, "1 %");
        for amount in [1, 9, 10, 999, 100_000, 123_456_789] {
            assert!(refund_fee_cap(amount, floor, ppm) * REFUND_FEE_SHARE <= amount);
        }
    }

    #[test]
    fn only_errors_before_dispatch_release_a_refund() {
        use ldk_node::NodeError as E;
        assert!(nothing_sent(&E::PaymentSendingFailed));
        assert!(nothing_sent(&E::InvalidInvoice));
        assert!(!nothing_sent(&E::DuplicatePayment));
        assert!(!nothing_sent(&E::PersistenceFailed));
    }
}

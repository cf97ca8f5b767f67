//! Paying refundable balances back to their owners, exactly once.
//!
//! The owner sends a BOLT11 invoice of its own: with an amount, that much is refunded; without
//! one, the whole refundable balance. The amount is reserved in the transaction that records
//! the attempt, then the node pays. LDK's outcome (`PaymentSuccessful` / `PaymentFailed`,
//! handled by the event loop, or its payment store at start-up) consumes or releases the
//! reservation. Routing fees are the operator's: the owner receives exactly the amount, and
//! the route may cost at most `max(refund_max_fee_msat, amount × refund_fee_ppm / 10⁶)`.

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
        let max_fee = self
            .refund_max_fee_msat
            .max(refund.amount_msat.saturating_mul(self.refund_fee_ppm) / 1_000_000);
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
                tracing::info!(payment_hash = %hex::encode(hash), amount_msat = refund.amount_msat, via, "refund sent");
                Ok(refund)
            }
            Err(e) => {
                // Nothing left the node: give the balance back now.
                self.store
                    .finish_refund(&hash, false, None, &format!("not sent: {e}"))?;
                Err(RefundError::Send(e))
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

    /// Start-up: refunds left pending follow LDK's record of their payment (one that never
    /// reached LDK is released).
    pub(super) fn reconcile_refunds(&self) -> Result<(), LightningError> {
        for r in self.store.pending_refunds()? {
            match self.ldk_status(&r.payment_hash) {
                Some((PaymentStatus::Succeeded, _)) => {
                    let fee = self
                        .node
                        .payment(&ldk_node::lightning::ln::channelmanager::PaymentId(
                            r.payment_hash,
                        ))
                        .and_then(|p| p.fee_paid_msat);
                    self.store.finish_refund(
                        &r.payment_hash,
                        true,
                        fee,
                        "succeeded (found at start)",
                    )?;
                }
                Some((PaymentStatus::Failed, _)) => {
                    self.store.finish_refund(
                        &r.payment_hash,
                        false,
                        None,
                        "failed (found at start)",
                    )?;
                }
                None => {
                    self.store.finish_refund(
                        &r.payment_hash,
                        false,
                        None,
                        "never sent (the server stopped first)",
                    )?;
                }
                Some((PaymentStatus::Pending, _)) => {}
            }
        }
        Ok(())
    }
}

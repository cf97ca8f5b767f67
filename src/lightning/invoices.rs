//! Every decision about an incoming payment, in one place.
//!
//! The claim protocol, and why it survives `kill -9` anywhere:
//! 1. An HTLC for one of our hold invoices is locked in: the event loop commits `held`, then
//!    tells the invoice's session ([`HeldHtlc`]). LDK cannot claim it on its own: the
//!    preimage is ours.
//! 2. The session decides to claim: `held → claiming` is committed together with the chunk's
//!    delivery *before* LDK is asked (`claim_for_hash`); only then are its tokens (BOLT11) or
//!    its key (ATOMIC) sent. The preimage is the ATOMIC chunk's key: once LDK claims, the
//!    payer can read the chunk, so it must already be a delivered chunk in the ledger. A claim
//!    LDK refuses takes the delivery back in the commit that fails the invoice.
//! 3. LDK reports the claim (`PaymentReceived`): only now is the money booked (`claimed`).
//!
//! After a crash, [`Lightning::reconcile_at_start`] can tell every case apart without racing
//! LDK's background processor: a `held` invoice was never claimed (safe to fail back); a
//! `claiming` one may have been, so it is claimed again (LDK deduplicates) and LDK's report
//! books it; an `open` one had no HTLC we knew of. A claim LDK never completes is found by
//! [`Lightning::confirm_claims`] and, if its chunk was delivered, written off as the
//! operator's loss.

use ldk_node::bitcoin::hashes::{sha256, Hash};
use ldk_node::lightning::ln::channelmanager::PaymentId;
use ldk_node::lightning_invoice::{Bolt11InvoiceDescription, Description};
use ldk_node::lightning_types::payment::{PaymentHash, PaymentPreimage};
use ldk_node::payment::{PaymentDirection, PaymentKind, PaymentStatus};
use rand::RngCore;
use std::collections::HashSet;
use tokio::sync::mpsc;

use super::{HeldHtlc, Lightning, LightningError, NodeNotice, SessionNotice};
use crate::store::{
    ChunkDelivery, Invoice, InvoicePurpose, InvoiceState, NewInvoice, Settlement, StoreError,
};

/// A held HTLC is failed back rather than claimed this close (in blocks) to LDK's claim
/// deadline for it.
pub const CLAIM_MARGIN_BLOCKS: u32 = 2;

/// What a new hold invoice is for.
#[derive(Debug, Clone)]
pub struct HoldInvoice {
    pub amount_msat: u64,
    pub description: String,
    pub expiry_secs: u32,
    pub purpose: InvoicePurpose,
    pub session_id: Option<[u8; 16]>,
    pub account_id: Option<[u8; 16]>,
    pub chunk_index: Option<u32>,
    /// The preimage to use (ATOMIC: the chunk key); random when None.
    pub preimage: Option<[u8; 32]>,
}

impl Lightning {
    /// Issues a hold invoice with our own preimage. The invoice is committed before its BOLT11
    /// leaves this function, and `notify` (if any) hears when the payer's HTLC is locked in.
    pub fn create_hold_invoice(
        &self,
        spec: &HoldInvoice,
        notify: Option<mpsc::UnboundedSender<HeldHtlc>>,
    ) -> Result<Invoice, LightningError> {
        let preimage = spec.preimage.unwrap_or_else(|| {
            let mut p = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut p);
            p
        });
        let hash = sha256::Hash::hash(&preimage).to_byte_array();
        let desc =
            Description::new(spec.description.clone()).map_err(|e| LightningError::Invalid {
                what: "invoice description",
                reason: e.to_string(),
            })?;
        let bolt11 = self.node.bolt11_payment().receive_for_hash(
            spec.amount_msat,
            &Bolt11InvoiceDescription::Direct(desc),
            spec.expiry_secs,
            PaymentHash(hash),
        )?;
        // A crash here leaves an invoice only LDK knows; nobody has its BOLT11, and start-up
        // fails it in LDK too.
        self.faults.point("invoice_in_ldk")?;
        // Register the listener before anyone can see the invoice: a payment can only come
        // after the BOLT11 string is handed out.
        if let Some(tx) = notify {
            self.holds.lock().unwrap().insert(hash, tx);
        }
        let inv = self.store.insert_invoice(&NewInvoice {
            payment_hash: hash,
            preimage,
            bolt11: bolt11.to_string(),
            amount_msat: spec.amount_msat,
            session_id: spec.session_id,
            account_id: spec.account_id,
            chunk_index: spec.chunk_index,
            purpose: spec.purpose,
            expires_at_unix: crate::store::now_unix() + spec.expiry_secs as u64,
        });
        match inv {
            Ok(inv) => Ok(inv),
            Err(e) => {
                self.holds.lock().unwrap().remove(&hash);
                self.fail_in_node(&hash);
                Err(e.into())
            }
        }
    }

    /// Claims held HTLCs (the prompt's first, with the first chunk, then the chunk's) and
    /// records the delivery they pay for: the decision and the delivery committed in one
    /// transaction, then LDK's claims, in order. The caller sends the chunk (plaintext, or
    /// ATOMIC's key) only after this returns Ok. A claim LDK refuses fails it and every later
    /// one back unrevealed and takes the delivery back (an earlier claim that LDK took is
    /// booked from its report, refundable: nothing was delivered for it). Blocking: run it off
    /// the async workers.
    pub fn claim(
        &self,
        hashes: &[[u8; 32]],
        delivery: Option<&ChunkDelivery>,
    ) -> Result<(), LightningError> {
        // An HTLC held (a prompt's, while its session waits) until within a few blocks of
        // LDK's claim deadline is failed back instead: claimed that late, LDK could have to
        // go on chain for it, or it could expire while the claim is in flight.
        if let Some(late) = self.too_late_to_claim(hashes) {
            for h in hashes {
                let _ = self.fail(h, "held too close to its claim deadline");
            }
            return Err(LightningError::ClaimRefused {
                hash: hex::encode(late),
                reason: format!(
                    "within {CLAIM_MARGIN_BLOCKS} blocks of its claim deadline: failed back"
                ),
            });
        }
        let decided = match self.store.begin_claim(hashes, delivery) {
            Ok(v) => v,
            Err(e) => {
                // Nothing was decided: what is held goes back to the payer.
                for h in hashes {
                    let _ = self.fail(h, "the claim could not be recorded");
                }
                return Err(e.into());
            }
        };
        for (i, inv) in decided.iter().enumerate() {
            if let Err(e) = self.claim_in_node(inv) {
                // LDK did not claim this one; the rest were not tried.
                let refused: Vec<[u8; 32]> = decided[i..].iter().map(|d| d.payment_hash).collect();
                self.refuse_claims(&refused, delivery, &e.to_string());
                return Err(LightningError::ClaimRefused {
                    hash: hex::encode(inv.payment_hash),
                    reason: e.to_string(),
                });
            }
        }
        self.faults.point("after_claim")?;
        Ok(())
    }

    /// LDK's claim deadline (block height) for a held HTLC of ours, while it is held.
    pub fn claim_deadline(&self, hash: &[u8; 32]) -> Option<u32> {
        self.deadlines.lock().unwrap().get(hash).copied()
    }

    /// The first of `hashes` whose claim deadline is `CLAIM_MARGIN_BLOCKS` away or less.
    fn too_late_to_claim(&self, hashes: &[[u8; 32]]) -> Option<[u8; 32]> {
        let deadlines: Vec<(u32, [u8; 32])> = {
            let d = self.deadlines.lock().unwrap();
            hashes
                .iter()
                .filter_map(|h| d.get(h).map(|v| (*v, *h)))
                .collect()
        };
        if deadlines.is_empty() {
            return None;
        }
        let height = self.node.status().current_best_block.height;
        deadlines
            .into_iter()
            .find(|(d, _)| height + CLAIM_MARGIN_BLOCKS >= *d)
            .map(|(_, h)| h)
    }

    fn claim_in_node(&self, inv: &Invoice) -> Result<(), LightningError> {
        self.deadlines.lock().unwrap().remove(&inv.payment_hash);
        self.faults.point("claim")?;
        self.node.bolt11_payment().claim_for_hash(
            PaymentHash(inv.payment_hash),
            inv.received_msat.unwrap_or(inv.amount_msat),
            PaymentPreimage(inv.preimage),
        )?;
        Ok(())
    }

    /// LDK did not claim decided invoices: `claiming → failed` and the delivery taken back
    /// (one commit), then the HTLCs failed back.
    fn refuse_claims(&self, hashes: &[[u8; 32]], delivery: Option<&ChunkDelivery>, reason: &str) {
        if let Err(e) = self.store.claim_refused(hashes, delivery, reason) {
            tracing::error!(error = %e, "recording a refused claim");
        }
        for h in hashes {
            self.fail_in_node(h);
        }
    }

    /// Fails a held HTLC back to the payer (commit first: the payer's money was never ours,
    /// and a replayed PaymentClaimable for a failed invoice is failed again).
    pub fn fail(&self, hash: &[u8; 32], reason: &str) -> Result<(), LightningError> {
        self.holds.lock().unwrap().remove(hash);
        self.deadlines.lock().unwrap().remove(hash);
        self.store
            .transition_invoice(hash, InvoiceState::Failed, None, reason)?;
        self.fail_in_node(hash);
        Ok(())
    }

    /// Withdraws an invoice whose session ended: open → canceled (LDK's record too), held →
    /// failed back. A decided claim is left to LDK's report. A later payment is failed.
    pub fn cancel(&self, hash: &[u8; 32], reason: &str) -> Result<(), LightningError> {
        self.holds.lock().unwrap().remove(hash);
        self.deadlines.lock().unwrap().remove(hash);
        match self.store.invoice(hash)?.map(|i| i.state) {
            Some(InvoiceState::Open) => {
                self.store
                    .transition_invoice(hash, InvoiceState::Canceled, None, reason)?;
                self.fail_in_node(hash);
                Ok(())
            }
            Some(InvoiceState::Held) => self.fail(hash, reason),
            _ => Ok(()),
        }
    }

    pub(super) fn fail_in_node(&self, hash: &[u8; 32]) {
        if let Err(e) = self.node.bolt11_payment().fail_for_hash(PaymentHash(*hash)) {
            // Unknown to the node, or already resolved: nothing is held.
            tracing::debug!(payment_hash = %hex::encode(hash), error = %e, "fail_for_hash");
        }
    }

    /// LDK's status of the payment with this hash (our invoices: inbound; refunds: outbound).
    pub(super) fn ldk_status(&self, hash: &[u8; 32]) -> Option<(PaymentStatus, Option<u64>)> {
        self.node
            .payment(&PaymentId(*hash))
            .map(|p| (p.status, p.amount_msat))
    }

    /// An HTLC set for one of our payment hashes is claimable (`PaymentClaimable`).
    pub(super) fn on_claimable(
        &self,
        hash: &[u8; 32],
        amount_msat: u64,
        deadline: Option<u32>,
    ) -> Result<(), LightningError> {
        let hx = hex::encode(hash);
        let Some(inv) = self.store.invoice(hash)? else {
            tracing::warn!(payment_hash = %hx, amount_msat, "HTLC for an unknown invoice: failing back");
            self.store
                .record_rejected_htlc(hash, amount_msat, "unknown invoice")?;
            self.fail_in_node(hash);
            return Ok(());
        };
        match inv.state {
            InvoiceState::Open => {
                let underpaid = amount_msat < inv.amount_msat;
                let expired = crate::store::now_unix() > inv.expires_at_unix;
                self.store
                    .transition_invoice(hash, InvoiceState::Held, Some(amount_msat), "")?;
                if underpaid || expired {
                    let why = if underpaid {
                        format!("underpaid: {amount_msat} < {} msat", inv.amount_msat)
                    } else {
                        "the invoice has expired".to_string()
                    };
                    return self.fail(hash, &why);
                }
                tracing::info!(payment_hash = %hx, amount_msat, "HTLC held");
                self.faults.point("held")?;
                self.decide_held(&inv, amount_msat, deadline)
            }
            // A replay of an event we had recorded: decide again.
            InvoiceState::Held => self.decide_held(&inv, amount_msat, deadline),
            // We decided to claim (crash before LDK was told, or a replay): claim; LDK dedupes.
            InvoiceState::Claiming => {
                if let Err(e) = self.claim_in_node(&inv) {
                    tracing::warn!(payment_hash = %hx, error = %e, "claim again after a replay");
                }
                Ok(())
            }
            // A new HTLC set for a hash that is already claimed: never claim it again. ldk-node
            // fails such duplicates itself once its record says Succeeded; failing through it
            // would overwrite that record, so only fail when LDK has not recorded the claim.
            InvoiceState::Claimed => {
                tracing::warn!(payment_hash = %hx, amount_msat, "second HTLC set for a claimed invoice: failing back");
                self.store
                    .record_rejected_htlc(hash, amount_msat, "invoice already claimed")?;
                if !matches!(self.ldk_status(hash), Some((PaymentStatus::Succeeded, _))) {
                    self.fail_in_node(hash);
                }
                Ok(())
            }
            // Halted, finished, expired or cancelled: never keep it.
            s @ (InvoiceState::Failed | InvoiceState::Expired | InvoiceState::Canceled) => {
                tracing::info!(payment_hash = %hx, state = %s, "late payment: failing back");
                self.store
                    .record_rejected_htlc(hash, amount_msat, &format!("invoice {s}"))?;
                self.fail_in_node(hash);
                Ok(())
            }
        }
    }

    /// A held HTLC: a TopUp is claimed here (its account exists: nothing else to wait for);
    /// a chunk or prompt goes to its session, or back to the payer when nobody listens.
    fn decide_held(
        &self,
        inv: &Invoice,
        amount_msat: u64,
        deadline: Option<u32>,
    ) -> Result<(), LightningError> {
        let hash = &inv.payment_hash;
        if inv.purpose == InvoicePurpose::TopUp {
            return match self.claim(&[*hash], None) {
                Err(LightningError::ClaimRefused { .. }) => Ok(()),
                other => other,
            };
        }
        let held = HeldHtlc {
            payment_hash: *hash,
            received_msat: amount_msat,
            claim_deadline_height: deadline,
            at: std::time::Instant::now(),
        };
        if let Some(d) = deadline {
            self.deadlines.lock().unwrap().insert(*hash, d);
        }
        match self.take_listener(hash) {
            Some(tx) if tx.send(held).is_ok() => Ok(()),
            _ => self.fail(hash, "no live session for this invoice"),
        }
    }

    /// LDK received money (`PaymentReceived`): a claim of ours completed, or a keysend.
    pub(super) fn on_received(
        &self,
        hash: &[u8; 32],
        amount_msat: u64,
        custom_records: &[ldk_node::CustomTlvRecord],
    ) -> Result<(), LightningError> {
        if self.store.invoice(hash)?.is_some() {
            match self.store.record_settlement(hash, amount_msat)? {
                Settlement::Recorded(inv) => self.settled(&inv, amount_msat),
                Settlement::Unexpected { was, invoice } => {
                    tracing::error!(
                        payment_hash = %hex::encode(hash), was = %was, amount_msat,
                        "LDK settled an invoice we had not decided to claim; booked as the owner's refundable money"
                    );
                    self.settled(&invoice, amount_msat);
                }
                Settlement::Already(_) => {}
            }
        } else {
            // Spontaneous payment (keysend): credit the session named in our TLV, if any.
            self.faults.point("keysend_credit")?;
            self.credit_keysend(hash, self.keysend_session(custom_records), amount_msat)?;
        }
        let _ = self.notices.send(NodeNotice::PaymentReceived {
            payment_hash: *hash,
            amount_msat,
        });
        Ok(())
    }

    /// Books a keysend (once per payment hash) to `session`, or unattributed when it names
    /// none we know, and tells a running session of its credit. True when newly booked. The
    /// event loop's path, and the watchdog's for a parked one.
    pub(super) fn credit_keysend(
        &self,
        hash: &[u8; 32],
        session: Option<[u8; 16]>,
        amount_msat: u64,
    ) -> Result<bool, LightningError> {
        let credited = match self.store.record_keysend_credit(hash, session, amount_msat) {
            Ok(new) => new,
            Err(StoreError::NotFound { .. }) => {
                self.store.record_keysend_credit(hash, None, amount_msat)?
            }
            Err(e) => return Err(e.into()),
        };
        if credited {
            crate::metrics::money("credited", amount_msat);
            if let Some(sid) = &session {
                self.notify_session(sid, SessionNotice::Credit { amount_msat });
            }
        }
        Ok(credited)
    }

    fn settled(&self, inv: &Invoice, amount_msat: u64) {
        crate::metrics::money(
            if inv.purpose == InvoicePurpose::TopUp {
                "topup"
            } else {
                "claimed"
            },
            amount_msat,
        );
        if let Some(sid) = &inv.session_id {
            self.notify_session(
                sid,
                SessionNotice::Settled {
                    payment_hash: inv.payment_hash,
                    amount_msat,
                },
            );
        }
    }

    /// After a restart no session survives (until one can be resumed): settles what the
    /// previous run left unresolved, following what LDK recorded. Runs before the event loop
    /// and cannot race LDK's background processor: LDK can only claim what we decided to
    /// claim (`claiming`), and those are claimed again and booked from LDK's own report.
    pub fn reconcile_at_start(&self) -> Result<(), LightningError> {
        let mut ours = HashSet::new();
        for inv in self.store.unresolved_invoices()? {
            let hash = inv.payment_hash;
            ours.insert(hash);
            match inv.state {
                InvoiceState::Open => {
                    self.store.transition_invoice(
                        &hash,
                        InvoiceState::Canceled,
                        None,
                        "server restarted",
                    )?;
                    self.fail_in_node(&hash);
                }
                InvoiceState::Held => self.fail(&hash, "server restarted before deciding")?,
                InvoiceState::Claiming => self.resume_claim(&inv)?,
                _ => {}
            }
        }
        // An invoice LDK issued just before a crash, which never reached our store (nobody
        // has its BOLT11): fail it in LDK too, so both records agree.
        for p in self.node.list_payments_with_filter(|p| {
            p.direction == PaymentDirection::Inbound
                && p.status == PaymentStatus::Pending
                && matches!(p.kind, PaymentKind::Bolt11 { .. })
        }) {
            let hash = p.id.0;
            if !ours.contains(&hash) && self.store.invoice(&hash)?.is_none() {
                tracing::info!(payment_hash = %hex::encode(hash), "an invoice only LDK knew: failing it");
                self.fail_in_node(&hash);
            }
        }
        self.reconcile_refunds()?;
        let halted = self.store.halt_open_sessions("server_restart")?;
        if halted > 0 {
            tracing::info!(halted, "sessions of the previous run halted");
        }
        Ok(())
    }

    /// A `claiming` invoice whose outcome we did not record: follow LDK.
    fn resume_claim(&self, inv: &Invoice) -> Result<(), LightningError> {
        let hash = inv.payment_hash;
        match self.ldk_status(&hash) {
            Some((PaymentStatus::Succeeded, amount)) => {
                let amount = amount.or(inv.received_msat).unwrap_or(inv.amount_msat);
                self.store.record_settlement(&hash, amount)?;
            }
            Some((PaymentStatus::Failed, _)) | None => {
                self.write_off(&hash, "LDK has no claim for a decided invoice");
            }
            Some((PaymentStatus::Pending, _)) => {
                // Claimed already (LDK replays its PaymentClaimed) or still claimable: either
                // way LDK completes it and reports it; if it cannot, confirm_claims writes it off.
                if let Err(e) = self.claim_in_node(inv) {
                    tracing::warn!(payment_hash = %hex::encode(hash), error = %e, "claim again at start");
                }
            }
        }
        Ok(())
    }

    fn write_off(&self, hash: &[u8; 32], reason: &str) {
        match self.store.write_off_unsettled_claim(hash, reason) {
            Ok(Some(loss)) => {
                crate::metrics::money("lost", loss.amount_msat);
                tracing::error!(
                    payment_hash = %hex::encode(hash), amount_msat = loss.amount_msat,
                    "a delivered chunk's claim never settled: written off as the operator's loss"
                )
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(payment_hash = %hex::encode(hash), error = %e, "writing off a claim")
            }
        }
    }

    /// The sweeper: open invoices past their expiry become `expired`, in the store and in
    /// LDK's payment store (a payment can no longer be taken for them: `on_claimable` fails
    /// an expired one back anyway). Unpaid TopUps, abandoned chunks and prompts are resolved
    /// as they expire, not left for a restart to walk through. Returns how many it swept.
    pub fn sweep_expired(&self) -> Result<usize, LightningError> {
        let now = crate::store::now_unix();
        let mut swept = 0;
        for inv in self.store.expired_open_invoices(now, 500)? {
            self.holds.lock().unwrap().remove(&inv.payment_hash);
            match self.store.transition_invoice(
                &inv.payment_hash,
                InvoiceState::Expired,
                None,
                "expired unpaid",
            ) {
                Ok(_) => {
                    self.fail_in_node(&inv.payment_hash);
                    swept += 1;
                }
                // Held meanwhile (a payment raced the sweep): the event loop decides it.
                Err(StoreError::IllegalTransition { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(swept)
    }

    /// The watchdog of decided claims: one that LDK has not reported within
    /// `claim_confirm_timeout` is booked if LDK's record says it succeeded (its report was
    /// lost, e.g. a parked event), else written off. Returns how many it resolved.
    pub fn confirm_claims(&self) -> Result<usize, LightningError> {
        let cutoff = crate::store::now_unix().saturating_sub(self.claim_confirm_timeout.as_secs());
        let mut resolved = 0;
        for inv in self.store.invoices_in(InvoiceState::Claiming)? {
            if inv.claiming_at_unix.unwrap_or(0) > cutoff {
                continue;
            }
            match self.ldk_status(&inv.payment_hash) {
                Some((PaymentStatus::Succeeded, amount)) => {
                    let amount = amount.or(inv.received_msat).unwrap_or(inv.amount_msat);
                    match self.store.record_settlement(&inv.payment_hash, amount)? {
                        Settlement::Recorded(i) | Settlement::Unexpected { invoice: i, .. } => {
                            self.settled(&i, amount)
                        }
                        Settlement::Already(_) => {}
                    }
                }
                _ => self.write_off(
                    &inv.payment_hash,
                    &format!(
                        "LDK did not complete the claim within {} s",
                        self.claim_confirm_timeout.as_secs()
                    ),
                ),
            }
            resolved += 1;
        }
        Ok(resolved)
    }
}

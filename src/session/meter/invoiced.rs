//! BOLT11 and ATOMIC: every chunk (and a priced prompt) has a hold invoice with our preimage
//! (ATOMIC: the chunk's key, the chunk sent at once encrypted under it). A held HTLC is claimed
//! with the chunk's delivery committed first (`Lightning::claim`), then the chunk (or its key)
//! is sent.

use tokio::time::Instant;

use super::{blocking, Chunk, End, Meter, Mode, PromptPay, Unpaid};
use crate::lightning::invoices::HoldInvoice;
use crate::lightning::{HeldHtlc, LightningError};
use crate::store::InvoicePurpose;
use crate::wire::cipher;
use crate::wire::proto::{self, generate_event::Event as Ev};

impl Meter {
    /// BOLT11/ATOMIC: the prompt's hold invoice, the stream's first event after Accepted (its
    /// HTLC, once held, starts the engine; it is claimed with the first chunk).
    pub(super) async fn invoice_prompt(&mut self) -> Result<(), End> {
        let price = self.spec.prompt_price_msat;
        let spec = HoldInvoice {
            amount_msat: price,
            description: format!("satstream prompt ({} tokens)", self.spec.prompt_tokens),
            expiry_secs: self.spec.invoice_expiry_secs,
            purpose: InvoicePurpose::Prompt,
            session_id: Some(self.sid()),
            account_id: None,
            chunk_index: None,
            preimage: None,
        };
        let inv = self.create_invoice(spec).await?;
        let invoice = proto::Invoice {
            chunk_index: None,
            bolt11: inv.bolt11,
            payment_hash: hex::encode(inv.payment_hash),
            amount_msat: price,
            tokens: self.spec.prompt_tokens,
            expires_at_unix: inv.expires_at_unix,
        };
        self.prompt = PromptPay::Invoiced {
            hash: inv.payment_hash,
            since: Instant::now(),
            invoice: invoice.clone(),
        };
        self.send(Ev::Invoice(invoice)).await
    }

    /// BOLT11/ATOMIC: a sealed chunk's hold invoice (ATOMIC: the chunk encrypted under the
    /// invoice's preimage, sent with it), tracked before it is sent.
    pub(super) async fn invoice_chunk(&mut self, chunk: Chunk, price_msat: u64) -> Result<(), End> {
        let k = chunk.index;
        let sealed = (self.spec.mode == Mode::Atomic).then(|| cipher::seal(chunk.text.as_bytes()));
        let inv = self
            .create_invoice(HoldInvoice {
                amount_msat: price_msat,
                description: format!("satstream chunk {k} ({} tokens)", chunk.tokens),
                expiry_secs: self.spec.invoice_expiry_secs,
                purpose: InvoicePurpose::Chunk,
                session_id: Some(self.sid()),
                account_id: None,
                chunk_index: Some(k),
                preimage: sealed.as_ref().map(|s| s.key),
            })
            .await?;
        let (first_token, tokens) = (chunk.first_token, chunk.tokens);
        // Tracked before it is sent: if the client is gone, the end withdraws it.
        self.by_hash.insert(inv.payment_hash, k);
        self.unpaid.insert(
            k,
            Unpaid::new(
                chunk,
                price_msat,
                Some(inv.payment_hash),
                sealed.as_ref().map(|s| s.key),
            ),
        );
        if self.parts.lightning.faults().point("send_invoice").is_err() {
            return Err(End::ClientGone);
        }
        let mut ask = Vec::new();
        if let Some(s) = sealed {
            ask.push(Ev::EncryptedChunk(proto::EncryptedChunk {
                chunk_index: k,
                ciphertext: s.ciphertext,
                nonce: s.nonce.to_vec(),
                first_token,
                tokens,
                payment_hash: hex::encode(inv.payment_hash),
            }));
        }
        ask.push(Ev::Invoice(proto::Invoice {
            chunk_index: Some(k),
            bolt11: inv.bolt11,
            payment_hash: hex::encode(inv.payment_hash),
            amount_msat: price_msat,
            tokens,
            expires_at_unix: inv.expires_at_unix,
        }));
        if let Some(u) = self.unpaid.get_mut(&k) {
            u.resend = ask.clone();
        }
        for e in ask {
            self.send(e).await?;
        }
        Ok(())
    }

    /// A payer's HTLC for one of our invoices is held: the prompt's starts the engine (it is
    /// claimed with the first chunk); a chunk's is claimed, its delivery recorded, and the
    /// chunk delivered (plaintext or key); the engine may go one chunk further.
    pub(super) async fn on_held(&mut self, h: HeldHtlc) -> Result<(), End> {
        if let PromptPay::Invoiced { hash, .. } = self.prompt {
            if hash == h.payment_hash {
                self.prompt = PromptPay::Done;
                self.prompt_held = Some(hash);
                self.live.paid();
                tracing::debug!("prompt paid (held): starting the engine");
                return self.start_engine().await;
            }
        }
        let Some(k) = self.by_hash.remove(&h.payment_hash) else {
            // Not ours any more (cannot happen: listeners are per invoice); never keep it.
            let (ln, hash) = (self.parts.lightning.clone(), h.payment_hash);
            let _ = blocking(move || ln.fail(&hash, "no such chunk in this session")).await;
            return Ok(());
        };
        let u = self.unpaid.remove(&k).expect("indexed chunk");
        self.spec
            .pace
            .on_paid(u.since.elapsed(), std::time::Instant::now());
        let notice = h.at.elapsed();
        let claiming = Instant::now();
        // The prompt's claim first: if LDK refuses it, the chunk is failed back unrevealed.
        let mut hashes = Vec::with_capacity(2);
        let mut delivery = self.delivery(&u);
        if let Some(p) = self.prompt_held.take() {
            hashes.push(p);
            delivery.prompt_msat = self.spec.prompt_price_msat;
        }
        hashes.push(h.payment_hash);
        let ln = self.parts.lightning.clone();
        let claimed = {
            let hashes = hashes.clone();
            blocking(move || ln.claim(&hashes, Some(&delivery))).await?
        };
        self.unsettled.extend(hashes.iter().copied());
        if let Err(e) = claimed {
            return Err(claim_end(k, e));
        }
        self.spent_msat += u.price_msat;
        self.live.paid();
        let claim = claiming.elapsed();
        self.after_commit()?;
        let delivering = Instant::now();
        self.release(u).await?;
        self.parts
            .metrics
            .payment_to_tokens(notice, claim, delivering.elapsed());
        Ok(())
    }

    pub(super) async fn create_invoice(
        &self,
        spec: HoldInvoice,
    ) -> Result<crate::store::Invoice, End> {
        let (ln, tx) = (self.parts.lightning.clone(), self.held_tx.clone());
        blocking(move || ln.create_hold_invoice(&spec, Some(tx)))
            .await?
            .map_err(|e| End::payment(format!("cannot issue an invoice: {e}")))
    }
}

/// How a failed claim ends the session (the HTLC is already failed back, or its money will be
/// booked as refundable).
fn claim_end(k: u32, e: LightningError) -> End {
    End::payment(format!("claim of chunk {k} failed: {e}"))
}

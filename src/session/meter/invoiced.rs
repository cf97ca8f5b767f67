//! BOLT11 and ATOMIC: every chunk (and a priced prompt) has a hold invoice with our preimage
//! (ATOMIC: the chunk's key, the chunk sent at once encrypted under it). A held HTLC is claimed
//! with the chunk's delivery committed first (`Lightning::claim`), then the chunk (or its key)
//! is sent.
//!
//! The first chunk's invoice is issued when the session opens, before any token (`Early`):
//! its price is known as long as the answer is at least one chunk long, so the client pays
//! while the engine prefills and the first chunk is claimed and sent the moment it is
//! complete. An answer that ends shorter never claims it: the early invoice is withdrawn (its
//! HTLC failed back) and the exact, shorter chunk invoiced again. Nothing is ever claimed for
//! tokens not delivered.

use tokio::time::Instant;

use super::{blocking, Chunk, Early, End, Meter, Mode, PromptPay, Unpaid};
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
            replaces_payment_hash: String::new(),
        };
        self.prompt = PromptPay::Invoiced {
            hash: inv.payment_hash,
            since: Instant::now(),
            invoice: invoice.clone(),
        };
        self.send(Ev::Invoice(invoice)).await
    }

    /// BOLT11/ATOMIC: the first chunk's invoice, before its first token, for the first chunk's
    /// size (or `max_tokens`, if fewer). Its preimage is the chunk's key in ATOMIC.
    pub(super) async fn invoice_first(&mut self) -> Result<(), End> {
        let tokens = self
            .first_chunk_target()
            .min(self.spec.params.max_tokens)
            .max(1);
        let price_msat = self.spec.price.chunk(tokens);
        let (inv, invoice) = self
            .chunk_invoice(0, tokens, price_msat, None, None)
            .await?;
        // Tracked before it is sent: if the client is gone, the end withdraws it.
        self.early = Some(Early {
            hash: inv.payment_hash,
            key: inv.preimage,
            tokens,
            since: Instant::now(),
            invoice: invoice.clone(),
            held: None,
        });
        if self.parts.lightning.faults().point("send_invoice").is_err() {
            return Err(End::ClientGone);
        }
        self.send(Ev::Invoice(invoice)).await
    }

    /// The first chunk is complete: at the early invoice's size it takes that invoice (and
    /// its HTLC, if already held: claimed now); shorter, the early invoice is withdrawn and
    /// the chunk invoiced at its own price.
    async fn take_early(&mut self, chunk: Chunk, price_msat: u64, e: Early) -> Result<(), End> {
        if chunk.tokens != e.tokens {
            let replaced = e.hash;
            let issued = self
                .issue_chunk_invoice(chunk, price_msat, Some(replaced))
                .await;
            // Withdrawn whatever became of the replacement (no longer tracked, it would hold
            // a paid HTLC until its deadline), and after it is out, so the client learns of
            // the replacement before its payment comes back. A payment of the withdrawn one
            // is failed back, now or when it arrives.
            let ln = self.parts.lightning.clone();
            let withdrawn = blocking(move || {
                ln.cancel(&replaced, "the answer ended shorter than its first chunk")
            })
            .await;
            issued?;
            withdrawn?
                .map_err(|e| End::payment(format!("cannot withdraw the first invoice: {e}")))?;
            tracing::debug!("short answer: the early first invoice was withdrawn and reissued");
            return Ok(());
        }
        let k = chunk.index;
        let sealed = (self.spec.mode == Mode::Atomic)
            .then(|| cipher::seal_with(e.key, chunk.text.as_bytes()));
        let (first_token, tokens) = (chunk.first_token, chunk.tokens);
        self.by_hash.insert(e.hash, k);
        let mut u = Unpaid::new(
            chunk,
            price_msat,
            Some(e.hash),
            sealed.as_ref().map(|s| s.key),
        );
        // Its payment was asked for when the early invoice went out.
        u.since = e.since;
        let ask: Vec<Ev> = sealed
            .map(|s| encrypted(k, first_token, tokens, s, &e.hash))
            .into_iter()
            .collect();
        u.resend = ask.clone();
        u.resend.push(Ev::Invoice(e.invoice));
        self.unpaid.insert(k, u);
        for ev in ask {
            self.send(ev).await?;
        }
        match e.held {
            Some(h) => self.on_held(h).await,
            None => Ok(()),
        }
    }

    /// BOLT11/ATOMIC: a sealed chunk's hold invoice (ATOMIC: the chunk encrypted under the
    /// invoice's preimage, sent with it), tracked before it is sent. The first chunk takes the
    /// invoice issued for it when the session opened.
    pub(super) async fn invoice_chunk(&mut self, chunk: Chunk, price_msat: u64) -> Result<(), End> {
        if let Some(e) = self.early.take() {
            return self.take_early(chunk, price_msat, e).await;
        }
        self.issue_chunk_invoice(chunk, price_msat, None).await
    }

    async fn issue_chunk_invoice(
        &mut self,
        chunk: Chunk,
        price_msat: u64,
        replaces: Option<[u8; 32]>,
    ) -> Result<(), End> {
        let (k, first_token, tokens) = (chunk.index, chunk.first_token, chunk.tokens);
        let sealed = (self.spec.mode == Mode::Atomic).then(|| cipher::seal(chunk.text.as_bytes()));
        let key = sealed.as_ref().map(|s| s.key);
        let (inv, invoice) = self
            .chunk_invoice(k, tokens, price_msat, key, replaces)
            .await?;
        // Tracked before it is sent: if the client is gone, the end withdraws it.
        self.by_hash.insert(inv.payment_hash, k);
        self.unpaid.insert(
            k,
            Unpaid::new(chunk, price_msat, Some(inv.payment_hash), key),
        );
        if self.parts.lightning.faults().point("send_invoice").is_err() {
            return Err(End::ClientGone);
        }
        let mut ask: Vec<Ev> = sealed
            .map(|s| encrypted(k, first_token, tokens, s, &inv.payment_hash))
            .into_iter()
            .collect();
        ask.push(Ev::Invoice(invoice));
        if let Some(u) = self.unpaid.get_mut(&k) {
            u.resend = ask.clone();
        }
        for e in ask {
            self.send(e).await?;
        }
        Ok(())
    }

    /// Chunk `k`'s hold invoice for `tokens` at `price_msat` (with `preimage`, ATOMIC's key;
    /// random when None), and the event that asks for it.
    async fn chunk_invoice(
        &self,
        k: u32,
        tokens: u32,
        price_msat: u64,
        preimage: Option<[u8; 32]>,
        replaces: Option<[u8; 32]>,
    ) -> Result<(crate::store::Invoice, proto::Invoice), End> {
        let inv = self
            .create_invoice(HoldInvoice {
                amount_msat: price_msat,
                description: format!("satstream chunk {k} ({tokens} tokens)"),
                expiry_secs: self.spec.invoice_expiry_secs,
                purpose: InvoicePurpose::Chunk,
                session_id: Some(self.sid()),
                account_id: None,
                chunk_index: Some(k),
                preimage,
            })
            .await?;
        let event = proto::Invoice {
            chunk_index: Some(k),
            bolt11: inv.bolt11.clone(),
            payment_hash: hex::encode(inv.payment_hash),
            amount_msat: price_msat,
            tokens,
            expires_at_unix: inv.expires_at_unix,
            replaces_payment_hash: replaces.map(hex::encode).unwrap_or_default(),
        };
        Ok((inv, event))
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
        if let Some(e) = self.early.as_mut().filter(|e| e.hash == h.payment_hash) {
            // Paid ahead of its chunk: held until the chunk is complete (or failed back if
            // the answer ends shorter).
            tracing::debug!("first chunk paid ahead of its tokens (held)");
            e.held = Some(h);
            return Ok(());
        }
        let Some(k) = self.by_hash.remove(&h.payment_hash) else {
            // Not ours any more (cannot happen: listeners are per invoice); never keep it.
            let (ln, hash) = (self.parts.lightning.clone(), h.payment_hash);
            let _ = blocking(move || ln.fail(&hash, "no such chunk in this session")).await;
            return Ok(());
        };
        let u = self.unpaid.remove(&k).expect("indexed chunk");
        // The payment's latency: from the ask to the HTLC's arrival (for an early invoice,
        // possibly long before its chunk was complete).
        let latency = h.at.saturating_duration_since(u.since.into_std());
        self.spec.pace.on_paid(latency, std::time::Instant::now());
        // Payment → tokens counts from when both the payment and the chunk were there.
        let notice = h.at.max(u.ready_at).elapsed();
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

/// ATOMIC: chunk `k` encrypted under the preimage of the invoice `hash`.
fn encrypted(k: u32, first_token: u32, tokens: u32, s: cipher::Sealed, hash: &[u8; 32]) -> Ev {
    Ev::EncryptedChunk(proto::EncryptedChunk {
        chunk_index: k,
        ciphertext: s.ciphertext,
        nonce: s.nonce.to_vec(),
        first_token,
        tokens,
        payment_hash: hex::encode(hash),
    })
}

/// How a failed claim ends the session (the HTLC is already failed back, or its money will be
/// booked as refundable).
fn claim_end(k: u32, e: LightningError) -> End {
    End::payment(format!("claim of chunk {k} failed: {e}"))
}

//! One Generate call, paid chunk by chunk from the client's [`Wallet`] within a budget.
//!
//! - BOLT11: each `Invoice` is checked (amount = tokens × the accepted rate, hash = the
//!   invoice's own) and paid at once; the server sends the chunk's `Tokens` after claiming.
//! - ATOMIC: each `EncryptedChunk` is decrypted with the preimage the payment reveals (the
//!   server's `ChunkKey` is only a fallback, and must hash to the same payment hash).
//! - KEYSEND: after `SessionOpened` the client keeps one chunk's price in flight or credited
//!   ahead of what the server has spent; what is left at the end stays refundable server-side.
//!
//! Reaching the budget stops paying; once every paid chunk has arrived the client hangs up,
//! which halts the generation on the server at once.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use ldk_node::Event;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::broadcast::error::RecvError;
use tonic::transport::Channel;

use super::{ClientError, Wallet};
use crate::wire::cipher;
use crate::wire::proto::{
    generate_event::Event as Ev, inference_client::InferenceClient, EndSessionRequest,
    GenerateEvent, GenerateRequest, PaymentMode, ResumeRequest,
};
use tonic::Streaming;

/// What happened, in order: for a caller that prints (`--json` prints these as they come).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ClientEvent {
    Accepted {
        session_id: String,
        model: String,
        mode: String,
        prompt_tokens: u32,
        chunk_tokens: u32,
        msat_per_token: u64,
        window_chunks: u32,
    },
    /// The stream dropped and the client reattached with `Resume` (`ms` from the drop to the
    /// stream being back); the paid chunks from `from_chunk` on are replayed.
    Resumed {
        from_chunk: u32,
        ms: u64,
    },
    /// A payment was sent: an invoice for `chunk`, or a keysend top-up (`chunk` null).
    Paying {
        chunk: Option<u32>,
        amount_msat: u64,
    },
    /// A payment settled, `ms` after it was sent.
    Paid {
        chunk: Option<u32>,
        amount_msat: u64,
        fee_msat: u64,
        ms: f64,
    },
    PaymentFailed {
        chunk: Option<u32>,
        reason: String,
    },
    /// The paid text of one chunk (decrypted in ATOMIC mode), in chunk order.
    Text {
        chunk: u32,
        first_token: u32,
        tokens: u32,
        text: String,
    },
    Balance {
        credited_msat: u64,
        spent_msat: u64,
        available_msat: u64,
    },
    /// The next payment would go over the budget: the client stops paying.
    BudgetReached {
        spent_msat: u64,
        next_msat: u64,
    },
}

/// The end of a paid generation, as the client saw it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub session_id: String,
    /// The session's owner secret (for Refund); never printed.
    #[serde(skip)]
    pub session_token: String,
    /// What the server recorded as refunded to this client afterwards (KEYSEND leftovers).
    pub refunded_msat: u64,
    /// "stop", "length", "stop_string" (Done); "halted: <reason>"; or "budget" (the client
    /// stopped paying and hung up).
    pub outcome: String,
    pub message: String,
    pub prompt_tokens: u32,
    /// Tokens received as text.
    pub tokens: u32,
    pub chunks: u32,
    /// Payments this client settled, and their total (fees excluded).
    pub payments: u32,
    pub spent_msat: u64,
    pub fees_msat: u64,
    /// The server's own totals (Done/Halted); 0 when the client hung up first.
    pub server_paid_msat: u64,
    pub refundable_msat: u64,
    /// PREPAID: the account's balance left (otherwise = refundable_msat).
    pub balance_msat: u64,
    /// Request to the stream's end (the last token, Done or Halted): what the user waits.
    pub stream_ms: u64,
    /// Also waiting for the last payments' outcomes after the stream ended.
    pub elapsed_ms: u64,
    /// Wall time with at least one payment sent and not yet settled.
    pub waiting_for_payment_ms: u64,
    /// Tokens over `stream_ms`.
    pub tokens_per_sec: f64,
    /// The signed receipt Done/Halted carried, as received.
    #[serde(skip)]
    pub receipt: Option<crate::wire::proto::Receipt>,
    /// Times the stream dropped and was resumed.
    pub resumes: u32,
    /// The last resume: from the drop to the first chunk replayed (or received) after it.
    pub resume_first_chunk_ms: Option<u64>,
    /// The receipt checked against the node this client paid and the text it received:
    /// "verified", "invalid: <why>", or "none" (the server sent none, or the client hung up).
    pub receipt_check: String,
}

/// How often invoices waiting for an HTLC slot are looked at again. A slot frees only when
/// the commitment dance after a payment's `PaymentSuccessful` is over, which no ldk-node
/// event reports, so waiting for the next event alone can wait forever.
const RETRY_EVERY: Duration = Duration::from_millis(50);

/// Sends LDK refused although a channel had a free HTLC slot (a genuine error, or a race with
/// another user of the wallet): after this many the invoice is given up.
const MAX_SEND_FAILURES: u32 = 3;

/// The payment rules a session accepted: what every invoice is checked against.
#[derive(Default)]
struct Terms {
    node_id: String,
    atomic: bool,
    msat_per_token: u64,
    chunk_tokens: u32,
    prompt_price_msat: u64,
    resume_grace_secs: u32,
}

struct InFlight {
    chunk: Option<u32>,
    amount_msat: u64,
    sent: Instant,
}

struct Sealed {
    chunk: u32,
    first_token: u32,
    tokens: u32,
    nonce: Vec<u8>,
    ciphertext: Vec<u8>,
}

struct Keysend {
    node_id: String,
    tlv_type: u64,
    session: Vec<u8>,
}

#[derive(Default)]
struct Run {
    summary: Summary,
    /// What the receipt must commit to as the prompt: this request's.
    prompt_sha256: Option<[u8; 32]>,
    budget_msat: Option<u64>,
    budget_hit: bool,
    terms: Terms,
    chunk_price_msat: u64,
    in_flight: HashMap<[u8; 32], InFlight>,
    waiting_since: Option<Instant>,
    waiting_ms: f64,
    /// Chunks paid (or being paid) whose text has not arrived.
    owed: BTreeMap<u32, ()>,
    /// ATOMIC: ciphertexts by payment hash, until the key is known.
    sealed: HashMap<[u8; 32], Sealed>,
    /// Text ready to show, by chunk index, and the next index to show.
    ready: BTreeMap<u32, ClientEvent>,
    next_chunk: u32,
    keysend: Option<Keysend>,
    /// Invoices not sent yet, in order: (chunk, BOLT11, amount, sends LDK refused). Mostly
    /// waiting for an HTLC slot (LDK lets at most 50 HTLCs be in flight on a channel, shared
    /// by every stream paying from this wallet); sent when a wallet event comes and every
    /// [`RETRY_EVERY`].
    retry: Vec<(Option<u32>, String, u64, u32)>,
    /// KEYSEND: sent so far, and the most the request can cost (no top-up beyond it).
    credited_ahead_msat: u64,
    server_credited_msat: u64,
    max_tokens: u32,
    /// The text of each chunk shown, in order (what the receipt must cover).
    texts: Vec<String>,
    /// Payment hashes of every invoice this client paid or tried to: an invoice sent again
    /// after a resume is never paid twice.
    asked: std::collections::HashSet<String>,
    /// Invoices the server withdrew and replaced (a first chunk invoiced ahead of an answer
    /// that ended shorter): never paid, and their failing back is expected.
    replaced: std::collections::HashSet<[u8; 32]>,
    /// ATOMIC: chunk invoices whose ciphertext has not arrived (the first chunk's is sent
    /// before the chunk exists), by payment hash: paid once it has.
    awaiting_ciphertext: HashMap<[u8; 32], (Option<u32>, String, u64)>,
    /// Since the stream dropped, until the next chunk arrives.
    dropped_at: Option<Instant>,
}

/// Runs `request` against the server and pays for it from `wallet`, spending at most
/// `budget_msat` (None: no limit). `on_event` sees every [`ClientEvent`] as it happens.
pub async fn generate(
    client: &mut InferenceClient<Channel>,
    wallet: &Wallet,
    request: GenerateRequest,
    budget_msat: Option<u64>,
    mut on_event: impl FnMut(&ClientEvent),
) -> Result<Summary, ClientError> {
    let started = Instant::now();
    // Subscribed before anything is paid, so no outcome can be missed.
    let mut ln_events = wallet.subscribe();
    let max_tokens = request.max_tokens;
    let prompt_sha256 = crate::wire::receipt::prompt_sha256(&request.messages, &request.prompt);
    let mut stream: Streaming<GenerateEvent> = client.generate(request).await?.into_inner();
    let mut run = Run {
        budget_msat,
        max_tokens,
        prompt_sha256: Some(prompt_sha256),
        ..Run::default()
    };
    let mut retry_tick = tokio::time::interval(RETRY_EVERY);
    retry_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if run.budget_hit && run.in_flight.is_empty() && run.owed.is_empty() {
            run.summary.outcome = "budget".into();
            run.summary.message = "the budget is spent; stopped paying and hung up".into();
            break;
        }
        tokio::select! {
            msg = stream.message() => {
                let ev = match msg {
                    Ok(Some(m)) => m.event,
                    Ok(None) => None,
                    Err(status) => {
                        if !run.resumable(&status) {
                            return Err(status.into());
                        }
                        None
                    }
                };
                let Some(ev) = ev else {
                    // The connection dropped mid-stream: reattach within the session's grace
                    // (with no grace, the session has ended: Resume replays what was paid for).
                    if run.summary.session_id.is_empty() {
                        return Err(ClientError::Protocol("the stream ended without Done or Halted".into()));
                    }
                    stream = run.resume(client, &mut on_event).await?;
                    continue;
                };
                if run.on_server_event(ev, wallet, &mut on_event)? {
                    break;
                }
            }
            e = ln_events.recv() => {
                if !run.on_wallet_event(e, &mut on_event)? {
                    return Err(ClientError::Wallet("the wallet stopped".into()));
                }
                run.retry_sends(wallet, &mut on_event)?;
            }
            _ = retry_tick.tick(), if !run.retry.is_empty() => {
                run.retry_sends(wallet, &mut on_event)?;
            }
        }
    }
    let stream_ms = started.elapsed().as_millis() as u64;
    // A budget-limited generation is ended on purpose: say so (no grace for Resume is kept),
    // then hang up.
    if run.budget_hit && !run.summary.session_id.is_empty() {
        let end = EndSessionRequest {
            session_id: run.summary.session_id.clone(),
            session_token: run.summary.session_token.clone(),
        };
        if let Err(e) = client.end_session(end).await {
            tracing::warn!(error = %e, "could not end the session; it ends when its grace runs out");
        }
    }
    drop(stream);
    // The server claims before it delivers, so payments still in flight are settling now:
    // wait for their outcomes (bounded) so that the summary counts what was really spent.
    let settle = async {
        while !run.in_flight.is_empty() {
            if !run.on_wallet_event(ln_events.recv().await, &mut on_event)? {
                break;
            }
        }
        Ok::<(), ClientError>(())
    };
    if tokio::time::timeout(std::time::Duration::from_secs(30), settle)
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = run.in_flight.len(),
            "payments still unresolved after the stream ended"
        );
    }
    let s = &mut run.summary;
    s.elapsed_ms = started.elapsed().as_millis() as u64;
    if let Some(since) = run.waiting_since.take() {
        run.waiting_ms += since.elapsed().as_secs_f64() * 1e3;
    }
    s.waiting_for_payment_ms = run.waiting_ms.round() as u64;
    s.stream_ms = stream_ms;
    s.tokens_per_sec = if stream_ms > 0 {
        s.tokens as f64 * 1e3 / stream_ms as f64
    } else {
        0.0
    };
    Ok(run.summary)
}

impl Run {
    /// The client trusts nothing it did not agree to: an invoice is paid only if it is for
    /// the accepted price of what it covers (a chunk of at most `chunk_tokens` tokens at the
    /// accepted rate, or the prompt at its accepted price), its own amount and hash say the
    /// same, and its payee is the server's node. Returns the amount to pay.
    fn check_invoice(&self, inv: &crate::wire::proto::Invoice) -> Result<u64, ClientError> {
        let what = match inv.chunk_index {
            Some(k) => format!("chunk {k}"),
            None => "the prompt".to_string(),
        };
        let t = &self.terms;
        let expected = match inv.chunk_index {
            Some(_) => {
                if inv.tokens == 0 || inv.tokens > t.chunk_tokens {
                    return Err(ClientError::Protocol(format!(
                        "{what}: {} tokens, but chunks were agreed at most {}",
                        inv.tokens, t.chunk_tokens
                    )));
                }
                inv.tokens as u64 * t.msat_per_token
            }
            None => t.prompt_price_msat,
        };
        if inv.amount_msat != expected || expected == 0 {
            return Err(ClientError::Protocol(format!(
                "{what} costs {} msat but the accepted price is {expected} msat",
                inv.amount_msat
            )));
        }
        let parsed: ldk_node::lightning_invoice::Bolt11Invoice = inv
            .bolt11
            .parse()
            .map_err(|e| ClientError::Protocol(format!("{what}: bad invoice: {e}")))?;
        if parsed.amount_milli_satoshis() != Some(expected)
            || hex::encode(parsed.payment_hash().as_ref() as &[u8]) != inv.payment_hash
        {
            return Err(ClientError::Protocol(format!(
                "{what}: the invoice does not match its amount or payment hash"
            )));
        }
        let payee = parsed.recover_payee_pub_key().to_string();
        if payee != t.node_id {
            return Err(ClientError::Protocol(format!(
                "{what}: the invoice pays {payee}, not the server's node {}",
                t.node_id
            )));
        }
        Ok(expected)
    }

    /// Payment outcomes from the wallet. Returns false once the wallet has stopped.
    fn on_wallet_event(
        &mut self,
        e: Result<Event, RecvError>,
        on_event: &mut impl FnMut(&ClientEvent),
    ) -> Result<bool, ClientError> {
        match e {
            Ok(Event::PaymentSuccessful {
                payment_hash,
                payment_preimage,
                fee_paid_msat,
                ..
            }) => {
                let preimage = payment_preimage.map(|p| p.0);
                self.on_settled(
                    payment_hash.0,
                    preimage,
                    fee_paid_msat.unwrap_or(0),
                    on_event,
                )?;
            }
            Ok(Event::PaymentFailed {
                payment_hash: Some(h),
                reason,
                ..
            }) => {
                if let Some(f) = self.in_flight.remove(&h.0) {
                    self.update_waiting();
                    if self.replaced.contains(&h.0) {
                        // Withdrawn by the server for a cheaper one: failed back, as said.
                        return Ok(true);
                    }
                    on_event(&ClientEvent::PaymentFailed {
                        chunk: f.chunk,
                        reason: format!("{reason:?}"),
                    });
                }
            }
            Ok(_) => return Ok(true),
            Err(RecvError::Lagged(n)) => tracing::warn!(missed = n, "wallet events lagged"),
            Err(RecvError::Closed) => return Ok(false),
        }
        Ok(true)
    }

    /// Sends the waiting invoices in order, up to the first that still cannot go (the rest
    /// would not either: they wait for the same slot).
    fn retry_sends(
        &mut self,
        wallet: &Wallet,
        on_event: &mut impl FnMut(&ClientEvent),
    ) -> Result<(), ClientError> {
        let mut waiting = std::mem::take(&mut self.retry).into_iter();
        for (chunk, bolt11, amount, failures) in waiting.by_ref() {
            if !self.pay_invoice(wallet, chunk, &bolt11, amount, failures, on_event)? {
                break;
            }
        }
        self.retry.extend(waiting);
        Ok(())
    }

    /// The server withdrew the invoice `hash` (and sent a replacement): it is not paid if it
    /// has not been yet; if it has, the server fails it back.
    fn withdrawn(&mut self, hash: [u8; 32]) {
        self.replaced.insert(hash);
        self.awaiting_ciphertext.remove(&hash);
        self.retry.retain(|(_, bolt11, ..)| {
            bolt11
                .parse::<ldk_node::lightning_invoice::Bolt11Invoice>()
                .map_or(true, |i| {
                    let h: &[u8; 32] = i.payment_hash().as_ref();
                    *h != hash
                })
        });
    }

    /// Keeps `waiting_since` true to "some payment is in flight".
    fn update_waiting(&mut self) {
        match (self.in_flight.is_empty(), self.waiting_since) {
            (false, None) => self.waiting_since = Some(Instant::now()),
            (true, Some(since)) => {
                self.waiting_ms += since.elapsed().as_secs_f64() * 1e3;
                self.waiting_since = None;
            }
            _ => {}
        }
    }

    fn committed_msat(&self) -> u64 {
        self.summary.spent_msat + self.in_flight.values().map(|f| f.amount_msat).sum::<u64>()
    }

    /// Whether `amount` fits the budget; the first refusal is reported.
    fn affordable(&mut self, amount: u64, on_event: &mut impl FnMut(&ClientEvent)) -> bool {
        let Some(budget) = self.budget_msat else {
            return true;
        };
        if !self.budget_hit && self.committed_msat() + amount <= budget {
            return true;
        }
        if !self.budget_hit {
            self.budget_hit = true;
            on_event(&ClientEvent::BudgetReached {
                spent_msat: self.committed_msat(),
                next_msat: amount,
            });
        }
        false
    }

    /// Pays chunk `chunk`'s invoice (None: the prompt's), or queues it (at the end of
    /// `retry`) when it cannot go yet. Returns false when it was queued.
    fn pay_invoice(
        &mut self,
        wallet: &Wallet,
        chunk: Option<u32>,
        bolt11: &str,
        amount_msat: u64,
        failures: u32,
        on_event: &mut impl FnMut(&ClientEvent),
    ) -> Result<bool, ClientError> {
        if !self.affordable(amount_msat, on_event) {
            return Ok(true);
        }
        // Every HTLC slot of the wallet's channels taken (by this and other streams): LDK
        // would only answer RouteNotFound, log two errors and write a failed payment record,
        // so ask it nothing until a slot frees; the server's payment timeout bounds the wait.
        if !wallet.has_htlc_slot() {
            self.retry
                .push((chunk, bolt11.to_string(), amount_msat, failures));
            return Ok(false);
        }
        let hash = match wallet.send(bolt11) {
            Ok(hash) => hash,
            Err(e) if failures + 1 < MAX_SEND_FAILURES => {
                tracing::debug!(?chunk, error = %e, "cannot send yet; retrying");
                self.retry
                    .push((chunk, bolt11.to_string(), amount_msat, failures + 1));
                return Ok(false);
            }
            Err(e) => {
                tracing::warn!(?chunk, error = %e, "the wallet cannot pay this invoice; giving up");
                on_event(&ClientEvent::PaymentFailed {
                    chunk,
                    reason: e.to_string(),
                });
                return Ok(true);
            }
        };
        self.in_flight.insert(
            hash,
            InFlight {
                chunk,
                amount_msat,
                sent: Instant::now(),
            },
        );
        if let Some(k) = chunk {
            self.owed.insert(k, ());
        }
        self.update_waiting();
        on_event(&ClientEvent::Paying { chunk, amount_msat });
        Ok(true)
    }

    /// KEYSEND: keeps one chunk's price credited or in flight ahead of the server's spending.
    fn top_up(
        &mut self,
        wallet: &Wallet,
        available_msat: u64,
        on_event: &mut impl FnMut(&ClientEvent),
    ) -> Result<(), ClientError> {
        if self.keysend.is_none() {
            return Ok(());
        }
        // Sent but not yet credited by the server (our own settlement may come later or
        // sooner than the server's Balance event; the server's count is what matters).
        let uncredited = self
            .credited_ahead_msat
            .saturating_sub(self.server_credited_msat);
        let amount = self.chunk_price_msat;
        let most =
            self.max_tokens as u64 * self.terms.msat_per_token + self.terms.prompt_price_msat;
        if available_msat + uncredited >= amount
            || (most > 0 && self.credited_ahead_msat >= most)
            || !self.affordable(amount, on_event)
        {
            return Ok(());
        }
        let k = self.keysend.as_ref().expect("checked above");
        let hash = wallet.keysend(&k.node_id, amount, vec![(k.tlv_type, k.session.clone())])?;
        self.in_flight.insert(
            hash,
            InFlight {
                chunk: None,
                amount_msat: amount,
                sent: Instant::now(),
            },
        );
        self.credited_ahead_msat += amount;
        self.update_waiting();
        on_event(&ClientEvent::Paying {
            chunk: None,
            amount_msat: amount,
        });
        Ok(())
    }

    fn on_settled(
        &mut self,
        hash: [u8; 32],
        preimage: Option<[u8; 32]>,
        fee_msat: u64,
        on_event: &mut impl FnMut(&ClientEvent),
    ) -> Result<(), ClientError> {
        let Some(f) = self.in_flight.remove(&hash) else {
            return Ok(()); // not ours (another stream sharing the wallet)
        };
        self.update_waiting();
        self.summary.payments += 1;
        self.summary.spent_msat += f.amount_msat;
        self.summary.fees_msat += fee_msat;
        on_event(&ClientEvent::Paid {
            chunk: f.chunk,
            amount_msat: f.amount_msat,
            fee_msat,
            ms: f.sent.elapsed().as_secs_f64() * 1e3,
        });
        if let (Some(key), Some(_)) = (preimage, self.sealed.get(&hash)) {
            self.decrypt(hash, &key, on_event)?;
        }
        Ok(())
    }

    fn decrypt(
        &mut self,
        hash: [u8; 32],
        key: &[u8; 32],
        on_event: &mut impl FnMut(&ClientEvent),
    ) -> Result<(), ClientError> {
        if Sha256::digest(key).as_slice() != hash {
            return Err(ClientError::Protocol(format!(
                "the key for payment {} does not hash to it",
                hex::encode(hash)
            )));
        }
        let Some(s) = self.sealed.remove(&hash) else {
            return Ok(());
        };
        let plain = cipher::open(key, &s.nonce, &s.ciphertext).ok_or_else(|| {
            ClientError::Protocol(format!("chunk {} does not decrypt with its key", s.chunk))
        })?;
        let text = String::from_utf8(plain)
            .map_err(|_| ClientError::Protocol(format!("chunk {} is not UTF-8 text", s.chunk)))?;
        self.text(s.chunk, s.first_token, s.tokens, text, on_event);
        Ok(())
    }

    /// Shows chunk texts strictly in order (ATOMIC keys can arrive out of order).
    fn text(
        &mut self,
        chunk: u32,
        first_token: u32,
        tokens: u32,
        text: String,
        on_event: &mut impl FnMut(&ClientEvent),
    ) {
        self.owed.remove(&chunk);
        // Replayed after a resume, or both decrypted and replayed: shown once.
        if chunk < self.next_chunk || self.ready.contains_key(&chunk) {
            return;
        }
        if let Some(t) = self.dropped_at.take() {
            self.summary.resume_first_chunk_ms = Some(t.elapsed().as_millis() as u64);
        }
        self.summary.tokens += tokens;
        self.summary.chunks += 1;
        self.ready.insert(
            chunk,
            ClientEvent::Text {
                chunk,
                first_token,
                tokens,
                text,
            },
        );
        while let Some(ev) = self.ready.remove(&self.next_chunk) {
            on_event(&ev);
            if let ClientEvent::Text { text, .. } = ev {
                self.texts.push(text);
            }
            self.next_chunk += 1;
        }
    }

    /// Returns true when the stream is over.
    fn on_server_event(
        &mut self,
        ev: Ev,
        wallet: &Wallet,
        on_event: &mut impl FnMut(&ClientEvent),
    ) -> Result<bool, ClientError> {
        match ev {
            Ev::Accepted(_) if !self.summary.session_id.is_empty() => {
                // Sent again on Resume: the same terms (without the token).
            }
            Ev::Accepted(a) if a.node_id.is_empty() => {
                // Without the payee every invoice's payee and the receipt's signer go unchecked.
                return Err(ClientError::Protocol(
                    "the server's Accepted names no node_id: its invoices and receipt cannot be checked; refusing to pay".into(),
                ));
            }
            Ev::Accepted(a) => {
                self.terms = Terms {
                    node_id: a.node_id.clone(),
                    atomic: a.mode == PaymentMode::Atomic as i32,
                    msat_per_token: a.msat_per_token,
                    chunk_tokens: a.max_chunk_tokens.max(a.chunk_tokens),
                    prompt_price_msat: a.prompt_price_msat,
                    resume_grace_secs: a.resume_grace_secs,
                };
                self.chunk_price_msat = a.chunk_tokens as u64 * a.msat_per_token;
                self.summary.session_id = a.session_id.clone();
                self.summary.session_token = a.session_token.clone();
                self.summary.prompt_tokens = a.prompt_tokens;
                on_event(&ClientEvent::Accepted {
                    session_id: a.session_id,
                    model: a.model,
                    mode: PaymentMode::try_from(a.mode)
                        .map(|m| m.as_str_name().trim_start_matches("PAYMENT_MODE_").into())
                        .unwrap_or_default(),
                    prompt_tokens: a.prompt_tokens,
                    chunk_tokens: a.chunk_tokens,
                    msat_per_token: a.msat_per_token,
                    window_chunks: a.window_chunks,
                });
            }
            Ev::Invoice(inv) if self.asked.contains(&inv.payment_hash) => {
                // Sent again on Resume; paid (or being paid) already.
            }
            Ev::Invoice(inv) => {
                if !inv.replaces_payment_hash.is_empty() {
                    self.withdrawn(parse_hash(&inv.replaces_payment_hash)?);
                }
                let amount = self.check_invoice(&inv)?;
                let hash = parse_hash(&inv.payment_hash)?;
                self.asked.insert(inv.payment_hash.clone());
                if self.terms.atomic
                    && inv.chunk_index.is_some()
                    && !self.sealed.contains_key(&hash)
                {
                    // ATOMIC's promise is paying only for a ciphertext held: an invoice sent
                    // ahead of its chunk (the first, while the engine prefills) waits for it.
                    self.awaiting_ciphertext
                        .insert(hash, (inv.chunk_index, inv.bolt11, amount));
                    return Ok(false);
                }
                // Behind any invoice still waiting for a slot: chunks are paid in order.
                self.retry.push((inv.chunk_index, inv.bolt11, amount, 0));
                self.retry_sends(wallet, on_event)?;
            }
            Ev::Tokens(t) => self.text(t.chunk_index, t.first_token, t.tokens, t.text, on_event),
            Ev::EncryptedChunk(c) => {
                let hash = parse_hash(&c.payment_hash)?;
                self.sealed.insert(
                    hash,
                    Sealed {
                        chunk: c.chunk_index,
                        first_token: c.first_token,
                        tokens: c.tokens,
                        nonce: c.nonce,
                        ciphertext: c.ciphertext,
                    },
                );
                if let Some((chunk, bolt11, amount)) = self.awaiting_ciphertext.remove(&hash) {
                    self.retry.push((chunk, bolt11, amount, 0));
                    self.retry_sends(wallet, on_event)?;
                }
            }
            Ev::ChunkKey(k) => {
                // Normally the preimage from our own payment already decrypted this chunk.
                let key: [u8; 32] = k.key.as_slice().try_into().map_err(|_| {
                    ClientError::Protocol(format!("chunk {}: key is not 32 bytes", k.chunk_index))
                })?;
                let hash: [u8; 32] = Sha256::digest(key).into();
                if self.sealed.contains_key(&hash) {
                    self.decrypt(hash, &key, on_event)?;
                }
            }
            Ev::SessionOpened(_) if self.keysend.is_some() => {}
            Ev::SessionOpened(so) => {
                let session = hex::decode(&so.session_id)
                    .map_err(|_| ClientError::Protocol("session id is not hex".into()))?;
                self.keysend = Some(Keysend {
                    node_id: so.node_id,
                    tlv_type: so.tlv_type,
                    session,
                });
                self.top_up(wallet, 0, on_event)?;
            }
            Ev::Balance(b) => {
                self.server_credited_msat = b.credited_msat;
                on_event(&ClientEvent::Balance {
                    credited_msat: b.credited_msat,
                    spent_msat: b.spent_msat,
                    available_msat: b.available_msat,
                });
                self.top_up(wallet, b.available_msat, on_event)?;
            }
            Ev::Done(d) => {
                let s = &mut self.summary;
                s.outcome = match crate::wire::proto::FinishReason::try_from(d.finish_reason) {
                    Ok(r) => r
                        .as_str_name()
                        .trim_start_matches("FINISH_REASON_")
                        .to_lowercase(),
                    Err(_) => "unknown".into(),
                };
                s.server_paid_msat = d.paid_msat;
                s.refundable_msat = d.refundable_msat;
                s.balance_msat = d.balance_msat;
                self.check_receipt(d.receipt);
                return Ok(true);
            }
            Ev::Halted(h) => {
                let s = &mut self.summary;
                s.outcome = match crate::wire::proto::HaltReason::try_from(h.reason) {
                    Ok(r) => format!(
                        "halted: {}",
                        r.as_str_name()
                            .trim_start_matches("HALT_REASON_")
                            .to_lowercase()
                    ),
                    Err(_) => "halted".into(),
                };
                s.message = h.message;
                s.server_paid_msat = h.paid_msat;
                s.refundable_msat = h.refundable_msat;
                s.balance_msat = h.balance_msat;
                self.check_receipt(h.receipt);
                return Ok(true);
            }
        }
        Ok(false)
    }
}

impl Run {
    /// A stream error that a `Resume` may cure: the connection, not the server's refusal.
    fn resumable(&self, s: &tonic::Status) -> bool {
        use tonic::Code;
        matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled | Code::Aborted
        )
    }

    /// Reattaches to the session (`Resume`), retrying while the server is unreachable or has
    /// not yet seen the old stream go, until the session's grace period is over.
    async fn resume(
        &mut self,
        client: &mut InferenceClient<Channel>,
        on_event: &mut impl FnMut(&ClientEvent),
    ) -> Result<Streaming<GenerateEvent>, ClientError> {
        let dropped = Instant::now();
        // Reconnecting takes a moment (the channel dials again on its first call after a
        // drop, and that call can fail): allowed even with no grace, where Resume replays the
        // ended session.
        let deadline = dropped
            + std::time::Duration::from_secs(self.terms.resume_grace_secs as u64)
                .max(std::time::Duration::from_secs(3));
        // The server may not have seen the old stream go yet (then it is "attached"): the
        // session ends or takes this stream within moments, grace or not.
        let busy_deadline = dropped + std::time::Duration::from_secs(10);
        tracing::info!(session = %self.summary.session_id, "stream dropped: resuming");
        loop {
            let req = ResumeRequest {
                session_id: self.summary.session_id.clone(),
                session_token: self.summary.session_token.clone(),
                from_chunk: self.next_chunk,
            };
            let e = match client.resume(req).await {
                Ok(s) => {
                    self.summary.resumes += 1;
                    self.dropped_at = Some(dropped);
                    on_event(&ClientEvent::Resumed {
                        from_chunk: self.next_chunk,
                        ms: dropped.elapsed().as_millis() as u64,
                    });
                    return Ok(s.into_inner());
                }
                Err(e) => e,
            };
            // The server's own word that the session is still between streams or ending.
            let busy = (e.code() == tonic::Code::FailedPrecondition
                && e.message().contains("another stream is attached"))
                || (e.code() == tonic::Code::Unavailable && e.message().contains("session"));
            let now = Instant::now();
            let retry = (self.resumable(&e) && now < deadline) || (busy && now < busy_deadline);
            if !retry {
                return Err(e.into());
            }
            // Reconnecting: pace the attempts, not a synchronisation.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Verifies the receipt against the node this client paid (from Accepted) and the chunks
    /// it received, and records the result in the summary.
    fn check_receipt(&mut self, r: Option<crate::wire::proto::Receipt>) {
        let s = &mut self.summary;
        s.receipt_check = match &r {
            None => "none".into(),
            Some(r) => {
                let node = Some(self.terms.node_id.as_str());
                let whole = self.texts.concat();
                match crate::wire::receipt::verify(r, node, Some(&whole), Some(&self.texts)) {
                    // A receipt for some other prompt proves nothing about this one.
                    Ok(b) if b.prompt_sha256 != self.prompt_sha256 => {
                        "invalid: the receipt does not commit to the prompt this client sent".into()
                    }
                    Ok(_) => "verified".into(),
                    Err(e) => format!("invalid: {e}"),
                }
            }
        };
        s.receipt = r;
    }
}

fn parse_hash(s: &str) -> Result<[u8; 32], ClientError> {
    hex::decode(s)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ClientError::Protocol(format!("{s:?} is not a 32-byte hex payment hash")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::proto::Invoice;
    use ldk_node::bitcoin::hashes::{sha256, Hash};
    use ldk_node::bitcoin::secp256k1::{PublicKey, Secp256k1, SecretKey};
    use ldk_node::lightning_invoice::{Currency, InvoiceBuilder};
    use ldk_node::lightning_types::payment::PaymentSecret;

    /// A regtest invoice for `msat` signed by `key`: (BOLT11, payment hash hex).
    fn invoice(key: &SecretKey, msat: u64) -> (String, String) {
        let secp = Secp256k1::new();
        let hash = sha256::Hash::hash(&[1u8; 32]);
        let inv = InvoiceBuilder::new(Currency::Regtest)
            .description("chunk".into())
            .payment_hash(hash)
            .payment_secret(PaymentSecret([2; 32]))
            .amount_milli_satoshis(msat)
            .current_timestamp()
            .min_final_cltv_expiry_delta(144)
            .build_signed(|m| secp.sign_ecdsa_recoverable(m, key))
            .unwrap();
        (inv.to_string(), hex::encode(hash.to_byte_array()))
    }

    fn run_with(server: &SecretKey) -> Run {
        let node_id = PublicKey::from_secret_key(&Secp256k1::new(), server).to_string();
        Run {
            terms: Terms {
                node_id,
                atomic: false,
                msat_per_token: 1_000,
                chunk_tokens: 4,
                prompt_price_msat: 3_000,
                resume_grace_secs: 0,
            },
            ..Run::default()
        }
    }

    fn chunk(bolt11: String, hash: String, tokens: u32, amount_msat: u64) -> Invoice {
        Invoice {
            chunk_index: Some(0),
            bolt11,
            payment_hash: hash,
            amount_msat,
            tokens,
            expires_at_unix: 0,
            replaces_payment_hash: String::new(),
        }
    }

    #[test]
    fn pays_only_what_was_agreed_to_whom_it_was_agreed() {
        let server = SecretKey::from_slice(&[7; 32]).unwrap();
        let other = SecretKey::from_slice(&[8; 32]).unwrap();
        let r = run_with(&server);
        let (b, h) = invoice(&server, 4_000);
        assert_eq!(r.check_invoice(&chunk(b, h, 4, 4_000)).unwrap(), 4_000);
        // Another payee, even at the right price.
        let (b, h) = invoice(&other, 4_000);
        let e = r.check_invoice(&chunk(b, h, 4, 4_000)).unwrap_err();
        assert!(e.to_string().contains("not the server's node"), "{e}");
        // More tokens than a chunk, or more than the agreed rate.
        let (b, h) = invoice(&server, 8_000);
        let e = r.check_invoice(&chunk(b, h, 8, 8_000)).unwrap_err();
        assert!(e.to_string().contains("at most 4"), "{e}");
        let (b, h) = invoice(&server, 5_000);
        assert!(r.check_invoice(&chunk(b, h, 4, 5_000)).is_err());
        // The invoice's own amount must match what the event says.
        let (b, h) = invoice(&server, 5_000);
        assert!(r.check_invoice(&chunk(b, h, 4, 4_000)).is_err());
        // The prompt: exactly its accepted price.
        let (b, h) = invoice(&server, 3_000);
        let mut p = chunk(b, h, 21, 3_000);
        p.chunk_index = None;
        assert_eq!(r.check_invoice(&p).unwrap(), 3_000);
        p.amount_msat = 2_000;
        assert!(r.check_invoice(&p).is_err());
        // Terms that name no node check nothing: nothing is paid (it used to pay anyone).
        let mut blind = run_with(&server);
        blind.terms.node_id.clear();
        let (b, h) = invoice(&other, 4_000);
        let e = blind.check_invoice(&chunk(b, h, 4, 4_000)).unwrap_err();
        assert!(e.to_string().contains("not the server's node"), "{e}");
    }
}

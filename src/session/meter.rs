//! The meter: one task per session.
//!
//! Tokens arrive from the engine; every `chunk_tokens` of them (or the rest at the end) form a
//! chunk, priced exactly. BOLT11: the chunk waits for its hold invoice to be held, is claimed,
//! then sent. ATOMIC: the chunk is sent at once, encrypted under its invoice's preimage.
//! KEYSEND: the chunk is sent once the session's balance covers it. The engine's allowance
//! is always `paid tokens + window × chunk_tokens`, so it never runs further ahead than that.
//! No payment for the oldest unpaid chunk within `payment_timeout` halts the session.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::app::App;
use crate::engine::{FinishReason, Generation, TokenEvent};
use crate::grpc::proto::{self, generate_event::Event as Ev, GenerateEvent};
use crate::lightning::HeldHtlc;
use crate::pricing::Price;
use crate::store::{ChunkDelivery, InvoicePurpose, SessionState};

use super::{cipher, LiveGuard};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Bolt11,
    Atomic,
    Keysend,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Bolt11 => "BOLT11",
            Mode::Atomic => "ATOMIC",
            Mode::Keysend => "KEYSEND",
        }
    }
}

pub struct SessionSpec {
    pub session_id: [u8; 16],
    pub mode: Mode,
    pub price: Price,
    /// Chunks the engine may run ahead of payment (≥ 1).
    pub window_chunks: u32,
    pub prompt_tokens: u32,
    pub payment_timeout: Duration,
    pub invoice_expiry_secs: u32,
}

struct Chunk {
    index: u32,
    first_token: u32,
    tokens: u32,
    text: String,
}

struct Unpaid {
    chunk: Chunk,
    price_msat: u64,
    payment_hash: Option<[u8; 32]>,
    key: Option<[u8; 32]>,
    since: Instant,
}

type Out = mpsc::Sender<Result<GenerateEvent, Status>>;

enum End {
    Done(FinishReason),
    Halt(proto::HaltReason, String),
    ClientGone,
}

struct Meter {
    app: Arc<App>,
    spec: SessionSpec,
    out: Out,
    held_tx: mpsc::UnboundedSender<HeldHtlc>,
    current: Chunk,
    next_index: u32,
    /// BOLT11/ATOMIC: invoiced chunks by index; KEYSEND: chunks waiting for balance.
    unpaid: BTreeMap<u32, Unpaid>,
    by_hash: HashMap<[u8; 32], u32>,
    paid_tokens: u32,
    paid_chunks: u32,
    /// KEYSEND: credited minus spent, msat.
    available_msat: u64,
    credited_msat: u64,
    spent_msat: u64,
}

fn event(e: Ev) -> Result<GenerateEvent, Status> {
    Ok(GenerateEvent { event: Some(e) })
}

/// Runs a session to its end. `gen` was started with allowance `window × chunk_tokens`.
pub async fn run(
    app: Arc<App>,
    spec: SessionSpec,
    gen: Generation,
    out: Out,
    shutdown: CancellationToken,
    live: LiveGuard,
) {
    use tracing::Instrument;
    let span = tracing::info_span!(
        "session",
        id = %hex::encode(spec.session_id),
        mode = spec.mode.as_str()
    );
    // Instrumented, not entered: the span must follow the task across await points.
    run_session(app, spec, gen, out, shutdown, live)
        .instrument(span)
        .await
}

async fn run_session(
    app: Arc<App>,
    spec: SessionSpec,
    mut gen: Generation,
    out: Out,
    shutdown: CancellationToken,
    _live: LiveGuard,
) {
    let sid = spec.session_id;
    let (held_tx, mut held_rx) = mpsc::unbounded_channel();
    let (credit_tx, mut credit_rx) = mpsc::unbounded_channel();
    if spec.mode == Mode::Keysend {
        app.lightning.register_keysend_session(sid, credit_tx);
    }
    let mut m = Meter {
        app: app.clone(),
        spec,
        out: out.clone(),
        held_tx,
        current: Chunk {
            index: 0,
            first_token: 0,
            tokens: 0,
            text: String::new(),
        },
        next_index: 0,
        unpaid: BTreeMap::new(),
        by_hash: HashMap::new(),
        paid_tokens: 0,
        paid_chunks: 0,
        available_msat: 0,
        credited_msat: 0,
        spent_msat: 0,
    };
    let mut finished: Option<FinishReason> = None;
    let started = Instant::now();
    let mut paused_since: Option<Instant> = None;
    let mut paused = Duration::ZERO;
    let far = Duration::from_secs(365 * 24 * 3600);
    let end = loop {
        if let Some(r) = &finished {
            if m.unpaid.is_empty() && m.current.tokens == 0 {
                break End::Done(r.clone());
            }
        }
        let deadline = m
            .unpaid
            .values()
            .map(|u| u.since)
            .min()
            .map(|t| t + m.spec.payment_timeout)
            .unwrap_or_else(|| Instant::now() + far);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break End::Halt(proto::HaltReason::Shutdown, "the server is shutting down".into()),
            _ = out.closed() => break End::ClientGone,
            Some(h) = held_rx.recv() => {
                if let Err(e) = m.on_held(h, &gen).await {
                    break e;
                }
            }
            Some(amount) = credit_rx.recv() => {
                if let Err(e) = m.on_credit(amount, &gen).await {
                    break e;
                }
            }
            ev = gen.events.recv(), if finished.is_none() => match ev {
                Some(TokenEvent::Token { text, .. }) => {
                    if let Some(t) = paused_since.take() {
                        paused += t.elapsed();
                    }
                    m.current.text.push_str(&text);
                    m.current.tokens += 1;
                    if m.current.tokens == m.spec.price.chunk_tokens {
                        if let Err(e) = m.seal(&gen).await {
                            break e;
                        }
                    }
                }
                Some(TokenEvent::Paused { generated }) => {
                    paused_since = Some(Instant::now());
                    tracing::debug!(generated, "engine paused: window full, waiting for payment");
                }
                Some(TokenEvent::Finished { reason, completion_tokens }) => {
                    tracing::debug!(?reason, completion_tokens, "engine finished");
                    match reason {
                        FinishReason::Error(e) => break End::Halt(proto::HaltReason::EngineError, e),
                        FinishReason::Cancelled => break End::Halt(proto::HaltReason::EngineError, "generation was cancelled".into()),
                        r => {
                            if m.current.tokens > 0 {
                                if let Err(e) = m.seal(&gen).await {
                                    break e;
                                }
                            }
                            finished = Some(r);
                        }
                    }
                }
                None => break End::Halt(proto::HaltReason::EngineError, "the engine stream ended unexpectedly".into()),
            },
            _ = tokio::time::sleep_until(deadline) => {
                let k = m.unpaid.keys().next().copied().unwrap_or(0);
                break End::Halt(
                    proto::HaltReason::PaymentTimeout,
                    format!("chunk {k} was not paid within {} s", m.spec.payment_timeout.as_secs()),
                );
            }
        }
    };
    let halt_at = Instant::now();
    let generated = gen.handle.generated();
    gen.handle.cancel();
    drop(gen);
    if let End::Halt(proto::HaltReason::PaymentTimeout, _) = &end {
        app.metrics
            .halt(generated.saturating_sub(m.paid_tokens), halt_at.elapsed());
    }
    if let Some(t) = paused_since {
        paused += t.elapsed();
    }
    app.metrics.session(started.elapsed(), paused);
    m.finish(end).await;
    if m.spec.mode == Mode::Keysend {
        app.lightning.unregister_keysend_session(&sid);
    }
}

impl Meter {
    fn sid(&self) -> [u8; 16] {
        self.spec.session_id
    }

    async fn send(&self, e: Ev) -> Result<(), End> {
        self.out.send(event(e)).await.map_err(|_| End::ClientGone)
    }

    fn allow(&self, gen: &Generation) {
        gen.handle.set_allowance(
            self.paid_tokens + self.spec.window_chunks * self.spec.price.chunk_tokens,
        );
    }

    /// Closes the current chunk: price it and ask for payment.
    async fn seal(&mut self, gen: &Generation) -> Result<(), End> {
        let next_first = self.current.first_token + self.current.tokens;
        self.next_index += 1;
        let chunk = std::mem::replace(
            &mut self.current,
            Chunk {
                index: self.next_index,
                first_token: next_first,
                tokens: 0,
                text: String::new(),
            },
        );
        let price_msat = self.spec.price.chunk(chunk.tokens);
        let k = chunk.index;
        match self.spec.mode {
            Mode::Keysend => {
                self.unpaid.insert(
                    k,
                    Unpaid {
                        chunk,
                        price_msat,
                        payment_hash: None,
                        key: None,
                        since: Instant::now(),
                    },
                );
                self.release_from_balance(gen).await
            }
            Mode::Bolt11 | Mode::Atomic => {
                let sealed =
                    (self.spec.mode == Mode::Atomic).then(|| cipher::seal(chunk.text.as_bytes()));
                let inv = self
                    .app
                    .lightning
                    .create_hold_invoice(
                        price_msat,
                        &format!("satstream chunk {k} ({} tokens)", chunk.tokens),
                        self.spec.invoice_expiry_secs,
                        InvoicePurpose::Chunk,
                        Some(self.sid()),
                        Some(k),
                        sealed.as_ref().map(|s| s.key),
                        self.held_tx.clone(),
                    )
                    .map_err(|e| {
                        End::Halt(
                            proto::HaltReason::PaymentFailed,
                            format!("cannot issue invoice: {e}"),
                        )
                    })?;
                if let Some(s) = &sealed {
                    self.send(Ev::EncryptedChunk(proto::EncryptedChunk {
                        chunk_index: k,
                        ciphertext: s.ciphertext.clone(),
                        nonce: s.nonce.to_vec(),
                        first_token: chunk.first_token,
                        tokens: chunk.tokens,
                        payment_hash: hex::encode(inv.payment_hash),
                    }))
                    .await?;
                }
                self.send(Ev::Invoice(proto::Invoice {
                    chunk_index: Some(k),
                    bolt11: inv.bolt11.clone(),
                    payment_hash: hex::encode(inv.payment_hash),
                    amount_msat: price_msat,
                    tokens: chunk.tokens,
                    expires_at_unix: inv.expires_at_unix,
                }))
                .await?;
                self.by_hash.insert(inv.payment_hash, k);
                self.unpaid.insert(
                    k,
                    Unpaid {
                        chunk,
                        price_msat,
                        payment_hash: Some(inv.payment_hash),
                        key: sealed.map(|s| s.key),
                        since: Instant::now(),
                    },
                );
                Ok(())
            }
        }
    }

    /// A payer's HTLC for one of our chunk invoices is held: claim it, record the delivery,
    /// deliver (plaintext or key), and let the engine go one chunk further.
    async fn on_held(&mut self, h: HeldHtlc, gen: &Generation) -> Result<(), End> {
        let Some(k) = self.by_hash.remove(&h.payment_hash) else {
            // Not ours any more (cannot happen: listeners are per invoice); never keep it.
            let _ = self
                .app
                .lightning
                .fail(&h.payment_hash, "no such chunk in this session");
            return Ok(());
        };
        let u = self.unpaid.remove(&k).expect("indexed chunk");
        let ln = self.app.lightning.clone();
        let hash = h.payment_hash;
        let notice = h.at.elapsed();
        let claiming = Instant::now();
        let delivery = self.delivery(&u);
        tokio::task::spawn_blocking(move || ln.claim(&hash, Some(&delivery)))
            .await
            .map_err(|e| End::Halt(proto::HaltReason::PaymentFailed, e.to_string()))?
            .map_err(|e| {
                End::Halt(
                    proto::HaltReason::PaymentFailed,
                    format!("claim of chunk {k} failed: {e}"),
                )
            })?;
        let claim = claiming.elapsed();
        let delivering = Instant::now();
        self.release(u, gen).await?;
        self.app
            .metrics
            .payment_to_tokens(notice, claim, delivering.elapsed());
        Ok(())
    }

    fn delivery(&self, u: &Unpaid) -> ChunkDelivery {
        ChunkDelivery {
            session_id: self.sid(),
            chunk_index: u.chunk.index,
            first_token: u.chunk.first_token,
            tokens: u.chunk.tokens,
            price_msat: u.price_msat,
            payment_hash: u.payment_hash,
        }
    }

    /// Records the chunk's delivery, then sends it.
    async fn deliver(&mut self, u: Unpaid, gen: &Generation) -> Result<(), End> {
        self.app
            .store
            .deliver_chunk(&self.delivery(&u))
            .map_err(|e| End::Halt(proto::HaltReason::EngineError, format!("store: {e}")))?;
        self.release(u, gen).await
    }

    /// Sends a chunk whose delivery is recorded, and lets the engine go one chunk further.
    async fn release(&mut self, u: Unpaid, gen: &Generation) -> Result<(), End> {
        let c = &u.chunk;
        self.paid_tokens += c.tokens;
        self.paid_chunks += 1;
        self.allow(gen);
        match (self.spec.mode, u.key) {
            (Mode::Atomic, Some(key)) => {
                self.send(Ev::ChunkKey(proto::ChunkKey {
                    chunk_index: c.index,
                    key: key.to_vec(),
                }))
                .await
            }
            _ => {
                self.send(Ev::Tokens(proto::Tokens {
                    chunk_index: c.index,
                    text: c.text.clone(),
                    first_token: c.first_token,
                    tokens: c.tokens,
                }))
                .await
            }
        }
    }

    async fn on_credit(&mut self, amount_msat: u64, gen: &Generation) -> Result<(), End> {
        self.credited_msat += amount_msat;
        self.available_msat += amount_msat;
        self.send_balance().await?;
        self.release_from_balance(gen).await
    }

    async fn send_balance(&self) -> Result<(), End> {
        self.send(Ev::Balance(proto::Balance {
            credited_msat: self.credited_msat,
            spent_msat: self.spent_msat,
            available_msat: self.available_msat,
        }))
        .await
    }

    /// KEYSEND: release waiting chunks, in order, while the balance covers them.
    async fn release_from_balance(&mut self, gen: &Generation) -> Result<(), End> {
        let mut spent_any = false;
        while let Some((&k, u)) = self.unpaid.iter().next() {
            if u.price_msat > self.available_msat {
                break;
            }
            let u = self.unpaid.remove(&k).expect("present");
            self.available_msat -= u.price_msat;
            self.spent_msat += u.price_msat;
            spent_any = true;
            self.deliver(u, gen).await?;
        }
        if spent_any {
            self.send_balance().await?;
        }
        Ok(())
    }

    /// Ends the session: withdraw unpaid invoices (failing back anything held), commit the
    /// end, and tell the client.
    async fn finish(&mut self, end: End) {
        let reason_str = match &end {
            End::Done(FinishReason::Eos) => "stop".to_string(),
            End::Done(FinishReason::Length(_)) => "length".to_string(),
            End::Done(FinishReason::Stop(_)) => "stop_string".to_string(),
            End::Done(r) => format!("{r:?}").to_lowercase(),
            End::Halt(r, _) => r
                .as_str_name()
                .trim_start_matches("HALT_REASON_")
                .to_lowercase(),
            End::ClientGone => "client_gone".to_string(),
        };
        for u in std::mem::take(&mut self.unpaid).into_values() {
            if let Some(hash) = u.payment_hash {
                if let Err(e) = self.app.lightning.cancel(&hash, &reason_str) {
                    tracing::error!(payment_hash = %hex::encode(hash), error = %e, "withdrawing invoice");
                }
            }
        }
        let state = match end {
            End::Done(_) => SessionState::Finished,
            _ => SessionState::Halted,
        };
        if let Err(e) = self.app.store.end_session(&self.sid(), state, &reason_str) {
            tracing::error!(error = %e, "ending session");
        }
        let s = self.app.store.session(&self.sid()).ok().flatten();
        let (paid, refundable, tokens, chunks) = s
            .map(|s| {
                (
                    s.paid_msat,
                    s.refundable_msat(),
                    s.completion_tokens,
                    s.chunks_delivered,
                )
            })
            .unwrap_or((0, 0, self.paid_tokens, self.paid_chunks));
        tracing::info!(reason = %reason_str, tokens, chunks, paid_msat = paid, refundable_msat = refundable, "session ended");
        let ev = match end {
            End::ClientGone => return,
            End::Done(r) => Ev::Done(proto::Done {
                finish_reason: match r {
                    FinishReason::Length(_) => proto::FinishReason::Length,
                    FinishReason::Stop(_) => proto::FinishReason::StopString,
                    _ => proto::FinishReason::Stop,
                } as i32,
                prompt_tokens: self.spec.prompt_tokens,
                completion_tokens: tokens,
                chunks,
                paid_msat: paid,
                refundable_msat: refundable,
                receipt: None,
            }),
            End::Halt(reason, message) => Ev::Halted(proto::Halted {
                reason: reason as i32,
                message,
                completion_tokens_delivered: tokens,
                chunks_delivered: chunks,
                paid_msat: paid,
                refundable_msat: refundable,
            }),
        };
        let _ = self.out.send(event(ev)).await;
    }
}

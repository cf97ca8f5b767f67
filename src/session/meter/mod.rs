//! The meter: one task per session.
//!
//! First the prompt, when it has a price: BOLT11/ATOMIC send a hold invoice for it and start
//! the engine only once its HTLC is held (it is claimed with the first chunk, or failed back);
//! KEYSEND waits for enough balance and charges it; PREPAID draws it from the account. An
//! unpaid client costs no prefill.
//!
//! Then tokens arrive from the engine; every `chunk_tokens` of them (or the rest at the end)
//! form a chunk, priced exactly. BOLT11: the chunk waits for its hold invoice to be held, is
//! claimed, then sent. ATOMIC: the chunk is sent at once, encrypted under its invoice's
//! preimage. KEYSEND: the chunk is sent once the session's balance covers it. PREPAID: the
//! chunk is drawn from the account in the transaction that delivers it and sent at once. The
//! engine's allowance keeps it at most `window × chunk_tokens` ahead of payment (PREPAID: one
//! chunk beyond what the balance covers). No payment for the oldest unpaid item within the
//! timeout (the first payment has its own, shorter one) halts the session.
//!
//! Every write to the client is bounded in time: a client that stops reading is halted like
//! one that stops paying. A client whose stream drops after paying something is kept for
//! `resume_grace` (`Resume` replays what it paid for and goes on); one that paid nothing ends
//! at once. Store commits and LDK calls run on blocking threads.
//!
//! This file keeps what every session shares: the loop, attach/detach (`Resume`), deadlines,
//! the engine's allowance and the end. How a chunk gets paid lives with its payment path:
//! `invoiced` (BOLT11 and ATOMIC hold invoices and the claim), `keysend` (credits released
//! in order), `prepaid` (an account drawn per chunk), and `balance` (what KEYSEND and PREPAID
//! share).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::app::App;
use crate::engine::{Admission, FinishReason, GenerateParams, Generation, TokenEvent};
use crate::lightning::{HeldHtlc, SessionNotice};
use crate::pricing::Price;
use crate::store::{ChunkDelivery, SessionState, StoreError};
use crate::wire::proto::{self, generate_event::Event as Ev, GenerateEvent};

use super::ending::{last_event, Ending, Totals};
use super::LiveGuard;

// How a chunk gets paid, one file per payment path: hold invoices (BOLT11, ATOMIC), a balance
// drawn per chunk (KEYSEND and PREPAID share its commits), keysend credits, a prepaid account.
mod balance;
mod invoiced;
mod keysend;
mod prepaid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Bolt11,
    Atomic,
    Keysend,
    Prepaid,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Bolt11 => "BOLT11",
            Mode::Atomic => "ATOMIC",
            Mode::Keysend => "KEYSEND",
            Mode::Prepaid => "PREPAID",
        }
    }

    /// The mode [`Mode::as_str`] names (as the store keeps it).
    pub fn from_name(name: &str) -> Option<Mode> {
        [Mode::Bolt11, Mode::Atomic, Mode::Keysend, Mode::Prepaid]
            .into_iter()
            .find(|m| m.as_str() == name)
    }
}

pub struct SessionSpec {
    pub session_id: [u8; 16],
    pub mode: Mode,
    pub model: String,
    pub price: Price,
    /// Chunks the engine may run ahead of payment (≥ 1).
    pub window_chunks: u32,
    /// Tokens in the first chunk (0: a full chunk; never more than one).
    pub first_chunk_tokens: u32,
    pub prompt_tokens: u32,
    /// The prompt's exact price (0: free).
    pub prompt_price_msat: u64,
    pub payment_timeout: Duration,
    /// Deadline of the first payment (the prompt's, or the first chunk's).
    pub first_payment_timeout: Duration,
    /// Longest a write to the client may wait for it to read.
    pub send_timeout: Duration,
    /// Longest the end of a session waits for LDK to report its last claims.
    pub settle_timeout: Duration,
    pub invoice_expiry_secs: u32,
    /// PREPAID: the account drawn on.
    pub account_id: Option<[u8; 16]>,
    /// The generation to run (prompt already tokenized); its allowance is set here.
    pub params: GenerateParams,
    /// Lookahead and tokens per invoice (BOLT11/ATOMIC), adapted to the payment path.
    pub pace: super::Pace,
    /// How long a session whose stream dropped waits for `Resume` (zero: it ends at once).
    pub resume_grace: Duration,
    /// Resumes it may take; then `Resume` is refused (the session ends when its grace does).
    pub max_resumes: u32,
    /// Its whole life, from the request: then it halts, wherever it is.
    pub max_lifetime: Duration,
    /// The session's terms as first sent (its token blanked): sent again on `Resume`.
    pub accepted: proto::Accepted,
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
    /// Since when its payment has been asked for (the payment deadline runs from here).
    since: Instant,
    /// When the chunk was complete.
    ready_at: std::time::Instant,
    /// What asked the client for payment (EncryptedChunk, Invoice): sent again on `Resume`.
    resend: Vec<Ev>,
}

impl Unpaid {
    fn new(
        chunk: Chunk,
        price_msat: u64,
        payment_hash: Option<[u8; 32]>,
        key: Option<[u8; 32]>,
    ) -> Unpaid {
        Unpaid {
            chunk,
            price_msat,
            payment_hash,
            key,
            since: Instant::now(),
            ready_at: std::time::Instant::now(),
            resend: Vec::new(),
        }
    }
}

/// BOLT11/ATOMIC: the first chunk's invoice, issued when the session opens so that the client
/// pays while the engine prefills. Priced for `tokens`; the first chunk is sealed at that size.
struct Early {
    hash: [u8; 32],
    /// Its preimage: ATOMIC's chunk key, chosen before the chunk exists.
    key: [u8; 32],
    tokens: u32,
    since: Instant,
    invoice: proto::Invoice,
    /// Its HTLC, when it arrived before the chunk was complete: claimed once it is.
    held: Option<HeldHtlc>,
}

/// The prompt's payment.
enum PromptPay {
    /// Free, or already paid (charged from a balance, or its HTLC held).
    Done,
    /// BOLT11/ATOMIC: its hold invoice is out, not yet held.
    Invoiced {
        hash: [u8; 32],
        since: Instant,
        invoice: proto::Invoice,
    },
    /// KEYSEND: waiting for enough balance.
    AwaitingBalance { since: Instant },
}

type Out = mpsc::Sender<Result<GenerateEvent, Status>>;

enum End {
    Done(FinishReason),
    Halt(proto::HaltReason, String),
    ClientGone,
    ClientStalled,
}

impl End {
    fn halt(reason: proto::HaltReason, msg: impl Into<String>) -> End {
        End::Halt(reason, msg.into())
    }

    fn payment(msg: impl Into<String>) -> End {
        End::halt(proto::HaltReason::PaymentFailed, msg)
    }

    fn engine(msg: impl Into<String>) -> End {
        End::halt(proto::HaltReason::EngineError, msg)
    }
}

/// The client's side of a session: its stream, or since when it has been away (its stream
/// dropped; the session waits `resume_grace` for `Resume`).
enum Client {
    Attached(Out),
    Away { since: Instant },
}

/// What a meter uses of the house: the ledger, the node, the engine, the metrics (the rest of
/// [`App`] is the front doors' business).
struct Parts {
    store: crate::store::Store,
    lightning: Arc<crate::lightning::Lightning>,
    engine: crate::engine::Engine,
    metrics: Arc<crate::metrics::Metrics>,
}

struct Meter {
    parts: Parts,
    spec: SessionSpec,
    client: Client,
    held_tx: mpsc::UnboundedSender<HeldHtlc>,
    current: Chunk,
    next_index: u32,
    /// BOLT11/ATOMIC: invoiced chunks by index; KEYSEND: chunks waiting for balance.
    unpaid: BTreeMap<u32, Unpaid>,
    by_hash: HashMap<[u8; 32], u32>,
    paid_tokens: u32,
    paid_chunks: u32,
    prompt: PromptPay,
    /// BOLT11/ATOMIC paid prompt: its held HTLC, claimed with the first chunk.
    prompt_held: Option<[u8; 32]>,
    /// BOLT11/ATOMIC: the first chunk's invoice, out before the chunk is complete.
    early: Option<Early>,
    /// KEYSEND / PREPAID mirror of the balance, for Balance events (the store decides).
    credited_msat: u64,
    spent_msat: u64,
    /// Claims decided whose settlement LDK has not reported yet.
    unsettled: HashSet<[u8; 32]>,
    admission: Option<Admission>,
    gen: Option<Generation>,
    started: Instant,
    /// Tokens the engine generated (set when it stops).
    generated: u32,
    /// The session's slot; told when the first payment arrives.
    live: LiveGuard,
    /// Resumes taken so far (capped by `max_resumes`).
    resumes: u32,
}

fn event(e: Ev) -> Result<GenerateEvent, Status> {
    Ok(GenerateEvent { event: Some(e) })
}

/// Runs a session to its end. `admission` is the engine slot the generation will run in;
/// None: a slot is taken once the prompt is paid (an unpaid prompt holds no engine slot).
pub async fn run(
    app: Arc<App>,
    spec: SessionSpec,
    admission: Option<Admission>,
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
    run_session(app, spec, admission, out, shutdown, live)
        .instrument(span)
        .await
}

/// Runs blocking work (store commits, LDK calls) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, End> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| End::engine(format!("internal task failed: {e}")))
}

/// Resolves when the client's stream closes; pending while the client is away.
async fn closed(client: &Client) {
    match client {
        Client::Attached(o) => o.closed().await,
        Client::Away { .. } => std::future::pending().await,
    }
}

/// The next engine event, or pending forever while no generation runs.
async fn next_token(gen: &mut Option<Generation>) -> Option<TokenEvent> {
    match gen {
        Some(g) => g.events.recv().await,
        None => std::future::pending().await,
    }
}

async fn run_session(
    app: Arc<App>,
    spec: SessionSpec,
    admission: Option<Admission>,
    out: Out,
    shutdown: CancellationToken,
    live: LiveGuard,
) {
    let sid = spec.session_id;
    let (held_tx, mut held_rx) = mpsc::unbounded_channel();
    let (notice_tx, mut notice_rx) = mpsc::unbounded_channel();
    app.lightning.register_session(sid, notice_tx);
    let (mut attach_rx, ended_by_owner) = app.resumable.open(sid);
    let mut m = Meter {
        parts: Parts {
            store: app.store.clone(),
            lightning: app.lightning.clone(),
            engine: app.engine.clone(),
            metrics: app.metrics.clone(),
        },
        spec,
        client: Client::Attached(out),
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
        prompt: PromptPay::Done,
        prompt_held: None,
        early: None,
        credited_msat: 0,
        spent_msat: 0,
        unsettled: HashSet::new(),
        admission,
        gen: None,
        started: Instant::now(),
        generated: 0,
        live,
        resumes: 0,
    };
    let mut finished: Option<FinishReason> = None;
    // When the engine paused, and whether that was before the session's first paid chunk.
    let mut paused_since: Option<(Instant, bool)> = None;
    let mut paused = Duration::ZERO;
    let mut paused_first = Duration::ZERO;
    let far = Duration::from_secs(365 * 24 * 3600);
    let end = 'session: {
        if let Err(e) = m.open_prompt().await {
            break 'session e;
        }
        loop {
            // A detached client gets its last chunks and Done when it resumes.
            if let (Some(r), Client::Attached(_)) = (&finished, &m.client) {
                if m.unpaid.is_empty() && m.current.tokens == 0 {
                    break End::Done(r.clone());
                }
            }
            let deadline = match m.away_since() {
                Some(t) => t + m.spec.resume_grace,
                None => m.deadline().unwrap_or_else(|| Instant::now() + far),
            };
            // Whatever it waits for, a session does not outlive its lifetime.
            let end_of_life = m.started + m.spec.max_lifetime;
            let deadline = deadline.min(end_of_life);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break End::halt(proto::HaltReason::Shutdown, "the server is shutting down"),
                _ = ended_by_owner.cancelled() => {
                    tracing::info!("the owner ended the session");
                    break End::halt(proto::HaltReason::EndedByOwner, "the owner ended the session (EndSession)");
                }
                _ = closed(&m.client) => {
                    if let Err(e) = m.detach() {
                        break e;
                    }
                }
                Some(a) = attach_rx.recv() => {
                    if let Err(e) = m.attach(a).await {
                        break e;
                    }
                }
                Some(h) = held_rx.recv() => {
                    if let Err(e) = m.on_held(h).await {
                        break e;
                    }
                }
                Some(n) = notice_rx.recv() => {
                    if let Err(e) = m.on_notice(n).await {
                        break e;
                    }
                }
                ev = next_token(&mut m.gen), if finished.is_none() => match ev {
                    Some(TokenEvent::Token { text, .. }) => {
                        if let Some((t, first)) = paused_since.take() {
                            paused += t.elapsed();
                            if first {
                                paused_first += t.elapsed();
                            }
                        }
                        m.spec.pace.on_token(std::time::Instant::now());
                        m.current.text.push_str(&text);
                        m.current.tokens += 1;
                        if m.current.tokens >= m.chunk_target() {
                            if let Err(e) = m.seal().await {
                                break e;
                            }
                        }
                    }
                    Some(TokenEvent::Paused { generated }) => {
                        paused_since = Some((Instant::now(), m.paid_chunks == 0));
                        m.spec.pace.on_pause();
                        tracing::debug!(generated, "engine paused: waiting for payment");
                    }
                    Some(TokenEvent::Finished { reason, completion_tokens }) => {
                        tracing::debug!(?reason, completion_tokens, "engine finished");
                        match reason {
                            FinishReason::Error(e) => break End::engine(e),
                            FinishReason::UpstreamFailed(e) => {
                                break End::halt(proto::HaltReason::UpstreamFailed, e)
                            }
                            FinishReason::Cancelled => break End::engine("generation was cancelled"),
                            r => {
                                if m.current.tokens > 0 {
                                    if let Err(e) = m.seal().await {
                                        break e;
                                    }
                                }
                                finished = Some(r);
                            }
                        }
                    }
                    None => break End::engine("the engine stream ended unexpectedly"),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    if Instant::now() >= end_of_life {
                        break End::halt(
                            proto::HaltReason::SessionLifetime,
                            format!(
                                "the session reached the server's limit of {} s (payments.max_session_secs)",
                                m.spec.max_lifetime.as_secs()
                            ),
                        );
                    }
                    if m.away_since().is_some() {
                        tracing::info!(grace = ?m.spec.resume_grace, "the client did not resume in time");
                        break End::ClientGone;
                    }
                    break m.timeout_end();
                }
            }
        }
    };
    let halt_at = Instant::now();
    let generated = m.gen.as_ref().map(|g| g.handle.generated()).unwrap_or(0);
    m.generated = generated;
    if let Some(g) = m.gen.take() {
        g.handle.cancel();
    }
    m.admission = None;
    if let End::Halt(proto::HaltReason::PaymentTimeout, _) = &end {
        app.metrics
            .halt(generated.saturating_sub(m.paid_tokens), halt_at.elapsed());
    }
    if let Some((t, first)) = paused_since {
        paused += t.elapsed();
        if first {
            paused_first += t.elapsed();
        }
    }
    app.metrics
        .session(m.started.elapsed(), paused, paused_first);
    // No more attaching: a Resume from now on waits for the end to be committed, then
    // replays the ended session.
    drop(attach_rx);
    m.finish(end, &mut notice_rx).await;
    app.resumable.close(&sid);
    app.lightning.unregister_session(&sid);
}

impl Meter {
    fn sid(&self) -> [u8; 16] {
        self.spec.session_id
    }

    /// Tokens the current chunk closes at: the early first invoice's size, else the pace's
    /// (the first chunk: `first_chunk_tokens`, if fewer).
    fn chunk_target(&self) -> u32 {
        match &self.early {
            Some(e) => e.tokens,
            None if self.next_index == 0 => self.first_chunk_target(),
            None => self.spec.pace.chunk_tokens(),
        }
    }

    fn first_chunk_target(&self) -> u32 {
        let full = self.spec.pace.chunk_tokens();
        match self.spec.first_chunk_tokens {
            0 => full,
            n => n.min(full),
        }
    }

    /// Since when the client has been away; None while its stream is attached.
    fn away_since(&self) -> Option<Instant> {
        match self.client {
            Client::Away { since } => Some(since),
            Client::Attached(_) => None,
        }
    }

    /// Writes one event to the client, waiting at most `send_timeout` for it to read. While
    /// the client is detached nothing is written: what it paid for is replayed on `Resume`.
    async fn send(&mut self, e: Ev) -> Result<(), End> {
        let Client::Attached(out) = &self.client else {
            return Ok(());
        };
        match tokio::time::timeout(self.spec.send_timeout, out.send(event(e))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => {
                tracing::debug!("the client's stream is closed");
                self.detach()
            }
            Err(_) => {
                tracing::info!(timeout = ?self.spec.send_timeout, "the client stopped reading");
                Err(End::ClientStalled)
            }
        }
    }

    /// The client's stream dropped: keep the session for `resume_grace` (payment deadlines
    /// wait, PREPAID stops drawing on the account), or end it when there is no grace or
    /// nothing was paid yet.
    fn detach(&mut self) -> Result<(), End> {
        // Nothing paid, nothing to protect: an unpaid session is not kept (it would hold an
        // engine slot for the grace period for free). PREPAID's account is money at stake
        // while it has a balance; an empty one is not.
        let at_stake = (self.spec.mode == Mode::Prepaid && self.available_msat() > 0)
            || !self.first_payment_pending()
            || self.credited_msat > 0;
        if self.spec.resume_grace.is_zero() || !at_stake {
            return Err(End::ClientGone);
        }
        if let Client::Attached(_) = self.client {
            tracing::info!(grace = ?self.spec.resume_grace, "the client's stream dropped: waiting for Resume");
            self.client = Client::Away {
                since: Instant::now(),
            };
            self.allow();
        }
        Ok(())
    }

    /// `Resume`: a new stream for this session. The terms again, the paid chunks from
    /// `from_chunk` replayed from the store, what waits for payment asked again (its deadline
    /// paused while the client was away: the client could not pay what it could not see),
    /// then on as before. At most `max_resumes` times.
    async fn attach(&mut self, a: super::Attach) -> Result<(), End> {
        if matches!(&self.client, Client::Attached(o) if !o.is_closed()) {
            let _ = a.reply.send(Err(Status::failed_precondition(
                "another stream is attached to this session",
            )));
            return Ok(());
        }
        if self.resumes >= self.spec.max_resumes {
            let _ = a.reply.send(Err(Status::resource_exhausted(format!(
                "this session was resumed {} times, the server's limit (payments.max_resumes); \
                 it ends when its grace period does, and Resume then replays what it delivered",
                self.resumes
            ))));
            return Ok(());
        }
        self.resumes += 1;
        let (back, left) = (Instant::now(), self.away_since());
        self.client = Client::Attached(a.out);
        let _ = a.reply.send(Ok(()));
        tracing::info!(away = ?left.map(|t| back - t), from_chunk = a.from_chunk, resumes = self.resumes, "client resumed");
        // Deadlines paused while the client was away (it could not pay what it could not
        // see): each keeps the time it had left, it does not start over. A client that drops
        // and resumes in a loop gains no time.
        let paused = |since: Instant| match left {
            Some(left) => since + (back - since.max(left)),
            None => since,
        };
        for u in self.unpaid.values_mut() {
            u.since = paused(u.since);
        }
        if let Some(e) = &mut self.early {
            e.since = paused(e.since);
        }
        if let PromptPay::Invoiced { since, .. } | PromptPay::AwaitingBalance { since } =
            &mut self.prompt
        {
            *since = paused(*since);
        }
        self.send(Ev::Accepted(self.spec.accepted.clone())).await?;
        let (store, sid) = (self.parts.store.clone(), self.sid());
        let delivered = blocking(move || store.delivered_chunks(&sid))
            .await?
            .map_err(|e| End::payment(format!("store: {e}")))?;
        for c in delivered
            .into_iter()
            .filter(|c| c.chunk_index >= a.from_chunk)
        {
            self.send(Ev::Tokens(proto::Tokens {
                chunk_index: c.chunk_index,
                text: c.text.unwrap_or_default(),
                first_token: c.first_token,
                tokens: c.tokens,
            }))
            .await?;
        }
        if let PromptPay::Invoiced { invoice, .. } = &self.prompt {
            let inv = invoice.clone();
            self.send(Ev::Invoice(inv)).await?;
        }
        if let Some(inv) = self.early.as_ref().map(|e| e.invoice.clone()) {
            self.send(Ev::Invoice(inv)).await?;
        }
        let resend: Vec<Ev> = self
            .unpaid
            .values()
            .flat_map(|u| u.resend.iter().cloned())
            .collect();
        for e in resend {
            self.send(e).await?;
        }
        self.send_balance().await?;
        match self.spec.mode {
            // Chunks sealed while the client was away were not drawn yet.
            Mode::Prepaid => {
                while let Some((_, u)) = self.unpaid.pop_first() {
                    self.deliver_from_account(u).await?;
                }
            }
            Mode::Keysend => self.release_from_balance().await?,
            _ => {}
        }
        self.allow();
        Ok(())
    }

    /// Nothing paid yet: the first payment's deadline applies.
    fn first_payment_pending(&self) -> bool {
        self.paid_chunks == 0 && self.prompt_held.is_none() && self.spent_msat == 0
    }

    /// When the oldest thing waiting for payment times out, if anything is.
    fn deadline(&self) -> Option<Instant> {
        let first = self.first_payment_pending();
        let t = |since: Instant| {
            since
                + if first {
                    self.spec.first_payment_timeout
                } else {
                    self.spec.payment_timeout
                }
        };
        match &self.prompt {
            PromptPay::Invoiced { since, .. } | PromptPay::AwaitingBalance { since } => {
                return Some(since.to_owned() + self.spec.first_payment_timeout)
            }
            PromptPay::Done => {}
        }
        // An early first invoice is due like any other; once its HTLC is held it waits for
        // its chunk, not for the client.
        let early = self
            .early
            .as_ref()
            .filter(|e| e.held.is_none())
            .map(|e| e.since);
        self.unpaid
            .values()
            .map(|u| u.since)
            .chain(early)
            .min()
            .map(t)
    }

    fn timeout_end(&self) -> End {
        let secs = |d: Duration| d.as_secs();
        match &self.prompt {
            PromptPay::Invoiced { .. } => End::halt(
                proto::HaltReason::PaymentTimeout,
                format!(
                    "the prompt was not paid within {} s",
                    secs(self.spec.first_payment_timeout)
                ),
            ),
            PromptPay::AwaitingBalance { .. } => End::halt(
                proto::HaltReason::PaymentTimeout,
                format!(
                    "the balance did not cover the prompt ({} msat) within {} s",
                    self.spec.prompt_price_msat,
                    secs(self.spec.first_payment_timeout)
                ),
            ),
            PromptPay::Done => {
                let k = self.unpaid.keys().next().copied().unwrap_or(0);
                let t = if self.first_payment_pending() {
                    self.spec.first_payment_timeout
                } else {
                    self.spec.payment_timeout
                };
                End::halt(
                    proto::HaltReason::PaymentTimeout,
                    format!("chunk {k} was not paid within {} s", secs(t)),
                )
            }
        }
    }

    /// The engine may generate this many tokens in all: paid + the window (PREPAID: what the
    /// balance covers + one chunk).
    fn allowance(&self) -> u32 {
        let chunk = self.spec.price.chunk_tokens;
        match self.spec.mode {
            // Away: nothing more is drawn from a balance until the client is back.
            Mode::Prepaid | Mode::Keysend if self.away_since().is_some() => self.paid_tokens,
            Mode::Prepaid => {
                let per = self.spec.price.msat_per_token.max(1);
                let covered = (self.available_msat() / per).min(u32::MAX as u64) as u32;
                self.paid_tokens
                    .saturating_add(covered)
                    .saturating_add(chunk)
            }
            _ => self.paid_tokens + self.spec.pace.lookahead(),
        }
    }

    fn allow(&self) {
        if let Some(g) = &self.gen {
            g.handle.set_allowance(self.allowance());
        }
    }

    fn available_msat(&self) -> u64 {
        self.credited_msat.saturating_sub(self.spent_msat)
    }

    /// Starts the generation once the prompt is paid (or free), in the slot taken at the
    /// request or, after a paid prompt, now.
    async fn start_engine(&mut self) -> Result<(), End> {
        if self.gen.is_some() {
            return Ok(());
        }
        let admission = match self.admission.take() {
            Some(a) => a,
            None => self
                .parts
                .engine
                .admit(&self.spec.model)
                .await
                .map_err(|e| End::engine(e.to_string()))?,
        };
        let mut params = self.spec.params.clone();
        params.allowance = self.allowance();
        let gen = self
            .parts
            .engine
            .start(admission, params)
            .await
            .map_err(|e| End::engine(e.to_string()))?;
        self.gen = Some(gen);
        Ok(())
    }

    /// The prompt's payment, before any prefill.
    async fn open_prompt(&mut self) -> Result<(), End> {
        let price = self.spec.prompt_price_msat;
        if self.spec.mode == Mode::Prepaid {
            self.refresh_account().await?;
        }
        let invoiced = matches!(self.spec.mode, Mode::Bolt11 | Mode::Atomic);
        if price == 0 {
            self.start_engine().await?;
            // The engine prefills while the client pays the first chunk.
            return if invoiced {
                self.invoice_first().await
            } else {
                Ok(())
            };
        }
        match self.spec.mode {
            // Both at once: the client pays the prompt and the first chunk in one go.
            Mode::Bolt11 | Mode::Atomic => {
                self.invoice_prompt().await?;
                self.invoice_first().await
            }
            Mode::Keysend => {
                self.prompt = PromptPay::AwaitingBalance {
                    since: Instant::now(),
                };
                Ok(())
            }
            Mode::Prepaid => self.charge_prompt().await,
        }
    }

    /// Closes the current chunk: price it and ask for (or take) payment.
    async fn seal(&mut self) -> Result<(), End> {
        // The lookahead is planned with the engine's rate, which the session only knows once
        // tokens come: at the start the allowance is the bare window. Replan at every chunk,
        // not only when a payment lands, or a fast engine waits out its first payment at the
        // window (the node's recent payment latency needs a rate to act on).
        self.allow();
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
                self.unpaid
                    .insert(k, Unpaid::new(chunk, price_msat, None, None));
                self.release_from_balance().await
            }
            Mode::Prepaid if self.away_since().is_some() => {
                self.unpaid
                    .insert(k, Unpaid::new(chunk, price_msat, None, None));
                Ok(())
            }
            Mode::Prepaid => {
                self.deliver_from_account(Unpaid::new(chunk, price_msat, None, None))
                    .await
            }
            Mode::Bolt11 | Mode::Atomic => self.invoice_chunk(chunk, price_msat).await,
        }
    }

    /// Fault point between a delivery's commit and its write to the client.
    fn after_commit(&self) -> Result<(), End> {
        self.parts
            .lightning
            .faults()
            .point("after_commit")
            .map_err(|_| End::payment("injected fault after the delivery commit"))
    }

    fn delivery(&self, u: &Unpaid) -> ChunkDelivery {
        ChunkDelivery {
            session_id: self.sid(),
            chunk_index: u.chunk.index,
            first_token: u.chunk.first_token,
            tokens: u.chunk.tokens,
            price_msat: u.price_msat,
            payment_hash: u.payment_hash,
            prompt_msat: 0,
            account_id: self.spec.account_id,
            text: u.chunk.text.clone(),
        }
    }

    /// Sends a chunk whose delivery is recorded, and lets the engine go one chunk further.
    async fn release(&mut self, u: Unpaid) -> Result<(), End> {
        let c = &u.chunk;
        self.paid_tokens += c.tokens;
        self.paid_chunks += 1;
        self.allow();
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

    async fn on_notice(&mut self, n: SessionNotice) -> Result<(), End> {
        match n {
            SessionNotice::Settled { payment_hash, .. } => {
                self.unsettled.remove(&payment_hash);
                Ok(())
            }
            SessionNotice::Credit { amount_msat } => self.on_credit(amount_msat).await,
        }
    }

    /// Ends the session: withdraw unpaid invoices (failing back anything held, the prompt's
    /// too when no chunk was delivered), wait briefly for LDK to report the claims made, commit
    /// the end, and tell the client.
    async fn finish(&mut self, end: End, notices: &mut mpsc::UnboundedReceiver<SessionNotice>) {
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
            End::ClientStalled => "client_stalled".to_string(),
        };
        let mut withdraw: Vec<[u8; 32]> = std::mem::take(&mut self.unpaid)
            .into_values()
            .filter_map(|u| u.payment_hash)
            .collect();
        if let PromptPay::Invoiced { hash, .. } = self.prompt {
            withdraw.push(hash);
        }
        withdraw.extend(self.prompt_held.take());
        withdraw.extend(self.early.take().map(|e| e.hash));
        if !withdraw.is_empty() {
            let (ln, why) = (self.parts.lightning.clone(), reason_str.clone());
            let _ = blocking(move || {
                for hash in withdraw {
                    if let Err(e) = ln.cancel(&hash, &why) {
                        tracing::error!(payment_hash = %hex::encode(hash), error = %e, "withdrawing invoice");
                    }
                }
            })
            .await;
        }
        // LDK reports a claim within milliseconds; the Done below should count it.
        let wait = tokio::time::sleep(self.spec.settle_timeout);
        tokio::pin!(wait);
        while !self.unsettled.is_empty() {
            tokio::select! {
                n = notices.recv() => match n {
                    Some(SessionNotice::Settled { payment_hash, .. }) => {
                        self.unsettled.remove(&payment_hash);
                    }
                    Some(_) => {}
                    None => break,
                },
                _ = &mut wait => {
                    tracing::warn!(unsettled = self.unsettled.len(), "claims not yet reported by LDK at the end of the session");
                    break;
                }
            }
        }
        let state = match end {
            End::Done(_) => SessionState::Finished,
            _ => SessionState::Halted,
        };
        let (store, sid, why) = (self.parts.store.clone(), self.sid(), reason_str.clone());
        let ln = self.parts.lightning.clone();
        let account = self.spec.account_id;
        let ended = blocking(move || {
            store.end_session(&sid, state, &why)?;
            let s = store.session(&sid)?;
            let balance = match account {
                Some(a) => store.account(&a)?.map(|a| a.available_msat()).unwrap_or(0),
                None => s.as_ref().map(|s| s.refundable_msat()).unwrap_or(0),
            };
            // The receipt is issued once the end is committed; a failure here leaves it to
            // GetReceipt, never the session's money.
            let receipt = super::receipt::issue(&store, &ln, &sid)
                .map_err(|e| tracing::error!(error = %e, "issuing the receipt"))
                .ok();
            Ok::<_, StoreError>((s, balance, receipt))
        })
        .await;
        let (s, balance, receipt) = match ended {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "ending session");
                (None, 0, None)
            }
            Err(_) => (None, 0, None),
        };
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
        crate::metrics::session_ended(
            self.spec.mode.as_str(),
            &reason_str,
            self.generated,
            tokens,
            self.started.elapsed().as_secs_f64(),
        );
        let ending = match end {
            End::ClientGone | End::ClientStalled => return,
            End::Done(r) => Ending::Done(match r {
                FinishReason::Length(_) => proto::FinishReason::Length,
                FinishReason::Stop(_) => proto::FinishReason::StopString,
                _ => proto::FinishReason::Stop,
            }),
            End::Halt(reason, message) => Ending::Halted(reason, message),
        };
        let ev = last_event(
            ending,
            Totals {
                prompt_tokens: self.spec.prompt_tokens,
                completion_tokens: tokens,
                chunks,
                paid_msat: paid,
                refundable_msat: refundable,
                balance_msat: balance,
                receipt,
            },
        );
        // The last word, bounded like every other write.
        let _ = self.send(ev).await;
    }
}

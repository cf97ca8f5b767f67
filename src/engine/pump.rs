//! The per-generation driver ("pump"): runs backend segments, turns observed token ids into
//! exactly one [`TokenEvent::Token`] each, enforces max_tokens / stop strings / stop() /
//! allowance, and pauses + resumes transparently.
//!
//! All events go into an unbounded per-generation buffer (bounded in practice by max_tokens + 2
//! events), written from the backend's observer and from this task. Nothing here ever waits on
//! the consumer, so a consumer that never reads cannot slow the backend or any other stream.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn, Instrument};

use super::backend::{Backend, SegmentEnd, SegmentRequest, TokenObserver};
use super::detok::{TokenBytes, Utf8Assembler};
use super::{FinishReason, TokenEvent};

/// Why the observer refused to let a segment continue.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Limit {
    Cancelled,
    Stopped,
    StopString(String),
    MaxTokens,
    Allowance,
}

struct State {
    max_tokens: u32,
    allowance: u32,
    stop_strings: Vec<String>,
    generated: Vec<u32>,
    assembler: Utf8Assembler,
    /// Complete text so far; kept only when stop strings must be matched.
    text: String,
    stop_requested: bool,
    cancelled: bool,
    /// Set by the observer when it ends the current segment; reset per segment.
    limit: Option<Limit>,
    /// The segment whose observer may report tokens (None between segments). mistral.rs can
    /// call a finished sequence's logits processor once more (with the forced EOS in its
    /// context) after it has sent the end; that late call must not touch this generation.
    open_segment: Option<u32>,
    events: mpsc::UnboundedSender<TokenEvent>,
    /// The admission slot. Kept here (not in the task) so that cancel() frees it synchronously.
    permit: Option<OwnedSemaphorePermit>,
}

pub(crate) struct Shared {
    state: Mutex<State>,
    /// Wakes the driver on cancel / stop / allowance changes. `notify_one` stores a permit, so
    /// a wake-up between the driver's check and its wait is never lost.
    wake: Notify,
    /// Mirrors `State::cancelled` for the lock-free check in [`EventStream`].
    cancelled: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent on panic (every update is a single step), so a poisoned
        // lock is safe to reuse; panicking here would take the backend loop down with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cancel(&self) {
        let permit = {
            let mut st = self.lock();
            if st.cancelled {
                return;
            }
            st.cancelled = true;
            self.cancelled.store(true, Ordering::SeqCst);
            st.permit.take()
        };
        drop(permit);
        self.wake.notify_one();
    }
}

/// Control of a running generation. Cheap to clone; all methods return immediately.
#[derive(Clone)]
pub struct GenerationHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for GenerationHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerationHandle")
            .field("generated", &self.generated())
            .field("allowance", &self.allowance())
            .finish()
    }
}

impl GenerationHandle {
    /// Cancels at once: when this returns, the event stream yields no further `Token` (it
    /// yields `Finished{Cancelled}` next), the admission slot is free, and the backend's
    /// sequence is being torn down (at most one more step of compute).
    pub fn cancel(&self) {
        self.shared.cancel();
    }

    /// Ends the generation cleanly before the next token (`Finished{Stopped}`, or `Eos`/`Length`
    /// if it ended on its own first). Tokens already generated are still delivered.
    pub fn stop(&self) {
        self.shared.lock().stop_requested = true;
        self.shared.wake.notify_one();
    }

    /// Tokens generated so far (= `Token` events produced). Exact at any time.
    pub fn generated(&self) -> u32 {
        self.shared.lock().generated.len() as u32
    }

    /// Total tokens the generation may produce; reaching it pauses the generation.
    pub fn allowance(&self) -> u32 {
        self.shared.lock().allowance
    }

    /// Sets the total allowance. Raising it above `generated()` resumes a paused generation.
    pub fn set_allowance(&self, allowance: u32) {
        self.shared.lock().allowance = allowance;
        self.shared.wake.notify_one();
    }

    /// Whether cancel() was called (or the event stream was dropped).
    pub fn is_cancelled(&self) -> bool {
        self.shared.cancelled.load(Ordering::SeqCst)
    }
}

/// The events of one generation, in order. Dropping it cancels the generation.
pub struct EventStream {
    rx: mpsc::UnboundedReceiver<TokenEvent>,
    shared: Arc<Shared>,
    delivered: u32,
    done: bool,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("delivered", &self.delivered)
            .field("done", &self.done)
            .finish()
    }
}

impl EventStream {
    /// The next event; `None` after the terminal `Finished`.
    pub async fn recv(&mut self) -> Option<TokenEvent> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next event if one is buffered, without waiting.
    pub fn try_recv(&mut self) -> Option<TokenEvent> {
        let waker = std::task::Waker::noop();
        match self.poll_recv(&mut Context::from_waker(waker)) {
            Poll::Ready(ev) => ev,
            Poll::Pending => None,
        }
    }

    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<TokenEvent>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.shared.cancelled.load(Ordering::SeqCst) {
            // Whatever is still buffered was not delivered: the stream ends here, and the
            // count says exactly how many tokens this consumer received.
            self.done = true;
            return Poll::Ready(Some(TokenEvent::Finished {
                reason: FinishReason::Cancelled,
                completion_tokens: self.delivered,
            }));
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(ev)) => {
                match &ev {
                    TokenEvent::Token { .. } => self.delivered += 1,
                    TokenEvent::Finished { .. } => self.done = true,
                    TokenEvent::Paused { .. } => {}
                }
                Poll::Ready(Some(ev))
            }
            Poll::Ready(None) => {
                // The driver always ends with Finished unless cancelled; be explicit anyway.
                self.done = true;
                Poll::Ready(None)
            }
        }
    }

    /// Token events delivered by this stream so far.
    pub fn delivered(&self) -> u32 {
        self.delivered
    }
}

impl tokio_stream::Stream for EventStream {
    type Item = TokenEvent;
    fn poll_next(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TokenEvent>> {
        self.get_mut().poll_recv(cx)
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if !self.done {
            self.shared.cancel();
        }
    }
}

struct Observer {
    shared: Arc<Shared>,
    bytes: Arc<TokenBytes>,
    segment: u32,
}

impl TokenObserver for Observer {
    fn on_token(&self, id: u32) {
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        if st.cancelled || st.open_segment != Some(self.segment) {
            return;
        }
        let index = st.generated.len() as u32;
        st.generated.push(id);
        let text = st.assembler.push(self.bytes.get(id));
        if !st.stop_strings.is_empty() && !text.is_empty() {
            let start = st.text.len();
            st.text.push_str(&text);
            let all = &st.text;
            let found = st.stop_strings.iter().find(|s| {
                // A match must end inside the new text, so it starts at most len-1 bytes before.
                let mut from = start.saturating_sub(s.len().saturating_sub(1));
                while !all.is_char_boundary(from) {
                    from -= 1;
                }
                all[from..].contains(s.as_str())
            });
            if let Some(s) = found {
                st.limit = Some(Limit::StopString(s.clone()));
            }
        }
        // Unbounded: never blocks the backend. Fails only when the consumer is gone, and then
        // the generation is being cancelled anyway.
        let _ = st.events.send(TokenEvent::Token { text, index });
    }

    fn proceed(&self) -> bool {
        let mut st = self.shared.lock();
        if st.limit.is_some() || st.open_segment != Some(self.segment) {
            return false;
        }
        let n = st.generated.len() as u32;
        let limit = if st.cancelled {
            Limit::Cancelled
        } else if st.stop_requested {
            Limit::Stopped
        } else if n >= st.max_tokens {
            Limit::MaxTokens
        } else if n >= st.allowance {
            Limit::Allowance
        } else {
            return true;
        };
        st.limit = Some(limit);
        false
    }
}

pub(crate) struct GenerationSpec {
    pub model: String,
    pub prompt: Vec<u32>,
    pub max_tokens: u32,
    pub allowance: u32,
    pub temperature: f64,
    pub top_p: f64,
    pub repetition_penalty: f64,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

/// Starts the driver task for an admitted generation.
pub(crate) fn spawn(
    spec: GenerationSpec,
    backend: Arc<dyn Backend>,
    bytes: Arc<TokenBytes>,
    slots: Arc<Semaphore>,
    permit: OwnedSemaphorePermit,
    id: u64,
) -> (EventStream, GenerationHandle) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            max_tokens: spec.max_tokens,
            allowance: spec.allowance,
            stop_strings: spec.stop.clone(),
            generated: Vec::with_capacity(spec.max_tokens.min(1 << 16) as usize),
            assembler: Utf8Assembler::default(),
            text: String::new(),
            stop_requested: false,
            cancelled: false,
            limit: None,
            open_segment: None,
            events: tx,
            permit: Some(permit),
        }),
        wake: Notify::new(),
        cancelled: AtomicBool::new(false),
    });
    let span = tracing::info_span!("generation", id, model = %spec.model);
    let driver = Driver {
        spec,
        backend,
        bytes,
        slots,
        shared: shared.clone(),
    };
    tokio::spawn(driver.run().instrument(span));
    let events = EventStream {
        rx,
        shared: shared.clone(),
        delivered: 0,
        done: false,
    };
    (events, GenerationHandle { shared })
}

enum Next {
    Run,
    Pause,
    Finish(FinishReason),
    Cancelled,
}

struct Driver {
    spec: GenerationSpec,
    backend: Arc<dyn Backend>,
    bytes: Arc<TokenBytes>,
    slots: Arc<Semaphore>,
    shared: Arc<Shared>,
}

impl Driver {
    async fn run(self) {
        let started = std::time::Instant::now();
        let mut segments = 0u32;
        let mut paused_at: Option<u32> = None;
        loop {
            let next = {
                let st = self.shared.lock();
                let n = st.generated.len() as u32;
                if st.cancelled {
                    Next::Cancelled
                } else if st.stop_requested {
                    Next::Finish(FinishReason::Stopped)
                } else if n >= st.max_tokens {
                    Next::Finish(FinishReason::Length(st.max_tokens))
                } else if n >= st.allowance {
                    Next::Pause
                } else {
                    Next::Run
                }
            };
            match next {
                Next::Cancelled => {
                    info!(generated = self.generated(), "generation cancelled");
                    return;
                }
                Next::Finish(reason) => return self.finish(reason, started, segments),
                Next::Pause => {
                    let n = self.generated();
                    // The slot is released before Paused is announced, so that whoever sees
                    // Paused can use it (a paused generation holds no slot).
                    let permit = self.shared.lock().permit.take();
                    drop(permit);
                    if paused_at != Some(n) {
                        let _ = self
                            .shared
                            .lock()
                            .events
                            .send(TokenEvent::Paused { generated: n });
                        debug!(generated = n, "paused: allowance reached, slot released");
                        paused_at = Some(n);
                    }
                    self.shared.wake.notified().await;
                    continue;
                }
                Next::Run => {}
            }
            if !self.ensure_slot().await {
                continue; // cancelled while waiting: the next check returns.
            }
            paused_at = None;
            segments += 1;
            match self.run_segment(segments).await {
                Some(reason) => return self.finish(reason, started, segments),
                None => continue,
            }
        }
    }

    fn generated(&self) -> u32 {
        self.shared.lock().generated.len() as u32
    }

    /// Makes sure this generation holds an admission slot (re-acquired after a pause).
    /// Returns false if cancelled meanwhile.
    async fn ensure_slot(&self) -> bool {
        if self.shared.lock().permit.is_some() {
            return true;
        }
        let acquire = self.slots.clone().acquire_owned();
        tokio::pin!(acquire);
        loop {
            tokio::select! {
                permit = &mut acquire => {
                    let Ok(permit) = permit else { return false };
                    let mut st = self.shared.lock();
                    if st.cancelled {
                        return false;
                    }
                    st.permit = Some(permit);
                    return true;
                }
                _ = self.shared.wake.notified() => {
                    let st = self.shared.lock();
                    if st.cancelled || st.stop_requested {
                        return false;
                    }
                    // An allowance change while waiting for a slot: keep waiting.
                }
            }
        }
    }

    /// Runs one backend segment. Returns the finish reason if the generation is over, None to
    /// go round the loop again (pause, or a limit the loop turns into a finish).
    async fn run_segment(&self, segment: u32) -> Option<FinishReason> {
        let (tokens, remaining) = {
            let mut st = self.shared.lock();
            st.limit = None;
            st.open_segment = Some(segment);
            let mut tokens = Vec::with_capacity(self.spec.prompt.len() + st.generated.len());
            tokens.extend_from_slice(&self.spec.prompt);
            tokens.extend_from_slice(&st.generated);
            (tokens, st.max_tokens - st.generated.len() as u32)
        };
        let resumed_from = tokens.len() - self.spec.prompt.len();
        debug!(segment, resumed_from, remaining, "starting segment");
        let observer = Arc::new(Observer {
            shared: self.shared.clone(),
            bytes: self.bytes.clone(),
            segment,
        });
        let request = SegmentRequest {
            tokens,
            max_new_tokens: remaining,
            temperature: self.spec.temperature,
            top_p: self.spec.top_p,
            repetition_penalty: self.spec.repetition_penalty,
            seed: self.spec.seed,
        };
        let mut seg = match self.backend.start(request, observer).await {
            Ok(seg) => seg,
            Err(e) => {
                self.shared.lock().open_segment = None;
                return Some(FinishReason::Error(e));
            }
        };
        let end = {
            let finished = seg.finished();
            tokio::pin!(finished);
            loop {
                tokio::select! {
                    end = &mut finished => break Some(end),
                    _ = self.shared.wake.notified() => {
                        if self.shared.cancelled.load(Ordering::SeqCst) {
                            break None;
                        }
                        // stop()/allowance changes are applied by the observer at the next step.
                    }
                }
            }
        };
        // Dropping the segment drops the backend's receiver: for a cancel this is what tears
        // the sequence down; after a normal end it is a no-op.
        drop(seg);
        // Closed before anything reads the count: whatever the backend still reports for
        // this segment is ignored.
        self.shared.lock().open_segment = None;
        let Some(end) = end else {
            return None; // cancelled; the loop reports it.
        };
        let (limit, n) = {
            let mut st = self.shared.lock();
            (st.limit.take(), st.generated.len() as u32)
        };
        match (limit, end) {
            (Some(Limit::StopString(s)), _) => Some(FinishReason::Stop(s)),
            // These are re-examined by the loop (a pause may already be lifted).
            (Some(Limit::Allowance | Limit::MaxTokens | Limit::Stopped | Limit::Cancelled), _) => {
                None
            }
            (None, SegmentEnd::Failed(e)) => {
                warn!(error = %e, generated = n, "backend failed");
                Some(FinishReason::Error(e))
            }
            (None, SegmentEnd::UpstreamFailed(e)) => {
                warn!(error = %e, generated = n, "upstream failed");
                Some(FinishReason::UpstreamFailed(e))
            }
            (None, SegmentEnd::Ended) if n >= self.spec.max_tokens => {
                Some(FinishReason::Length(self.spec.max_tokens))
            }
            (None, SegmentEnd::Ended) => Some(FinishReason::Eos),
        }
    }

    fn finish(&self, reason: FinishReason, started: std::time::Instant, segments: u32) {
        // The slot is released before Finished is announced, so that whoever sees the end can
        // start another generation in it.
        let permit = self.shared.lock().permit.take();
        drop(permit);
        let st = self.shared.lock();
        let n = st.generated.len() as u32;
        if !st.assembler.pending().is_empty() {
            // Only possible when the output was cut inside a character: those bytes are
            // not text, and the tokens carrying them were already delivered (with "").
            debug!(
                bytes = st.assembler.pending().len(),
                "incomplete character at the end"
            );
        }
        info!(
            ?reason,
            generated = n,
            segments,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "generation finished"
        );
        let _ = st.events.send(TokenEvent::Finished {
            reason,
            completion_tokens: n,
        });
    }
}

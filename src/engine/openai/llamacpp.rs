//! llama.cpp's `llama-server` by its native API (`upstream.api = "llama.cpp"`): token ids in,
//! token ids out, and the server's own count of what it generated on every event.
//!
//! Why: over OpenAI's API a gateway sees text and must map it back to tokens, so for an
//! upstream that streams multi-token pieces its count is a re-tokenization, not what was
//! generated (docs/scale-out.md). llama.cpp's native `POST /completions` takes the prompt as
//! ids (the exact tokens the client was charged for, no detokenize/re-tokenize round trip, and
//! a resume inside a character needs no special case) and streams, for every sampled token,
//! an event with its id and `tokens_predicted`, the server's count so far.
//!
//! One exception, read in llama.cpp's server (`process_token`): the tokens of a character
//! split across tokens are not streamed until the character is complete; the event that
//! completes it carries the character's whole text, the last token's id and a count that has
//! jumped by all of them. Their ids are recovered by the gateway's tokenizer from that text;
//! a count the text cannot account for (a character cut by the length limit, a split the
//! tokenizer does not reproduce) is charged as text-less tokens, because the server says it
//! generated them, and never more than the server's count.

use std::sync::Arc;

use serde::Deserialize;
use tracing::warn;

use super::{events, failed, next, pass_on, Attempt, Ctx, Lease, Next, BIG_PIECE_BYTES};
use crate::engine::backend::{SegmentEnd, SegmentRequest, TokenObserver};

/// The request: the prompt as ids, and only the client's own sampling settings (the server's
/// default top-k 40 and min-p 0.05 would change what the client asked for).
pub(super) fn body(req: &SegmentRequest, top_p: f64) -> serde_json::Value {
    serde_json::json!({
        "prompt": req.tokens,
        "n_predict": req.max_new_tokens,
        "temperature": req.temperature,
        "top_p": top_p,
        "top_k": 0,
        "min_p": 0.0,
        "stream": true,
        "cache_prompt": true,
    })
}

/// One streamed event of `POST /completions` (the fields the gateway reads).
#[derive(Deserialize)]
struct Event {
    #[serde(default)]
    content: String,
    /// The id of the token this event was sent for (empty on the first and the final event).
    #[serde(default)]
    tokens: Vec<u32>,
    /// Tokens generated so far, as the server counts them.
    tokens_predicted: Option<u32>,
    /// The final event.
    #[serde(default)]
    stop: bool,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

/// Reads the stream, passing each generated token on while the driver allows.
pub(super) async fn read(
    ctx: &Arc<Ctx>,
    lease: &mut Lease,
    observer: &dyn TokenObserver,
    resp: reqwest::Response,
) -> Attempt {
    let pool = &ctx.pool;
    let mut events = events(resp);
    // Tokens passed on (charged), and the server's count they account for (which also counts
    // an end-of-sequence token).
    let mut passed = 0u32;
    let mut accounted = 0u32;
    let mut ids = Vec::new();
    loop {
        let data = match next(&mut events, ctx.idle_timeout).await {
            Next::Data(d) => d,
            Next::Closed => {
                let why = "closed the stream before its final event".to_string();
                return failed(pool, lease, passed, why);
            }
            Next::Failed(why) => return failed(pool, lease, passed, why),
        };
        let ev: Event = match serde_json::from_str(&data) {
            Ok(e) => e,
            Err(e) => {
                let head: String = data.chars().take(200).collect();
                let why = format!("sent an unreadable event ({e}): {head}");
                return failed(pool, lease, passed, why);
            }
        };
        if let Some(err) = ev.error {
            return failed(pool, lease, passed, format!("reported an error: {err}"));
        }
        let Some(generated) = ev.tokens_predicted else {
            let why = "sent an event without tokens_predicted: it does not speak llama.cpp's \
                       native API (set upstream.api = \"openai\" for OpenAI's)";
            return failed(pool, lease, passed, why.into());
        };
        let Some(new) = generated
            .checked_sub(accounted)
            .filter(|&n| n as usize >= ev.tokens.len())
        else {
            crate::metrics::upstream_count_mismatch(&pool.model);
            lease.outcome = "failed";
            return Attempt::Done(SegmentEnd::UpstreamFailed(format!(
                "upstream {} counts {generated} tokens generated after sending {} \
                 (+{} now): halted rather than charge on a count that contradicts itself",
                lease.url(),
                accounted,
                ev.tokens.len()
            )));
        };
        accounted = generated;
        ids.clear();
        if new as usize == ev.tokens.len() {
            // The end-of-sequence token is counted by the server and charged to nobody.
            ids.extend(ev.tokens.iter().filter(|&&id| !ctx.vocab.is_eog(id)));
        } else {
            // Tokens held back by the server: their text is in this event's.
            match recover(ctx, &ev, new).await {
                Ok(v) => ids = v,
                Err(why) => return failed(pool, lease, passed, why),
            }
        }
        if let Some(end) = pass_on(&ids, observer, lease, &mut passed) {
            return end;
        }
        if ev.stop {
            lease.outcome = "ok";
            return Attempt::Done(SegmentEnd::Ended);
        }
    }
}

/// The ids of `new` generated tokens whose text is the event's: the tokenizer's split of the
/// text when it gives exactly `new` tokens ending with the event's own, else the split padded
/// with text-less tokens up to the server's count (never beyond it: a split longer than the
/// count loses its last pieces' text rather than charge for tokens not generated).
async fn recover(ctx: &Arc<Ctx>, ev: &Event, new: u32) -> Result<Vec<u32>, String> {
    let text = ev.content.as_bytes().to_vec();
    let mut ids = Vec::new();
    if text.len() > BIG_PIECE_BYTES {
        // A big piece is real tokenizer work: off the async workers.
        let c = ctx.clone();
        ids = tokio::task::spawn_blocking(move || {
            let mut v = Vec::new();
            c.vocab.ids(&text, &mut v);
            v
        })
        .await
        .map_err(|e| format!("tokenizing failed: {e}"))?;
    } else if !text.is_empty() {
        ctx.vocab.ids(&text, &mut ids);
    }
    let exact = ids.len() == new as usize && ev.tokens.last().is_none_or(|t| ids.last() == Some(t));
    if !exact {
        if !ids.is_empty() {
            crate::metrics::upstream_count_mismatch(&ctx.pool.model);
            warn!(
                generated = new,
                split = ids.len(),
                "the tokenizer's split of a held-back piece differs from the server's count"
            );
        }
        ids.truncate(new as usize);
        ids.resize(new as usize, ctx.vocab.textless());
    }
    Ok(ids)
}

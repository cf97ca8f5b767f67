//! The one validation `Quote` and `Generate` share: model, prompt, max_tokens and mode, checked
//! cheapest first (sizes before tokenizing), and the prompt tokenized once.

use std::sync::Arc;
use tonic::Status;

use crate::app::App;
use crate::config::ModelConfig;
use crate::engine::{ChatMessage, Prompt};
use crate::pricing::Price;
use crate::session::Mode;
use crate::wire::proto::{self, PaymentMode};

/// What a chat template adds around one message, at most, in bytes (ChatML's
/// `<|im_start|>user\n … <|im_end|>\n` is 24 plus the role): counted in `max_prompt_bytes`.
const TEMPLATE_BYTES_PER_MESSAGE: usize = 32;

/// A request that can be served: its model, its prompt's tokens and its prices.
pub(crate) struct Checked {
    pub model: ModelConfig,
    pub prompt: Vec<u32>,
    pub price: Price,
    pub mode: Mode,
}

impl Checked {
    pub fn prompt_tokens(&self) -> u32 {
        self.prompt.len() as u32
    }
}

/// The model a request names, or NotFound listing the ids on sale.
pub(crate) fn model_config<'a>(app: &'a App, id: &str) -> Result<&'a ModelConfig, Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument(
            "model: required; ListModels shows the ids",
        ));
    }
    app.config
        .models
        .iter()
        .find(|m| m.id == id)
        .ok_or_else(|| {
            let ids: Vec<_> = app.config.models.iter().map(|m| m.id.as_str()).collect();
            Status::not_found(format!(
                "model {id:?} is not on sale here; available: {ids:?}"
            ))
        })
}

pub(super) fn mode_of(mode: i32) -> Result<Mode, Status> {
    match PaymentMode::try_from(mode) {
        Ok(PaymentMode::Unspecified | PaymentMode::Bolt11) => Ok(Mode::Bolt11),
        Ok(PaymentMode::Atomic) => Ok(Mode::Atomic),
        Ok(PaymentMode::Keysend) => Ok(Mode::Keysend),
        Ok(PaymentMode::Prepaid) => Ok(Mode::Prepaid),
        Err(_) => Err(Status::invalid_argument(format!(
            "mode: unknown value {mode}; use BOLT11, ATOMIC, KEYSEND or PREPAID"
        ))),
    }
}

/// Exactly one of `messages` (chat) or `prompt` (raw text), with something to say.
fn prompt_of(messages: &[proto::ChatMessage], prompt: &str) -> Result<Prompt, Status> {
    match (messages.is_empty(), prompt.is_empty()) {
        (false, true) => {
            for (i, m) in messages.iter().enumerate() {
                if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                    return Err(Status::invalid_argument(format!(
                        "messages[{i}].role: {:?} is not one of \"system\", \"user\", \"assistant\"",
                        m.role
                    )));
                }
            }
            if messages.iter().all(|m| m.content.trim().is_empty()) {
                return Err(Status::invalid_argument(
                    "messages: every message is empty or whitespace",
                ));
            }
            Ok(Prompt::Chat(
                messages
                    .iter()
                    .map(|m| ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect(),
            ))
        }
        (true, false) if prompt.trim().is_empty() => Err(Status::invalid_argument(
            "prompt: only whitespace; give some text",
        )),
        (true, false) => Ok(Prompt::Text(prompt.to_string())),
        (true, true) => Err(Status::invalid_argument(
            "prompt: empty; give `messages` (chat) or `prompt` (raw text)",
        )),
        (false, false) => Err(Status::invalid_argument(
            "give either `messages` or `prompt`, not both",
        )),
    }
}

/// Validates a Quote or Generate request and tokenizes its prompt (once).
pub(crate) async fn check(
    app: &Arc<App>,
    model: &str,
    messages: &[proto::ChatMessage],
    prompt: &str,
    max_tokens: u32,
    mode: i32,
) -> Result<Checked, Status> {
    let model = model_config(app, model)?.clone();
    let mode = mode_of(mode)?;
    let max_messages = app.config.limits.max_messages as usize;
    if messages.len() > max_messages {
        return Err(Status::invalid_argument(format!(
            "messages: {} messages, this server accepts at most {max_messages}",
            messages.len()
        )));
    }
    // What the template adds counts too (its role tags, around every message): a flood of
    // empty messages is rendered and tokenized before the token cap could see it.
    let bytes: usize = prompt.len()
        + messages
            .iter()
            .map(|m| m.content.len() + m.role.len() + TEMPLATE_BYTES_PER_MESSAGE)
            .sum::<usize>();
    let max_bytes = app.config.limits.max_prompt_bytes as usize;
    if max_bytes > 0 && bytes > max_bytes {
        return Err(Status::invalid_argument(format!(
            "prompt: {bytes} bytes, this server accepts at most {max_bytes}"
        )));
    }
    let prompt = prompt_of(messages, prompt)?;
    if max_tokens == 0 {
        return Err(Status::invalid_argument("max_tokens: must be at least 1"));
    }
    let ctx = app
        .engine
        .model(&model.id)
        .map(|m| m.context_length)
        .unwrap_or(u32::MAX);
    if max_tokens >= ctx {
        return Err(Status::invalid_argument(format!(
            "max_tokens: {max_tokens} does not fit the model's context of {ctx} tokens with any prompt"
        )));
    }
    let tokens = app.engine.tokenize(&model.id, prompt).await?;
    let n = tokens.len() as u32;
    let cap = app.config.limits.max_prompt_tokens;
    if cap > 0 && n > cap {
        return Err(Status::invalid_argument(format!(
            "prompt: {n} tokens, this server accepts at most {cap}"
        )));
    }
    app.engine.check_fits(&model.id, n, max_tokens)?;
    let price = Price::from_model(&model);
    Ok(Checked {
        model,
        prompt: tokens,
        price,
        mode,
    })
}

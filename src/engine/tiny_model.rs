//! A tiny deterministic llama GGUF for tests: it loads in milliseconds, generates thousands of
//! tokens per second, and its greedy output is a known function of the last prompt token.
//!
//! How: attention output and FFN down projections are zero, so every layer adds nothing and the
//! final hidden state is the last token's embedding. Embeddings are one-hot per token class, and
//! the LM head maps each class to its successor. Tokenizer: byte-level GPT-2 BPE with the 256
//! byte tokens, one merge ("Ġ Ġ", required by mistral.rs), `<|im_start|>` and `<|im_end|>`
//! (EOS), and a ChatML chat template.
//!
//! The rule (greedy), by the LAST prompt token:
//! - a letter `a`..`z`: the following letters, cycling `z` → `a`, never ending by itself:
//!   `"a"` → `"bcd…xyzabc…"` up to max_tokens;
//! - a digit `0`..`9`: the following digits, then EOS: `"5"` → `"6789"` (4 tokens);
//!   `"9"` → `""` (0 tokens);
//! - a newline: `a`, then as above. Every chat prompt ends with the ChatML generation prompt
//!   `"<|im_start|>assistant\n"`, so chat output is `"abc…xyzabc…"`;
//! - `!`: the bytes C3, A9, `!` cycling, i.e. `"é!é!…"` where each `é` is TWO tokens (the
//!   first carries no text): exercises characters split across tokens;
//! - anything else (space, punctuation, special tokens): EOS at once (0 tokens).

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::detok::byte_to_char_table;

pub const HIDDEN: usize = 64;
pub const LAYERS: usize = 2;
const HEADS: usize = 4;
const FFN: usize = 128;
/// Token ids: 0..=255 bytes, then the merge token and the specials.
pub const MERGE_TOKEN: u32 = 256;
pub const IM_START: u32 = 257;
pub const IM_END: u32 = 258;
pub const VOCAB: usize = 259;
/// Default context length of the written model.
pub const CONTEXT_LENGTH: u32 = 32768;

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + \
message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ \
'<|im_start|>assistant\\n' }}{% endif %}";

/// Options for [`write_tiny_model_with`].
#[derive(Debug, Clone)]
pub struct TinyModelOptions {
    pub file_name: String,
    pub context_length: u32,
    /// `general.architecture`; anything but "llama" yields a file mistral.rs cannot load
    /// (useful to test the unsupported-architecture error).
    pub architecture: String,
}

impl Default for TinyModelOptions {
    fn default() -> Self {
        Self {
            file_name: "tiny-llama.gguf".into(),
            context_length: CONTEXT_LENGTH,
            architecture: "llama".into(),
        }
    }
}

/// Writes the tiny model into `dir` and returns its path.
pub fn write_tiny_model(dir: &Path) -> std::io::Result<PathBuf> {
    write_tiny_model_with(dir, &TinyModelOptions::default())
}

/// The greedy successor of byte `b` (None = EOS). This is the model's whole behaviour.
pub fn next_byte(b: u8) -> Option<u8> {
    match b {
        b'a'..=b'y' => Some(b + 1),
        b'z' => Some(b'a'),
        b'0'..=b'8' => Some(b + 1),
        b'\n' => Some(b'a'),
        b'!' => Some(0xc3),
        0xc3 => Some(0xa9),
        0xa9 => Some(b'!'),
        _ => None,
    }
}

/// The greedy output bytes after a prompt whose last token is byte `last`, up to `max_tokens`
/// tokens (one byte per token). Returns (bytes, ended_with_eos).
pub fn expected_output(last: u8, max_tokens: usize) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut cur = last;
    while out.len() < max_tokens {
        match next_byte(cur) {
            Some(n) => {
                out.push(n);
                cur = n;
            }
            None => return (out, true),
        }
    }
    (out, false)
}

/// One-hot dimension of each token class; every unlisted token shares `OTHER`.
fn class_dim(token: u32) -> usize {
    match token {
        t if (b'a' as u32..=b'z' as u32).contains(&t) => (t - b'a' as u32) as usize,
        t if (b'0' as u32..=b'9' as u32).contains(&t) => 26 + (t - b'0' as u32) as usize,
        t if t == b'\n' as u32 => 36,
        t if t == b'!' as u32 => 37,
        0xc3 => 38,
        0xa9 => 39,
        _ => OTHER,
    }
}
const OTHER: usize = 40;

fn err(e: candle_core::Error) -> std::io::Error {
    std::io::Error::other(e)
}

fn qt(data: Vec<f32>, shape: &[usize]) -> std::io::Result<QTensor> {
    let t = Tensor::from_vec(data, shape, &Device::Cpu).map_err(err)?;
    QTensor::quantize(&t, GgmlDType::F32).map_err(err)
}

/// Writes the tiny model with `opts` into `dir` and returns its path.
pub fn write_tiny_model_with(dir: &Path, opts: &TinyModelOptions) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(&opts.file_name);

    let mut embd = vec![0f32; VOCAB * HIDDEN];
    for t in 0..VOCAB as u32 {
        embd[t as usize * HIDDEN + class_dim(t)] = 1.0;
    }
    // Output row `t` reads the dimension of every class whose successor is `t`. After the final
    // RMSNorm a one-hot state is 8.0 (= sqrt(64)) in its dimension, so the successor's logit is
    // 8 and every other logit 0.
    let mut out = vec![0f32; VOCAB * HIDDEN];
    let mut set = |target: u32, dim: usize| out[target as usize * HIDDEN + dim] = 1.0;
    for b in 0u8..=255 {
        let dim = class_dim(b as u32);
        if dim == OTHER {
            continue;
        }
        match next_byte(b) {
            Some(n) => set(n as u32, dim),
            None => set(IM_END, dim),
        }
    }
    set(IM_END, OTHER);

    let ones = vec![1f32; HIDDEN];
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), qt(embd, &[VOCAB, HIDDEN])?),
        ("output.weight".into(), qt(out, &[VOCAB, HIDDEN])?),
        ("output_norm.weight".into(), qt(ones.clone(), &[HIDDEN])?),
    ];
    for l in 0..LAYERS {
        let p = format!("blk.{l}");
        let zeros = |r: usize, c: usize| qt(vec![0f32; r * c], &[r, c]);
        tensors.push((
            format!("{p}.attn_norm.weight"),
            qt(ones.clone(), &[HIDDEN])?,
        ));
        tensors.push((format!("{p}.ffn_norm.weight"), qt(ones.clone(), &[HIDDEN])?));
        for name in ["attn_q", "attn_k", "attn_v", "attn_output"] {
            tensors.push((format!("{p}.{name}.weight"), zeros(HIDDEN, HIDDEN)?));
        }
        tensors.push((format!("{p}.ffn_gate.weight"), zeros(FFN, HIDDEN)?));
        tensors.push((format!("{p}.ffn_up.weight"), zeros(FFN, HIDDEN)?));
        tensors.push((format!("{p}.ffn_down.weight"), zeros(HIDDEN, FFN)?));
    }

    let chars = byte_to_char_table();
    let mut tokens: Vec<Value> = chars.iter().map(|c| Value::String(c.to_string())).collect();
    tokens.push(Value::String("\u{120}\u{120}".into()));
    tokens.push(Value::String("<|im_start|>".into()));
    tokens.push(Value::String("<|im_end|>".into()));
    let mut types: Vec<Value> = (0..=MERGE_TOKEN).map(|_| Value::I32(1)).collect();
    types.push(Value::I32(3));
    types.push(Value::I32(3));
    debug_assert_eq!(tokens.len(), VOCAB);

    let a = opts.architecture.as_str();
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (
            "general.name".into(),
            Value::String("satstream tiny test model".into()),
        ),
        (
            format!("{a}.context_length"),
            Value::U32(opts.context_length),
        ),
        (format!("{a}.embedding_length"), Value::U32(HIDDEN as u32)),
        (format!("{a}.block_count"), Value::U32(LAYERS as u32)),
        (format!("{a}.feed_forward_length"), Value::U32(FFN as u32)),
        (
            format!("{a}.attention.head_count"),
            Value::U32(HEADS as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(HEADS as u32),
        ),
        (
            format!("{a}.rope.dimension_count"),
            Value::U32((HIDDEN / HEADS) as u32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-6),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![Value::String("\u{120} \u{120}".into())]),
        ),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(IM_END)),
        (
            "tokenizer.chat_template".into(),
            Value::String(CHATML.into()),
        ),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();

    // Write to a temporary name and rename, so a concurrent reader never sees half a file.
    let tmp = dir.join(format!(".{}.tmp{}", opts.file_name, std::process::id()));
    {
        let mut w = BufWriter::new(File::create(&tmp)?);
        gguf_file::write(&mut w, &md_refs, &t_refs).map_err(err)?;
        std::io::Write::flush(&mut w)?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_examples() {
        assert_eq!(expected_output(b'5', 100), (b"6789".to_vec(), true));
        assert_eq!(expected_output(b'9', 100), (vec![], true));
        assert_eq!(expected_output(b' ', 100), (vec![], true));
        assert_eq!(expected_output(b'x', 5), (b"yzabc".to_vec(), false));
        assert_eq!(
            expected_output(b'!', 4),
            (vec![0xc3, 0xa9, b'!', 0xc3], false)
        );
    }

    #[test]
    fn written_file_passes_the_header_check() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_tiny_model(dir.path()).unwrap();
        let info = super::super::gguf::read_info(&p).unwrap();
        info.check_supported().unwrap();
        assert_eq!(info.architecture, "llama");
        assert_eq!(info.context_length, Some(CONTEXT_LENGTH as u64));
        let tok = info.tokenizer.unwrap();
        assert_eq!(tok.tokens.len(), VOCAB);
        assert_eq!(tok.eos_token_id, Some(IM_END));
    }
}

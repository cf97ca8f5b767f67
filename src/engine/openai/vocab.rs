//! The model's tokenizer on the gateway: llama.cpp loaded *vocab only* from the model's GGUF
//! (no weights: milliseconds and a few MB), so that prompts are priced on exactly the tokens
//! the upstream will see and the upstream's streamed text is turned back into token ids.

use std::collections::HashMap;
use std::path::Path;

use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::super::llamacpp;
use super::super::Prompt;

pub(super) struct Vocab {
    model: LlamaModel,
    /// Text of every ordinary token → its id (the lowest id when two render the same).
    by_piece: HashMap<Vec<u8>, u32>,
}

impl Vocab {
    pub(super) fn load(path: &Path) -> Result<Vocab, String> {
        let params = LlamaModelParams::default().with_vocab_only(true);
        let model = LlamaModel::load_from_file(llamacpp::backend()?, path, &params)
            .map_err(|e| format!("llama.cpp failed to load the tokenizer: {e}"))?;
        let by_piece = {
            let vocab = model.vocab();
            let mut map = HashMap::with_capacity(vocab.n_tokens().max(0) as usize);
            for t in vocab.tokens() {
                if vocab.is_control(t) {
                    continue;
                }
                let piece = vocab.token_to_piece(t, false, None);
                if !piece.is_empty() {
                    map.entry(piece).or_insert(t.0 as u32);
                }
            }
            map
        };
        Ok(Vocab { model, by_piece })
    }

    /// A token without text (end-of-sequence): stands for generated tokens whose bytes the
    /// upstream did not send.
    pub(super) fn textless(&self) -> u32 {
        self.model.vocab().eos().0 as u32
    }

    /// An end-of-generation token (not text, and not charged).
    pub(super) fn is_eog(&self, id: u32) -> bool {
        self.model.vocab().is_eog(LlamaToken(id as i32))
    }

    /// Exact prompt tokens, as the in-process llama.cpp backend counts them.
    pub(super) fn tokenize(&self, prompt: Prompt) -> Result<Vec<u32>, String> {
        llamacpp::tokenize(&self.model, prompt)
    }

    /// The text a completions endpoint re-tokenizes into `ids`: special tokens written out
    /// (the upstream parses them back), the BOS it adds itself left out. A sequence cut inside
    /// a character (a pause between the tokens of one emoji) cannot be sent as text: the
    /// partial bytes are returned apart, for the caller to expect them again at the start of
    /// the continuation.
    pub(super) fn text(&self, ids: &[u32]) -> (String, Vec<u8>) {
        let toks: Vec<LlamaToken> = ids.iter().map(|&i| LlamaToken(i as i32)).collect();
        let mut bytes = self.model.vocab().detokenize(&toks, true, true);
        match std::str::from_utf8(&bytes) {
            Ok(_) => {}
            Err(e) if e.error_len().is_none() => {
                let partial = bytes.split_off(e.valid_up_to());
                return (String::from_utf8(bytes).expect("valid up to here"), partial);
            }
            Err(_) => return (String::from_utf8_lossy(&bytes).into_owned(), Vec::new()),
        }
        (String::from_utf8(bytes).expect("checked"), Vec::new())
    }

    /// The ids of a piece of streamed text: one token when the piece is one token's text (an
    /// upstream that streams one token per event), else the tokenizer's split of the piece
    /// (an upstream that held back the tokens of a split character and sent them together).
    pub(super) fn ids(&self, piece: &[u8], out: &mut Vec<u32>) {
        out.clear();
        if let Some(&id) = self.by_piece.get(piece) {
            out.push(id);
            return;
        }
        let vocab = self.model.vocab();
        out.extend(
            vocab
                .tokenize(piece, false, false)
                .into_iter()
                .map(|t| t.0 as u32),
        );
    }
}

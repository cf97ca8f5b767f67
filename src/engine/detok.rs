//! Token id → text, one token at a time.
//!
//! The engine attributes text to tokens itself instead of using mistral.rs's streamed chunks:
//! a chunk is not one token (a character split across tokens produces no chunk, the end of a
//! stream may produce none), and billing needs exactly one event per generated token. The
//! vocabulary comes from the GGUF header, so any backend reading the same file decodes the same.

use super::gguf::GgufTokenizer;

/// GGUF token types (llama.cpp `llama_token_type`).
const TYPE_NORMAL: i32 = 1;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

/// The byte sequence of every token id; special tokens map to no bytes.
#[derive(Debug, Clone)]
pub struct TokenBytes {
    table: Vec<Box<[u8]>>,
}

/// GPT-2's reversible byte → printable-char mapping used by byte-level BPE vocabularies.
pub(crate) fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
        table[b as usize] = if printable {
            char::from_u32(b).expect("latin-1 range")
        } else {
            let c = char::from_u32(256 + n).expect("valid code point");
            n += 1;
            c
        };
    }
    table
}

impl TokenBytes {
    /// Builds the table for a `gpt2` (byte-level BPE) or `llama` (SentencePiece) vocabulary.
    pub fn from_gguf(tok: &GgufTokenizer) -> Result<Self, String> {
        let ty = |i: usize| tok.token_types.get(i).copied().unwrap_or(TYPE_NORMAL);
        let is_eos = |i: usize| tok.eos_token_id == Some(i as u32);
        let table = match tok.model.as_str() {
            "gpt2" => {
                let fwd = byte_to_char_table();
                let mut inv = std::collections::HashMap::with_capacity(256);
                for (b, c) in fwd.iter().enumerate() {
                    inv.insert(*c, b as u8);
                }
                tok.tokens
                    .iter()
                    .enumerate()
                    .map(|(i, s)| match ty(i) {
                        _ if is_eos(i) => Box::default(),
                        TYPE_NORMAL => {
                            let mut out = Vec::with_capacity(s.len());
                            for c in s.chars() {
                                match inv.get(&c) {
                                    Some(b) => out.push(*b),
                                    // Not a byte-level char: keep it as text rather than lose it.
                                    None => {
                                        out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes())
                                    }
                                }
                            }
                            out.into_boxed_slice()
                        }
                        TYPE_USER_DEFINED => s.as_bytes().into(),
                        _ => Box::default(),
                    })
                    .collect()
            }
            "llama" | "replit" => tok
                .tokens
                .iter()
                .enumerate()
                .map(|(i, s)| match ty(i) {
                    _ if is_eos(i) => Box::default(),
                    TYPE_NORMAL => s.replace('\u{2581}', " ").into_bytes().into_boxed_slice(),
                    TYPE_USER_DEFINED => s.as_bytes().into(),
                    TYPE_BYTE => parse_byte_token(s)
                        .map(|b| vec![b].into_boxed_slice())
                        .unwrap_or_default(),
                    _ => Box::default(),
                })
                .collect(),
            other => return Err(format!("tokenizer model `{other}` is not supported")),
        };
        Ok(Self { table })
    }

    /// Bytes of token `id` (empty for special or unknown ids).
    pub fn get(&self, id: u32) -> &[u8] {
        self.table.get(id as usize).map(|b| &b[..]).unwrap_or(&[])
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

fn parse_byte_token(s: &str) -> Option<u8> {
    let hex = s.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// Turns a stream of byte chunks into text without ever splitting a character: bytes of an
/// incomplete UTF-8 sequence are held back until the token that completes them.
#[derive(Debug, Default, Clone)]
pub struct Utf8Assembler {
    pending: Vec<u8>,
}

impl Utf8Assembler {
    /// Appends `bytes` and returns the text that became complete (possibly empty). Invalid
    /// sequences become U+FFFD, as a lossy decoder would render them.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(valid).expect("checked valid prefix"));
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{FFFD}');
                            rest = &after[n..];
                        }
                        // Incomplete sequence at the end: wait for the next token.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let start = self.pending.len() - keep;
        self.pending.drain(..start);
        out
    }

    /// Bytes held back waiting for the rest of a character.
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_gpt2s() {
        let t = byte_to_char_table();
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], '\u{120}'); // 'Ġ'
        assert_eq!(t[b'\n' as usize], '\u{10a}'); // 'Ċ'
        assert_eq!(t[0xc3], '\u{c3}');
        let mut all: Vec<char> = t.to_vec();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 256);
    }

    #[test]
    fn gpt2_vocab_decodes_bytes_and_skips_specials() {
        let tok = GgufTokenizer {
            model: "gpt2".into(),
            tokens: vec![
                "\u{120}Hello".into(),
                "\u{c3}".into(),
                "\u{a9}".into(),
                "<|im_end|>".into(),
                "<think>".into(),
            ],
            token_types: vec![1, 1, 1, 3, 4],
            eos_token_id: Some(3),
        };
        let tb = TokenBytes::from_gguf(&tok).unwrap();
        assert_eq!(tb.get(0), b" Hello");
        assert_eq!(tb.get(1), &[0xc3]);
        assert_eq!(tb.get(3), b"");
        assert_eq!(tb.get(4), b"<think>");
        assert_eq!(tb.get(99), b"");
    }

    #[test]
    fn spm_vocab_decodes_spaces_and_byte_tokens() {
        let tok = GgufTokenizer {
            model: "llama".into(),
            tokens: vec!["<s>".into(), "\u{2581}Hi".into(), "<0xE2>".into()],
            token_types: vec![3, 1, 6],
            eos_token_id: None,
        };
        let tb = TokenBytes::from_gguf(&tok).unwrap();
        assert_eq!(tb.get(0), b"");
        assert_eq!(tb.get(1), b" Hi");
        assert_eq!(tb.get(2), &[0xe2]);
    }

    #[test]
    fn assembler_holds_back_split_characters() {
        let mut a = Utf8Assembler::default();
        assert_eq!(a.push(b"ab"), "ab");
        assert_eq!(a.push(&[0xf0, 0x9f]), "");
        assert_eq!(a.pending(), &[0xf0, 0x9f]);
        assert_eq!(a.push(&[0x98]), "");
        assert_eq!(a.push(&[0x80, b'!']), "\u{1f600}!");
        assert!(a.pending().is_empty());
        assert_eq!(a.push(&[0xff, b'x']), "\u{FFFD}x");
        assert_eq!(a.push(&[0xc3]), "");
        assert_eq!(a.push(b"z"), "\u{FFFD}z");
    }
}

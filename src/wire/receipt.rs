//! Receipts: what a session bought, in a canonical text signed by the server's Lightning node
//! key in the LN `signmessage` format (zbase32), so anyone holding the node id can check it —
//! with this module, ldk-node's `verify_signature`, or any Lightning node's `verifymessage`.
//!
//! The signed text is versioned and line-oriented, one `key: value` per line, in this order:
//!
//! ```text
//! satstream receipt v2
//! node_id: <33-byte compressed key, hex>
//! session_id: <hex>
//! model: <id>
//! mode: BOLT11 | ATOMIC | KEYSEND | PREPAID
//! prompt_tokens: <n>
//! prompt_price_msat: <n>
//! prompt_sha256: <what was asked and priced, hex: see prompt_sha256()>
//! msat_per_token: <n>
//! chunk: <index> <first_token> <tokens> <price_msat> <paid_by> <sha256 of its text, hex>
//! …one `chunk:` line per delivered chunk, in order…
//! completion_tokens: <n>
//! chunks: <n>
//! paid_msat: <n>
//! spent_msat: <n>
//! refundable_msat: <n>
//! output_sha256: <sha256 of the whole delivered text, hex>
//! end: finished <reason> | halted <reason>
//! finished_at_unix: <seconds>
//! ```
//!
//! A v1 receipt (sessions opened before the prompt was committed to) is the same without the
//! `prompt_sha256` line; both are read, v2 is written.
//!
//! `paid_by` is `hash:<payment hash, hex>` for a chunk paid by its own invoice, `balance` for
//! one drawn from a balance (KEYSEND credit, PREPAID account). Verification checks the
//! signature, that the structured fields of [`proto::Receipt`] say what the signed text says,
//! that the chunks add up, and (when given) the node id the client paid and the text it got.

use sha2::{Digest, Sha256};

use super::proto;

const HEADER: &str = "satstream receipt v2";
const HEADER_V1: &str = "satstream receipt v1";

/// What a receipt commits to as the prompt: SHA-256 over the request's input exactly as the
/// client sent it, each part length-prefixed (its UTF-8 length as 8 bytes big-endian, then the
/// bytes): "chat" and every message's role and content in order, or "text" and the raw prompt.
/// The client computes it from its own request and checks the receipt says the same.
pub fn prompt_sha256(messages: &[proto::ChatMessage], prompt: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut part = |s: &str| {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s.as_bytes());
    };
    if messages.is_empty() {
        part("text");
        part(prompt);
    } else {
        part("chat");
        for m in messages {
            part(&m.role);
            part(&m.content);
        }
    }
    h.finalize().into()
}

/// One delivered chunk, as the receipt lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptChunk {
    pub index: u32,
    pub first_token: u32,
    pub tokens: u32,
    pub price_msat: u64,
    /// The invoice that paid it; None when drawn from a balance.
    pub payment_hash: Option<[u8; 32]>,
    pub text_sha256: [u8; 32],
}

/// Everything a receipt states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptBody {
    pub node_id: String,
    pub session_id: String,
    pub model: String,
    pub mode: String,
    pub prompt_tokens: u32,
    pub prompt_price_msat: u64,
    /// [`prompt_sha256`] of the request; None in a v1 receipt.
    pub prompt_sha256: Option<[u8; 32]>,
    pub msat_per_token: u64,
    pub chunks: Vec<ReceiptChunk>,
    pub completion_tokens: u32,
    pub paid_msat: u64,
    pub spent_msat: u64,
    pub refundable_msat: u64,
    pub output_sha256: [u8; 32],
    /// `finished` or `halted`.
    pub state: String,
    /// Finish or halt reason (`length`, `stop`, `payment_timeout`, …).
    pub reason: String,
    pub finished_at_unix: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiptError {
    #[error("receipt text: {0}")]
    Malformed(String),
    #[error("receipt field {field} says {got:?} but the signed text says {signed:?}")]
    Mismatch {
        field: &'static str,
        got: String,
        signed: String,
    },
    #[error("the signature does not verify against node {0}")]
    BadSignature(String),
    #[error("signed by node {got}, but the server you paid is {expected}")]
    WrongNode { expected: String, got: String },
    #[error("{0}")]
    Inconsistent(String),
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// A value must stay on its line and keep its words apart.
fn field(name: &str, v: &str) -> Result<(), ReceiptError> {
    if v.is_empty() || v.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ReceiptError::Malformed(format!(
            "{name} {v:?} must be non-empty without spaces or control characters"
        )));
    }
    Ok(())
}

/// The value of the next line, which must be `key: value`.
fn value<'a>(lines: &mut impl Iterator<Item = &'a str>, key: &str) -> Result<String, ReceiptError> {
    let l = lines
        .next()
        .ok_or_else(|| ReceiptError::Malformed(format!("missing {key}")))?;
    l.strip_prefix(key)
        .and_then(|r| r.strip_prefix(": "))
        .map(str::to_string)
        .ok_or_else(|| ReceiptError::Malformed(format!("expected {key}, found {l:?}")))
}

impl ReceiptBody {
    /// The canonical text that is signed.
    pub fn encode(&self) -> Result<String, ReceiptError> {
        for (n, v) in [
            ("node_id", &self.node_id),
            ("session_id", &self.session_id),
            ("model", &self.model),
            ("mode", &self.mode),
            ("state", &self.state),
            ("reason", &self.reason),
        ] {
            field(n, v)?;
        }
        let mut t = String::with_capacity(512 + 160 * self.chunks.len());
        let mut line = |s: String| {
            t.push_str(&s);
            t.push('\n');
        };
        line(match self.prompt_sha256 {
            Some(_) => HEADER.into(),
            None => HEADER_V1.into(),
        });
        line(format!("node_id: {}", self.node_id));
        line(format!("session_id: {}", self.session_id));
        line(format!("model: {}", self.model));
        line(format!("mode: {}", self.mode));
        line(format!("prompt_tokens: {}", self.prompt_tokens));
        line(format!("prompt_price_msat: {}", self.prompt_price_msat));
        if let Some(h) = &self.prompt_sha256 {
            line(format!("prompt_sha256: {}", hex::encode(h)));
        }
        line(format!("msat_per_token: {}", self.msat_per_token));
        for c in &self.chunks {
            let paid_by = match &c.payment_hash {
                Some(h) => format!("hash:{}", hex::encode(h)),
                None => "balance".into(),
            };
            line(format!(
                "chunk: {} {} {} {} {} {}",
                c.index,
                c.first_token,
                c.tokens,
                c.price_msat,
                paid_by,
                hex::encode(c.text_sha256)
            ));
        }
        line(format!("completion_tokens: {}", self.completion_tokens));
        line(format!("chunks: {}", self.chunks.len()));
        line(format!("paid_msat: {}", self.paid_msat));
        line(format!("spent_msat: {}", self.spent_msat));
        line(format!("refundable_msat: {}", self.refundable_msat));
        line(format!(
            "output_sha256: {}",
            hex::encode(self.output_sha256)
        ));
        line(format!("end: {} {}", self.state, self.reason));
        line(format!("finished_at_unix: {}", self.finished_at_unix));
        Ok(t)
    }

    /// Parses a canonical text; anything but exactly what [`encode`](Self::encode) writes is
    /// refused (so one receipt has one text).
    pub fn parse(text: &str) -> Result<ReceiptBody, ReceiptError> {
        let bad = |m: String| ReceiptError::Malformed(m);
        let lines = &mut text
            .strip_suffix('\n')
            .ok_or_else(|| bad("does not end with a newline".into()))?
            .split('\n')
            .peekable();
        let v2 = match lines.next() {
            Some(HEADER) => true,
            Some(HEADER_V1) => false,
            _ => return Err(bad(format!("the first line must be {HEADER:?}"))),
        };
        let mut next = |key: &str| value(lines, key);
        fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, ReceiptError> {
            // Canonical decimal only: no sign, no leading zeros.
            if v.is_empty() || v.starts_with('+') || (v.len() > 1 && v.starts_with('0')) {
                return Err(ReceiptError::Malformed(format!(
                    "{key}: {v:?} is not canonical"
                )));
            }
            v.parse()
                .map_err(|_| ReceiptError::Malformed(format!("{key}: {v:?} is not a number")))
        }
        fn hash(key: &str, v: &str) -> Result<[u8; 32], ReceiptError> {
            if v.len() != 64 || v.chars().any(|c| c.is_ascii_uppercase()) {
                return Err(ReceiptError::Malformed(format!(
                    "{key}: {v:?} is not 64 lowercase hex digits"
                )));
            }
            hex::decode(v)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| ReceiptError::Malformed(format!("{key}: {v:?} is not hex")))
        }
        let node_id = next("node_id")?;
        let session_id = next("session_id")?;
        let model = next("model")?;
        let mode = next("mode")?;
        let prompt_tokens = num("prompt_tokens", &next("prompt_tokens")?)?;
        let prompt_price_msat = num("prompt_price_msat", &next("prompt_price_msat")?)?;
        let prompt_sha256 = match v2 {
            true => Some(hash("prompt_sha256", &next("prompt_sha256")?)?),
            false => None,
        };
        let msat_per_token = num("msat_per_token", &next("msat_per_token")?)?;
        let mut chunks = Vec::new();
        while let Some(l) = lines.peek() {
            let Some(rest) = l.strip_prefix("chunk: ") else {
                break;
            };
            let w: Vec<&str> = rest.split(' ').collect();
            if w.len() != 6 {
                return Err(bad(format!("chunk line {l:?} needs 6 fields")));
            }
            let payment_hash = match w[4] {
                "balance" => None,
                p => Some(hash(
                    "chunk payment hash",
                    p.strip_prefix("hash:")
                        .ok_or_else(|| bad(format!("chunk paid_by {p:?}")))?,
                )?),
            };
            chunks.push(ReceiptChunk {
                index: num("chunk index", w[0])?,
                first_token: num("chunk first_token", w[1])?,
                tokens: num("chunk tokens", w[2])?,
                price_msat: num("chunk price_msat", w[3])?,
                payment_hash,
                text_sha256: hash("chunk text sha256", w[5])?,
            });
            lines.next();
        }
        let mut next = |key: &str| value(lines, key);
        let completion_tokens = num("completion_tokens", &next("completion_tokens")?)?;
        let n: usize = num("chunks", &next("chunks")?)?;
        let paid_msat = num("paid_msat", &next("paid_msat")?)?;
        let spent_msat = num("spent_msat", &next("spent_msat")?)?;
        let refundable_msat = num("refundable_msat", &next("refundable_msat")?)?;
        let output_sha256 = hash("output_sha256", &next("output_sha256")?)?;
        let end = next("end")?;
        let finished_at_unix = num("finished_at_unix", &next("finished_at_unix")?)?;
        if let Some(l) = lines.next() {
            return Err(bad(format!("unexpected line {l:?}")));
        }
        if n != chunks.len() {
            return Err(bad(format!("chunks: {n} but {} chunk lines", chunks.len())));
        }
        let (state, reason) = end
            .split_once(' ')
            .ok_or_else(|| bad(format!("end: {end:?} needs a state and a reason")))?;
        let body = ReceiptBody {
            node_id,
            session_id,
            model,
            mode,
            prompt_tokens,
            prompt_price_msat,
            prompt_sha256,
            msat_per_token,
            chunks,
            completion_tokens,
            paid_msat,
            spent_msat,
            refundable_msat,
            output_sha256,
            state: state.into(),
            reason: reason.into(),
            finished_at_unix,
        };
        // One receipt, one text: re-encoding must give back exactly what was signed.
        if body.encode()? != text {
            return Err(bad("not in canonical form".into()));
        }
        Ok(body)
    }

    /// The gRPC message carrying this body, its text and signature.
    pub fn to_proto(&self, signed_text: String, signature: String) -> proto::Receipt {
        proto::Receipt {
            session_id: self.session_id.clone(),
            model: self.model.clone(),
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            paid_msat: self.paid_msat,
            refundable_msat: self.refundable_msat,
            finished_at_unix: self.finished_at_unix,
            output_sha256: hex::encode(self.output_sha256),
            prompt_sha256: self.prompt_sha256.map(hex::encode).unwrap_or_default(),
            signed_text,
            signature,
            node_id: self.node_id.clone(),
        }
    }

    /// The chunks add up: consecutive indices and token ranges, the totals are their sums.
    fn check_totals(&self) -> Result<(), ReceiptError> {
        // A receipt comes from a server the client may not trust: its numbers may be chosen
        // to overflow. Checked arithmetic, so a hostile receipt is refused, never a panic.
        let overflow = |what: &str| {
            ReceiptError::Inconsistent(format!("the {what} overflow: not a receipt we issue"))
        };
        let mut next_token = 0u32;
        let mut spent = self.prompt_price_msat;
        for (i, c) in self.chunks.iter().enumerate() {
            if c.index != i as u32 || c.first_token != next_token {
                return Err(ReceiptError::Inconsistent(format!(
                    "chunk {} does not follow the previous one (index {i}, first token {next_token} expected)",
                    c.index
                )));
            }
            next_token = next_token
                .checked_add(c.tokens)
                .ok_or_else(|| overflow("token counts"))?;
            spent = spent
                .checked_add(c.price_msat)
                .ok_or_else(|| overflow("prices"))?;
        }
        let tokens = next_token;
        if tokens != self.completion_tokens {
            return Err(ReceiptError::Inconsistent(format!(
                "completion_tokens {} but the chunks hold {tokens}",
                self.completion_tokens
            )));
        }
        if spent != self.spent_msat {
            return Err(ReceiptError::Inconsistent(format!(
                "spent_msat {} but the prompt and chunks cost {spent}",
                self.spent_msat
            )));
        }
        Ok(())
    }
}

/// The file form `satstream receipt verify` reads: the signed text, then one line
/// `signature: <zbase32>`.
pub fn to_file(r: &proto::Receipt) -> String {
    format!("{}signature: {}\n", r.signed_text, r.signature)
}

/// Reads [`to_file`]'s form back into a receipt.
pub fn from_file(s: &str) -> Result<proto::Receipt, ReceiptError> {
    let trimmed = s.strip_suffix('\n').unwrap_or(s);
    let (text, sig) = trimmed
        .rsplit_once('\n')
        .and_then(|(t, l)| Some((t, l.strip_prefix("signature: ")?)))
        .ok_or_else(|| {
            ReceiptError::Malformed("the last line must be `signature: <zbase32>`".into())
        })?;
    let text = format!("{text}\n");
    let body = ReceiptBody::parse(&text)?;
    Ok(body.to_proto(text, sig.to_string()))
}

/// Checks a receipt: its signature by `node_id`, its fields against the signed text, its
/// totals, and, when given, the node the client paid and the text it received (whole, and
/// per chunk when `chunk_texts` is given).
pub fn verify(
    r: &proto::Receipt,
    expected_node: Option<&str>,
    output: Option<&str>,
    chunk_texts: Option<&[String]>,
) -> Result<ReceiptBody, ReceiptError> {
    let body = ReceiptBody::parse(&r.signed_text)?;
    let mismatch = |field: &'static str, got: String, signed: String| {
        Err(ReceiptError::Mismatch { field, got, signed })
    };
    macro_rules! same {
        ($f:ident, $g:expr, $s:expr) => {
            if $g != $s {
                return mismatch(stringify!($f), format!("{}", $g), format!("{}", $s));
            }
        };
    }
    same!(node_id, r.node_id, body.node_id);
    same!(session_id, r.session_id, body.session_id);
    same!(model, r.model, body.model);
    same!(prompt_tokens, r.prompt_tokens, body.prompt_tokens);
    same!(
        completion_tokens,
        r.completion_tokens,
        body.completion_tokens
    );
    same!(paid_msat, r.paid_msat, body.paid_msat);
    same!(refundable_msat, r.refundable_msat, body.refundable_msat);
    same!(finished_at_unix, r.finished_at_unix, body.finished_at_unix);
    same!(
        output_sha256,
        r.output_sha256,
        hex::encode(body.output_sha256)
    );
    same!(
        prompt_sha256,
        r.prompt_sha256,
        body.prompt_sha256.map(hex::encode).unwrap_or_default()
    );
    let pk: ldk_node::bitcoin::secp256k1::PublicKey = body.node_id.parse().map_err(|_| {
        ReceiptError::Malformed(format!("node_id {:?} is not a public key", body.node_id))
    })?;
    if !ldk_node::lightning::util::message_signing::verify(
        r.signed_text.as_bytes(),
        &r.signature,
        &pk,
    ) {
        return Err(ReceiptError::BadSignature(body.node_id.clone()));
    }
    if let Some(expected) = expected_node {
        if !expected.eq_ignore_ascii_case(&body.node_id) {
            return Err(ReceiptError::WrongNode {
                expected: expected.to_string(),
                got: body.node_id.clone(),
            });
        }
    }
    body.check_totals()?;
    if let Some(text) = output {
        if sha256(text.as_bytes()) != body.output_sha256 {
            return Err(ReceiptError::Inconsistent(
                "the text you received is not the text the receipt covers".into(),
            ));
        }
    }
    if let Some(texts) = chunk_texts {
        if texts.len() != body.chunks.len() {
            return Err(ReceiptError::Inconsistent(format!(
                "you received {} chunks, the receipt lists {}",
                texts.len(),
                body.chunks.len()
            )));
        }
        for (t, c) in texts.iter().zip(&body.chunks) {
            if sha256(t.as_bytes()) != c.text_sha256 {
                return Err(ReceiptError::Inconsistent(format!(
                    "chunk {} you received is not the one the receipt covers",
                    c.index
                )));
            }
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> ReceiptBody {
        ReceiptBody {
            node_id: "02".to_string() + &"ab".repeat(32),
            session_id: "00".repeat(16),
            model: "tiny".into(),
            mode: "BOLT11".into(),
            prompt_tokens: 7,
            prompt_price_msat: 700,
            prompt_sha256: Some(prompt_sha256(&[], "hello")),
            msat_per_token: 1000,
            chunks: vec![
                ReceiptChunk {
                    index: 0,
                    first_token: 0,
                    tokens: 4,
                    price_msat: 4000,
                    payment_hash: Some([1; 32]),
                    text_sha256: sha256(b"abcd"),
                },
                ReceiptChunk {
                    index: 1,
                    first_token: 4,
                    tokens: 2,
                    price_msat: 2000,
                    payment_hash: None,
                    text_sha256: sha256(b"ef"),
                },
            ],
            completion_tokens: 6,
            paid_msat: 6700,
            spent_msat: 6700,
            refundable_msat: 0,
            output_sha256: sha256(b"abcdef"),
            state: "finished".into(),
            reason: "length".into(),
            finished_at_unix: 1_790_000_000,
        }
    }

    #[test]
    fn encoding_round_trips_and_is_canonical() {
        let b = body();
        let t = b.encode().unwrap();
        assert_eq!(ReceiptBody::parse(&t).unwrap(), b);
        // Not canonical: a leading zero, a trailing space, a missing line, an extra line.
        for bad in [
            t.replace("prompt_tokens: 7", "prompt_tokens: 07"),
            t.replace("model: tiny", "model: tiny "),
            t.replace("paid_msat: 6700\n", ""),
            format!("{t}extra: 1\n"),
            t.replace("chunks: 2", "chunks: 3"),
        ] {
            assert!(ReceiptBody::parse(&bad).is_err(), "accepted {bad}");
        }
        let mut spaced = b.clone();
        spaced.model = "two words".into();
        assert!(spaced.encode().is_err());
        // A v1 receipt (no prompt commitment) still reads, as v1.
        let mut v1 = b.clone();
        v1.prompt_sha256 = None;
        let t1 = v1.encode().unwrap();
        assert!(t1.starts_with("satstream receipt v1\n") && !t1.contains("prompt_sha256"));
        assert_eq!(ReceiptBody::parse(&t1).unwrap(), v1);
        // Not mixed: a v2 header without the line, a v1 header with it.
        assert!(ReceiptBody::parse(&t1.replace("receipt v1", "receipt v2")).is_err());
        assert!(ReceiptBody::parse(&t.replace("receipt v2", "receipt v1")).is_err());
    }

    #[test]
    fn the_prompt_commitment_is_unambiguous() {
        let chat = |m: &[(&str, &str)]| {
            let m: Vec<proto::ChatMessage> = m
                .iter()
                .map(|(r, c)| proto::ChatMessage {
                    role: r.to_string(),
                    content: c.to_string(),
                })
                .collect();
            prompt_sha256(&m, "")
        };
        assert_eq!(chat(&[("user", "hi")]), chat(&[("user", "hi")]));
        // Where one part ends and the next begins is part of what is hashed.
        assert_ne!(chat(&[("user", "hi")]), chat(&[("use", "rhi")]));
        assert_ne!(
            chat(&[("user", "a"), ("user", "b")]),
            chat(&[("user", "ab")])
        );
        assert_ne!(chat(&[("user", "hi")]), prompt_sha256(&[], "hi"));
        assert_ne!(prompt_sha256(&[], "hi"), prompt_sha256(&[], "hi "));
    }

    #[test]
    fn totals_must_add_up() {
        let mut b = body();
        assert!(b.check_totals().is_ok());
        b.completion_tokens = 7;
        assert!(b.check_totals().is_err());
        let mut b = body();
        b.chunks[1].first_token = 5;
        assert!(b.check_totals().is_err());
        let mut b = body();
        b.spent_msat = 6600;
        assert!(b.check_totals().is_err());
        // A hostile server's numbers that overflow are refused, not a panic (debug) or a
        // wrapped sum that happens to match (release).
        let mut b = body();
        b.chunks[0].price_msat = u64::MAX - 699;
        b.spent_msat = 1_999; // what u64 arithmetic wraps to
        assert!(
            matches!(b.check_totals(), Err(ReceiptError::Inconsistent(m)) if m.contains("overflow"))
        );
        let mut b = body();
        b.chunks[0].tokens = u32::MAX;
        b.chunks[1].first_token = u32::MAX;
        assert!(
            matches!(b.check_totals(), Err(ReceiptError::Inconsistent(m)) if m.contains("overflow"))
        );
    }

    fn signed() -> (proto::Receipt, String) {
        use ldk_node::bitcoin::secp256k1::{PublicKey, Secp256k1, SecretKey};
        let sk = SecretKey::from_slice(&[7; 32]).unwrap();
        let node = PublicKey::from_secret_key(&Secp256k1::new(), &sk).to_string();
        let mut b = body();
        b.node_id = node.clone();
        let text = b.encode().unwrap();
        let sig = ldk_node::lightning::util::message_signing::sign(text.as_bytes(), &sk);
        (b.to_proto(text, sig), node)
    }

    #[test]
    fn a_signed_receipt_verifies_and_any_tampering_fails() {
        let (r, node) = signed();
        let texts = ["abcd".to_string(), "ef".to_string()];
        verify(&r, Some(&node), Some("abcdef"), Some(&texts)).unwrap();

        // Each structured field changed alone.
        type Edit = fn(&mut proto::Receipt);
        let edits: [(&str, Edit); 10] = [
            ("session_id", |r| r.session_id = "11".repeat(16)),
            ("model", |r| r.model = "other".into()),
            ("prompt_tokens", |r| r.prompt_tokens += 1),
            ("completion_tokens", |r| r.completion_tokens += 1),
            ("paid_msat", |r| r.paid_msat += 1),
            ("refundable_msat", |r| r.refundable_msat += 1),
            ("finished_at_unix", |r| r.finished_at_unix += 1),
            ("output_sha256", |r| r.output_sha256 = hex::encode([9; 32])),
            ("node_id", |r| {
                r.node_id = "03".to_string() + &"cd".repeat(32)
            }),
            ("signature", |r| r.signature.replace_range(0..2, "yy")),
        ];
        for (what, edit) in edits {
            let mut t = r.clone();
            edit(&mut t);
            assert_ne!(t, r, "{what}: the edit changed nothing");
            assert!(
                verify(&t, None, None, None).is_err(),
                "tampered {what} verified"
            );
        }
        // Each line of the signed text changed (fields kept in agreement where they repeat it).
        for (i, line) in r.signed_text.lines().enumerate().skip(1) {
            let (key, value) = line.split_once(": ").unwrap();
            let last = value.chars().last().unwrap();
            let swapped = if last == '0' { '1' } else { '0' };
            let value2 = format!("{}{swapped}", &value[..value.len() - 1]);
            let text: String = r
                .signed_text
                .lines()
                .enumerate()
                .map(|(j, l)| {
                    if j == i {
                        format!("{key}: {value2}\n")
                    } else {
                        format!("{l}\n")
                    }
                })
                .collect();
            let mut t = r.clone();
            t.signed_text = text.clone();
            if let Ok(b) = ReceiptBody::parse(&text) {
                let agreed = b.to_proto(text, r.signature.clone());
                t = agreed;
            }
            assert!(
                verify(&t, None, None, None).is_err(),
                "tampered line {line:?} verified"
            );
        }
        // Honest receipt, wrong expectations.
        assert!(matches!(
            verify(&r, Some(&("03".to_string() + &"cd".repeat(32))), None, None),
            Err(ReceiptError::WrongNode { .. })
        ));
        assert!(verify(&r, Some(&node), Some("abcdeX"), None).is_err());
        let other = ["abcX".to_string(), "ef".to_string()];
        assert!(verify(&r, Some(&node), None, Some(&other)).is_err());
    }

    /// The size the docs quote: a 1 000-token BOLT11 session at 16-token chunks.
    #[test]
    fn a_thousand_token_receipt_is_about_ten_kilobytes() {
        let mut b = body();
        b.chunks = (0..63u32)
            .map(|i| {
                let tokens = if i == 62 { 1000 - 62 * 16 } else { 16 };
                ReceiptChunk {
                    index: i,
                    first_token: i * 16,
                    tokens,
                    price_msat: tokens as u64 * 1000,
                    payment_hash: Some([0xab; 32]),
                    text_sha256: [0xcd; 32],
                }
            })
            .collect();
        b.completion_tokens = 1000;
        b.spent_msat = b.prompt_price_msat + 1_000_000;
        b.check_totals().unwrap();
        let n = b.encode().unwrap().len();
        eprintln!("1 000-token BOLT11 receipt: {n} bytes of signed text");
        assert!((9_000..12_000).contains(&n), "{n} bytes");
    }

    #[test]
    fn file_form_round_trips() {
        let b = body();
        let r = b.to_proto(b.encode().unwrap(), "sig".into());
        assert_eq!(from_file(&to_file(&r)).unwrap(), r);
        assert!(from_file("satstream receipt v1\n").is_err());
    }
}

//! A small, defensive GGUF header reader.
//!
//! mistral.rs panics on an unknown `general.architecture` and may panic or allocate wildly on a
//! truncated or corrupt file, so every model file is checked here first: magic, version,
//! metadata, tensor table, and that every tensor's data lies inside the file. Only the keys the
//! engine needs are kept (architecture, context length, tokenizer vocabulary).

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use candle_core::quantized::GgmlDType;

/// GGUF architectures mistral.rs 0.8.1 can load from a GGUF file (anything else panics there).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "llama",
    "mistral3",
    "phi2",
    "phi3",
    "starcoder2",
    "qwen2",
    "qwen3",
    "qwen3moe",
];

// Sanity bounds: far above any real model, low enough that a corrupt length field produces an
// error instead of a multi-gigabyte allocation.
const MAX_STRING_LEN: u64 = 64 << 20;
const MAX_ARRAY_LEN: u64 = 16 << 20;
const MAX_KV_COUNT: u64 = 1 << 20;
const MAX_TENSOR_COUNT: u64 = 1 << 20;
const MAX_DIMS: u32 = 8;

/// Why a file is not a usable GGUF model.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("file does not exist")]
    NotFound,
    #[error("cannot read file: {0}")]
    Io(#[source] std::io::Error),
    #[error("not a GGUF file (first bytes {0:02x?}, expected \"GGUF\")")]
    BadMagic(Vec<u8>),
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    #[error("corrupt GGUF file: {0}")]
    Corrupt(String),
    #[error("GGUF metadata key `{0}` is missing")]
    MissingKey(String),
    #[error("GGUF metadata key `{key}` has an unexpected type (expected {expected})")]
    WrongType { key: String, expected: &'static str },
    #[error(
        "unsupported architecture `{0}` (general.architecture); supported: {supported}",
        supported = SUPPORTED_ARCHITECTURES.join(", ")
    )]
    UnsupportedArchitecture(String),
}

/// The embedded tokenizer vocabulary (`tokenizer.ggml.*`).
#[derive(Debug, Clone, Default)]
pub struct GgufTokenizer {
    /// `gpt2` (byte-level BPE) or `llama` (SentencePiece).
    pub model: String,
    pub tokens: Vec<String>,
    /// llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Vec<i32>,
    pub eos_token_id: Option<u32>,
}

/// What the engine needs to know about a model file before loading it.
#[derive(Debug, Clone)]
pub struct GgufInfo {
    pub version: u32,
    /// Lower-cased `general.architecture`.
    pub architecture: String,
    /// `<arch>.context_length`, if present.
    pub context_length: Option<u64>,
    pub tensor_count: u64,
    pub tokenizer: Option<GgufTokenizer>,
}

impl GgufInfo {
    /// Fails with [`GgufError::UnsupportedArchitecture`] unless mistral.rs can load it.
    pub fn check_supported(&self) -> Result<(), GgufError> {
        if SUPPORTED_ARCHITECTURES.contains(&self.architecture.as_str()) {
            Ok(())
        } else {
            Err(GgufError::UnsupportedArchitecture(
                self.architecture.clone(),
            ))
        }
    }
}

/// A metadata value, kept only for the keys we care about.
#[derive(Debug, Clone)]
enum Val {
    Uint(u64),
    Int(i64),
    Float,
    Bool,
    Str(String),
    StrArray(Vec<String>),
    IntArray(Vec<i64>),
    OtherArray,
}

struct Reader<R> {
    r: R,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(eof_is_corrupt)?;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn string(&mut self) -> Result<String, GgufError> {
        let len = self.u64()?;
        if len > MAX_STRING_LEN {
            return Err(GgufError::Corrupt(format!(
                "string length {len} is implausible"
            )));
        }
        let mut buf = vec![0u8; len as usize];
        self.r.read_exact(&mut buf).map_err(eof_is_corrupt)?;
        // Token strings of some vocabularies hold invalid UTF-8; keep them lossy rather than
        // rejecting the whole model.
        Ok(String::from_utf8(buf).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into()))
    }
    fn skip(&mut self, n: u64) -> Result<(), GgufError> {
        let copied = std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink())
            .map_err(GgufError::Io)?;
        if copied != n {
            return Err(GgufError::Corrupt("file ends inside the metadata".into()));
        }
        Ok(())
    }

    /// Reads one scalar of GGUF type `ty`; `keep` = false skips strings without allocating.
    fn scalar(&mut self, ty: u32, keep: bool) -> Result<Val, GgufError> {
        Ok(match ty {
            0 => Val::Uint(self.bytes::<1>()?[0] as u64),
            1 => Val::Int(self.bytes::<1>()?[0] as i8 as i64),
            2 => Val::Uint(u16::from_le_bytes(self.bytes()?) as u64),
            3 => Val::Int(i16::from_le_bytes(self.bytes()?) as i64),
            4 => Val::Uint(self.u32()? as u64),
            5 => Val::Int(i32::from_le_bytes(self.bytes()?) as i64),
            6 => {
                self.bytes::<4>()?;
                Val::Float
            }
            7 => {
                self.bytes::<1>()?;
                Val::Bool
            }
            8 if keep => Val::Str(self.string()?),
            8 => {
                let len = self.u64()?;
                if len > MAX_STRING_LEN {
                    return Err(GgufError::Corrupt(format!(
                        "string length {len} is implausible"
                    )));
                }
                self.skip(len)?;
                Val::Str(String::new())
            }
            10 => Val::Uint(self.u64()?),
            11 => Val::Int(i64::from_le_bytes(self.bytes()?)),
            12 => {
                self.bytes::<8>()?;
                Val::Float
            }
            other => return Err(GgufError::Corrupt(format!("unknown value type {other}"))),
        })
    }

    fn value(&mut self, ty: u32, keep: bool) -> Result<Val, GgufError> {
        if ty != 9 {
            return self.scalar(ty, keep);
        }
        let elem_ty = self.u32()?;
        let len = self.u64()?;
        if len > MAX_ARRAY_LEN {
            return Err(GgufError::Corrupt(format!(
                "array length {len} is implausible"
            )));
        }
        if elem_ty == 9 {
            return Err(GgufError::Corrupt("nested arrays are not supported".into()));
        }
        match (keep, elem_ty) {
            (true, 8) => {
                let mut v = Vec::with_capacity(len.min(1 << 20) as usize);
                for _ in 0..len {
                    v.push(self.string()?);
                }
                Ok(Val::StrArray(v))
            }
            (true, 0..=5 | 10 | 11) => {
                let mut v = Vec::with_capacity(len.min(1 << 20) as usize);
                for _ in 0..len {
                    v.push(match self.scalar(elem_ty, false)? {
                        Val::Uint(u) => u as i64,
                        Val::Int(i) => i,
                        _ => unreachable!("integer element types yield integers"),
                    });
                }
                Ok(Val::IntArray(v))
            }
            _ => {
                for _ in 0..len {
                    self.scalar(elem_ty, false)?;
                }
                Ok(Val::OtherArray)
            }
        }
    }
}

fn eof_is_corrupt(e: std::io::Error) -> GgufError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        GgufError::Corrupt("file is truncated".into())
    } else {
        GgufError::Io(e)
    }
}

/// Maps a ggml tensor type id to the dtype candle (and so mistral.rs) can load.
fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Reads and validates the header of the GGUF file at `path`: its metadata and its tensor
/// table (every tensor of a type candle loads, inside the file).
pub fn read_info(path: &Path) -> Result<GgufInfo, GgufError> {
    read(path, true)
}

/// Reads the metadata only (architecture, context length, tokenizer), for a backend that
/// never loads the weights (a remote one): any tensor types, or none (a vocabulary-only file).
pub fn read_metadata(path: &Path) -> Result<GgufInfo, GgufError> {
    read(path, false)
}

fn read(path: &Path, check_tensors: bool) -> Result<GgufInfo, GgufError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(GgufError::NotFound),
        Err(e) => return Err(GgufError::Io(e)),
    };
    let meta = file.metadata().map_err(GgufError::Io)?;
    if !meta.is_file() {
        return Err(GgufError::Io(std::io::Error::other("not a regular file")));
    }
    let file_len = meta.len();
    let mut rd = Reader {
        r: BufReader::with_capacity(1 << 16, file),
    };

    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match rd.r.read(&mut magic[got..]).map_err(GgufError::Io)? {
            0 => break,
            n => got += n,
        }
    }
    if got < 4 || &magic != b"GGUF" {
        return Err(GgufError::BadMagic(magic[..got].to_vec()));
    }
    let version = rd.u32()?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let tensor_count = rd.u64()?;
    let kv_count = rd.u64()?;
    if tensor_count > MAX_TENSOR_COUNT || kv_count > MAX_KV_COUNT {
        return Err(GgufError::Corrupt(format!(
            "implausible counts: {tensor_count} tensors, {kv_count} metadata keys"
        )));
    }

    let mut architecture: Option<String> = None;
    let mut alignment: u64 = 32;
    let mut ctx_by_arch: Vec<(String, u64)> = Vec::new();
    let mut tok = GgufTokenizer::default();
    let mut has_tokenizer = false;
    for _ in 0..kv_count {
        let key = rd.string()?;
        let ty = rd.u32()?;
        let keep = key == "general.architecture"
            || key == "general.alignment"
            || key.ends_with(".context_length")
            || key.starts_with("tokenizer.ggml.");
        let val = rd.value(ty, keep)?;
        match (key.as_str(), val) {
            ("general.architecture", Val::Str(s)) => architecture = Some(s.to_ascii_lowercase()),
            ("general.architecture", _) => {
                return Err(GgufError::WrongType {
                    key,
                    expected: "string",
                })
            }
            ("general.alignment", Val::Uint(a)) if a > 0 && a.is_power_of_two() => alignment = a,
            ("general.alignment", _) => {
                return Err(GgufError::Corrupt(
                    "general.alignment is not a power of two".into(),
                ))
            }
            ("tokenizer.ggml.model", Val::Str(s)) => {
                tok.model = s;
                has_tokenizer = true;
            }
            ("tokenizer.ggml.tokens", Val::StrArray(v)) => tok.tokens = v,
            ("tokenizer.ggml.token_type", Val::IntArray(v)) => {
                tok.token_types = v.into_iter().map(|x| x as i32).collect()
            }
            ("tokenizer.ggml.eos_token_id", Val::Uint(u)) => {
                tok.eos_token_id = u32::try_from(u).ok()
            }
            (k, Val::Uint(u)) if k.ends_with(".context_length") => {
                let arch = k.trim_end_matches(".context_length").to_ascii_lowercase();
                ctx_by_arch.push((arch, u));
            }
            _ => {}
        }
    }
    let architecture =
        architecture.ok_or_else(|| GgufError::MissingKey("general.architecture".into()))?;
    let context_length = ctx_by_arch
        .iter()
        .find(|(a, _)| *a == architecture)
        .map(|(_, c)| *c);

    // Tensor table: every tensor must have a known type and lie inside the file, otherwise the
    // loader would fail deep inside mistral.rs (or read out of bounds of the mmap).
    let mut tensor_end: u64 = 0;
    for _ in 0..if check_tensors { tensor_count } else { 0 } {
        let name = rd.string()?;
        let n_dims = rd.u32()?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::Corrupt(format!(
                "tensor `{name}` has {n_dims} dimensions"
            )));
        }
        let mut elems: u64 = 1;
        for _ in 0..n_dims {
            let d = rd.u64()?;
            elems = elems.checked_mul(d).ok_or_else(|| {
                GgufError::Corrupt(format!("tensor `{name}` has an overflowing shape"))
            })?;
        }
        let ty = rd.u32()?;
        let offset = rd.u64()?;
        let dtype = ggml_dtype(ty).ok_or_else(|| {
            GgufError::Corrupt(format!("tensor `{name}` has unsupported ggml type {ty}"))
        })?;
        let block = dtype.block_size() as u64;
        if elems % block != 0 {
            return Err(GgufError::Corrupt(format!(
                "tensor `{name}`: {elems} elements is not a multiple of the block size {block}"
            )));
        }
        let size = (elems / block)
            .checked_mul(dtype.type_size() as u64)
            .and_then(|s| s.checked_add(offset))
            .ok_or_else(|| GgufError::Corrupt(format!("tensor `{name}` is too large")))?;
        tensor_end = tensor_end.max(size);
    }
    let header_end = rd.r.stream_position().map_err(GgufError::Io)?;
    let data_start = header_end.div_ceil(alignment) * alignment;
    if check_tensors && data_start.saturating_add(tensor_end) > file_len {
        return Err(GgufError::Corrupt(format!(
            "file is truncated: tensor data needs {} bytes, file has {file_len}",
            data_start.saturating_add(tensor_end)
        )));
    }

    Ok(GgufInfo {
        version,
        architecture,
        context_length,
        tensor_count,
        tokenizer: has_tokenizer.then_some(tok),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};
    use std::io::Write;

    fn write_gguf(path: &Path, arch: &str, ctx: Option<u32>) {
        let mut md: Vec<(String, Value)> =
            vec![("general.architecture".into(), Value::String(arch.into()))];
        if let Some(c) = ctx {
            md.push((format!("{arch}.context_length"), Value::U32(c)));
        }
        md.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
        md.push((
            "tokenizer.ggml.tokens".into(),
            Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
        ));
        md.push((
            "tokenizer.ggml.token_type".into(),
            Value::Array(vec![Value::I32(1), Value::I32(3)]),
        ));
        md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(1)));
        md.push(("some.float".into(), Value::F32(1.5)));
        let t = QTensor::quantize(
            &Tensor::zeros((4, 8), candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = File::create(path).unwrap();
        gguf_file::write(&mut f, &md_refs, &[("w", &t)]).unwrap();
    }

    #[test]
    fn reads_architecture_context_and_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        write_gguf(&p, "LLaMA", Some(4096));
        let info = read_info(&p).unwrap();
        assert_eq!(info.version, 2);
        assert_eq!(info.architecture, "llama");
        assert_eq!(info.context_length, Some(4096));
        assert_eq!(info.tensor_count, 1);
        let tok = info.tokenizer.unwrap();
        assert_eq!(tok.model, "gpt2");
        assert_eq!(tok.tokens, vec!["a", "b"]);
        assert_eq!(tok.token_types, vec![1, 3]);
        assert_eq!(tok.eos_token_id, Some(1));
        info_supported(&p);
    }

    fn info_supported(p: &Path) {
        read_info(p).unwrap().check_supported().unwrap();
    }

    #[test]
    fn metadata_alone_ignores_the_tensors() {
        // A tensor of a type candle cannot load (an IQ quantization, id 16) whose data is not
        // in the file: the full check refuses it, the metadata read (a remote backend's) does
        // not look.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        write_gguf(&p, "gemma", Some(8192));
        let mut bytes = std::fs::read(&p).unwrap();
        // The tensor record: name "w" (u64 length + bytes), 2 dims (u32 + 2 × u64), type u32.
        let rec = [&1u64.to_le_bytes()[..], b"w", &2u32.to_le_bytes()].concat();
        let at = bytes
            .windows(rec.len())
            .position(|w| w == rec.as_slice())
            .expect("tensor record")
            + rec.len()
            + 16;
        bytes[at..at + 4].copy_from_slice(&16u32.to_le_bytes());
        std::fs::write(&p, &bytes).unwrap();
        let err = read_info(&p).unwrap_err();
        assert!(
            err.to_string().contains("unsupported ggml type 16"),
            "{err}"
        );
        let info = read_metadata(&p).unwrap();
        assert_eq!(info.architecture, "gemma");
        assert_eq!(info.context_length, Some(8192));
        assert_eq!(info.tokenizer.unwrap().tokens, vec!["a", "b"]);
    }

    #[test]
    fn missing_context_length_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        write_gguf(&p, "qwen2", None);
        assert_eq!(read_info(&p).unwrap().context_length, None);
    }

    #[test]
    fn unsupported_architecture_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        write_gguf(&p, "gpt-neox", Some(2048));
        let info = read_info(&p).unwrap();
        let err = info.check_supported().unwrap_err();
        assert!(matches!(err, GgufError::UnsupportedArchitecture(ref a) if a == "gpt-neox"));
        assert!(err.to_string().contains("gpt-neox"), "{err}");
        assert!(err.to_string().contains("qwen3moe"), "{err}");
    }

    #[test]
    fn missing_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read_info(&dir.path().join("nope.gguf")),
            Err(GgufError::NotFound)
        ));
    }

    #[test]
    fn not_gguf() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        std::fs::write(&p, b"PK\x03\x04 this is a zip").unwrap();
        assert!(matches!(read_info(&p), Err(GgufError::BadMagic(ref m)) if m == b"PK\x03\x04"));
        std::fs::write(&p, b"GG").unwrap();
        assert!(matches!(read_info(&p), Err(GgufError::BadMagic(_))));
        std::fs::write(&p, b"").unwrap();
        assert!(matches!(read_info(&p), Err(GgufError::BadMagic(_))));
    }

    #[test]
    fn bad_version() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        let mut f = File::create(&p).unwrap();
        f.write_all(b"GGUF").unwrap();
        f.write_all(&7u32.to_le_bytes()).unwrap();
        drop(f);
        assert!(matches!(
            read_info(&p),
            Err(GgufError::UnsupportedVersion(7))
        ));
    }

    #[test]
    fn truncated_files_are_corrupt_at_every_length() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        write_gguf(&p, "llama", Some(128));
        let full = std::fs::read(&p).unwrap();
        let q = dir.path().join("t.gguf");
        // Every strict prefix longer than the magic must be rejected as corrupt (never panic,
        // never accepted): the last tensor's data ends exactly at the end of the file.
        for len in 4..full.len() {
            std::fs::write(&q, &full[..len]).unwrap();
            match read_info(&q) {
                Err(GgufError::Corrupt(_)) => {}
                other => panic!("prefix of {len}/{} bytes: {other:?}", full.len()),
            }
        }
    }

    #[test]
    fn implausible_lengths_are_rejected_without_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&u64::MAX.to_le_bytes()); // key length
        std::fs::write(&p, &b).unwrap();
        assert!(matches!(read_info(&p), Err(GgufError::Corrupt(_))));
    }

    #[test]
    fn missing_architecture() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        let mut f = File::create(&p).unwrap();
        gguf_file::write(&mut f, &[("a.b", &Value::U32(1))], &[]).unwrap();
        drop(f);
        assert!(
            matches!(read_info(&p), Err(GgufError::MissingKey(ref k)) if k == "general.architecture")
        );
    }
}

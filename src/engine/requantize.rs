//! Re-quantizing a GGUF model's weights (candle's quantizer): the demo model ships as Q4_1,
//! and mistral.rs (candle) has no fast Q4_1 CPU kernel, while its Q8_0 kernel is fast. Every
//! quantized 2-D weight whose rows are whole blocks becomes `to`; everything else (norms,
//! metadata, the tokenizer) is copied as it is. The output is deterministic for a given input.

use std::io::{BufWriter, Write};
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;

/// What [`requantize`] did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Requantized {
    pub converted: usize,
    pub copied: usize,
}

/// `general.file_type` values (llama.cpp's `llama_ftype`) for the types we write.
fn file_type(to: GgmlDType) -> Option<u32> {
    match to {
        GgmlDType::Q8_0 => Some(7),
        GgmlDType::Q4_0 => Some(2),
        GgmlDType::F16 => Some(1),
        _ => None,
    }
}

/// Writes `src` with its quantized weights converted to `to` as `dst` (atomically: a
/// half-written file never has `dst`'s name).
pub fn requantize(src: &Path, dst: &Path, to: GgmlDType) -> Result<Requantized, String> {
    let e = |what: &str| {
        let what = what.to_string();
        move |err: candle_core::Error| format!("{what}: {err}")
    };
    let mut f = std::fs::File::open(src).map_err(|err| format!("{}: {err}", src.display()))?;
    let content = gguf_file::Content::read(&mut f).map_err(e("reading the GGUF header"))?;
    // In file order, so that the output is laid out like the input.
    let mut names: Vec<(&String, u64)> = content
        .tensor_infos
        .iter()
        .map(|(n, i)| (n, i.offset))
        .collect();
    names.sort_by_key(|(_, o)| *o);
    let block = to.block_size();
    let mut out = Requantized::default();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for (name, _) in names {
        let t = content
            .tensor(&mut f, name, &Device::Cpu)
            .map_err(e(&format!("tensor {name}")))?;
        let dims = t.shape().dims().to_vec();
        let convert = t.dtype() != to
            && !matches!(t.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
            && dims.len() == 2
            && dims[1] % block == 0;
        let t = if convert {
            out.converted += 1;
            let full = t
                .dequantize(&Device::Cpu)
                .map_err(e(&format!("dequantizing {name}")))?;
            QTensor::quantize(&full, to).map_err(e(&format!("quantizing {name}")))?
        } else {
            out.copied += 1;
            t
        };
        tensors.push((name.clone(), t));
    }
    let mut metadata: Vec<(String, gguf_file::Value)> = content.metadata.into_iter().collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(ft) = file_type(to) {
        for (k, v) in metadata.iter_mut() {
            if k == "general.file_type" {
                *v = gguf_file::Value::U32(ft);
            }
        }
    }
    let tmp = dst.with_extension("gguf.partial");
    {
        let file =
            std::fs::File::create(&tmp).map_err(|err| format!("{}: {err}", tmp.display()))?;
        let mut w = BufWriter::new(file);
        let md: Vec<(&str, &gguf_file::Value)> =
            metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut w, &md, &ts).map_err(e("writing the GGUF file"))?;
        w.flush().map_err(|err| err.to_string())?;
        let file = w.into_inner().map_err(|err| err.to_string())?;
        file.sync_all().map_err(|err| err.to_string())?;
    }
    std::fs::rename(&tmp, dst).map_err(|err| format!("{}: {err}", dst.display()))?;
    Ok(out)
}

/// The quantization type named `name` (`q8_0`, `q4_0`, `f16`).
pub fn parse_type(name: &str) -> Result<GgmlDType, String> {
    match name.to_ascii_lowercase().as_str() {
        "q8_0" => Ok(GgmlDType::Q8_0),
        "q4_0" => Ok(GgmlDType::Q4_0),
        "f16" => Ok(GgmlDType::F16),
        other => Err(format!("{other:?}: use q8_0, q4_0 or f16")),
    }
}

#[cfg(all(test, feature = "devtools"))]
mod tests {
    use super::*;

    #[test]
    fn converts_quantized_weights_and_copies_the_rest_deterministically() {
        let dir = tempfile::tempdir().unwrap();
        // The tiny model is F32 throughout: nothing to convert, everything copied.
        let src = crate::engine::tiny_model::write_tiny_model(dir.path()).unwrap();
        let a = dir.path().join("a.gguf");
        let b = dir.path().join("b.gguf");
        let r = requantize(&src, &a, GgmlDType::Q8_0).unwrap();
        assert_eq!(r.converted, 0);
        assert!(r.copied > 0);
        requantize(&src, &b, GgmlDType::Q8_0).unwrap();
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "deterministic"
        );
        let info = crate::engine::gguf::read_info(&a).unwrap();
        assert_eq!(info.architecture, "llama");
        assert!(parse_type("Q8_0").is_ok() && parse_type("q5").is_err());
    }
}

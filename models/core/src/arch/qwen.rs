//! Qwen2 / Qwen2.5 and Qwen3: the LLaMA network ([`super::llama::Llama`]) configured by
//! [`Variant`]. Qwen2 adds q/k/v biases (none on o_proj) and usually ties the head; Qwen3 adds
//! per-head RMS norms of q and k over head_dim before RoPE and may have head_dim ≠ d/heads.
//! `qwen2`/`qwen3` GGUF files keep HF's Q/K row order (NEOX rotary): half-split RoPE on the
//! rows as stored, and `output.weight`, when present, is an untied head.

use std::path::Path;

use candle_core::Device;

use super::llama::config::{LlamaConfig, Variant};
use super::llama::{weights, Llama};
use crate::checkpoint::{JsonFile, SafetensorsCheckpoint};
use crate::error::{unsupported, Context, Result};
use crate::gguf::GgufFile;
use crate::runtime::{Runtime, Source, SourceKind};
use crate::text::TextCodec;

/// The config.json `model_type` / `architectures` values of each Qwen variant.
pub const QWEN2_NAMES: &[&str] = &["qwen2", "Qwen2ForCausalLM"];
pub const QWEN3_NAMES: &[&str] = &["qwen3", "Qwen3ForCausalLM"];

/// The Qwen variant a config.json or GGUF architecture name denotes.
pub fn variant_of(name: &str) -> Option<Variant> {
    if QWEN2_NAMES.contains(&name) {
        Some(Variant::Qwen2)
    } else if QWEN3_NAMES.contains(&name) {
        Some(Variant::Qwen3)
    } else {
        None
    }
}

/// The Qwen variant of a config.json (`model_type` first, then `architectures`).
pub fn variant_of_config(config: &JsonFile) -> Option<Variant> {
    let model_type = config
        .get("model_type")
        .and_then(|v| v.as_str())
        .and_then(variant_of);
    model_type.or_else(|| {
        config
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.iter().filter_map(|v| v.as_str()).find_map(variant_of))
    })
}

/// Opens an HF Qwen2/Qwen3 checkpoint directory.
pub fn open_hf_dir(dir: &Path, device: &Device) -> Result<Runtime<Llama>> {
    let what = || format!("loading Qwen checkpoint {}", dir.display());
    let config_file = JsonFile::read(&dir.join("config.json")).with_context(what)?;
    let variant = variant_of_config(&config_file)
        .ok_or_else(|| unsupported("config.json names neither qwen2 nor qwen3"))
        .with_context(what)?;
    let config = LlamaConfig::from_hf_variant(&config_file, variant).with_context(what)?;
    let ckpt = SafetensorsCheckpoint::open_dir(dir).with_context(what)?;
    let weights = weights::load_safetensors(&config, &ckpt, device).with_context(what)?;
    let text = TextCodec::from_hf_dir(dir, &config_file).with_context(what)?;
    let source = Source {
        path: dir.to_path_buf(),
        kind: SourceKind::HfDir,
    };
    Ok(Runtime::new(
        Llama::new(config),
        weights,
        text,
        source,
        device.clone(),
    ))
}

/// Opens a `qwen2`/`qwen3` GGUF file, dequantising every tensor to f32.
pub fn open_gguf(path: &Path, device: &Device) -> Result<Runtime<Llama>> {
    let what = || format!("loading Qwen GGUF {}", path.display());
    let gguf = GgufFile::open(path).with_context(what)?;
    let arch = gguf.architecture().with_context(what)?;
    if variant_of(arch).is_none() {
        return Err(unsupported(format!(
            "GGUF architecture '{arch}' is not qwen2 or qwen3"
        )))
        .with_context(what);
    }
    let config = LlamaConfig::from_gguf(&gguf).with_context(what)?;
    let weights = weights::load_gguf(&config, &gguf, device).with_context(what)?;
    let text = if gguf.metadata("tokenizer.ggml.tokens").is_some() {
        TextCodec::from_gguf(&gguf).with_context(what)?
    } else {
        TextCodec::ids_only(
            config.bos_token_id,
            config.eos_token_ids.clone(),
            config.pad_token_id,
        )
    };
    let source = Source {
        path: path.to_path_buf(),
        kind: SourceKind::Gguf,
    };
    Ok(Runtime::new(
        Llama::new(config),
        weights,
        text,
        source,
        device.clone(),
    ))
}

/// Opens either form: a directory is an HF checkpoint, a file a GGUF.
pub fn open(path: &Path, device: &Device) -> Result<Runtime<Llama>> {
    if path.is_dir() {
        open_hf_dir(path, device)
    } else {
        open_gguf(path, device)
    }
}

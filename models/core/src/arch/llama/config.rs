//! LLaMA hyper-parameters from an HF `config.json` (transformers 4.x and 5.x forms) or from the
//! `llama.*` metadata of a GGUF file.

use serde_json::{json, Value};

use crate::arch::Dims;
use crate::checkpoint::JsonFile;
use crate::engine::{Rope, RopeStyle};
use crate::error::{invalid, unsupported, Result};
use crate::gguf::GgufFile;

/// Where the weights come from, which decides the Q/K row order (and so the RoPE style).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFormat {
    /// HF safetensors: Q/K rows in HF order, rotate-half RoPE.
    HfSafetensors,
    /// A `llama`-architecture GGUF: llama.cpp permuted the Q/K rows of every head, so the same
    /// rotation acts on interleaved pairs.
    Gguf,
    /// A GGUF whose Q/K rows llama.cpp stores unpermuted (`qwen2`, `qwen3`: NEOX rotary), so
    /// half-split RoPE applies to the rows as stored.
    GgufUnpermuted,
}

/// Which member of the LLaMA-shaped decoders a config describes. Qwen2 and Qwen3 are LLaMA
/// with q/k/v biases (Qwen2) or per-head q/k RMS norms before RoPE (Qwen3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Llama,
    Qwen2,
    Qwen3,
}

impl Variant {
    /// The family name (and HF `model_type`).
    pub fn family(self) -> &'static str {
        match self {
            Variant::Llama => "llama",
            Variant::Qwen2 => "qwen2",
            Variant::Qwen3 => "qwen3",
        }
    }

    fn hf_architecture(self) -> &'static str {
        match self {
            Variant::Llama => "LlamaForCausalLM",
            Variant::Qwen2 => "Qwen2ForCausalLM",
            Variant::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// The variant of a GGUF `general.architecture`.
    pub fn of_gguf_arch(arch: &str) -> Option<Self> {
        match arch {
            "llama" => Some(Variant::Llama),
            "qwen2" => Some(Variant::Qwen2),
            "qwen3" => Some(Variant::Qwen3),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct LlamaConfig {
    pub dims: Dims,
    /// As stored (GGUF's f32 widened to f64, not rounded to a decimal).
    pub rms_norm_eps: f64,
    pub rope: Rope,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub source: SourceFormat,
    pub variant: Variant,
    /// Per-head RMS norms of q and k over head_dim before RoPE (Qwen3).
    pub qk_norm: bool,
    /// The checkpoint's own config.json, written back unchanged on export.
    pub hf_config: Option<Value>,
}

// `%` rather than `is_multiple_of`, which needs a newer Rust than the workspace's 1.80.
#[allow(clippy::manual_is_multiple_of)]
fn check_dims(dims: &Dims, origin: &str) -> Result<()> {
    let bad = |what: String| invalid(format!("{origin}: {what}"));
    if dims.n_layers == 0 || dims.d_model == 0 || dims.n_heads == 0 || dims.vocab_size == 0 {
        return Err(bad(format!("degenerate sizes {dims:?}")));
    }
    if dims.n_kv_heads == 0 || dims.n_heads % dims.n_kv_heads != 0 {
        return Err(bad(format!(
            "{} attention heads cannot share {} key/value heads evenly",
            dims.n_heads, dims.n_kv_heads
        )));
    }
    if dims.head_dim % 2 != 0 {
        return Err(bad(format!(
            "head_dim {} is odd; RoPE needs pairs",
            dims.head_dim
        )));
    }
    Ok(())
}

impl LlamaConfig {
    pub fn from_hf(config: &JsonFile) -> Result<Self> {
        Self::from_hf_variant(config, Variant::Llama)
    }

    /// A config.json of `variant` (Qwen2 always has q/k/v biases; Qwen3 has q/k norms).
    pub fn from_hf_variant(config: &JsonFile, variant: Variant) -> Result<Self> {
        let origin = config.path.display().to_string();
        if let Some(act) = config.str_opt("hidden_act")? {
            if act != "silu" {
                return Err(unsupported(format!(
                    "{origin}: hidden_act '{act}' is not supported (LLaMA uses silu)"
                )));
            }
        }
        if config.bool_opt("use_sliding_window")? == Some(true) {
            return Err(unsupported(format!(
                "{origin}: use_sliding_window = true is not supported yet (full attention only)"
            )));
        }
        let d_model = config.usize("hidden_size", "model width")?;
        let n_heads = config.usize("num_attention_heads", "attention heads")?;
        let head_dim = match config.usize_opt("head_dim")? {
            Some(d) => d,
            None => d_model / n_heads,
        };
        let dims = Dims {
            n_layers: config.usize("num_hidden_layers", "number of layers")?,
            d_model,
            d_ff: config.usize("intermediate_size", "MLP width")?,
            n_heads,
            n_kv_heads: config.usize_opt("num_key_value_heads")?.unwrap_or(n_heads),
            head_dim,
            vocab_size: config.usize("vocab_size", "vocabulary size")?,
            max_positions: config.usize_opt("max_position_embeddings")?.unwrap_or(2048),
        };
        check_dims(&dims, &origin)?;

        // transformers ≥ 5 nests theta and type in `rope_parameters`; 4.x has a top-level
        // `rope_theta` and an optional `rope_scaling`.
        let params = config.get("rope_parameters");
        let theta = match params.and_then(|p| p.get("rope_theta")) {
            Some(v) => v.as_f64().ok_or_else(|| {
                invalid(format!(
                    "{origin}: rope_parameters.rope_theta must be a number"
                ))
            })?,
            None => config.f64_opt("rope_theta")?.unwrap_or(10000.0),
        };
        let rope_type = params
            .or_else(|| config.get("rope_scaling"))
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if rope_type != "default" {
            return Err(unsupported(format!(
                "{origin}: RoPE type '{rope_type}' is not supported yet (only 'default')"
            )));
        }

        Ok(Self {
            rope: Rope {
                style: RopeStyle::HalfSplit,
                theta,
                rotary_dim: dims.head_dim,
                head_dim: dims.head_dim,
            },
            dims,
            rms_norm_eps: config.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
            tie_word_embeddings: config.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: variant == Variant::Qwen2
                || config.bool_opt("attention_bias")?.unwrap_or(false),
            mlp_bias: config.bool_opt("mlp_bias")?.unwrap_or(false),
            bos_token_id: config.ids_opt("bos_token_id")?.first().copied(),
            eos_token_ids: config.ids_opt("eos_token_id")?,
            pad_token_id: config.ids_opt("pad_token_id")?.first().copied(),
            source: SourceFormat::HfSafetensors,
            variant,
            qk_norm: variant == Variant::Qwen3,
            hf_config: Some(config.value.clone()),
        })
    }

    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let arch = gguf.architecture()?;
        let variant = Variant::of_gguf_arch(arch).ok_or_else(|| {
            unsupported(format!(
                "{}: GGUF architecture '{arch}' is not llama, qwen2 or qwen3",
                gguf.display_path()
            ))
        })?;
        let key = |k: &str| format!("{arch}.{k}");
        let d_model = gguf.get_u32(&key("embedding_length"))? as usize;
        let n_heads = gguf.get_u32(&key("attention.head_count"))? as usize;
        let head_dim = match gguf.get_u32_opt(&key("attention.key_length"))? {
            Some(d) => d as usize,
            None => d_model / n_heads,
        };
        let rotary_dim = match gguf.get_u32_opt(&key("rope.dimension_count"))? {
            Some(d) => d as usize,
            None => head_dim,
        };
        if rotary_dim != head_dim {
            return Err(unsupported(format!(
                "{}: partial rotary ({rotary_dim} of {head_dim} dims) is not LLaMA",
                gguf.display_path()
            )));
        }
        if let Some(t) = gguf.get_str_opt(&key("rope.scaling.type"))? {
            if t != "none" {
                return Err(unsupported(format!(
                    "{}: RoPE scaling '{t}' is not supported yet",
                    gguf.display_path()
                )));
            }
        }
        let vocab_size = match gguf.get_u32_opt(&key("vocab_size"))? {
            Some(v) => v as usize,
            None => gguf
                .tensor_info("token_embd.weight")
                .map(|t| t.shape()[0])
                .ok_or_else(|| {
                    invalid(format!(
                        "{}: no {arch}.vocab_size and no token_embd.weight",
                        gguf.display_path()
                    ))
                })?,
        };
        let dims = Dims {
            n_layers: gguf.get_u32(&key("block_count"))? as usize,
            d_model,
            d_ff: gguf.get_u32(&key("feed_forward_length"))? as usize,
            n_heads,
            n_kv_heads: gguf
                .get_u32_opt(&key("attention.head_count_kv"))?
                .map(|n| n as usize)
                .unwrap_or(n_heads),
            head_dim,
            vocab_size,
            max_positions: gguf
                .get_u32_opt(&key("context_length"))?
                .map(|n| n as usize)
                .unwrap_or(2048),
        };
        check_dims(&dims, gguf.display_path())?;
        let eps = gguf.get_f32(&key("attention.layer_norm_rms_epsilon"))?;
        let theta = gguf.get_f32_opt(&key("rope.freq_base"))?.unwrap_or(10000.0);
        let id = |k: &str| -> Result<Option<u32>> { Ok(gguf.get_u32_opt(k)?) };
        // llama.cpp permutes the Q/K rows of `llama` files only; qwen files keep HF's rows
        // and use NEOX (half-split) rotary.
        let (style, source) = match variant {
            Variant::Llama => (RopeStyle::Interleaved, SourceFormat::Gguf),
            _ => (RopeStyle::HalfSplit, SourceFormat::GgufUnpermuted),
        };
        Ok(Self {
            rope: Rope {
                style,
                theta: theta as f64,
                rotary_dim,
                head_dim,
            },
            dims,
            rms_norm_eps: eps as f64,
            tie_word_embeddings: !gguf.has_tensor("output.weight"),
            attention_bias: gguf.has_tensor("blk.0.attn_q.bias"),
            mlp_bias: gguf.has_tensor("blk.0.ffn_down.bias"),
            bos_token_id: id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: id("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
            pad_token_id: id("tokenizer.ggml.padding_token_id")?,
            source,
            variant,
            qk_norm: variant == Variant::Qwen3,
            hf_config: None,
        })
    }

    /// The HF `config.json`: the checkpoint's own when it had one, else a LlamaForCausalLM
    /// config that transformers 4.x and 5.x both read.
    pub fn to_hf_json(&self) -> Value {
        if let Some(v) = &self.hf_config {
            return v.clone();
        }
        let d = &self.dims;
        let opt = |v: Option<u32>| v.map_or(Value::Null, |v| json!(v));
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        json!({
            "architectures": [self.variant.hf_architecture()],
            "model_type": self.variant.family(),
            "hidden_act": "silu",
            "hidden_size": d.d_model,
            "intermediate_size": d.d_ff,
            "num_hidden_layers": d.n_layers,
            "num_attention_heads": d.n_heads,
            "num_key_value_heads": d.n_kv_heads,
            "head_dim": d.head_dim,
            "vocab_size": d.vocab_size,
            "max_position_embeddings": d.max_positions,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "rope_parameters": {"rope_theta": self.rope.theta, "rope_type": "default"},
            "rope_scaling": Value::Null,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": true,
            "bos_token_id": opt(self.bos_token_id),
            "eos_token_id": eos,
            "pad_token_id": opt(self.pad_token_id),
            "torch_dtype": "float32",
        })
    }
}

//! Which tensors a LLaMA checkpoint holds, under HF and GGUF names, and where each one goes:
//! a canonical weight site, a bias, or a family-internal name (norm scales).

use candle_core::{Device, Tensor};
use kedit_plugin_api::WeightSite;

use super::config::{LlamaConfig, SourceFormat, Variant};
use crate::checkpoint::SafetensorsCheckpoint;
use crate::error::{invalid, Context, Result};
use crate::gguf::GgufFile;
use crate::weights::WeightStore;

/// Where a checkpoint tensor lives in the runtime.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    Site(WeightSite),
    Bias(WeightSite),
    Named(String),
}

/// One checkpoint tensor.
#[derive(Clone, Debug)]
pub struct Spec {
    pub target: Target,
    pub hf: String,
    pub gguf: String,
    /// Row-major shape, outermost first (`[out, in]` for linear maps).
    pub shape: Vec<usize>,
}

pub fn attn_norm(layer: usize) -> String {
    format!("layer.{layer}.attn_norm")
}

pub fn mlp_norm(layer: usize) -> String {
    format!("layer.{layer}.mlp_norm")
}

pub fn q_norm(layer: usize) -> String {
    format!("layer.{layer}.q_norm")
}

pub fn k_norm(layer: usize) -> String {
    format!("layer.{layer}.k_norm")
}

pub const FINAL_NORM: &str = "final_norm";

/// Every tensor of a LLaMA checkpoint with this config (the head only when untied).
pub fn specs(cfg: &LlamaConfig) -> Vec<Spec> {
    let d = &cfg.dims;
    let (dm, ff) = (d.d_model, d.d_ff);
    let (q_out, kv_out) = (d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim);
    let mut out = vec![Spec {
        target: Target::Site(WeightSite::Embed),
        hf: "model.embed_tokens.weight".into(),
        gguf: "token_embd.weight".into(),
        shape: vec![d.vocab_size, dm],
    }];
    for i in 0..d.n_layers {
        let hf = |n: &str| format!("model.layers.{i}.{n}");
        let gg = |n: &str| format!("blk.{i}.{n}");
        let linear = [
            (
                WeightSite::AttnQ(i),
                "self_attn.q_proj",
                "attn_q",
                [q_out, dm],
                cfg.attention_bias,
            ),
            (
                WeightSite::AttnK(i),
                "self_attn.k_proj",
                "attn_k",
                [kv_out, dm],
                cfg.attention_bias,
            ),
            (
                WeightSite::AttnV(i),
                "self_attn.v_proj",
                "attn_v",
                [kv_out, dm],
                cfg.attention_bias,
            ),
            (
                WeightSite::AttnO(i),
                "self_attn.o_proj",
                "attn_output",
                [dm, q_out],
                // Qwen2 has q/k/v biases but none on o_proj.
                cfg.attention_bias && cfg.variant != Variant::Qwen2,
            ),
            (
                WeightSite::MlpGate(i),
                "mlp.gate_proj",
                "ffn_gate",
                [ff, dm],
                cfg.mlp_bias,
            ),
            (
                WeightSite::MlpUp(i),
                "mlp.up_proj",
                "ffn_up",
                [ff, dm],
                cfg.mlp_bias,
            ),
            (
                WeightSite::MlpDown(i),
                "mlp.down_proj",
                "ffn_down",
                [dm, ff],
                cfg.mlp_bias,
            ),
        ];
        for (site, hf_name, gguf_name, shape, bias) in linear {
            out.push(Spec {
                target: Target::Site(site),
                hf: hf(&format!("{hf_name}.weight")),
                gguf: gg(&format!("{gguf_name}.weight")),
                shape: shape.to_vec(),
            });
            if bias {
                out.push(Spec {
                    target: Target::Bias(site),
                    hf: hf(&format!("{hf_name}.bias")),
                    gguf: gg(&format!("{gguf_name}.bias")),
                    shape: vec![shape[0]],
                });
            }
        }
        out.push(Spec {
            target: Target::Named(attn_norm(i)),
            hf: hf("input_layernorm.weight"),
            gguf: gg("attn_norm.weight"),
            shape: vec![dm],
        });
        out.push(Spec {
            target: Target::Named(mlp_norm(i)),
            hf: hf("post_attention_layernorm.weight"),
            gguf: gg("ffn_norm.weight"),
            shape: vec![dm],
        });
        if cfg.qk_norm {
            out.push(Spec {
                target: Target::Named(q_norm(i)),
                hf: hf("self_attn.q_norm.weight"),
                gguf: gg("attn_q_norm.weight"),
                shape: vec![d.head_dim],
            });
            out.push(Spec {
                target: Target::Named(k_norm(i)),
                hf: hf("self_attn.k_norm.weight"),
                gguf: gg("attn_k_norm.weight"),
                shape: vec![d.head_dim],
            });
        }
    }
    out.push(Spec {
        target: Target::Named(FINAL_NORM.into()),
        hf: "model.norm.weight".into(),
        gguf: "output_norm.weight".into(),
        shape: vec![dm],
    });
    if !cfg.tie_word_embeddings {
        out.push(Spec {
            target: Target::Site(WeightSite::LmHead),
            hf: "lm_head.weight".into(),
            gguf: "output.weight".into(),
            shape: vec![d.vocab_size, dm],
        });
    }
    out
}

fn store(weights: &mut WeightStore, target: &Target, t: Tensor) {
    match target {
        Target::Site(s) => weights.insert_site(*s, t),
        Target::Bias(s) => weights.insert_bias(*s, t),
        Target::Named(n) => weights.insert_named(n.clone(), t),
    }
}

pub fn load_safetensors(
    cfg: &LlamaConfig,
    ckpt: &SafetensorsCheckpoint,
    device: &Device,
) -> Result<WeightStore> {
    let mut weights = WeightStore::new(cfg.tie_word_embeddings);
    for spec in specs(cfg) {
        let data = ckpt.tensor_f32(&spec.hf, &spec.shape)?;
        let t = Tensor::from_vec(data, spec.shape.as_slice(), device)
            .with_context(|| format!("placing '{}' on {device:?}", spec.hf))?;
        store(&mut weights, &spec.target, t);
    }
    Ok(weights)
}

/// Dequantises every tensor to f32, keeping llama.cpp's Q/K row order (the config's RoPE style
/// is interleaved for GGUF sources).
pub fn load_gguf(cfg: &LlamaConfig, gguf: &GgufFile, device: &Device) -> Result<WeightStore> {
    let mut weights = WeightStore::new(cfg.tie_word_embeddings);
    for spec in specs(cfg) {
        let (shape, data) = gguf.tensor_f32(&spec.gguf)?;
        if shape != spec.shape {
            return Err(invalid(format!(
                "{}: tensor '{}' has shape {shape:?}, but the metadata implies {:?}",
                gguf.display_path(),
                spec.gguf,
                spec.shape
            )));
        }
        let t = Tensor::from_vec(data, shape.as_slice(), device)
            .with_context(|| format!("placing '{}' on {device:?}", spec.gguf))?;
        store(&mut weights, &spec.target, t);
    }
    Ok(weights)
}

/// llama.cpp's Q/K row permutation undone: `w.reshape(n, rows/n/2, 2, cols)
/// .swapaxes(1, 2).reshape(rows, cols)` turns interleaved-pair rows into HF's half-split rows.
pub fn unpermute_rows(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((n_heads, rows / n_heads / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The tensors under HF names and orientation (Q/K rows un-permuted for GGUF sources).
pub fn to_hf_tensors(cfg: &LlamaConfig, weights: &WeightStore) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for spec in specs(cfg) {
        let t = match &spec.target {
            Target::Site(s) => weights.site(*s)?.clone(),
            Target::Bias(s) => weights
                .bias(*s)
                .cloned()
                .ok_or_else(|| invalid(format!("bias of '{s}' is missing")))?,
            Target::Named(n) => weights.named(n)?.clone(),
        };
        let t = match (&spec.target, cfg.source) {
            (Target::Site(WeightSite::AttnQ(_)), SourceFormat::Gguf) => {
                unpermute_rows(&t, cfg.dims.n_heads)?
            }
            (Target::Site(WeightSite::AttnK(_)), SourceFormat::Gguf) => {
                unpermute_rows(&t, cfg.dims.n_kv_heads)?
            }
            (Target::Bias(WeightSite::AttnQ(_)), SourceFormat::Gguf) => {
                unpermute_rows(&t.unsqueeze(1)?, cfg.dims.n_heads)?.squeeze(1)?
            }
            (Target::Bias(WeightSite::AttnK(_)), SourceFormat::Gguf) => {
                unpermute_rows(&t.unsqueeze(1)?, cfg.dims.n_kv_heads)?.squeeze(1)?
            }
            _ => t,
        };
        out.push((spec.hf, t));
    }
    Ok(out)
}

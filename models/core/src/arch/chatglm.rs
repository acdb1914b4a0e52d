//! ChatGLM2 / ChatGLM3 (and the remote-code GLM-4-9B-chat) in THUDM's remote-code layout:
//! `transformer.encoder.layers.{i}`, a fused `self_attention.query_key_value` with bias and
//! rows `[q: heads·kv_channels | k: groups·kv_channels | v: groups·kv_channels]`
//! (multi-query groups), `self_attention.dense`, a fused `mlp.dense_h_to_4h` (rows
//! `[gate | up]`, `silu(first) * second`), `mlp.dense_4h_to_h`, RMSNorm, `final_layernorm`
//! and an untied `output_layer`. RoPE is interleaved on the first `kv_channels / 2` dims of each
//! head with base `10000 · rope_ratio`. The remote code runs seq-first internally; that is
//! irrelevant here (activations are `[batch, seq, hidden]`).

use std::path::Path;

use candle_core::{Device, Tensor};
use kedit_plugin_api::{ActSite, WeightSite};
use serde_json::Value;

use super::glm::fused::{self, Spec, Target};
use super::{Architecture, Dims, HfCheckpoint};
use crate::checkpoint::{JsonFile, SafetensorsCheckpoint};
use crate::engine::{AttentionShape, Pass, Qkv, Rope, RopeStyle};
use crate::error::{invalid, unsupported, Context, Result};
use crate::runtime::{Runtime, Source, SourceKind};
use crate::text::TextCodec;
use crate::weights::WeightStore;

/// The rotary buffer real checkpoints carry; kept only to be written back on export.
pub const INV_FREQ: &str = "transformer.rotary_pos_emb.inv_freq";

#[derive(Clone, Debug)]
pub struct ChatGlmConfig {
    pub dims: Dims,
    pub eps: f64,
    pub rope: Rope,
    pub add_qkv_bias: bool,
    pub add_bias_linear: bool,
    /// `post_layer_norm`: whether `encoder.final_layernorm` exists.
    pub final_norm: bool,
    /// Whether the checkpoint holds `transformer.rotary_pos_emb.inv_freq`.
    pub has_inv_freq: bool,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub hf_config: Value,
}

impl ChatGlmConfig {
    // `%` rather than `is_multiple_of`, which needs a newer Rust than the workspace's 1.80.
    #[allow(clippy::manual_is_multiple_of)]
    pub fn from_hf(config: &JsonFile) -> Result<Self> {
        let origin = config.path.display().to_string();
        if config.bool_opt("rmsnorm")? == Some(false) {
            return Err(unsupported(format!(
                "{origin}: rmsnorm=false (LayerNorm ChatGLM) is not supported; ChatGLM2/3 use RMSNorm"
            )));
        }
        if config.bool_opt("apply_residual_connection_post_layernorm")? == Some(true) {
            return Err(unsupported(format!(
                "{origin}: apply_residual_connection_post_layernorm=true is not supported"
            )));
        }
        if let Some(n) = config.usize_opt("pre_seq_len")? {
            return Err(unsupported(format!(
                "{origin}: P-tuning prefixes (pre_seq_len {n}) are not supported"
            )));
        }
        let d_model = config.usize("hidden_size", "model width")?;
        let n_heads = config.usize("num_attention_heads", "attention heads")?;
        let head_dim = config
            .usize_opt("kv_channels")?
            .unwrap_or(d_model / n_heads);
        let n_kv_heads = if config.bool_opt("multi_query_attention")?.unwrap_or(false) {
            config.usize("multi_query_group_num", "key/value groups")?
        } else {
            n_heads
        };
        let vocab_size = match config.usize_opt("padded_vocab_size")? {
            Some(v) => v,
            None => config.usize("vocab_size", "vocabulary size")?,
        };
        let dims = Dims {
            n_layers: config.usize("num_layers", "number of layers")?,
            d_model,
            d_ff: config.usize("ffn_hidden_size", "MLP width")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            max_positions: config.usize_opt("seq_length")?.unwrap_or(2048),
        };
        fused::check_dims(&dims, &origin)?;
        let rotary_dim = head_dim / 2;
        if rotary_dim % 2 != 0 || rotary_dim == 0 {
            return Err(invalid(format!(
                "{origin}: kv_channels {head_dim} gives {rotary_dim} rotated dims; RoPE needs pairs"
            )));
        }
        let rope_ratio = config.f64_opt("rope_ratio")?.unwrap_or(1.0);
        Ok(Self {
            rope: Rope {
                style: RopeStyle::Interleaved,
                theta: 10000.0 * rope_ratio,
                rotary_dim,
                head_dim,
            },
            dims,
            eps: config.f64_opt("layernorm_epsilon")?.unwrap_or(1e-5),
            add_qkv_bias: config.bool_opt("add_qkv_bias")?.unwrap_or(false),
            add_bias_linear: config.bool_opt("add_bias_linear")?.unwrap_or(false),
            final_norm: config.bool_opt("post_layer_norm")?.unwrap_or(true),
            has_inv_freq: false,
            eos_token_ids: config.ids_opt("eos_token_id")?,
            pad_token_id: config.ids_opt("pad_token_id")?.first().copied(),
            hf_config: config.value.clone(),
        })
    }
}

fn norm_name(layer: usize, which: &str) -> String {
    format!("layer.{layer}.{which}")
}

pub const FINAL_NORM: &str = "final_norm";

/// Every tensor of a ChatGLM checkpoint, fused ones split into canonical sites.
pub fn specs(cfg: &ChatGlmConfig) -> Vec<Spec> {
    let d = &cfg.dims;
    let (dm, ff) = (d.d_model, d.d_ff);
    let (q_out, kv_out) = (d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim);
    let mut out = vec![Spec::plain(
        Target::Site(WeightSite::Embed),
        "transformer.embedding.word_embeddings.weight",
        &[d.vocab_size, dm],
    )];
    for i in 0..d.n_layers {
        let hf = |n: &str| format!("transformer.encoder.layers.{i}.{n}");
        let qkv = |t: fn(WeightSite) -> Target| {
            vec![
                (t(WeightSite::AttnQ(i)), q_out),
                (t(WeightSite::AttnK(i)), kv_out),
                (t(WeightSite::AttnV(i)), kv_out),
            ]
        };
        out.push(Spec::fused(
            hf("self_attention.query_key_value.weight"),
            &[dm],
            qkv(Target::Site),
        ));
        if cfg.add_qkv_bias {
            out.push(Spec::fused(
                hf("self_attention.query_key_value.bias"),
                &[],
                qkv(Target::Bias),
            ));
        }
        // (HF name, row blocks, input width)
        type Linear<'a> = (&'a str, Vec<(WeightSite, usize)>, usize);
        let linears: [Linear; 3] = [
            (
                "self_attention.dense",
                vec![(WeightSite::AttnO(i), dm)],
                q_out,
            ),
            (
                "mlp.dense_h_to_4h",
                vec![(WeightSite::MlpGate(i), ff), (WeightSite::MlpUp(i), ff)],
                dm,
            ),
            ("mlp.dense_4h_to_h", vec![(WeightSite::MlpDown(i), dm)], ff),
        ];
        for (name, parts, inp) in linears {
            out.push(Spec::fused(
                hf(&format!("{name}.weight")),
                &[inp],
                parts.iter().map(|&(s, n)| (Target::Site(s), n)).collect(),
            ));
            if cfg.add_bias_linear {
                out.push(Spec::fused(
                    hf(&format!("{name}.bias")),
                    &[],
                    parts.iter().map(|&(s, n)| (Target::Bias(s), n)).collect(),
                ));
            }
        }
        out.push(Spec::plain(
            Target::Named(norm_name(i, "attn_norm")),
            hf("input_layernorm.weight"),
            &[dm],
        ));
        out.push(Spec::plain(
            Target::Named(norm_name(i, "mlp_norm")),
            hf("post_attention_layernorm.weight"),
            &[dm],
        ));
    }
    if cfg.final_norm {
        out.push(Spec::plain(
            Target::Named(FINAL_NORM.into()),
            "transformer.encoder.final_layernorm.weight",
            &[dm],
        ));
    }
    out.push(Spec::plain(
        Target::Site(WeightSite::LmHead),
        "transformer.output_layer.weight",
        &[d.vocab_size, dm],
    ));
    if cfg.has_inv_freq {
        out.push(Spec::plain(
            Target::Named(INV_FREQ.into()),
            INV_FREQ,
            &[cfg.rope.rotary_dim / 2],
        ));
    }
    out
}

pub struct ChatGlm {
    pub config: ChatGlmConfig,
    attention: AttentionShape,
    norms: Vec<(String, String)>,
    specs: Vec<Spec>,
}

impl ChatGlm {
    pub fn new(config: ChatGlmConfig) -> Self {
        let d = &config.dims;
        Self {
            attention: AttentionShape {
                n_heads: d.n_heads,
                n_kv_heads: d.n_kv_heads,
                head_dim: d.head_dim,
            },
            norms: (0..d.n_layers)
                .map(|i| (norm_name(i, "attn_norm"), norm_name(i, "mlp_norm")))
                .collect(),
            specs: specs(&config),
            config,
        }
    }
}

impl Architecture for ChatGlm {
    fn family(&self) -> &str {
        "chatglm"
    }

    fn dims(&self) -> &Dims {
        &self.config.dims
    }

    fn block(&self, pass: &mut Pass<'_>, i: usize, h: Tensor) -> Result<Tensor> {
        let eps = self.config.eps;
        let (attn_norm, mlp_norm) = &self.norms[i];
        let h = pass.act(ActSite::ResidPre(i), h)?;

        let Qkv { q, k, v, shape } =
            pass.qkv(i, &h, self.attention, &|p, x| p.rms_norm(x, attn_norm, eps))?;
        let a = pass.attention(i, shape, Some(&self.config.rope), &q, &k, &v)?;
        let a = pass.act(ActSite::AttnZ(i), a)?;
        let (h, a) = pass.keep_slots(i, h, a)?;
        let attn_out = pass.linear(WeightSite::AttnO(i), &a)?;
        let attn_out = pass.act(ActSite::AttnOut(i), attn_out)?;
        let h = (h + attn_out)?;

        let mlp_in = pass.act(ActSite::MlpIn(i), h.clone())?;
        let x = pass.rms_norm(&mlp_in, mlp_norm, eps)?;
        let [gate, up] = pass.linears([WeightSite::MlpGate(i), WeightSite::MlpUp(i)], &x)?;
        let key = crate::engine::ops::swiglu(&gate, &up)?;
        let key = pass.act(ActSite::MlpKey(i), key)?;
        let mlp_out = pass.linear(WeightSite::MlpDown(i), &key)?;
        let mlp_out = pass.act(ActSite::MlpOut(i), mlp_out)?;
        let h = (h + mlp_out)?;
        pass.act(ActSite::ResidPost(i), h)
    }

    fn final_norm(&self, pass: &mut Pass<'_>, h: &Tensor) -> Result<Tensor> {
        if self.config.final_norm {
            pass.rms_norm(h, FINAL_NORM, self.config.eps)
        } else {
            Ok(h.clone())
        }
    }

    fn to_hf(&self, weights: &WeightStore) -> Result<HfCheckpoint> {
        Ok(HfCheckpoint {
            tensors: fused::to_hf(&self.specs, weights)?,
            config: self.config.hf_config.clone(),
        })
    }
}

/// The `[gMASK]` `sop` prefix the ChatGLM tokenizers put before every encoded text
/// (`ChatGLMTokenizer.build_inputs_with_special_tokens`), when the directory's tokenizer is one
/// of THUDM's (`tokenizer_config.json` → `tokenizer_class`) and `tokenizer.json` knows both
/// tokens (GLM-4 spells the second one `<sop>`).
fn prefix_tokens(dir: &Path, text: &TextCodec) -> Result<Vec<u32>> {
    let Some(tok_config) = JsonFile::read_optional(&dir.join("tokenizer_config.json"))? else {
        return Ok(Vec::new());
    };
    let class = tok_config.str_opt("tokenizer_class")?.unwrap_or("");
    if !matches!(class, "ChatGLMTokenizer" | "ChatGLM4Tokenizer") {
        return Ok(Vec::new());
    }
    let gmask = text.token_id("[gMASK]");
    let sop = text.token_id("sop").or_else(|| text.token_id("<sop>"));
    Ok(match (gmask, sop) {
        (Some(g), Some(s)) => vec![g, s],
        _ => Vec::new(),
    })
}

/// Opens a ChatGLM2/3 remote-code checkpoint directory (safetensors).
pub fn open(dir: &Path, device: &Device) -> Result<Runtime<ChatGlm>> {
    let what = || format!("loading ChatGLM checkpoint {}", dir.display());
    let config_file = JsonFile::read(&dir.join("config.json")).with_context(what)?;
    let mut config = ChatGlmConfig::from_hf(&config_file).with_context(what)?;
    let ckpt = SafetensorsCheckpoint::open_dir(dir).with_context(what)?;
    config.has_inv_freq = ckpt.contains(INV_FREQ);
    let weights = fused::load(&specs(&config), &ckpt, false, device).with_context(what)?;
    let mut text = TextCodec::from_hf_dir(dir, &config_file).with_context(what)?;
    let prefix = prefix_tokens(dir, &text).with_context(what)?;
    text.prefix_tokens = prefix;
    let source = Source {
        path: dir.to_path_buf(),
        kind: SourceKind::HfDir,
    };
    Ok(Runtime::new(
        ChatGlm::new(config),
        weights,
        text,
        source,
        device.clone(),
    ))
}

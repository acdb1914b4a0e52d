//! GLM in transformers' native form: `GlmForCausalLM` (GLM-4-9B-chat-hf) and
//! `Glm4ForCausalLM` (GLM-4-0414, which adds sandwich norms). LLaMA-style names, q/k/v with
//! bias, **partial interleaved** RoPE (the first `head_dim · partial_rotary_factor` dims of each
//! head, pairs (2i, 2i+1)), and a fused `gate_up_proj` (rows `[gate | up]`).
//!
//! ```text
//! glm:  h = h + o(attn(n1(h)));                 h = h + down(silu(gate(n2(h))) * up(n2(h)))
//! glm4: h = h + n_post_attn(o(attn(n1(h))));    h = h + n_post_mlp(down(...))
//! ```
//!
//! `layer.i.attn_out` and `layer.i.mlp_out` are the outputs of `o_proj` and `down_proj`, i.e.
//! before GLM-4's post norms.

pub mod fused;

use std::path::Path;

use candle_core::{Device, Tensor};
use kedit_plugin_api::{ActSite, WeightSite};
use serde_json::Value;

use self::fused::{Spec, Target};
use super::{Architecture, Dims, HfCheckpoint};
use crate::checkpoint::{JsonFile, SafetensorsCheckpoint};
use crate::engine::{AttentionShape, Pass, Qkv, Rope, RopeStyle};
use crate::error::{invalid, unsupported, Context, Result};
use crate::runtime::{Runtime, Source, SourceKind};
use crate::text::TextCodec;
use crate::weights::WeightStore;

/// `rope_parameters` (transformers ≥ 5) or the 4.x top-level keys: (theta, partial factor).
pub fn rope_params(config: &JsonFile, default_factor: f64) -> Result<(f64, f64)> {
    let origin = config.path.display().to_string();
    let params = config.get("rope_parameters");
    let num = |key: &str| -> Result<Option<f64>> {
        match params.and_then(|p| p.get(key)).filter(|v| !v.is_null()) {
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                invalid(format!("{origin}: rope_parameters.{key} must be a number"))
            }),
            None => config.f64_opt(key),
        }
    };
    let theta = num("rope_theta")?.unwrap_or(10000.0);
    let factor = num("partial_rotary_factor")?.unwrap_or(default_factor);
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
    Ok((theta, factor))
}

#[derive(Clone, Debug)]
pub struct GlmConfig {
    pub dims: Dims,
    pub rms_norm_eps: f64,
    pub rope: Rope,
    /// GLM-4-0414's `post_self_attn_layernorm` / `post_mlp_layernorm`.
    pub sandwich: bool,
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The checkpoint's config.json, written back unchanged on export.
    pub hf_config: Value,
}

impl GlmConfig {
    /// `glm4` when `model_type` or `architectures` says GLM-4-0414.
    // `%` rather than `is_multiple_of`, which needs a newer Rust than the workspace's 1.80.
    #[allow(clippy::manual_is_multiple_of)]
    pub fn from_hf(config: &JsonFile) -> Result<Self> {
        let origin = config.path.display().to_string();
        if let Some(act) = config.str_opt("hidden_act")? {
            if act != "silu" {
                return Err(unsupported(format!(
                    "{origin}: hidden_act '{act}' is not supported (GLM uses silu)"
                )));
            }
        }
        let glm4 = config.str_opt("model_type")? == Some("glm4")
            || config
                .get("architectures")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|v| v.as_str() == Some("Glm4ForCausalLM")));
        let d_model = config.usize("hidden_size", "model width")?;
        let n_heads = config.usize("num_attention_heads", "attention heads")?;
        let head_dim = config.usize_opt("head_dim")?.unwrap_or(d_model / n_heads);
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
        fused::check_dims(&dims, &origin)?;
        let (theta, factor) = rope_params(config, 0.5)?;
        let rotary_dim = (head_dim as f64 * factor) as usize;
        if rotary_dim % 2 != 0 || rotary_dim == 0 || rotary_dim > head_dim {
            return Err(invalid(format!(
                "{origin}: partial_rotary_factor {factor} of head_dim {head_dim} gives {rotary_dim} \
                 rotated dims; RoPE needs an even number between 2 and head_dim"
            )));
        }
        Ok(Self {
            rope: Rope {
                style: RopeStyle::Interleaved,
                theta,
                rotary_dim,
                head_dim,
            },
            dims,
            rms_norm_eps: config.f64_opt("rms_norm_eps")?.unwrap_or(1.5625e-7),
            sandwich: glm4,
            attention_bias: config.bool_opt("attention_bias")?.unwrap_or(true),
            tie_word_embeddings: config.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            bos_token_id: config.ids_opt("bos_token_id")?.first().copied(),
            eos_token_ids: config.ids_opt("eos_token_id")?,
            pad_token_id: config.ids_opt("pad_token_id")?.first().copied(),
            hf_config: config.value.clone(),
        })
    }

    pub fn family(&self) -> &'static str {
        if self.sandwich {
            "glm4"
        } else {
            "glm"
        }
    }
}

fn norm_name(layer: usize, which: &str) -> String {
    format!("layer.{layer}.{which}")
}

pub const FINAL_NORM: &str = "final_norm";

/// Every tensor of a GLM / GLM-4 checkpoint, with `gate_up_proj` split into gate and up.
pub fn specs(cfg: &GlmConfig) -> Vec<Spec> {
    let d = &cfg.dims;
    let (dm, ff) = (d.d_model, d.d_ff);
    let (q_out, kv_out) = (d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim);
    let mut out = vec![Spec::plain(
        Target::Site(WeightSite::Embed),
        "model.embed_tokens.weight",
        &[d.vocab_size, dm],
    )];
    for i in 0..d.n_layers {
        let hf = |n: &str| format!("model.layers.{i}.{n}");
        for (site, name, rows) in [
            (WeightSite::AttnQ(i), "q_proj", q_out),
            (WeightSite::AttnK(i), "k_proj", kv_out),
            (WeightSite::AttnV(i), "v_proj", kv_out),
        ] {
            out.push(Spec::plain(
                Target::Site(site),
                hf(&format!("self_attn.{name}.weight")),
                &[rows, dm],
            ));
            if cfg.attention_bias {
                out.push(Spec::plain(
                    Target::Bias(site),
                    hf(&format!("self_attn.{name}.bias")),
                    &[rows],
                ));
            }
        }
        out.push(Spec::plain(
            Target::Site(WeightSite::AttnO(i)),
            hf("self_attn.o_proj.weight"),
            &[dm, q_out],
        ));
        out.push(Spec::fused(
            hf("mlp.gate_up_proj.weight"),
            &[dm],
            vec![
                (Target::Site(WeightSite::MlpGate(i)), ff),
                (Target::Site(WeightSite::MlpUp(i)), ff),
            ],
        ));
        out.push(Spec::plain(
            Target::Site(WeightSite::MlpDown(i)),
            hf("mlp.down_proj.weight"),
            &[dm, ff],
        ));
        let mut norms = vec![
            ("attn_norm", "input_layernorm"),
            ("mlp_norm", "post_attention_layernorm"),
        ];
        if cfg.sandwich {
            norms.push(("post_attn_norm", "post_self_attn_layernorm"));
            norms.push(("post_mlp_norm", "post_mlp_layernorm"));
        }
        for (ours, theirs) in norms {
            out.push(Spec::plain(
                Target::Named(norm_name(i, ours)),
                hf(&format!("{theirs}.weight")),
                &[dm],
            ));
        }
    }
    out.push(Spec::plain(
        Target::Named(FINAL_NORM.into()),
        "model.norm.weight",
        &[dm],
    ));
    if !cfg.tie_word_embeddings {
        out.push(Spec::plain(
            Target::Site(WeightSite::LmHead),
            "lm_head.weight",
            &[d.vocab_size, dm],
        ));
    }
    out
}

struct LayerNorms {
    attn: String,
    mlp: String,
    post_attn: String,
    post_mlp: String,
}

pub struct Glm {
    pub config: GlmConfig,
    attention: AttentionShape,
    norms: Vec<LayerNorms>,
    specs: Vec<Spec>,
}

impl Glm {
    pub fn new(config: GlmConfig) -> Self {
        let d = &config.dims;
        Self {
            attention: AttentionShape {
                n_heads: d.n_heads,
                n_kv_heads: d.n_kv_heads,
                head_dim: d.head_dim,
            },
            norms: (0..d.n_layers)
                .map(|i| LayerNorms {
                    attn: norm_name(i, "attn_norm"),
                    mlp: norm_name(i, "mlp_norm"),
                    post_attn: norm_name(i, "post_attn_norm"),
                    post_mlp: norm_name(i, "post_mlp_norm"),
                })
                .collect(),
            specs: specs(&config),
            config,
        }
    }
}

impl Architecture for Glm {
    fn family(&self) -> &str {
        self.config.family()
    }

    fn dims(&self) -> &Dims {
        &self.config.dims
    }

    fn block(&self, pass: &mut Pass<'_>, i: usize, h: Tensor) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        let norms = &self.norms[i];
        let h = pass.act(ActSite::ResidPre(i), h)?;

        let Qkv { q, k, v, shape } = pass.qkv(i, &h, self.attention, &|p, x| {
            p.rms_norm(x, &norms.attn, eps)
        })?;
        let a = pass.attention(i, shape, Some(&self.config.rope), &q, &k, &v)?;
        let a = pass.act(ActSite::AttnZ(i), a)?;
        let (h, a) = pass.keep_slots(i, h, a)?;
        let attn_out = pass.linear(WeightSite::AttnO(i), &a)?;
        let attn_out = pass.act(ActSite::AttnOut(i), attn_out)?;
        let attn_out = if self.config.sandwich {
            pass.rms_norm(&attn_out, &norms.post_attn, eps)?
        } else {
            attn_out
        };
        let h = (h + attn_out)?;

        let mlp_in = pass.act(ActSite::MlpIn(i), h.clone())?;
        let x = pass.rms_norm(&mlp_in, &norms.mlp, eps)?;
        let [gate, up] = pass.linears([WeightSite::MlpGate(i), WeightSite::MlpUp(i)], &x)?;
        let key = crate::engine::ops::swiglu(&gate, &up)?;
        let key = pass.act(ActSite::MlpKey(i), key)?;
        let mlp_out = pass.linear(WeightSite::MlpDown(i), &key)?;
        let mlp_out = pass.act(ActSite::MlpOut(i), mlp_out)?;
        let mlp_out = if self.config.sandwich {
            pass.rms_norm(&mlp_out, &norms.post_mlp, eps)?
        } else {
            mlp_out
        };
        let h = (h + mlp_out)?;
        pass.act(ActSite::ResidPost(i), h)
    }

    fn final_norm(&self, pass: &mut Pass<'_>, h: &Tensor) -> Result<Tensor> {
        pass.rms_norm(h, FINAL_NORM, self.config.rms_norm_eps)
    }

    fn to_hf(&self, weights: &WeightStore) -> Result<HfCheckpoint> {
        Ok(HfCheckpoint {
            tensors: fused::to_hf(&self.specs, weights)?,
            config: self.config.hf_config.clone(),
        })
    }
}

/// Opens an HF checkpoint directory of `GlmForCausalLM` / `Glm4ForCausalLM`.
pub fn open(dir: &Path, device: &Device) -> Result<Runtime<Glm>> {
    let what = || format!("loading GLM checkpoint {}", dir.display());
    let config_file = JsonFile::read(&dir.join("config.json")).with_context(what)?;
    let config = GlmConfig::from_hf(&config_file).with_context(what)?;
    let ckpt = SafetensorsCheckpoint::open_dir(dir).with_context(what)?;
    let weights = fused::load(&specs(&config), &ckpt, config.tie_word_embeddings, device)
        .with_context(what)?;
    let text = TextCodec::from_hf_dir(dir, &config_file).with_context(what)?;
    let source = Source {
        path: dir.to_path_buf(),
        kind: SourceKind::HfDir,
    };
    Ok(Runtime::new(
        Glm::new(config),
        weights,
        text,
        source,
        device.clone(),
    ))
}

//! Baichuan (remote code): LLaMA-like blocks with one fused `self_attn.W_pack` (rows
//! `[q | k | v]`, no bias). Two position schemes, chosen from the config:
//!
//! * 7B style (Baichuan-7B, Baichuan2-7B): `max_position_embeddings` present → half-split RoPE
//!   over the full head, base 10000 (hard-coded in the remote code);
//! * 13B style (Baichuan-13B, Baichuan2-13B): no `max_position_embeddings` (the config has only
//!   `model_max_length`) → **ALiBi**, score bias `slope_h · j`, no position ids.
//!
//! Baichuan2 has a **NormHead**: `lm_head.weight` is stored raw and every vocab row is divided by
//! its L2 norm (`F.normalize`, eps 1e-12) when used. The `lm_head` weight site reads and writes
//! the **raw** stored weight (what the checkpoint holds and export writes back); the forward
//! normalises it (cached until the weight changes). A site gradient at `lm_head` therefore
//! describes `y = x · W_nᵀ`: `gᵀx` is the gradient with respect to the normalised weight `W_n`,
//! and the raw-weight gradient of row r is `(G_r − (G_r·ŵ_r) ŵ_r) / ‖w_r‖`.
//! Baichuan-7B v1 (`BaiChuanForCausalLM`, capital C) and Baichuan-13B v1 (vocab 64000) use a
//! plain head.

use std::path::Path;
use std::sync::Mutex;

use candle_core::{Device, Tensor, TensorId, D};
use kedit_plugin_api::{ActSite, WeightSite};
use serde_json::Value;

use super::glm::fused::{self, Spec, Target};
use super::{Architecture, Dims, HfCheckpoint};
use crate::checkpoint::{JsonFile, SafetensorsCheckpoint};
use crate::engine::{alibi, AttentionShape, Pass, Qkv, Rope, RopeStyle};
use crate::error::{unsupported, Context, Result};
use crate::runtime::{Runtime, Source, SourceKind};
use crate::text::TextCodec;
use crate::weights::WeightStore;

/// How positions enter attention.
#[derive(Clone, Debug, PartialEq)]
pub enum Positions {
    Rope(Rope),
    /// One slope per head.
    Alibi(Vec<f32>),
}

#[derive(Clone, Debug)]
pub struct BaichuanConfig {
    pub dims: Dims,
    pub rms_norm_eps: f64,
    pub positions: Positions,
    /// Baichuan2's row-normalised head.
    pub norm_head: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub hf_config: Value,
}

/// Baichuan v1 vocabulary size (Baichuan-7B and Baichuan-13B, plain head).
const V1_VOCAB: usize = 64000;

impl BaichuanConfig {
    /// `norm_head`: `Some` overrides the rule (from the plugin's `norm_head` option).
    pub fn from_hf(config: &JsonFile, norm_head: Option<bool>) -> Result<Self> {
        let origin = config.path.display().to_string();
        if let Some(act) = config.str_opt("hidden_act")? {
            if act != "silu" {
                return Err(unsupported(format!(
                    "{origin}: hidden_act '{act}' is not supported (Baichuan uses silu)"
                )));
            }
        }
        let d_model = config.usize("hidden_size", "model width")?;
        let n_heads = config.usize("num_attention_heads", "attention heads")?;
        let head_dim = d_model / n_heads;
        let rope_max = config.usize_opt("max_position_embeddings")?;
        let max_positions = match rope_max {
            Some(n) => n,
            None => config.usize_opt("model_max_length")?.unwrap_or(4096),
        };
        let dims = Dims {
            n_layers: config.usize("num_hidden_layers", "number of layers")?,
            d_model,
            d_ff: config.usize("intermediate_size", "MLP width")?,
            n_heads,
            n_kv_heads: n_heads,
            head_dim,
            vocab_size: config.usize("vocab_size", "vocabulary size")?,
            max_positions,
        };
        fused::check_dims(&dims, &origin)?;
        let positions = match rope_max {
            Some(_) => Positions::Rope(Rope {
                style: RopeStyle::HalfSplit,
                theta: 10000.0,
                rotary_dim: head_dim,
                head_dim,
            }),
            None => Positions::Alibi(alibi::slopes(n_heads)),
        };
        let v1_class = config
            .get("architectures")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|v| v.as_str() == Some("BaiChuanForCausalLM")));
        let norm_head = norm_head.unwrap_or(!v1_class && dims.vocab_size != V1_VOCAB);
        Ok(Self {
            dims,
            rms_norm_eps: config.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
            positions,
            norm_head,
            bos_token_id: config.ids_opt("bos_token_id")?.first().copied(),
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

/// Every tensor of a Baichuan checkpoint, `W_pack` split into q, k and v.
pub fn specs(cfg: &BaichuanConfig) -> Vec<Spec> {
    let d = &cfg.dims;
    let (dm, ff) = (d.d_model, d.d_ff);
    let mut out = vec![Spec::plain(
        Target::Site(WeightSite::Embed),
        "model.embed_tokens.weight",
        &[d.vocab_size, dm],
    )];
    for i in 0..d.n_layers {
        let hf = |n: &str| format!("model.layers.{i}.{n}");
        out.push(Spec::fused(
            hf("self_attn.W_pack.weight"),
            &[dm],
            vec![
                (Target::Site(WeightSite::AttnQ(i)), dm),
                (Target::Site(WeightSite::AttnK(i)), dm),
                (Target::Site(WeightSite::AttnV(i)), dm),
            ],
        ));
        for (site, name, shape) in [
            (WeightSite::AttnO(i), "self_attn.o_proj", [dm, dm]),
            (WeightSite::MlpGate(i), "mlp.gate_proj", [ff, dm]),
            (WeightSite::MlpUp(i), "mlp.up_proj", [ff, dm]),
            (WeightSite::MlpDown(i), "mlp.down_proj", [dm, ff]),
        ] {
            out.push(Spec::plain(
                Target::Site(site),
                hf(&format!("{name}.weight")),
                &shape,
            ));
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
    out.push(Spec::plain(
        Target::Named(FINAL_NORM.into()),
        "model.norm.weight",
        &[dm],
    ));
    out.push(Spec::plain(
        Target::Site(WeightSite::LmHead),
        "lm_head.weight",
        &[d.vocab_size, dm],
    ));
    out
}

/// NormHead: every row divided by `max(‖row‖₂, 1e-12)`.
pub fn normalize_rows(w: &Tensor) -> candle_core::Result<Tensor> {
    let norm = w.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    w.broadcast_div(&norm)
}

pub struct Baichuan {
    pub config: BaichuanConfig,
    attention: AttentionShape,
    norms: Vec<(String, String)>,
    specs: Vec<Spec>,
    /// The normalised head and the id of the raw tensor it came from.
    norm_head_cache: Mutex<Option<(TensorId, Tensor)>>,
}

impl Baichuan {
    pub fn new(config: BaichuanConfig) -> Self {
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
            norm_head_cache: Mutex::new(None),
            config,
        }
    }

    /// The head the forward applies: the raw weight row-normalised (computed once per raw
    /// tensor; a write replaces the tensor and so its id).
    fn normalized_head(&self, raw: &Tensor) -> Result<Tensor> {
        let mut cache = self
            .norm_head_cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((id, t)) = cache.as_ref() {
            if *id == raw.id() {
                return Ok(t.clone());
            }
        }
        let t = normalize_rows(raw)?;
        *cache = Some((raw.id(), t.clone()));
        Ok(t)
    }
}

impl Architecture for Baichuan {
    fn family(&self) -> &str {
        "baichuan"
    }

    fn dims(&self) -> &Dims {
        &self.config.dims
    }

    fn block(&self, pass: &mut Pass<'_>, i: usize, h: Tensor) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        let (attn_norm, mlp_norm) = &self.norms[i];
        let h = pass.act(ActSite::ResidPre(i), h)?;

        let Qkv { q, k, v, shape } =
            pass.qkv(i, &h, self.attention, &|p, x| p.rms_norm(x, attn_norm, eps))?;
        let a = match &self.config.positions {
            Positions::Rope(rope) => pass.attention(i, shape, Some(rope), &q, &k, &v)?,
            Positions::Alibi(slopes) => {
                let layout = pass.layout();
                let keys = layout.past + layout.seq;
                let bias = alibi::bias(slopes, keys, pass.device())?;
                pass.attention_with_bias(i, shape, None, Some(&bias), &q, &k, &v)?
            }
        };
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
        pass.rms_norm(h, FINAL_NORM, self.config.rms_norm_eps)
    }

    fn lm_head(&self, pass: &mut Pass<'_>, h: &Tensor) -> Result<Tensor> {
        if !self.config.norm_head {
            return pass.linear(WeightSite::LmHead, h);
        }
        let w = self.normalized_head(pass.weights().site(WeightSite::LmHead)?)?;
        pass.linear_with(WeightSite::LmHead, h, &w)
    }

    fn to_hf(&self, weights: &WeightStore) -> Result<HfCheckpoint> {
        Ok(HfCheckpoint {
            tensors: fused::to_hf(&self.specs, weights)?,
            config: self.config.hf_config.clone(),
        })
    }
}

/// Opens a Baichuan / Baichuan2 checkpoint directory (safetensors). `norm_head` overrides the
/// NormHead rule (Baichuan2 unless the class is `BaiChuanForCausalLM` or the vocabulary is
/// Baichuan v1's 64000).
pub fn open(dir: &Path, norm_head: Option<bool>, device: &Device) -> Result<Runtime<Baichuan>> {
    let what = || format!("loading Baichuan checkpoint {}", dir.display());
    let config_file = JsonFile::read(&dir.join("config.json")).with_context(what)?;
    let config = BaichuanConfig::from_hf(&config_file, norm_head).with_context(what)?;
    let ckpt = SafetensorsCheckpoint::open_dir(dir).with_context(what)?;
    let weights = fused::load(&specs(&config), &ckpt, false, device).with_context(what)?;
    let text = TextCodec::from_hf_dir(dir, &config_file).with_context(what)?;
    let source = Source {
        path: dir.to_path_buf(),
        kind: SourceKind::HfDir,
    };
    Ok(Runtime::new(
        Baichuan::new(config),
        weights,
        text,
        source,
        device.clone(),
    ))
}

//! GPT-2: pre-norm blocks with LayerNorm (weight and bias), learned absolute positions, fused
//! multi-head attention without RoPE, a `gelu_new` MLP, biases everywhere and a head tied to
//! the token embedding.
//!
//! ```text
//! h = wte[ids] + wpe[pos]
//! h = h + c_proj(attn(split(c_attn(ln_1(h)))))
//! h = h + mlp.c_proj(gelu_new(c_fc(ln_2(h))))
//! logits = ln_f(h) · wteᵀ
//! ```
//!
//! Checkpoints store `Conv1D` weights as `[in, out]` (`y = x·W + b`); the runtime keeps every
//! weight site as `[out, in]` like every other family, so loading and export transpose them.
//! `layer.i.attn.{q,k,v}` are the three column blocks of the fused `c_attn`, re-fused on export.
//! Both namings load: `transformer.h.N…` (save_pretrained) and the original OpenAI checkpoint
//! without the `transformer.` prefix (whose `h.N.attn.bias` / `masked_bias` mask buffers are not
//! weights and are ignored).

pub mod tokenizer;

use std::path::Path;

use candle_core::{Device, Tensor};
use kedit_plugin_api::{ActSite, WeightSite};
use serde_json::Value;

use super::{Architecture, Dims, HfCheckpoint};
use crate::checkpoint::{JsonFile, SafetensorsCheckpoint};
use crate::engine::layer_norm::{gelu_new, layer_norm};
use crate::engine::{AttentionShape, Pass, Qkv};
use crate::error::{invalid, unsupported, Context, Result};
use crate::runtime::{Runtime, Source, SourceKind};
use crate::text::TextCodec;
use crate::weights::WeightStore;

/// config.json `model_type` / `architectures` values of GPT-2.
pub const NAMES: &[&str] = &["gpt2", "GPT2LMHeadModel"];

#[derive(Clone, Debug)]
pub struct Gpt2Config {
    pub dims: Dims,
    pub layer_norm_epsilon: f64,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// `"transformer."` (save_pretrained) or `""` (the original OpenAI checkpoint).
    pub prefix: String,
    /// The checkpoint's own config.json, written back unchanged on export.
    pub hf_config: Value,
}

impl Gpt2Config {
    pub fn from_hf(config: &JsonFile) -> Result<Self> {
        let origin = config.path.display().to_string();
        if let Some(act) = config.str_opt("activation_function")? {
            if act != "gelu_new" && act != "gelu_pytorch_tanh" {
                return Err(unsupported(format!(
                    "{origin}: activation_function '{act}' is not supported (GPT-2 uses gelu_new)"
                )));
            }
        }
        if config.bool_opt("scale_attn_by_inverse_layer_idx")? == Some(true) {
            return Err(unsupported(format!(
                "{origin}: scale_attn_by_inverse_layer_idx is not supported"
            )));
        }
        if config.bool_opt("scale_attn_weights")? == Some(false) {
            return Err(unsupported(format!(
                "{origin}: scale_attn_weights = false is not supported"
            )));
        }
        let d_model = config.usize("n_embd", "model width")?;
        let n_heads = config.usize("n_head", "attention heads")?;
        if n_heads == 0 || d_model % n_heads != 0 {
            return Err(invalid(format!(
                "{origin}: n_embd {d_model} is not a multiple of n_head {n_heads}"
            )));
        }
        let dims = Dims {
            n_layers: config.usize("n_layer", "number of layers")?,
            d_model,
            d_ff: config.usize_opt("n_inner")?.unwrap_or(4 * d_model),
            n_heads,
            n_kv_heads: n_heads,
            head_dim: d_model / n_heads,
            vocab_size: config.usize("vocab_size", "vocabulary size")?,
            max_positions: config
                .usize_opt("n_positions")?
                .or(config.usize_opt("n_ctx")?)
                .unwrap_or(1024),
        };
        if dims.n_layers == 0 || dims.vocab_size == 0 {
            return Err(invalid(format!("{origin}: degenerate sizes {dims:?}")));
        }
        Ok(Self {
            dims,
            layer_norm_epsilon: config.f64_opt("layer_norm_epsilon")?.unwrap_or(1e-5),
            tie_word_embeddings: config.bool_opt("tie_word_embeddings")?.unwrap_or(true),
            bos_token_id: config.ids_opt("bos_token_id")?.first().copied(),
            eos_token_ids: config.ids_opt("eos_token_id")?,
            pad_token_id: config.ids_opt("pad_token_id")?.first().copied(),
            prefix: "transformer.".into(),
            hf_config: config.value.clone(),
        })
    }
}

/// Family-internal weight names (norms and positions).
fn ln(layer: usize, which: u8, part: &str) -> String {
    format!("layer.{layer}.ln_{which}.{part}")
}
const WPE: &str = "wpe";
const LN_F_W: &str = "ln_f.weight";
const LN_F_B: &str = "ln_f.bias";

pub struct Gpt2 {
    pub config: Gpt2Config,
    attention: AttentionShape,
}

impl Gpt2 {
    pub fn new(config: Gpt2Config) -> Self {
        let d = &config.dims;
        Self {
            attention: AttentionShape {
                n_heads: d.n_heads,
                n_kv_heads: d.n_kv_heads,
                head_dim: d.head_dim,
            },
            config,
        }
    }

    fn norm(&self, pass: &Pass<'_>, x: &Tensor, w: &str, b: &str) -> Result<Tensor> {
        let weights = pass.weights();
        Ok(layer_norm(
            x,
            weights.named(w)?,
            weights.named(b)?,
            self.config.layer_norm_epsilon,
            pass.path(),
        )?)
    }
}

impl Architecture for Gpt2 {
    fn family(&self) -> &str {
        "gpt2"
    }

    fn dims(&self) -> &Dims {
        &self.config.dims
    }

    /// `wte[ids] + wpe[pos]`, with real tokens at positions `past + 0..n` whatever the padding.
    fn embed(&self, pass: &mut Pass<'_>, ids: &Tensor) -> Result<Tensor> {
        let tokens = pass.embedding(ids)?;
        let (b, s, d) = tokens.dims3()?;
        let positions = pass.positions();
        let max = self.config.dims.max_positions;
        if let Some(&p) = positions.iter().find(|&&p| p as usize >= max) {
            return Err(invalid(format!(
                "position {p} is beyond GPT-2's {max} learned positions (n_positions)"
            )));
        }
        let positions = Tensor::new(positions, tokens.device())?;
        let wpe = pass.weights().named(WPE)?;
        let pos = wpe.index_select(&positions, 0)?.reshape((b, s, d))?;
        Ok((tokens + pos)?)
    }

    fn block(&self, pass: &mut Pass<'_>, i: usize, h: Tensor) -> Result<Tensor> {
        let h = pass.act(ActSite::ResidPre(i), h)?;

        let (ln_w, ln_b) = (ln(i, 1, "weight"), ln(i, 1, "bias"));
        let Qkv { q, k, v, shape } =
            pass.qkv(i, &h, self.attention, &|p, x| self.norm(p, x, &ln_w, &ln_b))?;
        let a = pass.attention(i, shape, None, &q, &k, &v)?;
        let a = pass.act(ActSite::AttnZ(i), a)?;
        let (h, a) = pass.keep_slots(i, h, a)?;
        let attn_out = pass.linear(WeightSite::AttnO(i), &a)?;
        let attn_out = pass.act(ActSite::AttnOut(i), attn_out)?;
        let h = (h + attn_out)?;

        let mlp_in = pass.act(ActSite::MlpIn(i), h.clone())?;
        let x = self.norm(pass, &mlp_in, &ln(i, 2, "weight"), &ln(i, 2, "bias"))?;
        let up = pass.linear(WeightSite::MlpUp(i), &x)?;
        let key = gelu_new(&up, pass.path())?;
        let key = pass.act(ActSite::MlpKey(i), key)?;
        let mlp_out = pass.linear(WeightSite::MlpDown(i), &key)?;
        let mlp_out = pass.act(ActSite::MlpOut(i), mlp_out)?;
        let h = (h + mlp_out)?;
        pass.act(ActSite::ResidPost(i), h)
    }

    fn final_norm(&self, pass: &mut Pass<'_>, h: &Tensor) -> Result<Tensor> {
        self.norm(pass, h, LN_F_W, LN_F_B)
    }

    fn to_hf(&self, weights: &WeightStore) -> Result<HfCheckpoint> {
        Ok(HfCheckpoint {
            tensors: to_hf_tensors(&self.config, weights)?,
            config: self.config.hf_config.clone(),
        })
    }
}

/// One checkpoint tensor and where it goes.
enum Piece {
    /// A Conv1D weight `[in, out]` → site `[out, in]`.
    Conv(WeightSite),
    Bias(WeightSite),
    /// The fused `c_attn` `[d, 3d]`: columns q | k | v.
    FusedQkv(usize),
    FusedQkvBias(usize),
    /// Stored as is (`[vocab, d]` embedding, `[vocab, d]` head).
    Site(WeightSite),
    Named(String),
}

/// Every checkpoint tensor (names without prefix), its shape and where it goes.
fn pieces(cfg: &Gpt2Config) -> Vec<(String, Vec<usize>, Piece)> {
    let d = &cfg.dims;
    let (dm, ff) = (d.d_model, d.d_ff);
    let mut out = vec![
        (
            "wte.weight".to_string(),
            vec![d.vocab_size, dm],
            Piece::Site(WeightSite::Embed),
        ),
        (
            "wpe.weight".to_string(),
            vec![d.max_positions, dm],
            Piece::Named(WPE.into()),
        ),
    ];
    for i in 0..d.n_layers {
        let n = |s: &str| format!("h.{i}.{s}");
        out.extend([
            (n("ln_1.weight"), vec![dm], Piece::Named(ln(i, 1, "weight"))),
            (n("ln_1.bias"), vec![dm], Piece::Named(ln(i, 1, "bias"))),
            (
                n("attn.c_attn.weight"),
                vec![dm, 3 * dm],
                Piece::FusedQkv(i),
            ),
            (n("attn.c_attn.bias"), vec![3 * dm], Piece::FusedQkvBias(i)),
            (
                n("attn.c_proj.weight"),
                vec![dm, dm],
                Piece::Conv(WeightSite::AttnO(i)),
            ),
            (
                n("attn.c_proj.bias"),
                vec![dm],
                Piece::Bias(WeightSite::AttnO(i)),
            ),
            (n("ln_2.weight"), vec![dm], Piece::Named(ln(i, 2, "weight"))),
            (n("ln_2.bias"), vec![dm], Piece::Named(ln(i, 2, "bias"))),
            (
                n("mlp.c_fc.weight"),
                vec![dm, ff],
                Piece::Conv(WeightSite::MlpUp(i)),
            ),
            (
                n("mlp.c_fc.bias"),
                vec![ff],
                Piece::Bias(WeightSite::MlpUp(i)),
            ),
            (
                n("mlp.c_proj.weight"),
                vec![ff, dm],
                Piece::Conv(WeightSite::MlpDown(i)),
            ),
            (
                n("mlp.c_proj.bias"),
                vec![dm],
                Piece::Bias(WeightSite::MlpDown(i)),
            ),
        ]);
    }
    out.push(("ln_f.weight".into(), vec![dm], Piece::Named(LN_F_W.into())));
    out.push(("ln_f.bias".into(), vec![dm], Piece::Named(LN_F_B.into())));
    out
}

/// The HF name of a tensor: under the prefix, except the head (`lm_head.weight`).
fn hf_name(cfg: &Gpt2Config, name: &str) -> String {
    format!("{}{name}", cfg.prefix)
}

pub fn load_safetensors(
    cfg: &mut Gpt2Config,
    ckpt: &SafetensorsCheckpoint,
    device: &Device,
) -> Result<WeightStore> {
    cfg.prefix = if ckpt.contains("transformer.wte.weight") {
        "transformer.".into()
    } else if ckpt.contains("wte.weight") {
        String::new()
    } else {
        return Err(crate::error::not_found(format!(
            "tensor 'transformer.wte.weight' (or 'wte.weight') is missing from {}",
            ckpt.path_of("wte.weight").display()
        )));
    };
    // An untied head only when the config says so and the file has one.
    if !cfg.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
        cfg.tie_word_embeddings = true;
    }
    let mut weights = WeightStore::new(cfg.tie_word_embeddings);
    let dm = cfg.dims.d_model;
    for (name, shape, piece) in pieces(cfg) {
        let name = hf_name(cfg, &name);
        let data = ckpt.tensor_f32(&name, &shape)?;
        let t = Tensor::from_vec(data, shape.as_slice(), device)
            .with_context(|| format!("placing '{name}' on {device:?}"))?;
        match piece {
            Piece::Conv(site) => weights.insert_site(site, t.t()?.contiguous()?),
            Piece::Bias(site) => weights.insert_bias(site, t),
            Piece::FusedQkv(i) => {
                let sites = [
                    WeightSite::AttnQ(i),
                    WeightSite::AttnK(i),
                    WeightSite::AttnV(i),
                ];
                for (j, site) in sites.into_iter().enumerate() {
                    weights.insert_site(site, t.narrow(1, j * dm, dm)?.t()?.contiguous()?);
                }
            }
            Piece::FusedQkvBias(i) => {
                let sites = [
                    WeightSite::AttnQ(i),
                    WeightSite::AttnK(i),
                    WeightSite::AttnV(i),
                ];
                for (j, site) in sites.into_iter().enumerate() {
                    weights.insert_bias(site, t.narrow(0, j * dm, dm)?.contiguous()?);
                }
            }
            Piece::Site(site) => weights.insert_site(site, t),
            Piece::Named(n) => weights.insert_named(n, t),
        }
    }
    if !cfg.tie_word_embeddings {
        let shape = [cfg.dims.vocab_size, dm];
        let data = ckpt.tensor_f32("lm_head.weight", &shape)?;
        weights.insert_site(
            WeightSite::LmHead,
            Tensor::from_vec(data, shape.as_slice(), device)?,
        );
    }
    Ok(weights)
}

/// The tensors under their HF names in Conv1D orientation, `c_attn` re-fused, a tied head
/// omitted (as `save_pretrained` writes them).
pub fn to_hf_tensors(cfg: &Gpt2Config, weights: &WeightStore) -> Result<Vec<(String, Tensor)>> {
    let bias = |site: WeightSite| {
        weights
            .bias(site)
            .cloned()
            .ok_or_else(|| invalid(format!("bias of '{site}' is missing")))
    };
    let mut out = Vec::new();
    for (name, _, piece) in pieces(cfg) {
        let t = match piece {
            Piece::Conv(site) => weights.site(site)?.t()?.contiguous()?,
            Piece::Bias(site) => bias(site)?,
            Piece::FusedQkv(i) => {
                let parts = [
                    WeightSite::AttnQ(i),
                    WeightSite::AttnK(i),
                    WeightSite::AttnV(i),
                ]
                .into_iter()
                .map(|s| Ok(weights.site(s)?.t()?))
                .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, 1)?.contiguous()?
            }
            Piece::FusedQkvBias(i) => {
                let parts = [
                    WeightSite::AttnQ(i),
                    WeightSite::AttnK(i),
                    WeightSite::AttnV(i),
                ]
                .into_iter()
                .map(bias)
                .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)?
            }
            Piece::Site(site) => weights.site(site)?.clone(),
            Piece::Named(n) => weights.named(&n)?.clone(),
        };
        out.push((hf_name(cfg, &name), t));
    }
    if !weights.is_tied() {
        out.push((
            "lm_head.weight".into(),
            weights.site(WeightSite::LmHead)?.clone(),
        ));
    }
    Ok(out)
}

/// Opens an HF GPT-2 checkpoint directory (`config.json`, safetensors, and a tokenizer from
/// `tokenizer.json` or from GPT-2's original `encoder.json` + `vocab.bpe`).
pub fn open_hf_dir(dir: &Path, device: &Device) -> Result<Runtime<Gpt2>> {
    let what = || format!("loading GPT-2 checkpoint {}", dir.display());
    let config_file = JsonFile::read(&dir.join("config.json")).with_context(what)?;
    let mut config = Gpt2Config::from_hf(&config_file).with_context(what)?;
    let ckpt = SafetensorsCheckpoint::open_dir(dir).with_context(what)?;
    let weights = load_safetensors(&mut config, &ckpt, device).with_context(what)?;
    let text = TextCodec::from_hf_dir(dir, &config_file).with_context(what)?;
    let source = Source {
        path: dir.to_path_buf(),
        kind: SourceKind::HfDir,
    };
    Ok(Runtime::new(
        Gpt2::new(config),
        weights,
        text,
        source,
        device.clone(),
    ))
}

pub fn open(path: &Path, device: &Device) -> Result<Runtime<Gpt2>> {
    if path.is_dir() {
        open_hf_dir(path, device)
    } else {
        Err(unsupported(format!(
            "{}: GPT-2 loads from an HF checkpoint directory (config.json + safetensors)",
            path.display()
        )))
    }
}

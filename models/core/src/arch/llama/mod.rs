//! LLaMA (and Mistral-style GQA without sliding window): pre-norm blocks with RMSNorm, GQA
//! attention with RoPE, and a SwiGLU MLP.
//!
//! ```text
//! h = h + o(attn(rope(q(n1(h))), rope(k(n1(h))), v(n1(h))))
//! h = h + down(silu(gate(n2(h))) * up(n2(h)))
//! ```

pub mod config;
pub mod weights;

use std::path::Path;

use candle_core::{Device, Tensor};
use kedit_plugin_api::{ActSite, WeightSite};

use self::config::LlamaConfig;
use super::{Architecture, Dims, HfCheckpoint};
use crate::checkpoint::{JsonFile, SafetensorsCheckpoint};
use crate::engine::{AttentionShape, Pass, Qkv};
use crate::error::{Context, Result};
use crate::gguf::GgufFile;
use crate::runtime::{Runtime, Source, SourceKind};
use crate::text::TextCodec;
use crate::weights::WeightStore;

pub struct Llama {
    pub config: LlamaConfig,
    attention: AttentionShape,
    /// Per layer: the names of its two norm weights (built once, not per call).
    norms: Vec<(String, String)>,
    /// Per layer: the names of its q/k head norms (Qwen3), empty otherwise.
    qk_norms: Vec<(String, String)>,
}

impl Llama {
    pub fn new(config: LlamaConfig) -> Self {
        let d = &config.dims;
        Self {
            attention: AttentionShape {
                n_heads: d.n_heads,
                n_kv_heads: d.n_kv_heads,
                head_dim: d.head_dim,
            },
            norms: (0..d.n_layers)
                .map(|i| (weights::attn_norm(i), weights::mlp_norm(i)))
                .collect(),
            qk_norms: if config.qk_norm {
                (0..d.n_layers)
                    .map(|i| (weights::q_norm(i), weights::k_norm(i)))
                    .collect()
            } else {
                Vec::new()
            },
            config,
        }
    }
}

impl Llama {
    /// RMS norm of every head of `x: [batch, seq, heads·head_dim]` over head_dim (Qwen3).
    fn head_norm(&self, pass: &mut Pass<'_>, x: &Tensor, name: &str) -> Result<Tensor> {
        let (b, s, w) = x.dims3()?;
        let hd = self.config.dims.head_dim;
        let heads = x.reshape((b, s, w / hd, hd))?;
        let n = pass.rms_norm(&heads, name, self.config.rms_norm_eps)?;
        Ok(n.reshape((b, s, w))?)
    }
}

impl Architecture for Llama {
    fn family(&self) -> &str {
        self.config.variant.family()
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
        let (q, k) = match self.qk_norms.get(i) {
            Some((qn, kn)) => (self.head_norm(pass, &q, qn)?, self.head_norm(pass, &k, kn)?),
            None => (q, k),
        };
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
        pass.rms_norm(h, weights::FINAL_NORM, self.config.rms_norm_eps)
    }

    fn to_hf(&self, weights: &WeightStore) -> Result<HfCheckpoint> {
        Ok(HfCheckpoint {
            tensors: weights::to_hf_tensors(&self.config, weights)?,
            config: self.config.to_hf_json(),
        })
    }
}

/// Opens an HF checkpoint directory (`config.json`, safetensors, optional tokenizer).
pub fn open_hf_dir(dir: &Path, device: &Device) -> Result<Runtime<Llama>> {
    let what = || format!("loading LLaMA checkpoint {}", dir.display());
    let config_file = JsonFile::read(&dir.join("config.json")).with_context(what)?;
    let config = LlamaConfig::from_hf(&config_file).with_context(what)?;
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

/// Opens a `llama`-architecture GGUF file, dequantising every tensor to f32.
pub fn open_gguf(path: &Path, device: &Device) -> Result<Runtime<Llama>> {
    let what = || format!("loading LLaMA GGUF {}", path.display());
    let gguf = GgufFile::open(path).with_context(what)?;
    let config = LlamaConfig::from_gguf(&gguf).with_context(what)?;
    let weights = weights::load_gguf(&config, &gguf, device).with_context(what)?;
    // A GGUF without tokenizer.ggml.* still works with ids.
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

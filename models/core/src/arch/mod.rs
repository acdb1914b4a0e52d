//! Model families. Each one is a config (from HF `config.json` and from GGUF metadata), a
//! mapping between checkpoint tensor names and canonical sites, and an explicit forward written
//! against [`Pass`], in the style of candle-transformers' model files.

pub mod baichuan;
pub mod chatglm;
pub mod glm;
pub mod gpt2;
pub mod llama;
pub mod qwen;

use candle_core::Tensor;
use kedit_plugin_api::{ActSite, WeightSite};

use crate::engine::Pass;
use crate::error::{invalid, Result};
use crate::weights::WeightStore;

/// The sizes every family shares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dims {
    pub n_layers: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_positions: usize,
}

impl Dims {
    /// Width of the activation at `site`.
    pub fn act_width(&self, site: &ActSite) -> usize {
        match site {
            ActSite::MlpKey(_) => self.d_ff,
            ActSite::AttnZ(_) => self.n_heads * self.head_dim,
            ActSite::HeadIn(_) => self.n_heads * self.d_model,
            _ => self.d_model,
        }
    }

    pub fn check_act_site(&self, site: &ActSite) -> Result<()> {
        match site.layer() {
            Some(l) if l >= self.n_layers => Err(invalid(format!(
                "site '{site}': layer {l} does not exist (the model has {} layers)",
                self.n_layers
            ))),
            _ => Ok(()),
        }
    }

    pub fn check_weight_site(&self, site: &WeightSite) -> Result<()> {
        match site.layer() {
            Some(l) if l >= self.n_layers => Err(invalid(format!(
                "site '{site}': layer {l} does not exist (the model has {} layers)",
                self.n_layers
            ))),
            _ => Ok(()),
        }
    }

    pub fn check_token(&self, what: &str, id: u32) -> Result<()> {
        if id as usize >= self.vocab_size {
            return Err(invalid(format!(
                "{what}: token id {id} is outside the vocabulary of {} tokens",
                self.vocab_size
            )));
        }
        Ok(())
    }
}

/// An HF checkpoint as written by export: tensors under their HF names and orientation, and
/// the `config.json` value.
pub struct HfCheckpoint {
    pub tensors: Vec<(String, Tensor)>,
    pub config: serde_json::Value,
}

/// A model family's network.
pub trait Architecture: Send + Sync + 'static {
    /// The family name the plugin registered (`llama`, ...).
    fn family(&self) -> &str;

    fn dims(&self) -> &Dims;

    /// Input embeddings `[batch, seq, d_model]` of `ids: [batch, seq]`.
    fn embed(&self, pass: &mut Pass<'_>, ids: &Tensor) -> Result<Tensor> {
        pass.embedding(ids)
    }

    /// Block `layer`: takes the residual stream entering it (before the `resid_pre` site) and
    /// returns the stream leaving it (after the `resid_post` site).
    fn block(&self, pass: &mut Pass<'_>, layer: usize, h: Tensor) -> Result<Tensor>;

    /// The final norm (before the `final_norm` site).
    fn final_norm(&self, pass: &mut Pass<'_>, h: &Tensor) -> Result<Tensor>;

    /// Logits of the final-norm output `h: [batch, seq, d_model]`.
    fn lm_head(&self, pass: &mut Pass<'_>, h: &Tensor) -> Result<Tensor> {
        pass.linear(WeightSite::LmHead, h)
    }

    /// The weights under their HF names and the HF `config.json`.
    fn to_hf(&self, weights: &WeightStore) -> Result<HfCheckpoint>;
}

//! Per-head attention inputs: the `layer.{i}.head_in` site, where every head of a block may see
//! its own copy of the residual stream. Knowledge-circuit analysis needs the gradient of a
//! metric with respect to one head's input alone, and a per-head intervention; the heads of a
//! block normally share one input, so when the site is used the block computes q, k and v head
//! by head from that head's own normalised input. With grouped-query attention each query head
//! then gets its own copy of its group's key/value projection (as TransformerLens ungroups
//! them), so that a head's k and v follow its own input.

use candle_core::Tensor;
use kedit_plugin_api::{ActSite, WeightSite};

use super::attention::AttentionShape;
use super::pass::Pass;
use crate::error::Result;

/// The inputs of one attention call.
pub struct Qkv {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// The shape to attend with: key/value heads are ungrouped (one per query head) on the
    /// per-head path.
    pub shape: AttentionShape,
}

/// Normalises `x` (any rank, over the last dimension) with the block's pre-attention norm.
pub type PreNorm<'n> = dyn Fn(&Pass<'_>, &Tensor) -> Result<Tensor> + 'n;

impl Pass<'_> {
    /// q, k and v of block `layer` from the residual `h: [batch, seq, d]` entering it: shared
    /// projections of `norm(h)` as usual, or head by head when `layer.{layer}.head_in` is
    /// intervened on or captured.
    pub fn qkv(
        &mut self,
        layer: usize,
        h: &Tensor,
        shape: AttentionShape,
        norm: &PreNorm<'_>,
    ) -> Result<Qkv> {
        let site = ActSite::HeadIn(layer);
        if !self.touches(&site) {
            let x = norm(self, h)?;
            let [q, k, v] = self.linears(
                [
                    WeightSite::AttnQ(layer),
                    WeightSite::AttnK(layer),
                    WeightSite::AttnV(layer),
                ],
                &x,
            )?;
            return Ok(Qkv { q, k, v, shape });
        }
        self.check_per_head(layer)?;
        let (b, s, d) = h.dims3()?;
        let heads = shape.n_heads;
        let per_head =
            h.unsqueeze(2)?
                .broadcast_as((b, s, heads, d))?
                .reshape((b, s, heads * d))?;
        let per_head = self.act(site, per_head)?.reshape((b, s, heads, d))?;
        let x = norm(self, &per_head)?;
        // [heads, b·s, d]: one matmul per head against that head's rows of each projection.
        let x = x.permute((2, 0, 1, 3))?.reshape((heads, b * s, d))?;
        let group = heads / shape.n_kv_heads;
        let q = self.head_projection(WeightSite::AttnQ(layer), &x, shape, 1, (b, s))?;
        let k = self.head_projection(WeightSite::AttnK(layer), &x, shape, group, (b, s))?;
        let v = self.head_projection(WeightSite::AttnV(layer), &x, shape, group, (b, s))?;
        Ok(Qkv {
            q,
            k,
            v,
            shape: AttentionShape {
                n_kv_heads: heads,
                ..shape
            },
        })
    }

    /// `x: [heads, b·s, d]` through head h's rows of the projection at `site` (rows of head
    /// `h / group`: 1 for queries, the GQA group size for keys and values), plus bias →
    /// `[b, s, heads·head_dim]`.
    fn head_projection(
        &self,
        site: WeightSite,
        x: &Tensor,
        shape: AttentionShape,
        group: usize,
        (b, s): (usize, usize),
    ) -> Result<Tensor> {
        let (heads, hd) = (shape.n_heads, shape.head_dim);
        let w = self.weights().site(site)?;
        let d = w.dim(1)?;
        let owner: Vec<u32> = (0..heads).map(|h| (h / group) as u32).collect();
        let owner = Tensor::new(owner.as_slice(), self.device())?;
        let w = w.reshape((heads / group, hd, d))?.index_select(&owner, 0)?;
        let y = x.matmul(&w.transpose(1, 2)?)?; // [heads, b·s, hd]
        let y = y.reshape((heads, b, s, hd))?.permute((1, 2, 0, 3))?;
        let y = match self.weights().bias(site) {
            Some(bias) => {
                let bias = bias.reshape((heads / group, hd))?.index_select(&owner, 0)?;
                y.broadcast_add(&bias)?
            }
            None => y,
        };
        Ok(y.contiguous()?.reshape((b, s, heads * hd))?)
    }
}

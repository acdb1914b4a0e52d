//! The state of one forward call: which path it takes (fused inference or differentiable), the
//! interventions and captures at activation sites, the taps at linear maps, the modules, the
//! attention mask and RoPE tables, and (when generating) the KV cache. Family forwards talk to
//! the network only through a `Pass`, so every family gets captures, interventions, modules and
//! gradients the same way.

use std::collections::{HashMap, HashSet};

use candle_core::{Device, Tensor, Var};
use kedit_plugin_api::{ActSite, ModuleContext, WeightSite};

use super::attention::{attention, AttentionInputs, AttentionShape};
use super::edits::SiteEdit;
use super::frozen;
use super::kv_cache::KvCache;
use super::layout::RowLayout;
use super::memo::MemoUse;
use super::ops::{self, Path};
use super::rope::{Rope, RopeTables};
use crate::device::to_abi;
use crate::error::{internal, Result};
use crate::modules::ModuleSet;
use crate::weights::WeightStore;

/// What a gradient call returns for a linear map: its input and a zero leaf added to its
/// output, whose gradient is the gradient of the output.
pub struct Tap {
    pub input: Tensor,
    pub output_leaf: Var,
}

/// What a pass leaves behind.
pub struct PassOutputs {
    pub captured: HashMap<ActSite, Tensor>,
    pub taps: HashMap<WeightSite, Tap>,
}

impl PassOutputs {
    /// The captures of `sites`, in that order, as ABI tensors.
    pub fn captures(&self, sites: &[ActSite]) -> Result<Vec<kedit_plugin_api::Tensor>> {
        sites
            .iter()
            .map(|site| {
                let t = self
                    .captured
                    .get(site)
                    .ok_or_else(|| internal(format!("site '{site}' was never reached")))?;
                to_abi(t)
            })
            .collect()
    }

    pub fn tap(&self, site: &WeightSite) -> Result<&Tap> {
        self.taps
            .get(site)
            .ok_or_else(|| internal(format!("site '{site}' was never reached")))
    }
}

pub struct Pass<'a> {
    path: Path,
    weights: &'a WeightStore,
    modules: &'a ModuleSet,
    layout: RowLayout,
    module_context: ModuleContext,
    edits: HashMap<ActSite, SiteEdit>,
    capture: HashSet<ActSite>,
    captured: HashMap<ActSite, Tensor>,
    tap_sites: HashSet<WeightSite>,
    taps: HashMap<WeightSite, Tap>,
    mask: Option<Tensor>,
    query_has_key: Option<Tensor>,
    positions: Vec<u32>,
    rope_tables: Option<(Rope, RopeTables)>,
    cache: Option<&'a mut KvCache>,
    memo: Option<MemoUse<'a>>,
    /// The last block runs its attention output on, and everything after it only at, these
    /// flat `row·seq + position` slots (see [`Pass::keep_slots`]).
    kept_slots: Option<(usize, Tensor)>,
    /// Whether a block gathered the kept slots.
    slots_were_kept: bool,
    device: Device,
}

impl<'a> Pass<'a> {
    pub fn new(
        path: Path,
        weights: &'a WeightStore,
        modules: &'a ModuleSet,
        layout: RowLayout,
        cache: Option<&'a mut KvCache>,
        device: &Device,
    ) -> Result<Self> {
        let generating = cache.is_some();
        Ok(Self {
            path,
            weights,
            modules,
            module_context: layout.module_context(generating),
            mask: layout.attention_mask(device)?,
            query_has_key: layout.query_has_key(device)?,
            positions: layout.positions(),
            layout,
            edits: HashMap::new(),
            capture: HashSet::new(),
            captured: HashMap::new(),
            tap_sites: HashSet::new(),
            taps: HashMap::new(),
            rope_tables: None,
            cache,
            memo: None,
            kept_slots: None,
            slots_were_kept: false,
            device: device.clone(),
        })
    }

    pub fn with_edits(mut self, edits: HashMap<ActSite, SiteEdit>) -> Self {
        self.edits = edits;
        self
    }

    pub fn with_captures(mut self, sites: impl IntoIterator<Item = ActSite>) -> Self {
        self.capture.extend(sites);
        self
    }

    pub fn with_taps(mut self, sites: impl IntoIterator<Item = WeightSite>) -> Self {
        self.tap_sites.extend(sites);
        self
    }

    /// Reuses the products of a prepared batch's earlier calls where their inputs recur (see
    /// [`super::memo`]).
    pub fn with_memo(mut self, memo: MemoUse<'a>) -> Self {
        self.memo = Some(memo);
        self
    }

    /// From the attention output of block `layer` on, computes only the flat `row·seq +
    /// position` slots `slots` (in that order): the caller reads nothing else downstream. Only
    /// for the last block, which no later attention reads, and only when nothing at or after
    /// that point of the block is captured, intervened on, tapped or has a module.
    pub fn with_kept_slots(mut self, layer: usize, slots: Tensor) -> Self {
        self.kept_slots = Some((layer, slots));
        self
    }

    /// Called by every block right after its attention (the `attn_z` site): when this pass
    /// keeps only some slots from block `layer` on, the residual stream `h: [batch, seq, d]`
    /// and the attention output `a: [batch, seq, w]` become `[1, slots, ·]`, so the output
    /// map, the MLP, the final norm and the head run on those slots alone. Exact, since
    /// every later operation is per position. Otherwise returns both unchanged.
    pub fn keep_slots(&mut self, layer: usize, h: Tensor, a: Tensor) -> Result<(Tensor, Tensor)> {
        match &self.kept_slots {
            Some((l, slots)) if *l == layer => {
                let gather = |t: Tensor| -> Result<Tensor> {
                    let (b, s, w) = t.dims3()?;
                    Ok(t.reshape((b * s, w))?
                        .index_select(slots, 0)?
                        .unsqueeze(0)?)
                };
                let kept = (gather(h)?, gather(a)?);
                self.slots_were_kept = true;
                Ok(kept)
            }
            _ => Ok((h, a)),
        }
    }

    /// Whether a block kept only the slots of [`Pass::with_kept_slots`]: the stream leaving
    /// the blocks is then `[1, slots, d]`, in the slots' order.
    pub fn slots_were_kept(&self) -> bool {
        self.slots_were_kept
    }

    pub fn path(&self) -> Path {
        self.path
    }

    pub fn layout(&self) -> &RowLayout {
        &self.layout
    }

    pub fn weights(&self) -> &WeightStore {
        self.weights
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Position of every slot of this call, row-major: `past + i` for real token i of a row,
    /// 0 for pads (learned position embeddings read them).
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    /// Whether this call intervenes on or captures `site`.
    pub fn touches(&self, site: &ActSite) -> bool {
        self.edits.contains_key(site) || self.capture.contains(site)
    }

    /// The per-head q/k/v path of block `layer` computes the projections itself, so it cannot
    /// honour what only [`Pass::linear`] applies: modules and gradient taps at `attn.{q,k,v}`,
    /// and the KV cache (whose key/value heads stay grouped).
    pub fn check_per_head(&self, layer: usize) -> Result<()> {
        let what = format!("site 'layer.{layer}.head_in'");
        if self.cache.is_some() {
            return Err(crate::error::invalid(format!(
                "{what} cannot be used with a KV cache or a prepared prefix"
            )));
        }
        for site in [
            WeightSite::AttnQ(layer),
            WeightSite::AttnK(layer),
            WeightSite::AttnV(layer),
        ] {
            if self.modules.has_site(site) || self.tap_sites.contains(&site) {
                return Err(crate::error::invalid(format!(
                    "{what} cannot be combined with a module or a site gradient at '{site}'"
                )));
            }
        }
        Ok(())
    }

    /// Passes `h` through activation site `site`: applies its interventions, then records it if
    /// captured.
    pub fn act(&mut self, site: ActSite, h: Tensor) -> Result<Tensor> {
        let h = match self.edits.get(&site) {
            Some(edit) => edit.apply(&h)?,
            None => h,
        };
        if self.capture.contains(&site) {
            self.captured.insert(site, h.detach());
        }
        Ok(h)
    }

    /// The linear map at `site` applied to `x: [batch, seq, in]`: `x·Wᵀ (+ b)` with a frozen
    /// weight, then any installed modules, then (for a gradient tap) a zero leaf whose gradient
    /// is the output gradient.
    pub fn linear(&mut self, site: WeightSite, x: &Tensor) -> Result<Tensor> {
        let w = self.weights.site(site)?;
        self.linear_with(site, x, w)
    }

    /// [`Pass::linear`] with `w` applied in place of the stored weight of `site` (bias, modules
    /// and taps stay those of `site`): for a family whose forward applies a weight derived from
    /// the stored one, such as Baichuan2's row-normalised head.
    pub fn linear_with(&mut self, site: WeightSite, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let y = match self.memo {
            Some(memo) => memo.product(site, x, || Ok(frozen::linear(x, w)?))?,
            None => frozen::linear(x, w)?,
        };
        self.finish_linear(site, x, y)
    }

    /// [`Pass::linear`] at several sites that read the same `x` (q, k and v; gate and up). A
    /// decode step streams their weights in one parallel section, which matters for the small
    /// projections of small models; otherwise, and always with the same values, one
    /// [`Pass::linear`] each.
    pub fn linears<const N: usize>(
        &mut self,
        sites: [WeightSite; N],
        x: &Tensor,
    ) -> Result<[Tensor; N]> {
        let mut ws = Vec::with_capacity(N);
        for site in sites {
            ws.push(self.weights.site(site)?);
        }
        let products = frozen::skinny_linears(x, &ws)?;
        let mut out = Vec::with_capacity(N);
        match products {
            Some(ys) => {
                for (site, y) in sites.into_iter().zip(ys) {
                    out.push(self.finish_linear(site, x, y)?);
                }
            }
            None => {
                for site in sites {
                    out.push(self.linear(site, x)?);
                }
            }
        }
        Ok(out
            .try_into()
            .unwrap_or_else(|_| unreachable!("one output per site")))
    }

    /// Bias, modules and gradient tap of `site`, after its product `y = x·Wᵀ`.
    fn finish_linear(&mut self, site: WeightSite, x: &Tensor, mut y: Tensor) -> Result<Tensor> {
        if let Some(b) = self.weights.bias(site) {
            y = y.broadcast_add(b)?;
        }
        if self.modules.has_site(site) {
            y = self.modules.apply(site, x, y, &self.module_context)?;
        }
        if self.tap_sites.contains(&site) {
            let leaf = Var::zeros(y.shape(), y.dtype(), &self.device)?;
            y = (y + leaf.as_tensor())?;
            self.taps.insert(
                site,
                Tap {
                    input: x.detach(),
                    output_leaf: leaf,
                },
            );
        }
        Ok(y)
    }

    /// Token embeddings of `ids: [batch, seq]` from the `embed.weight` site.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        let table = self.weights.site(WeightSite::Embed)?;
        let (b, s) = ids.dims2()?;
        let d = table.dim(1)?;
        Ok(table
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, s, d))?)
    }

    /// RMS norm with the family weight `name`.
    pub fn rms_norm(&self, x: &Tensor, name: &str, eps: f64) -> Result<Tensor> {
        let w = self.weights.named(name)?;
        Ok(ops::rms_norm(x, w, eps, self.path)?)
    }

    /// Causal self-attention of layer `layer` with this call's mask, RoPE and cache.
    pub fn attention(
        &mut self,
        layer: usize,
        shape: AttentionShape,
        rope: Option<&Rope>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        self.attention_with_bias(layer, shape, rope, None, q, k, v)
    }

    /// [`Pass::attention`] with an additive score bias (ALiBi), broadcast to
    /// `[batch, heads, seq, past + seq]` and added before the mask.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_with_bias(
        &mut self,
        layer: usize,
        shape: AttentionShape,
        rope: Option<&Rope>,
        score_bias: Option<&Tensor>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        if let Some(rope) = rope {
            let stale = !matches!(&self.rope_tables, Some((r, _)) if r == rope);
            if stale {
                let tables = rope.tables(
                    &self.positions,
                    self.layout.batch,
                    self.layout.seq,
                    &self.device,
                )?;
                self.rope_tables = Some((rope.clone(), tables));
            }
        }
        let inputs = AttentionInputs {
            rope: rope.and(self.rope_tables.as_ref().map(|(r, t)| (r, t))),
            mask: self.mask.as_ref(),
            query_has_key: self.query_has_key.as_ref(),
            score_bias,
            path: self.path,
        };
        let cache = self.cache.as_deref_mut().map(|c| (c, layer));
        let (out, probs) = attention(shape, q, k, v, &inputs, cache)?;
        let site = ActSite::AttnProbs(layer);
        if self.capture.contains(&site) {
            // [batch, heads, seq, keys] → [batch, seq, heads·keys], as captures are laid out.
            let (b, h, s, keys) = probs.dims4()?;
            let probs = probs
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, s, h * keys))?;
            self.captured.insert(site, probs.detach());
        }
        Ok(out)
    }

    /// Marks that this call's tokens went through every layer (generation).
    pub fn finish(mut self) -> PassOutputs {
        if let Some(cache) = self.cache.as_deref_mut() {
            cache.advance(self.layout.seq);
        }
        PassOutputs {
            captured: self.captured,
            taps: self.taps,
        }
    }
}

//! Interventions (add or replace a vector at a site, row and position) and embedding noise,
//! validated once per request and applied as differentiable tensor operations.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Tensor};
use kedit_plugin_api::{ActSite, ForwardRequest, InterventionMode};

use super::layout::RowLayout;
use crate::arch::Dims;
use crate::device::from_abi;
use crate::error::{invalid, Result};

/// Where an intervention's vector comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VectorSource {
    /// The request's `value`, stored in [`InterventionPlan::fixed`].
    Fixed(usize),
    /// A request parameter, whose gradient a gradient call returns.
    Param(usize),
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub row: usize,
    pub pos: usize,
    pub mode: InterventionMode,
    pub source: VectorSource,
}

/// The validated interventions of one request, grouped by site in request order.
pub struct InterventionPlan {
    pub by_site: BTreeMap<ActSite, Vec<Entry>>,
    fixed: Vec<Tensor>,
}

impl InterventionPlan {
    pub fn parse(
        request: &ForwardRequest,
        layout: &RowLayout,
        dims: &Dims,
        device: &Device,
    ) -> Result<Self> {
        let mut by_site: BTreeMap<ActSite, Vec<Entry>> = BTreeMap::new();
        let mut fixed = Vec::new();
        let mut param_width: HashMap<usize, (usize, ActSite)> = HashMap::new();
        for (k, iv) in request.interventions.iter().enumerate() {
            let what = format!("intervention {k} at '{}'", iv.site);
            let site: ActSite = iv.site.parse()?;
            dims.check_act_site(&site)?;
            if let ActSite::AttnProbs(_) = site {
                return Err(invalid(format!(
                    "{what}: attention probabilities can only be captured"
                )));
            }
            let (row, pos) = (iv.row as usize, iv.position as usize);
            layout.check_slot(&what, row, pos)?;
            let width = dims.act_width(&site);
            let source = match (iv.value.as_ref().into_option(), iv.param.into_option()) {
                (Some(v), None) => {
                    fixed.push(from_abi(v, device, &what, Some(&[width]))?);
                    VectorSource::Fixed(fixed.len() - 1)
                }
                (None, Some(p)) => {
                    let p = p as usize;
                    let param = request.params.get(p).ok_or_else(|| {
                        invalid(format!(
                            "{what}: parameter {p} does not exist (the request has {})",
                            request.params.len()
                        ))
                    })?;
                    param.expect_shape(&format!("{what}: parameter {p}"), &[width])?;
                    if let Some((w, other)) = param_width.insert(p, (width, site)) {
                        if w != width {
                            return Err(invalid(format!(
                                "{what}: parameter {p} is also used at '{other}', which has width {w}"
                            )));
                        }
                    }
                    VectorSource::Param(p)
                }
                _ => {
                    return Err(invalid(format!(
                        "{what}: give exactly one of `value` and `param`"
                    )))
                }
            };
            by_site.entry(site).or_default().push(Entry {
                row,
                pos,
                mode: iv.mode,
                source,
            });
        }
        Ok(Self { by_site, fixed })
    }

    pub fn is_empty(&self) -> bool {
        self.by_site.is_empty()
    }

    /// The earliest position any intervention touches in each of `rows` rows (`None` for a row
    /// without one).
    pub fn first_positions(&self, rows: usize) -> Vec<Option<usize>> {
        let mut first = vec![None; rows];
        for e in self.by_site.values().flatten() {
            let f: &mut Option<usize> = &mut first[e.row];
            *f = Some(f.map_or(e.pos, |p| p.min(e.pos)));
        }
        first
    }

    /// Moves every intervention of row r `shift[r]` positions to the left (for a call that
    /// starts after a cached prefix). Every position must lie at or after its row's shift.
    pub fn shift_left(&mut self, shift: &[usize]) {
        for e in self.by_site.values_mut().flatten() {
            debug_assert!(e.pos >= shift[e.row]);
            e.pos -= shift[e.row];
        }
    }

    /// Builds the per-site edits with `params` as the tensors of the request's parameters
    /// (plain tensors for inference, variables for a gradient).
    pub fn materialize(
        &self,
        params: &[Tensor],
        layout: &RowLayout,
        device: &Device,
    ) -> Result<HashMap<ActSite, SiteEdit>> {
        let mut out = HashMap::new();
        for (site, entries) in &self.by_site {
            let vectors: Vec<Tensor> = entries
                .iter()
                .map(|e| match e.source {
                    VectorSource::Fixed(i) => self.fixed[i].clone(),
                    VectorSource::Param(p) => params[p].clone(),
                })
                .collect();
            out.insert(*site, SiteEdit::new(entries, vectors, layout, device)?);
        }
        Ok(out)
    }
}

/// All interventions at one site as `h · keep + A · V`: `keep` zeroes replaced slots, `A`
/// (`[batch·seq, K]`, entries 0/1) places each of the K vectors `V` at its slot. One matmul
/// instead of K scatters, differentiable in both `h` and `V`, and exact (only 0/1 products).
pub struct SiteEdit {
    keep: Option<Tensor>,
    placement: Tensor,
    vectors: Vec<Tensor>,
}

impl SiteEdit {
    fn new(
        entries: &[Entry],
        vectors: Vec<Tensor>,
        layout: &RowLayout,
        device: &Device,
    ) -> Result<Self> {
        let slots = layout.batch * layout.seq;
        let k = entries.len();
        // Per slot, in request order: a replace discards the original and everything placed
        // before it; an add accumulates.
        let mut keep = vec![1f32; slots];
        let mut contributions: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            let slot = e.row * layout.seq + e.pos;
            let list = contributions.entry(slot).or_default();
            if e.mode == InterventionMode::Replace {
                keep[slot] = 0.0;
                list.clear();
            }
            list.push(i);
        }
        let mut placement = vec![0f32; slots * k];
        for (slot, list) in &contributions {
            for &i in list {
                placement[slot * k + i] += 1.0;
            }
        }
        let any_replaced = keep.contains(&0.0);
        Ok(Self {
            keep: if any_replaced {
                Some(Tensor::from_vec(
                    keep,
                    (layout.batch, layout.seq, 1),
                    device,
                )?)
            } else {
                None
            },
            placement: Tensor::from_vec(placement, (slots, k), device)?,
            vectors,
        })
    }

    /// Applies the edits to `h: [batch, seq, width]`.
    pub fn apply(&self, h: &Tensor) -> Result<Tensor> {
        let (b, s, w) = h.dims3()?;
        let v = Tensor::stack(&self.vectors, 0)?;
        let delta = self.placement.matmul(&v)?.reshape((b, s, w))?;
        let kept = match &self.keep {
            Some(keep) => h.broadcast_mul(keep)?,
            None => h.clone(),
        };
        Ok((kept + delta)?)
    }
}

/// Seeded Gaussian noise for the input embeddings, `[batch, seq, d_model]`, or `None`.
pub fn embedding_noise(
    request: &ForwardRequest,
    layout: &RowLayout,
    d_model: usize,
    device: &Device,
) -> Result<Option<Tensor>> {
    if request.noise.is_empty() {
        return Ok(None);
    }
    let mut buf = vec![0f32; layout.batch * layout.seq * d_model];
    for (k, n) in request.noise.iter().enumerate() {
        let (row, start, end) = (n.row as usize, n.start as usize, n.end as usize);
        let what = format!("noise {k}");
        if start >= end {
            return Err(invalid(format!(
                "{what}: empty position range {start}..{end}"
            )));
        }
        layout.check_slot(&what, row, end - 1)?;
        if !n.scale.is_finite() {
            return Err(invalid(format!("{what}: scale {} is not finite", n.scale)));
        }
        let values = kedit_plugin_api::noise::gaussian(n.seed, (end - start) * d_model, n.scale);
        let base = (row * layout.seq + start) * d_model;
        for (dst, v) in buf[base..base + values.len()].iter_mut().zip(values) {
            *dst += v;
        }
    }
    Ok(Some(Tensor::from_vec(
        buf,
        (layout.batch, layout.seq, d_model),
        device,
    )?))
}

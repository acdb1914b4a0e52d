//! Frozen prefixes of a prepared batch.
//!
//! Attention is causal, so the positions of a row before its first intervention cannot see
//! that intervention: while no weight changes, their keys and values at every layer are the
//! same in every gradient call. The first call that can use this computes, once, each row's
//! prefix through every layer (keys and values kept) and the residual stream of the remaining
//! positions entering the prepared layer; later calls run only the remaining positions from
//! the prepared layer on, attending over the cached prefix. ROME's v* optimisation, whose
//! δ sits at the subject's last token, thus runs a few positions per template row instead of
//! the whole row.

use std::sync::Arc;

use candle_core::Tensor;
use kedit_plugin_api::{GradRequest, LogitsWanted};

use super::{Prepared, Runtime, Start};
use crate::arch::Architecture;
use crate::engine::edits::InterventionPlan;
use crate::engine::kv_cache::KvCache;
use crate::engine::layout::RowLayout;
use crate::engine::{Pass, Path};
use crate::error::Result;

pub(super) struct FrozenPrefix {
    /// Per row: how many leading positions are frozen.
    pub cuts: Vec<usize>,
    /// Keys and values of the frozen positions at every layer, rows left-aligned to the
    /// longest prefix.
    pub cache: KvCache,
    /// The layout of the remaining positions: right-padded, continuing `cache`.
    pub layout: RowLayout,
    /// Their residual stream entering the prepared layer.
    pub resid: Tensor,
    /// [`super::Epochs::total`] when built: any later weight or module change invalidates it.
    epoch: u64,
}

/// What a prepared handle knows about frozen prefixes.
#[derive(Default)]
pub(super) enum FrozenState {
    #[default]
    Unused,
    Ready(Arc<FrozenPrefix>),
    /// A weight changed while the prefix was in use: this caller edits between calls, so
    /// rebuilding at every call would cost more than it saves.
    Disabled,
}

impl<A: Architecture> Runtime<A> {
    /// Per row, the positions a gradient call on a prepared batch can take as frozen: those
    /// before the row's first intervention, first loss slot and (for `Last` logits) last token.
    /// `None` when the call needs whole rows (captures, site gradients, all logits, installed
    /// modules, which may look at whole rows, or a left-padded batch) or nothing is frozen.
    pub(super) fn frozen_prefix_cuts(
        &self,
        req: &GradRequest,
        plan: &InterventionPlan,
        layout: &RowLayout,
        loss_positions: &[(usize, usize)],
    ) -> Option<Vec<usize>> {
        let fwd = &req.forward;
        if !self.modules.is_empty()
            || !fwd.captures.is_empty()
            || !req.site_grads.is_empty()
            || !fwd.noise.is_empty()
            || fwd.logits == LogitsWanted::All
            || layout.offsets.iter().any(|&o| o > 0)
        {
            return None;
        }
        let mut cuts: Vec<usize> = layout.lengths.iter().map(|&n| n - 1).collect();
        for (r, first) in plan.first_positions(layout.batch).into_iter().enumerate() {
            if let Some(p) = first {
                cuts[r] = cuts[r].min(p);
            }
        }
        for &(r, p) in loss_positions {
            cuts[r] = cuts[r].min(p);
        }
        (cuts.iter().any(|&c| c > 0)).then_some(cuts)
    }

    /// The frozen prefix of `prepared` for `cuts`, built now if it is missing, made for other
    /// cuts or stale; `None` once the handle has seen its weights change.
    pub(super) fn frozen_prefix(
        &self,
        prepared: &Prepared,
        cuts: Vec<usize>,
    ) -> Result<Option<Arc<FrozenPrefix>>> {
        let mut state = prepared
            .frozen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match &*state {
            FrozenState::Disabled => return Ok(None),
            FrozenState::Ready(f) if f.epoch != self.epochs.total() => {
                *state = FrozenState::Disabled;
                return Ok(None);
            }
            FrozenState::Ready(f) if f.cuts == cuts => return Ok(Some(f.clone())),
            _ => {}
        }
        let built = Arc::new(self.build_frozen_prefix(prepared, cuts)?);
        *state = FrozenState::Ready(built.clone());
        Ok(Some(built))
    }

    fn build_frozen_prefix(&self, prepared: &Prepared, cuts: Vec<usize>) -> Result<FrozenPrefix> {
        let n_layers = self.arch.dims().n_layers;
        let pad = self.pad_id();
        let rows = &prepared.batch.rows;

        let prefix_layout = RowLayout::left_aligned(cuts.clone());
        let width = prefix_layout.seq;
        let heads: Vec<&[u32]> = rows.iter().zip(&cuts).map(|(r, &c)| &r[..c]).collect();
        let ids = prefix_layout.place_ids(&heads, pad, &self.device)?;
        let mut cache = KvCache::new(n_layers);
        {
            let mut pass = Pass::new(
                Path::Gradient,
                &self.weights,
                &self.modules,
                prefix_layout,
                Some(&mut cache),
                &self.device,
            )?;
            let start = Start::Embeddings { ids, noise: None };
            self.run_blocks(&mut pass, start, n_layers)?;
            pass.finish();
        }

        let layout = RowLayout::continuing(
            rows.iter().zip(&cuts).map(|(r, &c)| r.len() - c).collect(),
            width,
            cuts.iter().map(|&c| width - c).collect(),
        );
        let tails: Vec<&[u32]> = rows.iter().zip(&cuts).map(|(r, &c)| &r[c..]).collect();
        let ids = layout.place_ids(&tails, pad, &self.device)?;
        // The layers below the prepared one append to a scratch copy of the cache.
        let mut scratch = cache.clone();
        let resid = {
            let mut pass = Pass::new(
                Path::Gradient,
                &self.weights,
                &self.modules,
                layout.clone(),
                Some(&mut scratch),
                &self.device,
            )?;
            let start = Start::Embeddings { ids, noise: None };
            self.run_blocks(&mut pass, start, prepared.from_layer)?
                .detach()
        };
        Ok(FrozenPrefix {
            cuts,
            cache,
            layout,
            resid,
            epoch: self.epochs.total(),
        })
    }
}

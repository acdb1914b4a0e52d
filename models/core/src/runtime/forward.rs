//! Forward calls: captures, interventions, noise and logits over a padded batch.

use candle_core::Tensor;
use kedit_plugin_api::{ActSite, ForwardOutput, ForwardRequest, LogitsWanted, WeightSite};

use super::{Runtime, Start};
use crate::arch::Architecture;
use crate::device::{from_abi, to_abi};
use crate::engine::edits::{embedding_noise, InterventionPlan};
use crate::engine::layout::RowLayout;
use crate::engine::{Pass, Path};
use crate::error::Result;

/// A forward request checked against the model.
pub(super) struct ParsedForward {
    pub layout: RowLayout,
    pub ids: Tensor,
    pub captures: Vec<ActSite>,
    pub plan: InterventionPlan,
    pub noise: Option<Tensor>,
}

impl<A: Architecture> Runtime<A> {
    pub(super) fn parse_forward(&self, req: &ForwardRequest) -> Result<ParsedForward> {
        let dims = self.arch.dims();
        let layout = RowLayout::of_batch(&req.batch)?;
        for (r, row) in req.batch.rows.iter().enumerate() {
            for &id in row.iter() {
                dims.check_token(&format!("batch row {r}"), id)?;
            }
        }
        let pad = self.pad_id();
        let ids = layout.ids(&req.batch, pad, &self.device)?;
        let captures = req
            .captures
            .iter()
            .map(|s| {
                let site: ActSite = s.parse()?;
                dims.check_act_site(&site)?;
                Ok(site)
            })
            .collect::<Result<Vec<_>>>()?;
        let plan = InterventionPlan::parse(req, &layout, dims, &self.device)?;
        let noise = embedding_noise(req, &layout, dims.d_model, &self.device)?;
        Ok(ParsedForward {
            layout,
            ids,
            captures,
            plan,
            noise,
        })
    }

    /// Logits of the final-norm output `hn: [batch, seq, d]` as `wanted`. For `Last`, only the
    /// last real position of each row goes through the head (unless a module sits on the head
    /// and must see the whole batch).
    pub(super) fn logits(
        &self,
        pass: &mut Pass<'_>,
        hn: &Tensor,
        wanted: LogitsWanted,
    ) -> Result<Option<Tensor>> {
        let layout = pass.layout().clone();
        match wanted {
            LogitsWanted::None => Ok(None),
            LogitsWanted::All => Ok(Some(self.arch.lm_head(pass, hn)?)),
            LogitsWanted::Last => {
                let (b, s, d) = hn.dims3()?;
                let rows = Tensor::new(layout.last_slots().as_slice(), hn.device())?;
                if self.modules.has_site(WeightSite::LmHead) {
                    let all = self.arch.lm_head(pass, hn)?;
                    let v = all.dim(2)?;
                    return Ok(Some(all.reshape((b * s, v))?.index_select(&rows, 0)?));
                }
                let last = hn
                    .reshape((b * s, d))?
                    .index_select(&rows, 0)?
                    .unsqueeze(1)?;
                Ok(Some(self.arch.lm_head(pass, &last)?.squeeze(1)?))
            }
        }
    }

    pub(super) fn forward_impl(&self, req: &ForwardRequest) -> Result<ForwardOutput> {
        let parsed = self.parse_forward(req)?;
        let params = req
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| from_abi(p, &self.device, &format!("parameter {i}"), None))
            .collect::<Result<Vec<_>>>()?;
        let edits = parsed
            .plan
            .materialize(&params, &parsed.layout, &self.device)?;
        let n_layers = self.arch.dims().n_layers;
        let wants_final =
            req.logits != LogitsWanted::None || parsed.captures.contains(&ActSite::FinalNorm);
        // Without logits, stop after the last layer anything looks at (causal tracing captures
        // early layers many times); modules must still see every layer.
        let end = if wants_final || !self.modules.is_empty() {
            n_layers
        } else {
            parsed
                .captures
                .iter()
                .chain(parsed.plan.by_site.keys())
                .filter_map(|s| s.layer())
                .map(|l| l + 1)
                .max()
                .unwrap_or(0)
        };

        let mut pass = Pass::new(
            Path::Inference,
            &self.weights,
            &self.modules,
            parsed.layout.clone(),
            None,
            &self.device,
        )?
        .with_edits(edits)
        .with_captures(parsed.captures.iter().copied());
        let start = Start::Embeddings {
            ids: parsed.ids,
            noise: parsed.noise,
        };
        let h = self.run_blocks(&mut pass, start, end)?;
        let logits = if wants_final {
            let hn = self.arch.final_norm(&mut pass, &h)?;
            let hn = pass.act(ActSite::FinalNorm, hn)?;
            self.logits(&mut pass, &hn, req.logits)?
        } else {
            None
        };
        let captures = pass.finish().captures(&parsed.captures)?;
        Ok(ForwardOutput {
            logits: logits.map(|l| to_abi(&l)).transpose()?.into(),
            captures: captures.into(),
        })
    }
}

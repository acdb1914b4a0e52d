//! Gradients of editor-described losses, and prepared batches.
//!
//! The loss is `Σ wₙ·(−log p(token)) + Σ w_k·KL(ref ‖ p)` at chosen (row, position) slots. Only
//! those slots go through the LM head. The tracked part of the loss is one contraction
//! `−Σ C ⊙ log p` with a constant coefficient matrix `C` (NLL weights at the target tokens,
//! `w·exp(ref)` for KL terms); the constant `Σ w·exp(ref)·ref` of the KL terms and the reported
//! values are computed on the host in f64.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use candle_core::{Tensor, Var};
use kedit_plugin_api::{
    ActSite, Batch, ForwardOutput, GradOutput, GradRequest, LogitsWanted, SiteGrad, WeightSite,
};

use super::{Prepared, Runtime, Start};
use crate::arch::Architecture;
use crate::device::{from_abi, to_abi};
use crate::engine::edits::SiteEdit;
use crate::engine::kv_cache::KvCache;
use crate::engine::layout::RowLayout;
use crate::engine::loss::{contracted_log_softmax, SlotLogProbs};
use crate::engine::memo::{MemoUse, ProductMemo};
use crate::engine::{Pass, Path};
use crate::error::{invalid, not_found, numeric, Result};

/// The loss terms gathered per distinct slot.
struct LossPlan {
    /// Flat `row·seq + position` of each distinct slot, in order of first use.
    slots: Vec<u32>,
    /// For each NLL term: (slot index, token, weight).
    nll: Vec<(usize, u32, f32)>,
    /// For each KL term: (slot index, reference log-probabilities, weight).
    kl: Vec<(usize, Vec<f32>, f32)>,
}

impl LossPlan {
    fn parse(req: &GradRequest, layout: &RowLayout, vocab: usize) -> Result<Self> {
        let mut slots = Vec::new();
        let mut index: HashMap<u32, usize> = HashMap::new();
        // Names are formatted only for errors: a KL written as NLL terms has one per token.
        let mut slot_of = |row: u32, pos: u32, what: &dyn Fn() -> String| -> Result<usize> {
            if row as usize >= layout.batch || pos as usize >= layout.seq {
                layout.check_slot(&what(), row as usize, pos as usize)?;
            }
            let flat = row * layout.seq as u32 + pos;
            Ok(*index.entry(flat).or_insert_with(|| {
                slots.push(flat);
                slots.len() - 1
            }))
        };
        let mut nll = Vec::new();
        for (i, t) in req.nll.iter().enumerate() {
            let what = || format!("nll term {i}");
            if t.token as usize >= vocab {
                return Err(invalid(format!(
                    "{}: token {} is outside the vocabulary of {vocab}",
                    what(),
                    t.token
                )));
            }
            if !t.weight.is_finite() {
                return Err(invalid(format!(
                    "{}: weight {} is not finite",
                    what(),
                    t.weight
                )));
            }
            nll.push((slot_of(t.row, t.position, &what)?, t.token, t.weight));
        }
        let mut kl = Vec::new();
        for (i, t) in req.kl.iter().enumerate() {
            let what = format!("kl term {i}");
            t.ref_logprobs
                .expect_shape(&format!("{what}: ref_logprobs"), &[vocab])?;
            if t.ref_logprobs
                .as_slice()
                .iter()
                .any(|v| v.is_nan() || *v == f32::INFINITY)
            {
                return Err(invalid(format!("{what}: ref_logprobs hold NaN or +inf")));
            }
            if !t.weight.is_finite() {
                return Err(invalid(format!(
                    "{what}: weight {} is not finite",
                    t.weight
                )));
            }
            let slot = slot_of(t.row, t.position, &|| what.clone())?;
            kl.push((slot, t.ref_logprobs.as_slice().to_vec(), t.weight));
        }
        Ok(Self { slots, nll, kl })
    }

    /// (row, position) of every slot.
    fn positions(&self, seq: usize) -> Vec<(usize, usize)> {
        self.slots
            .iter()
            .map(|&f| (f as usize / seq, f as usize % seq))
            .collect()
    }

    /// Moves row r's slots `shift[r]` positions left, into a call of `new_seq` positions.
    fn shift_left(&mut self, shift: &[usize], seq: usize, new_seq: usize) {
        for f in self.slots.iter_mut() {
            let (r, p) = (*f as usize / seq, *f as usize % seq);
            *f = (r * new_seq + p - shift[r]) as u32;
        }
    }

    /// `C` as a host buffer `[slots, vocab]`.
    fn coefficients(&self, vocab: usize) -> Vec<f32> {
        let mut c = vec![0f32; self.slots.len() * vocab];
        for &(k, token, w) in &self.nll {
            c[k * vocab + token as usize] += w;
        }
        for (k, reference, w) in &self.kl {
            let row = &mut c[k * vocab..(k + 1) * vocab];
            for (c, &r) in row.iter_mut().zip(reference) {
                *c += w * r.exp();
            }
        }
        c
    }

    /// (nll, kl, per-term log-probabilities) from the slots' log-probabilities.
    fn values(&self, logp: &SlotLogProbs) -> (f64, f64, Vec<f32>) {
        let mut nll = 0f64;
        let mut logprobs = Vec::with_capacity(self.nll.len());
        for &(k, token, w) in &self.nll {
            let lp = logp.get(k, token as usize);
            logprobs.push(lp);
            nll -= w as f64 * lp as f64;
        }
        let mut kl = 0f64;
        for (k, reference, w) in &self.kl {
            let term: f64 = reference
                .iter()
                .zip(logp.row(*k))
                .filter(|(r, _)| r.is_finite())
                .map(|(&r, lp)| (r as f64).exp() * (r as f64 - lp as f64))
                .sum();
            kl += *w as f64 * term;
        }
        (nll, kl, logprobs)
    }
}

/// One differentiable pass: where it starts, what it changes and records, and its loss.
struct GradientPass<'a> {
    layout: RowLayout,
    start: Start,
    edits: HashMap<ActSite, SiteEdit>,
    captures: Vec<ActSite>,
    taps: Vec<WeightSite>,
    loss_plan: LossPlan,
    /// Keys and values of frozen prefixes the pass continues.
    cache: Option<KvCache>,
    /// The prepared batch's kept products, and its layer.
    memo: Option<(&'a ProductMemo, usize)>,
}

/// Whether `site` lies below a prepared layer (computed once, so it cannot be changed).
fn act_below(site: &ActSite, layer: usize) -> bool {
    match site {
        ActSite::Embed => true,
        ActSite::FinalNorm => false,
        s => s.layer().is_some_and(|l| l < layer),
    }
}

impl<A: Architecture> Runtime<A> {
    pub(super) fn prepare_impl(&mut self, batch: &Batch, from_layer: usize) -> Result<u64> {
        let n_layers = self.arch.dims().n_layers;
        if from_layer > n_layers {
            return Err(invalid(format!(
                "prepare: layer {from_layer} does not exist (the model has {n_layers} layers)"
            )));
        }
        let request = kedit_plugin_api::ForwardRequest::new(batch.clone(), LogitsWanted::None);
        let parsed = self.parse_forward(&request)?;
        // The gradient path's own kernels, so that prepared and unprepared gradients agree
        // bit for bit; nothing is tracked because no variable takes part.
        let mut pass = Pass::new(
            Path::Gradient,
            &self.weights,
            &self.modules,
            parsed.layout,
            None,
            &self.device,
        )?;
        let start = Start::Embeddings {
            ids: parsed.ids,
            noise: None,
        };
        let resid = self.run_blocks(&mut pass, start, from_layer)?.detach();
        self.next_handle += 1;
        let handle = self.next_handle;
        self.prepared.insert(
            handle,
            Prepared {
                batch: batch.clone(),
                from_layer,
                resid,
                epoch: self.epochs.below(from_layer),
                frozen: Default::default(),
                products: Default::default(),
            },
        );
        Ok(handle)
    }

    pub(super) fn release_impl(&mut self, handle: u64) -> Result<()> {
        self.prepared
            .remove(&handle)
            .map(|_| ())
            .ok_or_else(|| not_found(format!("no prepared batch has handle {handle}")))
    }

    /// The prepared start for `handle`, after checking that the request fits it.
    fn prepared_start(
        &self,
        handle: u64,
        req: &GradRequest,
        taps: &[WeightSite],
        captures: &[ActSite],
    ) -> Result<Start> {
        let p = self
            .prepared
            .get(&handle)
            .ok_or_else(|| not_found(format!("no prepared batch has handle {handle}")))?;
        let layer = p.from_layer;
        if p.batch != req.forward.batch {
            return Err(invalid(format!(
                "prepared handle {handle} was made for a different batch"
            )));
        }
        if p.epoch != self.epochs.below(layer) {
            return Err(invalid(format!(
                "prepared handle {handle} is stale: a weight or module below layer {layer} \
                 changed since it was prepared; prepare the batch again"
            )));
        }
        let below = |what: String| {
            invalid(format!(
                "{what} lies below layer {layer}, which handle {handle} computed once; \
                 prepare from a lower layer"
            ))
        };
        for iv in req.forward.interventions.iter() {
            let site: ActSite = iv.site.parse()?;
            if act_below(&site, layer) {
                return Err(below(format!("intervention at '{site}'")));
            }
        }
        if let Some(site) = captures.iter().find(|s| act_below(s, layer)) {
            return Err(below(format!("capture of '{site}'")));
        }
        if !req.forward.noise.is_empty() {
            return Err(below("embedding noise".into()));
        }
        if let Some(site) = taps
            .iter()
            .find(|s| *s == &WeightSite::Embed || s.layer().is_some_and(|l| l < layer))
        {
            return Err(below(format!("site gradient of '{site}'")));
        }
        Ok(Start::Resid {
            layer,
            h: p.resid.clone(),
        })
    }

    /// The logits a gradient call returns, outside the graph: from the full head output when
    /// the call computed one, else from a plain pass over the final-norm output.
    fn caller_logits(
        &self,
        wanted: LogitsWanted,
        layout: &RowLayout,
        hn: &Tensor,
        all_logits: Option<Tensor>,
    ) -> Result<Option<Tensor>> {
        match (wanted, all_logits) {
            (LogitsWanted::None, _) => Ok(None),
            (LogitsWanted::Last, Some(all)) => {
                let (b, s, v) = all.dims3()?;
                let rows = Tensor::new(layout.last_slots().as_slice(), &self.device)?;
                Ok(Some(
                    all.detach().reshape((b * s, v))?.index_select(&rows, 0)?,
                ))
            }
            (LogitsWanted::All, Some(all)) => Ok(Some(all.detach())),
            (_, None) => {
                let mut plain = Pass::new(
                    Path::Inference,
                    &self.weights,
                    &self.modules,
                    layout.clone(),
                    None,
                    &self.device,
                )?;
                self.logits(&mut plain, &hn.detach(), wanted)
            }
        }
    }

    pub(super) fn gradient_impl(&self, req: &GradRequest) -> Result<GradOutput> {
        let fwd = &req.forward;
        let dims = self.arch.dims();
        let vocab = dims.vocab_size;
        let mut parsed = self.parse_forward(fwd)?;
        let mut loss_plan = LossPlan::parse(req, &parsed.layout, vocab)?;
        let taps = req
            .site_grads
            .iter()
            .map(|s| {
                let site: WeightSite = s.parse()?;
                dims.check_weight_site(&site)?;
                if site == WeightSite::Embed {
                    return Err(invalid(
                        "site gradient of 'embed.weight': the embedding is a lookup, not a linear map",
                    ));
                }
                Ok(site)
            })
            .collect::<Result<Vec<_>>>()?;

        let vars = fwd
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let t = from_abi(p, &self.device, &format!("parameter {i}"), None)?;
                Ok(Var::from_tensor(&t)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let param_tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();

        // Where the differentiable pass starts: the embeddings, a prepared prefix's state, or
        // (when the loss and the edits allow) past the prefix's frozen leading tokens.
        let memo = req
            .prepared
            .into_option()
            .and_then(|h| self.prepared.get(&h))
            .map(|p| (&p.products, p.from_layer));
        let (counter, layout, start, captures, cache) = match req.prepared.into_option() {
            None => (
                &self.gradient_paths.full,
                parsed.layout,
                Start::Embeddings {
                    ids: parsed.ids,
                    noise: parsed.noise,
                },
                parsed.captures,
                None,
            ),
            Some(handle) => {
                let start = self.prepared_start(handle, req, &taps, &parsed.captures)?;
                let prepared = &self.prepared[&handle];
                let cuts = self.frozen_prefix_cuts(
                    req,
                    &parsed.plan,
                    &parsed.layout,
                    &loss_plan.positions(parsed.layout.seq),
                );
                let frozen = match cuts {
                    Some(cuts) => self.frozen_prefix(prepared, cuts)?,
                    None => None,
                };
                match frozen {
                    Some(frozen) => {
                        parsed.plan.shift_left(&frozen.cuts);
                        loss_plan.shift_left(&frozen.cuts, parsed.layout.seq, frozen.layout.seq);
                        (
                            &self.gradient_paths.frozen_prefix,
                            frozen.layout.clone(),
                            Start::Resid {
                                layer: prepared.from_layer,
                                h: frozen.resid.clone(),
                            },
                            Vec::new(),
                            Some(frozen.cache.clone()),
                        )
                    }
                    None => (
                        &self.gradient_paths.prepared,
                        parsed.layout,
                        start,
                        parsed.captures,
                        None,
                    ),
                }
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let edits = parsed
            .plan
            .materialize(&param_tensors, &layout, &self.device)?;
        self.run_gradient(
            req,
            &vars,
            GradientPass {
                layout,
                start,
                edits,
                captures,
                taps,
                loss_plan,
                cache,
                memo,
            },
        )
    }

    /// Whether nothing in block `last` (the last one), the final norm or the head is
    /// intervened on, captured, tapped or has a module, so that the block may run its output
    /// map and MLP on the loss slots alone ([`Pass::with_kept_slots`]).
    fn last_block_is_plain(
        &self,
        last: usize,
        edits: &[ActSite],
        captures: &[ActSite],
        taps: &[WeightSite],
    ) -> bool {
        let act_after = |s: &ActSite| *s == ActSite::FinalNorm || s.layer() == Some(last);
        let weight_after = |s: &WeightSite| *s == WeightSite::LmHead || s.layer() == Some(last);
        let module_after = [
            WeightSite::AttnQ(last),
            WeightSite::AttnK(last),
            WeightSite::AttnV(last),
            WeightSite::AttnO(last),
            WeightSite::MlpGate(last),
            WeightSite::MlpUp(last),
            WeightSite::MlpDown(last),
            WeightSite::LmHead,
        ]
        .into_iter()
        .any(|s| self.modules.has_site(s));
        !edits.iter().any(act_after)
            && !captures.iter().any(act_after)
            && !taps.iter().any(weight_after)
            && !module_after
    }

    /// Runs one differentiable pass and the backward of its loss.
    fn run_gradient(
        &self,
        req: &GradRequest,
        vars: &[Var],
        call: GradientPass<'_>,
    ) -> Result<GradOutput> {
        let fwd = &req.forward;
        let dims = self.arch.dims();
        let vocab = dims.vocab_size;
        let GradientPass {
            layout,
            start,
            edits,
            captures,
            taps,
            loss_plan,
            mut cache,
            memo,
        } = call;
        let edits_sites: Vec<ActSite> = edits.keys().copied().collect();
        let mut pass = Pass::new(
            Path::Gradient,
            &self.weights,
            &self.modules,
            layout.clone(),
            cache.as_mut(),
            &self.device,
        )?
        .with_edits(edits)
        .with_captures(captures.iter().copied())
        .with_taps(taps.iter().copied());
        if let Some((memo, layer)) = memo {
            pass = pass.with_memo(MemoUse {
                memo,
                layer,
                epoch: self.epochs.total(),
                hits: &self.gradient_paths.memo_hits,
            });
        }

        // The head runs on the loss slots only, unless something needs all of its output.
        let full_head = fwd.logits == LogitsWanted::All
            || taps.contains(&WeightSite::LmHead)
            || self.modules.has_site(WeightSite::LmHead);
        let slots = Tensor::new(loss_plan.slots.as_slice(), &self.device)?;
        let last = dims.n_layers.checked_sub(1);
        if let Some(last) = last.filter(|&l| {
            fwd.logits == LogitsWanted::None
                && !loss_plan.slots.is_empty()
                && self.last_block_is_plain(l, &edits_sites, &captures, &taps)
        }) {
            pass = pass.with_kept_slots(last, slots.clone());
        }

        let h = self.run_blocks(&mut pass, start, dims.n_layers)?;
        let hn = self.arch.final_norm(&mut pass, &h)?;
        let hn = pass.act(ActSite::FinalNorm, hn)?;
        let (b, s, d) = hn.dims3()?;

        let (slot_logits, all_logits) = if pass.slots_were_kept() {
            // The last block already ran on the loss slots alone, in their order.
            self.gradient_paths
                .last_block_slots
                .fetch_add(1, Ordering::Relaxed);
            (Some(self.arch.lm_head(&mut pass, &hn)?.squeeze(0)?), None)
        } else if full_head {
            let all = self.arch.lm_head(&mut pass, &hn)?;
            let picked = if loss_plan.slots.is_empty() {
                None
            } else {
                Some(all.reshape((b * s, vocab))?.index_select(&slots, 0)?)
            };
            (picked, Some(all))
        } else if loss_plan.slots.is_empty() {
            (None, None)
        } else {
            let x = hn
                .reshape((b * s, d))?
                .index_select(&slots, 0)?
                .unsqueeze(0)?;
            (Some(self.arch.lm_head(&mut pass, &x)?.squeeze(0)?), None)
        };

        let (nll, kl, nll_logprobs, grads) = match slot_logits {
            None => (0.0, 0.0, Vec::new(), None),
            Some(logits) => {
                let (objective, logp) =
                    contracted_log_softmax(&logits, loss_plan.coefficients(vocab))?;
                let (nll, kl, lps) = loss_plan.values(&logp);
                (nll, kl, lps, Some(objective.backward()?))
            }
        };
        let loss = nll + kl;
        if !loss.is_finite() {
            return Err(numeric(format!(
                "the loss is not finite (nll {nll}, kl {kl})"
            )));
        }

        let grad_of = |t: &Tensor| -> Result<Tensor> {
            match grads.as_ref().and_then(|g| g.get(t)) {
                Some(g) => Ok(g.clone()),
                None => Ok(t.zeros_like()?),
            }
        };
        let param_grads = vars
            .iter()
            .map(|v| to_abi(&grad_of(v.as_tensor())?))
            .collect::<Result<Vec<_>>>()?;

        let logits = self.caller_logits(fwd.logits, &layout, &hn, all_logits)?;
        let outputs = pass.finish();
        let site_grads = taps
            .iter()
            .map(|site| {
                let tap = outputs.tap(site)?;
                Ok(SiteGrad {
                    input: to_abi(&tap.input)?,
                    output_grad: to_abi(&grad_of(tap.output_leaf.as_tensor())?)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let captures = outputs.captures(&captures)?;

        Ok(GradOutput {
            loss: loss as f32,
            nll: nll as f32,
            kl: kl as f32,
            nll_logprobs: nll_logprobs.into(),
            param_grads: param_grads.into(),
            site_grads: site_grads.into(),
            forward: ForwardOutput {
                logits: logits.map(|l| to_abi(&l)).transpose()?.into(),
                captures: captures.into(),
            },
        })
    }
}

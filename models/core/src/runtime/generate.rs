//! Generation with a per-call KV cache: greedy or seeded top-k sampling, stop ids and stop
//! strings. Rows are generated one after another, each with its own cache.

use candle_core::Tensor;
use kedit_plugin_api::{ActSite, GenerateRequest, SamplingKind, WeightSite};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Runtime, Start};
use crate::arch::Architecture;
use crate::engine::kv_cache::KvCache;
use crate::engine::layout::RowLayout;
use crate::engine::{Pass, Path};
use crate::error::{invalid, numeric, Context, Result};

/// Picks the next token from `logits`: the first maximum for greedy decoding (as torch's
/// argmax), else a draw from the `top_k` most likely tokens at `temperature`.
pub fn sample_next(logits: &[f32], req: &GenerateRequest, rng: &mut StdRng) -> Result<u32> {
    if logits.iter().any(|v| v.is_nan()) {
        return Err(numeric("the logits hold NaN"));
    }
    let greedy = req.sampling == SamplingKind::Greedy || req.temperature <= 0.0 || req.top_k == 1;
    if greedy {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        return Ok(best as u32);
    }
    let k = match req.top_k as usize {
        0 => logits.len(),
        k => k.min(logits.len()),
    };
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    // Descending logit, ties by lower id, so the candidate set is deterministic.
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, by_logit);
        order.truncate(k);
    }
    order.sort_by(by_logit);
    let t = req.temperature as f64;
    let top = logits[order[0] as usize] as f64;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i as usize] as f64 - top) / t).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.gen::<f64>() * total;
    for (&id, w) in order.iter().zip(&weights) {
        if u < *w {
            return Ok(id);
        }
        u -= w;
    }
    Ok(*order.last().expect("k ≥ 1"))
}

/// Incremental decoding of one sequence with its own KV cache: the logits after the prompt,
/// then after every pushed token. Borrowing the runtime immutably, it never changes weights.
pub struct Decoder<'m, A: Architecture> {
    runtime: &'m Runtime<A>,
    cache: KvCache,
    logits: Vec<f32>,
}

impl<A: Architecture> Decoder<'_, A> {
    /// Next-token logits after everything fed so far.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Tokens fed so far (prompt included).
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Feeds more tokens.
    pub fn push(&mut self, ids: &[u32]) -> Result<()> {
        self.logits = self.runtime.decode_step(ids, &mut self.cache)?;
        Ok(())
    }
}

impl<A: Architecture> Runtime<A> {
    /// Starts decoding after `prompt`.
    pub fn decoder(&self, prompt: &[u32]) -> Result<Decoder<'_, A>> {
        let dims = self.arch.dims();
        if prompt.is_empty() {
            return Err(invalid("the prompt is empty"));
        }
        for &id in prompt {
            dims.check_token("prompt", id)?;
        }
        let mut decoder = Decoder {
            runtime: self,
            cache: KvCache::new(dims.n_layers),
            logits: Vec::new(),
        };
        decoder.push(prompt)?;
        Ok(decoder)
    }

    /// Runs `ids` (one row) after what `cache` holds and returns the logits of the last one.
    fn decode_step(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let n_layers = self.arch.dims().n_layers;
        let layout = RowLayout::single(ids.len(), cache.len());
        let ids = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let mut pass = Pass::new(
            Path::Inference,
            &self.weights,
            &self.modules,
            layout,
            Some(cache),
            &self.device,
        )?;
        let start = Start::Embeddings { ids, noise: None };
        let h = self.run_blocks(&mut pass, start, n_layers)?;
        let s = h.dim(1)?;
        // The final norm and the head are per position: only the last one matters, unless a
        // module on the head must see every position of the call (as its context says).
        let h = if self.modules.has_site(WeightSite::LmHead) {
            h
        } else {
            h.narrow(1, s - 1, 1)?
        };
        let hn = self.arch.final_norm(&mut pass, &h)?;
        let hn = pass.act(ActSite::FinalNorm, hn)?;
        let logits = self.arch.lm_head(&mut pass, &hn)?;
        let last = logits.dim(1)? - 1;
        pass.finish();
        Ok(logits.narrow(1, last, 1)?.flatten_all()?.to_vec1::<f32>()?)
    }

    fn generate_row(&self, row: usize, prompt: &[u32], req: &GenerateRequest) -> Result<Vec<u32>> {
        let what = || format!("prompt {row}");
        let max_new = req.max_new_tokens as usize;
        let mut new = Vec::with_capacity(max_new);
        if max_new == 0 {
            return Ok(new);
        }
        let stop_strings: Vec<&str> = req.stop_strings.iter().map(|s| s.as_str()).collect();
        let mut rng = StdRng::seed_from_u64(req.seed.wrapping_add(row as u64));
        let mut decoder = self.decoder(prompt).with_context(what)?;
        loop {
            let next = sample_next(decoder.logits(), req, &mut rng)?;
            new.push(next);
            if new.len() >= max_new || req.stop_ids.contains(&next) {
                break;
            }
            if !stop_strings.is_empty() {
                let text = self.text.detokenize(&new, false)?;
                if stop_strings.iter().any(|s| text.contains(s)) {
                    break;
                }
            }
            decoder.push(&[next])?;
        }
        Ok(new)
    }

    pub(super) fn generate_impl(&self, req: &GenerateRequest) -> Result<Vec<Vec<u32>>> {
        if req.sampling == SamplingKind::TopK && !req.temperature.is_finite() {
            return Err(invalid(format!(
                "temperature {} is not finite",
                req.temperature
            )));
        }
        req.prompts
            .iter()
            .enumerate()
            .map(|(row, prompt)| self.generate_row(row, prompt, req))
            .collect()
    }
}

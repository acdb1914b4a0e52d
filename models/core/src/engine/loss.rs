//! The gradient path's loss: `−Σ C ⊙ log_softmax(logits)` over the loss slots' logits.
//!
//! Written with candle's primitives this is about a dozen whole-vocabulary tensors per call
//! (shift, exp, sum, log, subtract, multiply by `C`, then each one's backward), each allocated
//! and walked on one thread; over 40 slots × 49 152 tokens that was a tenth of a ROME step. On
//! the CPU it is one custom op instead: the log-sum-exp of every slot is computed once (in
//! parallel over slots), the forward is one pass and the backward writes
//! `∂/∂x = C_rowsum · softmax(x) − C` in one more. Other devices keep the composed form.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::ops::log_softmax_last_dim;

/// The slots' log-probabilities, as the loss saw them: `logp(k, j) = values[k·V + j] − shift[k]`.
pub struct SlotLogProbs {
    values: Vec<f32>,
    shift: Vec<f32>,
    vocab: usize,
}

impl SlotLogProbs {
    pub fn get(&self, slot: usize, token: usize) -> f32 {
        self.values[slot * self.vocab + token] - self.shift[slot]
    }

    /// Slot `k`'s log-probabilities over the vocabulary.
    pub fn row(&self, slot: usize) -> impl Iterator<Item = f32> + '_ {
        let s = self.shift[slot];
        self.values[slot * self.vocab..(slot + 1) * self.vocab]
            .iter()
            .map(move |&v| v - s)
    }
}

/// `(objective, log-probabilities)` for logits `[slots, vocab]` and coefficients `C` of the same
/// shape (row-major): the objective `−Σ C ⊙ log_softmax(logits)` is a scalar tracked for
/// backpropagation into `logits`.
pub fn contracted_log_softmax(
    logits: &Tensor,
    coef: Vec<f32>,
) -> candle_core::Result<(Tensor, SlotLogProbs)> {
    let (slots, vocab) = logits.dims2()?;
    if coef.len() != slots * vocab {
        candle_core::bail!(
            "loss coefficients hold {} values for {slots} × {vocab} logits",
            coef.len()
        );
    }
    if !logits.device().is_cpu() || logits.dtype() != candle_core::DType::F32 {
        let logp = log_softmax_last_dim(logits)?;
        let values = logp.detach().flatten_all()?.to_vec1::<f32>()?;
        let c = Tensor::from_vec(coef, (slots, vocab), logits.device())?;
        let objective = (logp * c)?.sum_all()?.neg()?;
        let shift = vec![0.0; slots];
        return Ok((
            objective,
            SlotLogProbs {
                values,
                shift,
                vocab,
            },
        ));
    }
    let values = logits.detach().flatten_all()?.to_vec1::<f32>()?;
    let lse: Vec<f32> = values
        .par_chunks(vocab)
        .map(|row| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
            max + sum.ln() as f32
        })
        .collect();
    let op = ContractedLogSoftmax {
        coef,
        lse: lse.clone(),
        vocab,
    };
    let objective = logits.apply_op1(op)?;
    Ok((
        objective,
        SlotLogProbs {
            values,
            shift: lse,
            vocab,
        },
    ))
}

struct ContractedLogSoftmax {
    coef: Vec<f32>,
    /// Per slot, `log Σ exp(logits)` of the logits this op was built for.
    lse: Vec<f32>,
    vocab: usize,
}

impl CustomOp1 for ContractedLogSoftmax {
    fn name(&self) -> &'static str {
        "contracted-log-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(all) = s else {
            candle_core::bail!("contracted log-softmax: logits are not f32");
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("contracted log-softmax: logits are not contiguous");
        };
        let x = &all[a..b];
        let value: f64 = x
            .par_chunks(self.vocab)
            .zip(self.coef.par_chunks(self.vocab))
            .zip(self.lse.par_iter())
            .map(|((x, c), &lse)| {
                x.iter()
                    .zip(c)
                    .filter(|(_, &c)| c != 0.0)
                    .map(|(&x, &c)| c as f64 * (x - lse) as f64)
                    .sum::<f64>()
            })
            .sum();
        Ok((CpuStorage::F32(vec![-value as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad_res
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()?;
        let x = arg.detach().flatten_all()?.to_vec1::<f32>()?;
        let mut grad = vec![0f32; x.len()];
        grad.par_chunks_mut(self.vocab)
            .zip(x.par_chunks(self.vocab))
            .zip(self.coef.par_chunks(self.vocab))
            .zip(self.lse.par_iter())
            .for_each(|(((out, x), c), &lse)| {
                let total: f32 = c.iter().sum();
                for ((o, &x), &c) in out.iter_mut().zip(x).zip(c) {
                    *o = g * (total * (x - lse).exp() - c);
                }
            });
        Ok(Some(Tensor::from_vec(grad, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn the_fused_loss_and_its_gradient_match_the_composed_form() {
        let dev = Device::Cpu;
        let (slots, vocab) = (3, 257);
        let x = Var::from_tensor(&Tensor::randn(0f32, 4.0, (slots, vocab), &dev).unwrap()).unwrap();
        // An NLL-like sparse row, a KL-like dense row and an empty row.
        let mut coef = vec![0f32; slots * vocab];
        coef[5] = 0.7;
        coef[100] = 0.3;
        for j in 0..vocab {
            coef[vocab + j] = 0.01 * ((j % 7) as f32);
        }
        let (fused, logp) = contracted_log_softmax(x.as_tensor(), coef.clone()).unwrap();
        let reference = log_softmax_last_dim(x.as_tensor()).unwrap();
        let c = Tensor::from_vec(coef, (slots, vocab), &dev).unwrap();
        let composed = (reference.clone() * c)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap();
        let (a, b) = (
            fused.to_scalar::<f32>().unwrap(),
            composed.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        let lp = reference.to_vec2::<f32>().unwrap();
        for (k, want) in lp.iter().enumerate() {
            assert!((logp.get(k, 5) - want[5]).abs() < 1e-5);
            for (v, w) in logp.row(k).zip(want) {
                assert!((v - w).abs() < 1e-5);
            }
        }
        let gf = fused.backward().unwrap();
        let gc = composed.backward().unwrap();
        let (gf, gc) = (
            gf.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
            gc.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
        );
        for k in 0..slots {
            for j in 0..vocab {
                assert!(
                    (gf[k][j] - gc[k][j]).abs() < 2e-6 * gc[k][j].abs().max(1.0),
                    "∂/∂x[{k}][{j}]: {} vs {}",
                    gf[k][j],
                    gc[k][j]
                );
            }
        }
    }
}

//! Products that repeated gradient calls on one prepared batch would compute again unchanged.
//!
//! An editor's optimisation calls the gradient of the same prepared batch tens of times, and
//! only what lies downstream of its parameters changes between calls. In the prepared layer
//! itself, the linear maps before the first intervention or side memory (WISE trains the
//! `mlp.down` of its layer: the attention and the gate/up products of that block see the same
//! input at every iteration) get the same input and the same weight each time. A
//! [`ProductMemo`] keeps such products per weight site and hands them back when the input is
//! bit for bit the one it was computed from and no weight changed since (the runtime's change
//! counter), so a hit returns exactly what the product would have.
//!
//! Only products of the prepared layer are kept (at most one block's worth; never the
//! vocabulary-wide head, which belongs to no layer), only for inputs
//! outside the autograd graph (a tracked input depends on this call's parameters), and only on
//! the CPU, where comparing the input costs a memory scan, a small fraction of the product it
//! saves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use candle_core::{DType, Tensor};
use kedit_plugin_api::WeightSite;

use crate::error::Result;

struct Entry {
    /// The runtime's weight-change counter when the product was computed.
    epoch: u64,
    dims: Vec<usize>,
    input: Vec<f32>,
    product: Tensor,
}

/// The kept products of one prepared batch, one per weight site (the latest input seen there).
#[derive(Default)]
pub struct ProductMemo {
    entries: Mutex<HashMap<WeightSite, Entry>>,
}

/// A memo as one pass uses it: the layer whose products it keeps (the prepared one: the memo
/// then holds one block's products at most), the weight epoch the pass runs under, and where
/// hits are counted.
#[derive(Clone, Copy)]
pub struct MemoUse<'a> {
    pub memo: &'a ProductMemo,
    pub layer: usize,
    pub epoch: u64,
    pub hits: &'a AtomicU64,
}

impl MemoUse<'_> {
    /// `compute()`'s value for `x` at `site`: the kept one when `x` and the weights are those
    /// it was computed from, else computed now (and kept when `x` qualifies).
    pub fn product(
        &self,
        site: WeightSite,
        x: &Tensor,
        compute: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        if site.layer() != Some(self.layer)
            || x.track_op()
            || !x.device().is_cpu()
            || x.dtype() != DType::F32
        {
            return compute();
        }
        let input = x.flatten_all()?.to_vec1::<f32>()?;
        let dims = x.dims().to_vec();
        let mut entries = self
            .memo
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(e) = entries.get(&site) {
            // Bitwise, so that a NaN input or a signed zero never matches a different one.
            let same = e.epoch == self.epoch
                && e.dims == dims
                && e.input
                    .iter()
                    .zip(&input)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
            if same {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(e.product.clone());
            }
        }
        let product = compute()?.detach();
        entries.insert(
            site,
            Entry {
                epoch: self.epoch,
                dims,
                input,
                product: product.clone(),
            },
        );
        Ok(product)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn counted(memo: &MemoUse<'_>, x: &Tensor, calls: &mut u32) -> Tensor {
        memo.product(WeightSite::MlpDown(0), x, || {
            *calls += 1;
            Ok((x * 2.0)?)
        })
        .unwrap()
    }

    #[test]
    fn a_product_is_reused_only_for_the_same_input_and_weights() {
        let memo = ProductMemo::default();
        let hits = AtomicU64::new(0);
        let at = |epoch| MemoUse {
            memo: &memo,
            layer: 0,
            epoch,
            hits: &hits,
        };
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.0], [3.0, -0.0]], &dev).unwrap();
        let mut calls = 0;
        counted(&at(0), &x, &mut calls);
        let again = counted(&at(0), &x, &mut calls);
        assert_eq!((calls, hits.load(Ordering::Relaxed)), (1, 1));
        assert_eq!(again.to_vec2::<f32>().unwrap(), [[2.0, 4.0], [6.0, -0.0]]);

        // Another input (a signed zero flipped), another weight epoch, another shape.
        let flipped = Tensor::new(&[[1f32, 2.0], [3.0, 0.0]], &dev).unwrap();
        counted(&at(0), &flipped, &mut calls);
        counted(&at(1), &flipped, &mut calls);
        counted(&at(1), &flipped.reshape(4).unwrap(), &mut calls);
        assert_eq!((calls, hits.load(Ordering::Relaxed)), (4, 1));

        // An input that depends on a parameter is never kept.
        let v = Var::from_tensor(&x).unwrap();
        let tracked = (v.as_tensor() + 0.0).unwrap();
        counted(&at(1), &tracked, &mut calls);
        counted(&at(1), &tracked, &mut calls);
        assert_eq!((calls, hits.load(Ordering::Relaxed)), (6, 1));

        // Another layer's product is never kept.
        let other = MemoUse {
            memo: &memo,
            layer: 1,
            epoch: 1,
            hits: &hits,
        };
        counted(&other, &x, &mut calls);
        counted(&other, &x, &mut calls);
        assert_eq!((calls, hits.load(Ordering::Relaxed)), (8, 1));
    }
}

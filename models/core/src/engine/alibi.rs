//! ALiBi (attention with linear biases; Baichuan-13B, Baichuan2-13B): no position embedding,
//! but a per-head bias `slope_h · j` on the score of key j. Softmax is shift-invariant per
//! query row, so this equals `slope_h · (j − i)`; the absolute form needs no query position and
//! so continues a KV cache unchanged (key j keeps its absolute index `past + j`).

use candle_core::{Device, Tensor};

/// The slopes of `n_heads` heads, as Baichuan's `_get_interleave` (and BLOOM) computes them:
/// for a power of two n, `slope_k = (2^(−8/n))^(k+1)`; otherwise, with `p = 2^⌊log2 n⌋`,
/// `slopes(p) ++ slopes(2p)[0::2][..n−p]`. Computed in f64, returned as f32 (the reference
/// builds them as Python floats and stores a float32 tensor).
pub fn slopes(n_heads: usize) -> Vec<f32> {
    slopes_f64(n_heads).into_iter().map(|s| s as f32).collect()
}

fn slopes_f64(n: usize) -> Vec<f64> {
    fn power_of_two(n: usize) -> Vec<f64> {
        let start = 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
        (0..n).map(|i| start * start.powi(i as i32)).collect()
    }
    if n == 0 {
        return Vec::new();
    }
    if n.is_power_of_two() {
        return power_of_two(n);
    }
    let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let mut out = power_of_two(p);
    out.extend(slopes_f64(2 * p).into_iter().step_by(2).take(n - p));
    out
}

/// The additive score bias `[1, heads, 1, keys]`: `slope_h · j` for key j (absolute index,
/// cached keys included). It broadcasts over the batch and the queries.
pub fn bias(slopes: &[f32], keys: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mut v = Vec::with_capacity(slopes.len() * keys);
    for &s in slopes {
        v.extend((0..keys).map(|j| s * j as f32));
    }
    Tensor::from_vec(v, (1, slopes.len(), 1, keys), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slopes_follow_the_reference_formula() {
        assert_eq!(
            slopes(6),
            vec![0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
        );
        assert_eq!(slopes(8)[0], 0.5);
        assert_eq!(slopes(8)[7], 2f32.powi(-8));
        let s40 = slopes(40);
        assert_eq!(s40.len(), 40);
        assert_eq!(s40[0], 2f32.powf(-0.25));
        // The 8 extra heads take every other slope of 64 heads.
        assert_eq!(s40[32], slopes(64)[0]);
        assert_eq!(s40[33], slopes(64)[2]);
    }

    #[test]
    fn bias_is_slope_times_key_index() {
        let b = bias(&[0.5, 0.25], 3, &Device::Cpu).unwrap();
        assert_eq!(b.dims(), &[1, 2, 1, 3]);
        assert_eq!(
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0, 0.5, 1.0, 0.0, 0.25, 0.5]
        );
    }
}

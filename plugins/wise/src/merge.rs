//! Merging side memories as task vectors `τᵢ = Wᵢ − W`, as EasyEdit's `wise/merge/*` does it:
//! `GTA(sparsify, consensus, normalize)` for TIES and its relatives, and `linear`.

use kedit_plugin_api::PluginError;
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MergeAlg {
    /// Trim to the top-`density` magnitudes, elect signs by sum, disjoint mean.
    Ties,
    /// Trim by magnitude, weighted mean without sign election.
    MagnitudeNorm,
    /// Trim by magnitude, weighted sum.
    Magnitude,
    /// Sign election by sum, disjoint mean, no trimming.
    Sign,
    /// Random drop with rescaling, sign election, weighted sum (not normalised, as in EasyEdit).
    DareTies,
    /// Random drop without rescaling, weighted sum.
    DareLinear,
    /// `t·W₁ + (1 − t)·W` with `t` the first weight and `W₁` the first memory (EasyEdit's
    /// `linear` reads only the first of each list).
    Linear,
}

#[derive(Clone, Copy, PartialEq)]
enum Sparsify {
    None,
    Magnitude,
    RescaledRandom,
    Random,
}

impl MergeAlg {
    fn gta(self) -> Option<(Sparsify, bool, bool)> {
        // (sparsify, sign consensus by sum, normalise by the kept weights)
        Some(match self {
            MergeAlg::Ties => (Sparsify::Magnitude, true, true),
            MergeAlg::MagnitudeNorm => (Sparsify::Magnitude, false, true),
            MergeAlg::Magnitude => (Sparsify::Magnitude, false, false),
            MergeAlg::Sign => (Sparsify::None, true, true),
            MergeAlg::DareTies => (Sparsify::RescaledRandom, true, false),
            MergeAlg::DareLinear => (Sparsify::Random, false, false),
            MergeAlg::Linear => return None,
        })
    }
}

/// Keeps the `⌊density·n⌋` largest magnitudes (ties broken by lower index), zeroing the rest.
pub fn trim_by_magnitude(delta: &mut [f32], density: f64) -> Result<(), PluginError> {
    if density >= 1.0 {
        return Ok(());
    }
    let k = (density * delta.len() as f64) as usize;
    if k == 0 {
        return Err(PluginError::invalid(format!(
            "wise merge: density {density} keeps no entry of {} values",
            delta.len()
        )));
    }
    let mut order: Vec<u32> = (0..delta.len() as u32).collect();
    let by_mag = |a: &u32, b: &u32| {
        delta[*b as usize]
            .abs()
            .total_cmp(&delta[*a as usize].abs())
            .then(a.cmp(b))
    };
    order.select_nth_unstable_by(k - 1, by_mag);
    let mut keep = vec![false; delta.len()];
    for &i in &order[..k] {
        keep[i as usize] = true;
    }
    for (v, k) in delta.iter_mut().zip(keep) {
        if !k {
            *v = 0.0;
        }
    }
    Ok(())
}

fn bernoulli(delta: &mut [f32], density: f64, rescale: bool, rng: &mut StdRng) {
    if density >= 1.0 {
        return;
    }
    for v in delta.iter_mut() {
        let keep = rng.gen::<f64>() < density;
        *v = if keep { *v } else { 0.0 };
        if rescale {
            *v /= density as f32;
        }
    }
}

/// Merges `tensors` (full weights) around `base` with one weight each.
pub fn merge(
    alg: MergeAlg,
    weights: &[f64],
    base: &[f32],
    tensors: &[&[f32]],
    density: f64,
    rng: &mut StdRng,
) -> Result<Vec<f32>, PluginError> {
    if weights.len() != tensors.len() || tensors.is_empty() {
        return Err(PluginError::internal(format!(
            "wise merge: {} weights for {} tensors",
            weights.len(),
            tensors.len()
        )));
    }
    if let Some(t) = tensors.iter().find(|t| t.len() != base.len()) {
        return Err(PluginError::internal(format!(
            "wise merge: a memory has {} values, the base {}",
            t.len(),
            base.len()
        )));
    }
    let Some((sparsify, consensus, normalize)) = alg.gta() else {
        let t = weights[0] as f32;
        return Ok(tensors[0]
            .iter()
            .zip(base)
            .map(|(&v1, &v0)| t * v1 + (1.0 - t) * v0)
            .collect());
    };
    let mut weighted: Vec<Vec<f32>> = Vec::with_capacity(tensors.len());
    for (t, &w) in tensors.iter().zip(weights) {
        let mut delta: Vec<f32> = t.iter().zip(base).map(|(&a, &b)| a - b).collect();
        match sparsify {
            Sparsify::None => {}
            Sparsify::Magnitude => trim_by_magnitude(&mut delta, density)?,
            Sparsify::RescaledRandom => bernoulli(&mut delta, density, true, rng),
            Sparsify::Random => bernoulli(&mut delta, density, false, rng),
        }
        let w = w as f32;
        delta.iter_mut().for_each(|v| *v *= w);
        weighted.push(delta);
    }
    let ws: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
    let mut out = Vec::with_capacity(base.len());
    for (i, &b) in base.iter().enumerate() {
        let (mixed, divisor) = if consensus {
            // torch's sign(): 0 for 0, so a trimmed entry never agrees with the elected sign.
            let total: f32 = weighted.iter().map(|d| d[i]).sum();
            let majority = if total >= 0.0 { 1.0 } else { -1.0 };
            let (mut m, mut div) = (0f32, 0f32);
            for (d, &w) in weighted.iter().zip(&ws) {
                let v = d[i];
                let sign = if v > 0.0 {
                    1.0
                } else if v < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                if sign == majority {
                    m += v;
                    div += w;
                }
            }
            (m, if div == 0.0 { 1.0 } else { div })
        } else {
            let m: f32 = weighted.iter().map(|d| d[i]).sum();
            let div: f32 = ws.iter().sum();
            (m, if div.abs() < 1e-8 { 1.0 } else { div })
        };
        out.push(b + if normalize { mixed / divisor } else { mixed });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    const BASE: [f32; 4] = [1.0, 1.0, 1.0, 1.0];

    #[test]
    fn ties_trims_elects_signs_and_takes_the_disjoint_mean() {
        // τ₁ = [4, −2, 1, 0], τ₂ = [2, 3, −1, 0.5]; density 0.5 keeps the 2 largest of each:
        // τ₁ → [4, −2, 0, 0], τ₂ → [2, 3, 0, 0].
        let t1 = [5.0f32, -1.0, 2.0, 1.0];
        let t2 = [3.0f32, 4.0, 0.0, 1.5];
        let w = [0.5, 0.5];
        let got = merge(MergeAlg::Ties, &w, &BASE, &[&t1, &t2], 0.5, &mut rng()).unwrap();
        // entry 0: weighted 2 and 1, sign +, both agree → (2+1)/(0.5+0.5) = 3 → 4.
        // entry 1: weighted −1 and 1.5, sum 0.5 → +, only τ₂ agrees → 1.5/0.5 = 3 → 4.
        // entries 2, 3: all trimmed → 0 → 1.
        assert_eq!(got, vec![4.0, 4.0, 1.0, 1.0]);
    }

    #[test]
    fn sign_elects_without_trimming() {
        let t1 = [5.0f32, -1.0, 2.0, 1.0];
        let t2 = [3.0f32, 4.0, 0.0, 1.5];
        let got = merge(
            MergeAlg::Sign,
            &[0.5, 0.5],
            &BASE,
            &[&t1, &t2],
            0.5,
            &mut rng(),
        )
        .unwrap();
        // entry 2: τ = [1, −1] weighted [0.5, −0.5], sum 0 → elected +, only τ₁ → 0.5/0.5 = 1 → 2.
        // entry 3: τ = [0, 0.5] → τ₁'s zero never agrees → 0.25/0.5 = 0.5 → 1.5.
        assert_eq!(got, vec![4.0, 4.0, 2.0, 1.5]);
    }

    #[test]
    fn linear_reads_the_first_weight_and_memory() {
        let t1 = [3.0f32, -1.0, 1.0, 5.0];
        let t2 = [100.0f32; 4];
        let got = merge(
            MergeAlg::Linear,
            &[0.25, 0.75],
            &BASE,
            &[&t1, &t2],
            0.5,
            &mut rng(),
        )
        .unwrap();
        assert_eq!(got, vec![1.5, 0.5, 1.0, 2.0]);
    }

    #[test]
    fn dare_ties_at_full_density_is_an_unnormalised_sign_consensus() {
        let t1 = [5.0f32, -1.0, 2.0, 1.0];
        let t2 = [3.0f32, 4.0, 0.0, 1.5];
        let got = merge(
            MergeAlg::DareTies,
            &[0.5, 0.5],
            &BASE,
            &[&t1, &t2],
            1.0,
            &mut rng(),
        )
        .unwrap();
        // Weighted τ: [2, −1, 0.5, 0] and [1, 1.5, −0.5, 0.25]; kept sums: 3, 1.5, 0.5, 0.25.
        assert_eq!(got, vec![4.0, 2.5, 1.5, 1.25]);
    }

    #[test]
    fn dare_drops_and_rescales_at_the_given_density() {
        let n = 20_000;
        let base = vec![0f32; n];
        let t = vec![1f32; n];
        let got = merge(MergeAlg::DareTies, &[1.0], &base, &[&t], 0.25, &mut rng()).unwrap();
        let kept = got.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
        assert!((kept - 0.25).abs() < 0.02, "kept {kept}");
        assert!(got.iter().all(|&v| v == 0.0 || v == 4.0));
        let got = merge(MergeAlg::DareLinear, &[1.0], &base, &[&t], 0.25, &mut rng()).unwrap();
        assert!(got.iter().all(|&v| v == 0.0 || v == 1.0));
    }

    #[test]
    fn magnitude_variants_trim_then_sum_or_average() {
        let t1 = [5.0f32, -1.0, 2.0, 1.0];
        let t2 = [3.0f32, 4.0, 0.0, 1.5];
        let got = merge(
            MergeAlg::Magnitude,
            &[0.5, 0.5],
            &BASE,
            &[&t1, &t2],
            0.5,
            &mut rng(),
        )
        .unwrap();
        // trimmed τ₁ [4, −2, 0, 0], τ₂ [2, 3, 0, 0]; halves summed: [3, 0.5, 0, 0].
        assert_eq!(got, vec![4.0, 1.5, 1.0, 1.0]);
        let got = merge(
            MergeAlg::MagnitudeNorm,
            &[0.5, 0.5],
            &BASE,
            &[&t1, &t2],
            0.5,
            &mut rng(),
        )
        .unwrap();
        assert_eq!(got, vec![4.0, 1.5, 1.0, 1.0]);
        let e = merge(MergeAlg::Ties, &[1.0], &BASE, &[&t1], 0.1, &mut rng()).unwrap_err();
        assert!(e.message.contains("density"), "{e}");
    }
}

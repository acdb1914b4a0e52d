//! The machine's sustained memory read bandwidth, measured the way decoding reads weights.
//!
//! Decoding one token streams every weight once, so tokens/s can be no higher than this
//! bandwidth divided by the bytes of weights. `kedit bench` reports it next to the decode speed,
//! so that a run shows how close decoding is to what the memory allows on that machine at that
//! moment, not only how it compares with another implementation.

use std::time::Instant;

use rayon::prelude::*;

/// Bytes per second read from a buffer of `bytes` (rounded down to whole f32s; make it much
/// larger than the last-level cache), split across rayon's threads as the skinny kernel splits
/// weight rows; the median of `repeats` passes after one untimed pass.
pub fn read_bandwidth(bytes: usize, repeats: usize) -> f64 {
    let data = vec![1f32; (bytes / 4).max(1 << 16)];
    let chunk = data.len().div_ceil(4 * rayon::current_num_threads().max(1));
    let pass = || -> f32 { data.par_chunks(chunk).map(sum).sum() };
    std::hint::black_box(pass());
    let mut rates: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(pass());
            (data.len() * 4) as f64 / t.elapsed().as_secs_f64().max(1e-9)
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// The sum of `c`, with the widest vectors this CPU has, so that the loop is limited by memory
/// and not by the adds.
fn sum(c: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { sum_avx512(c) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { sum_avx2(c) };
        }
    }
    sum_lanes(c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_avx512(c: &[f32]) -> f32 {
    sum_lanes(c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(c: &[f32]) -> f32 {
    sum_lanes(c)
}

/// 64 independent partial sums: four 16-lane vectors' worth of adds in flight, vectorised with
/// whatever features the caller was compiled for.
#[inline(always)]
fn sum_lanes(c: &[f32]) -> f32 {
    let mut acc = [0f32; 64];
    let mut blocks = c.chunks_exact(64);
    for b in &mut blocks {
        for (a, v) in acc.iter_mut().zip(b) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + blocks.remainder().iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_vector_sum_is_the_sum() {
        let v: Vec<f32> = (0..1000).map(|i| (i % 7) as f32).collect();
        assert_eq!(super::sum(&v), v.iter().sum::<f32>());
    }

    #[test]
    fn bandwidth_is_a_plausible_positive_rate() {
        let bw = super::read_bandwidth(8 << 20, 3);
        // Anything from a slow VM's 100 MB/s to a cache-resident 1 TB/s.
        assert!((1e8..1e12).contains(&bw), "{bw} B/s");
    }
}

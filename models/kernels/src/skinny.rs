//! The skinny product: few rows of `x` against a large weight, streamed once.
//!
//! The weight is cut into blocks of [`ROW_BLOCK`] rows; each block is dotted with every row of
//! `x` while it is hot in L1, so `W` crosses the memory bus exactly once per call. Threads take
//! disjoint ranges of weight rows (output columns), so each core streams its own part of `W`.

use rayon::prelude::*;
use std::ops::Range;
use std::sync::OnceLock;

/// Weight rows dotted together: four independent accumulators keep the FMA units busy while the
/// loads stream, and four rows of any width fit L1 many times over.
const ROW_BLOCK: usize = 4;

/// Below this many multiply-adds a call stays on the calling thread: handing work to another
/// core costs a few microseconds, as much as the whole product.
const PARALLEL_MIN_WORK: usize = 1 << 17;

/// The instruction sets the kernel is written for, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2Fma,
    Portable,
}

impl Isa {
    /// The best instruction set this CPU has (detected once).
    pub fn detect() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| Isa::available()[0])
    }

    /// Every instruction set this CPU can run, best first (`Portable` always last).
    pub fn available() -> Vec<Isa> {
        let mut isas = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                isas.push(Isa::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                isas.push(Isa::Avx2Fma);
            }
        }
        isas.push(Isa::Portable);
        isas
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512f",
            Isa::Avx2Fma => "avx2+fma",
            Isa::Portable => "portable",
        }
    }
}

pub fn run(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, y: &mut [f32]) {
    run_with(Isa::detect(), x, w, m, k, n, y)
}

/// The output pointer shared by threads that write disjoint columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every thread writes a disjoint set of columns of `y` (see `run_many_with`), and `y`
// outlives the parallel section.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Through a method, so closures capture the whole `Out` (Send + Sync), not its pointer.
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

pub fn run_with(isa: Isa, x: &[f32], w: &[f32], m: usize, k: usize, n: usize, y: &mut [f32]) {
    run_many_with(isa, x, m, k, &mut [crate::Product { w, n, y }]);
}

pub fn run_many(x: &[f32], m: usize, k: usize, products: &mut [crate::Product<'_>]) {
    run_many_with(Isa::detect(), x, m, k, products)
}

/// Every product of `x` with its weight in one parallel section: the weight rows of all of them
/// are cut into shares, so the threads meet once per call rather than once per weight (a
/// decode step's q, k and v projections are each too small to amortise a meeting).
pub fn run_many_with(isa: Isa, x: &[f32], m: usize, k: usize, products: &mut [crate::Product<'_>]) {
    assert!(isa == Isa::Portable || Isa::available().contains(&isa));
    assert_eq!(x.len(), m * k);
    for p in products.iter() {
        assert!(p.w.len() == p.n * k && p.y.len() == m * p.n);
    }
    let parts: Vec<(&[f32], usize, Out)> = products
        .iter_mut()
        .map(|p| (p.w, p.n, Out(p.y.as_mut_ptr())))
        .collect();
    let rows: usize = parts.iter().map(|p| p.1).sum();
    let threads = rayon::current_num_threads();
    if threads <= 1 || m * rows * k < PARALLEL_MIN_WORK || rows < 2 * ROW_BLOCK {
        for &(w, n, out) in &parts {
            columns(isa, x, w, m, k, n, 0..n, out);
        }
        return;
    }
    // A few equal shares of weight rows per thread, each a whole number of blocks, so that a
    // core the OS takes away for a while does not leave the others waiting at the end. A share
    // never spans two weights; a weight's last share may be shorter.
    let share = rows.div_ceil(threads * 4).div_ceil(ROW_BLOCK) * ROW_BLOCK;
    let tasks: Vec<(usize, Range<usize>)> = parts
        .iter()
        .enumerate()
        .flat_map(|(i, &(_, n, _))| {
            (0..n.div_ceil(share)).map(move |t| (i, t * share..((t + 1) * share).min(n)))
        })
        .collect();
    tasks.into_par_iter().for_each(|(i, cols)| {
        let (w, n, out) = parts[i];
        columns(isa, x, w, m, k, n, cols, out);
    });
}

/// Rows of `x` dotted against one weight block at once: each weight vector loaded from L1 serves
/// all of them, and 4 × 4 accumulators still leave registers for the loads.
const X_TILE: usize = 4;

/// Output columns `cols` of `y` (weight rows `cols`) for every row of `x`.
#[allow(clippy::too_many_arguments)]
fn columns(
    isa: Isa,
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    cols: Range<usize>,
    out: Out,
) {
    let mut j = cols.start;
    while j < cols.end {
        let rows = ROW_BLOCK.min(cols.end - j);
        // A short last block repeats its last row: the extra dots are discarded, and one kernel
        // per instruction set stays enough.
        let block: [&[f32]; ROW_BLOCK] =
            std::array::from_fn(|r| &w[(j + r.min(rows - 1)) * k..][..k]);
        let mut i = 0;
        while i < m {
            let tile = X_TILE.min(m - i);
            let xs = |g: usize| &x[(i + g.min(tile - 1)) * k..][..k];
            let dots = match tile {
                1 => widen(dot_tile::<1>(isa, [xs(0)], block)),
                2 => widen(dot_tile::<2>(isa, [xs(0), xs(1)], block)),
                3 => widen(dot_tile::<3>(isa, [xs(0), xs(1), xs(2)], block)),
                _ => dot_tile::<4>(isa, [xs(0), xs(1), xs(2), xs(3)], block),
            };
            for (g, row) in dots.iter().take(tile).enumerate() {
                for (r, d) in row.iter().take(rows).enumerate() {
                    // SAFETY: (i + g, j + r) is inside y ([m, n]) and column j + r belongs to
                    // this thread's range alone.
                    unsafe { *out.at((i + g) * n + j + r) = *d };
                }
            }
            i += tile;
        }
        j += rows;
    }
}

fn widen<const G: usize>(t: [[f32; ROW_BLOCK]; G]) -> [[f32; ROW_BLOCK]; X_TILE] {
    std::array::from_fn(|g| if g < G { t[g] } else { [0.0; ROW_BLOCK] })
}

fn dot_tile<const G: usize>(
    isa: Isa,
    x: [&[f32]; G],
    w: [&[f32]; ROW_BLOCK],
) -> [[f32; ROW_BLOCK]; G] {
    match isa {
        // SAFETY: `run_with` only accepts an instruction set this CPU has; all slices have
        // length k (checked by the callers' shape asserts).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::tile_avx512(x, w) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { x86::tile_avx2(x, w) },
        _ => x.map(|xr| dot4_portable(xr, w)),
    }
}

/// Eight-lane partial sums the compiler can vectorise for any target.
fn dot4_portable(x: &[f32], w: [&[f32]; ROW_BLOCK]) -> [f32; ROW_BLOCK] {
    const LANES: usize = 8;
    let mut acc = [[0f32; LANES]; ROW_BLOCK];
    let whole = x.len() / LANES * LANES;
    for p in (0..whole).step_by(LANES) {
        let xs = &x[p..p + LANES];
        for (r, row) in w.iter().enumerate() {
            let ws = &row[p..p + LANES];
            for l in 0..LANES {
                acc[r][l] = xs[l].mul_add(ws[l], acc[r][l]);
            }
        }
    }
    std::array::from_fn(|r| {
        let tail: f32 = (whole..x.len()).map(|p| x[p] * w[r][p]).sum();
        acc[r].iter().sum::<f32>() + tail
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::ROW_BLOCK;
    use std::arch::x86_64::*;

    /// How far ahead of the loads each weight row is prefetched, in floats (1 KiB). The
    /// hardware prefetcher starts over at every 4 KiB page and at every new block of rows; asking
    /// for the line a kilobyte ahead keeps the memory busy across those restarts (the last row of
    /// a block prefetches into the next block, which follows it in memory). Measured on SmolLM2's
    /// decode weights: 10% more bandwidth than without (`examples/skinny_bandwidth.rs`); 128–384
    /// floats all do about as well.
    const PREFETCH_FLOATS: usize = 256;

    /// Prefetches the line `PREFETCH_FLOATS` past `row[p]` into L1. A prefetch never faults,
    /// so the address may lie past the end of the weight.
    #[inline(always)]
    unsafe fn prefetch_ahead(row: *const f32, p: usize) {
        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(p + PREFETCH_FLOATS) as *const i8);
    }

    /// # Safety
    /// The CPU has AVX-512F; every slice is as long as `x[0]`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_avx512<const G: usize>(
        x: [&[f32]; G],
        w: [&[f32]; ROW_BLOCK],
    ) -> [[f32; ROW_BLOCK]; G] {
        let k = x[0].len();
        let xp: [*const f32; G] = std::array::from_fn(|g| x[g].as_ptr());
        let wp: [*const f32; ROW_BLOCK] = std::array::from_fn(|r| w[r].as_ptr());
        let mut acc = [[_mm512_setzero_ps(); ROW_BLOCK]; G];
        let mut p = 0;
        while p + 16 <= k {
            let mut wv = [_mm512_setzero_ps(); ROW_BLOCK];
            for r in 0..ROW_BLOCK {
                prefetch_ahead(wp[r], p);
                wv[r] = _mm512_loadu_ps(wp[r].add(p));
            }
            for g in 0..G {
                let xv = _mm512_loadu_ps(xp[g].add(p));
                for r in 0..ROW_BLOCK {
                    acc[g][r] = _mm512_fmadd_ps(wv[r], xv, acc[g][r]);
                }
            }
            p += 16;
        }
        if p < k {
            // Masked loads read only the k - p valid lanes (no read past the end).
            let mask: __mmask16 = ((1u32 << (k - p)) - 1) as __mmask16;
            let mut wv = [_mm512_setzero_ps(); ROW_BLOCK];
            for r in 0..ROW_BLOCK {
                wv[r] = _mm512_maskz_loadu_ps(mask, wp[r].add(p));
            }
            for g in 0..G {
                let xv = _mm512_maskz_loadu_ps(mask, xp[g].add(p));
                for r in 0..ROW_BLOCK {
                    acc[g][r] = _mm512_fmadd_ps(wv[r], xv, acc[g][r]);
                }
            }
        }
        let mut sums = [[0f32; ROW_BLOCK]; G];
        for g in 0..G {
            for r in 0..ROW_BLOCK {
                sums[g][r] = _mm512_reduce_add_ps(acc[g][r]);
            }
        }
        sums
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; every slice is as long as `x[0]`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_avx2<const G: usize>(
        x: [&[f32]; G],
        w: [&[f32]; ROW_BLOCK],
    ) -> [[f32; ROW_BLOCK]; G] {
        let k = x[0].len();
        let xp: [*const f32; G] = std::array::from_fn(|g| x[g].as_ptr());
        let wp: [*const f32; ROW_BLOCK] = std::array::from_fn(|r| w[r].as_ptr());
        let mut acc = [[_mm256_setzero_ps(); ROW_BLOCK]; G];
        let mut p = 0;
        while p + 8 <= k {
            let mut wv = [_mm256_setzero_ps(); ROW_BLOCK];
            for r in 0..ROW_BLOCK {
                // Once per 64-byte line.
                if p % 16 == 0 {
                    prefetch_ahead(wp[r], p);
                }
                wv[r] = _mm256_loadu_ps(wp[r].add(p));
            }
            for g in 0..G {
                let xv = _mm256_loadu_ps(xp[g].add(p));
                for r in 0..ROW_BLOCK {
                    acc[g][r] = _mm256_fmadd_ps(wv[r], xv, acc[g][r]);
                }
            }
            p += 8;
        }
        let mut sums = [[0f32; ROW_BLOCK]; G];
        for g in 0..G {
            for r in 0..ROW_BLOCK {
                sums[g][r] = hsum256(acc[g][r]);
            }
        }
        for q in p..k {
            for g in 0..G {
                let xq = *xp[g].add(q);
                for r in 0..ROW_BLOCK {
                    sums[g][r] += xq * *wp[r].add(q);
                }
            }
        }
        sums
    }

    #[target_feature(enable = "avx2")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

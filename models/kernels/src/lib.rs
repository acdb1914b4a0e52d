//! CPU f32 kernels for products with frozen weights, `y = x·Wᵀ`, with `x: [m, k]` and
//! `W: [n, k]` both row-major — the layout every kedit weight site has.
//!
//! candle's CPU matmul goes through the `gemm` crate, whose f32 kernels are AVX2 at best and treat
//! a one-row product (decoding a token) as a general GEMM. Decoding is bound by reading the
//! weights once per token, so what matters there is streaming `W` at memory bandwidth on every
//! core. [`matmul_nt`] does that for few rows ([`SKINNY_MAX_ROWS`]): each block of weight rows is
//! read once and dotted with every row of `x` while it sits in L1. Larger `m` is left to the
//! caller's general GEMM ([`handles`] says which).
//!
//! Results differ from a GEMM's only by summation order (each output is one dot product over `k`,
//! accumulated in 16- or 8-lane partial sums, then reduced).

pub mod bandwidth;
pub mod blas;
mod skinny;

/// The most rows of `x` the skinny kernel takes; beyond this a blocked GEMM reuses `W` better.
pub const SKINNY_MAX_ROWS: usize = 8;

/// Whether [`matmul_nt`] handles an `[m, k]·[n, k]ᵀ` product (otherwise use a general GEMM).
pub fn handles(m: usize, _k: usize, _n: usize) -> bool {
    (1..=SKINNY_MAX_ROWS).contains(&m)
}

/// `y = x·Wᵀ` for `x: [m, k]`, `w: [n, k]`, `y: [m, n]`, all row-major and contiguous.
///
/// # Panics
/// When the slice lengths do not match the shapes, or `m` is outside what [`handles`] accepts.
pub fn matmul_nt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, y: &mut [f32]) {
    assert!(
        handles(m, k, n),
        "matmul_nt: {m} rows is not a skinny product"
    );
    assert_eq!(x.len(), m * k, "matmul_nt: x is not [{m}, {k}]");
    assert_eq!(w.len(), n * k, "matmul_nt: w is not [{n}, {k}]");
    assert_eq!(y.len(), m * n, "matmul_nt: y is not [{m}, {n}]");
    skinny::run(x, w, m, k, n, y);
}

/// One weight of a [`matmul_nt_many`] call: `w: [n, k]` and its output `y: [m, n]`.
pub struct Product<'a> {
    pub w: &'a [f32],
    pub n: usize,
    pub y: &'a mut [f32],
}

/// `y_i = x·W_iᵀ` for every product, `x: [m, k]` shared: the same as one [`matmul_nt`] per
/// weight, with all of them streamed in one parallel section (for the projections that read the
/// same input, such as q, k and v).
///
/// # Panics
/// As [`matmul_nt`], for any of the products.
pub fn matmul_nt_many(x: &[f32], m: usize, k: usize, products: &mut [Product<'_>]) {
    assert!(
        handles(m, k, 0),
        "matmul_nt_many: {m} rows is not a skinny product"
    );
    assert_eq!(x.len(), m * k, "matmul_nt_many: x is not [{m}, {k}]");
    for (i, p) in products.iter().enumerate() {
        let n = p.n;
        assert_eq!(
            p.w.len(),
            n * k,
            "matmul_nt_many: weight {i} is not [{n}, {k}]"
        );
        assert_eq!(
            p.y.len(),
            m * n,
            "matmul_nt_many: output {i} is not [{m}, {n}]"
        );
    }
    skinny::run_many(x, m, k, products);
}

/// The instruction set the kernels use on this machine, for benchmark reports.
pub fn isa() -> &'static str {
    skinny::Isa::detect().name()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
            }
        }
        y
    }

    fn check(m: usize, k: usize, n: usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64((m * 1_000_003 + k * 1009 + n) as u64);
        let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut y = vec![f32::NAN; m * n];
        matmul_nt(&x, &w, m, k, n, &mut y);
        let want = reference(&x, &w, m, k, n);
        for (idx, (got, want)) in y.iter().zip(&want).enumerate() {
            let tol = 1e-5 * (k as f64).sqrt().max(1.0) * 4.0;
            assert!(
                (*got as f64 - want).abs() <= tol,
                "[{m}, {k}]·[{n}, {k}]ᵀ at ({}, {}): {got} vs {want}",
                idx / n,
                idx % n
            );
        }
    }

    #[test]
    fn matches_a_f64_reference_on_every_tail_and_row_count() {
        // k and n not multiples of the vector width or the row block, tiny and larger shapes,
        // and n large enough to take the threaded path.
        for m in 1..=SKINNY_MAX_ROWS {
            for &(k, n) in &[
                (1, 1),
                (3, 5),
                (16, 4),
                (17, 7),
                (33, 9),
                (576, 192),
                (100, 2051),
            ] {
                check(m, k, n);
            }
        }
        check(1, 1536, 4099);
        check(3, 64, 70_001);
    }

    #[test]
    fn every_instruction_set_this_machine_has_gives_the_same_answer() {
        let (m, k, n) = (3, 77, 131);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let want = reference(&x, &w, m, k, n);
        for isa in skinny::Isa::available() {
            let mut y = vec![f32::NAN; m * n];
            skinny::run_with(isa, &x, &w, m, k, n, &mut y);
            for (got, want) in y.iter().zip(&want) {
                assert!(
                    (*got as f64 - want).abs() < 1e-4,
                    "{}: {got} vs {want}",
                    isa.name()
                );
            }
        }
    }

    #[test]
    fn several_weights_in_one_call_equal_one_call_each() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        // Sizes around the threading threshold and shares that do not divide the weights.
        for &(m, k, ns) in &[
            (1, 576, &[576usize, 192, 192][..]),
            (3, 64, &[5, 4099, 13][..]),
            (8, 33, &[1, 2, 3][..]),
            (1, 896, &[4864, 4864][..]),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let ws: Vec<Vec<f32>> = ns
                .iter()
                .map(|&n| (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect())
                .collect();
            let mut ys: Vec<Vec<f32>> = ns.iter().map(|&n| vec![f32::NAN; m * n]).collect();
            let mut products: Vec<Product> = ws
                .iter()
                .zip(ys.iter_mut())
                .zip(ns)
                .map(|((w, y), &n)| Product { w, n, y })
                .collect();
            matmul_nt_many(&x, m, k, &mut products);
            for ((w, y), &n) in ws.iter().zip(&ys).zip(ns) {
                let mut alone = vec![0f32; m * n];
                matmul_nt(&x, w, m, k, n, &mut alone);
                assert_eq!(y, &alone, "[{m}, {k}]·[{n}, {k}]ᵀ among {ns:?}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "w is not")]
    fn a_weight_of_the_wrong_size_is_refused() {
        let mut y = vec![0f32; 2];
        matmul_nt(&[1.0; 4], &[1.0; 7], 1, 4, 2, &mut y);
    }
}

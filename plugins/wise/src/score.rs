//! WISE's routing distance, as EasyEdit's `WISE.py::euc` computes it (not the paper's Eq. 3):
//! per token `d_t = ‖act(y′_t) − act(y_t)‖₂`, with `act` the model's own activation applied to
//! both outputs of the edited linear map, then the mean over tokens (the max beyond 100 tokens at
//! inference). Also the matrix products the side memory needs.

use candle_core::{Device, Tensor as CTensor};
use kedit_kernels::blas::Blas;
use kedit_plugin_api::PluginError;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ActFn {
    Silu,
    /// GPT-2's tanh approximation.
    GeluNew,
    /// The exact erf GELU.
    Gelu,
    Relu,
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;

fn erf(x: f64) -> f64 {
    // Numerical Recipes' erfc Chebyshev fit (fractional error < 1.2e-7): std has no erf, and
    // exact GELU only matters for families without a WISE default.
    let t = 1.0 / (1.0 + 0.5 * x.abs());
    let y = 1.0
        - t * (-x * x - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        y
    } else {
        -y
    }
}

impl ActFn {
    pub fn apply(self, z: f32) -> f32 {
        let z = z as f64;
        (match self {
            ActFn::Silu => z / (1.0 + (-z).exp()),
            ActFn::GeluNew => {
                0.5 * z * (1.0 + (SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)).tanh())
            }
            ActFn::Gelu => 0.5 * z * (1.0 + erf(z / std::f64::consts::SQRT_2)),
            ActFn::Relu => z.max(0.0),
        }) as f32
    }

    pub fn derivative(self, z: f32) -> f32 {
        let z = z as f64;
        (match self {
            ActFn::Silu => {
                let s = 1.0 / (1.0 + (-z).exp());
                s * (1.0 + z * (1.0 - s))
            }
            ActFn::GeluNew => {
                let u = SQRT_2_OVER_PI * (z + 0.044715 * z * z * z);
                let t = u.tanh();
                0.5 * (1.0 + t)
                    + 0.5 * z * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * z * z)
            }
            ActFn::Gelu => {
                let pdf = (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt();
                0.5 * (1.0 + erf(z / std::f64::consts::SQRT_2)) + z * pdf
            }
            ActFn::Relu => {
                if z > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
        }) as f32
    }
}

/// `d_t` for every token: `y` and `ys` are `[n, out]` row-major (original and side outputs).
pub fn token_distances(act: ActFn, y: &[f32], ys: &[f32], out: usize) -> Vec<f32> {
    y.chunks_exact(out)
        .zip(ys.chunks_exact(out))
        .map(|(a, b)| {
            let sq: f64 = a
                .iter()
                .zip(b)
                .map(|(&p, &q)| {
                    let d = (act.apply(q) - act.apply(p)) as f64;
                    d * d
                })
                .sum();
            sq.sqrt() as f32
        })
        .collect()
}

/// The gradient of `d_t` with respect to the side output `ys_t` (0 where `d_t` = 0, torch's
/// subgradient of the norm), scaled by `coef`, added into `into`.
pub fn add_distance_grad(act: ActFn, y: &[f32], ys: &[f32], d: f32, coef: f32, into: &mut [f32]) {
    if d == 0.0 || coef == 0.0 {
        return;
    }
    for ((g, &p), &q) in into.iter_mut().zip(y).zip(ys) {
        let diff = act.apply(q) - act.apply(p);
        *g += coef * diff / d * act.derivative(q);
    }
}

/// EasyEdit's inference score of one row: the mean of `d_t`, or the max beyond 100 tokens.
pub fn row_score(d: &[f32]) -> f32 {
    if d.len() > 100 {
        d.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    } else {
        mean(d)
    }
}

pub fn mean(d: &[f32]) -> f32 {
    if d.is_empty() {
        return 0.0;
    }
    (d.iter().map(|&v| v as f64).sum::<f64>() / d.len() as f64) as f32
}

/// A row-major `[rows, cols]` f32 matrix.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl Matrix {
    pub fn new(data: Vec<f32>, rows: usize, cols: usize, what: &str) -> Result<Self, PluginError> {
        if data.len() != rows * cols {
            return Err(PluginError::internal(format!(
                "wise: {what} has {} values, not [{rows}, {cols}]",
                data.len()
            )));
        }
        Ok(Self { data, rows, cols })
    }
}

/// `x·Dᵀ` for `x: [n, in]` and `D: [out, in]`, as `[n, out]` row-major.
///
/// This runs in every forward pass through the side memory, so it uses the model's own product
/// kernels: the streaming kernel for a few rows (a decoding step reads ΔW once, on every core),
/// the run-time BLAS for more, candle's GEMM only when no BLAS is installed.
pub fn x_dt(x: &[f32], n: usize, d: &Matrix) -> Result<Vec<f32>, PluginError> {
    x_dt_with(x, n, d, kedit_kernels::blas::get())
}

fn x_dt_with(
    x: &[f32],
    n: usize,
    d: &Matrix,
    blas: Option<&Blas>,
) -> Result<Vec<f32>, PluginError> {
    let (out, inp) = (d.rows, d.cols);
    if x.len() != n * inp {
        return Err(PluginError::internal(format!(
            "wise: x·ΔWᵀ: the input has {} values, not [{n}, {inp}]",
            x.len()
        )));
    }
    if kedit_kernels::handles(n, inp, out) {
        let mut y = vec![0f32; n * out];
        kedit_kernels::matmul_nt(x, &d.data, n, inp, out, &mut y);
        return Ok(y);
    }
    if let Some(blas) = blas {
        return Ok(blas.matmul_nt(x, &d.data, n, inp, out));
    }
    let e = candle_err("x·ΔWᵀ");
    let xm = CTensor::from_slice(x, (n, inp), &Device::Cpu).map_err(&e)?;
    let dm = CTensor::from_slice(&d.data, (out, inp), &Device::Cpu).map_err(&e)?;
    xm.matmul(&dm.t().map_err(&e)?)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(e)
}

/// `Σ_t g_tᵀ x_t` for `g: [n, out]` and `x: [n, in]`, as `[out, in]` row-major.
pub fn gt_x(
    g: &[f32],
    x: &[f32],
    n: usize,
    out: usize,
    inp: usize,
) -> Result<Vec<f32>, PluginError> {
    gt_x_with(g, x, (n, out, inp), kedit_kernels::blas::get())
}

fn gt_x_with(
    g: &[f32],
    x: &[f32],
    (n, out, inp): (usize, usize, usize),
    blas: Option<&Blas>,
) -> Result<Vec<f32>, PluginError> {
    if g.len() != n * out || x.len() != n * inp {
        return Err(PluginError::internal(format!(
            "wise: Gᵀx: {} and {} values do not fit [{n}, {out}] and [{n}, {inp}]",
            g.len(),
            x.len()
        )));
    }
    if let Some(blas) = blas {
        // Gᵀx = (Gᵀ)·(xᵀ)ᵀ: both transposes are small next to the product.
        return Ok(blas.matmul_nt(&transpose(g, n, out), &transpose(x, n, inp), out, n, inp));
    }
    let e = candle_err("Gᵀx");
    let gm = CTensor::from_slice(g, (n, out), &Device::Cpu).map_err(&e)?;
    let xm = CTensor::from_slice(x, (n, inp), &Device::Cpu).map_err(&e)?;
    gm.t()
        .and_then(|gt| gt.contiguous())
        .and_then(|gt| gt.matmul(&xm))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(e)
}

fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; a.len()];
    for (r, row) in a.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            t[c * rows + r] = v;
        }
    }
    t
}

fn candle_err(what: &str) -> impl Fn(candle_core::Error) -> PluginError + '_ {
    move |e| PluginError::internal(format!("wise: {what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every backend the products can take (the streaming kernel for ≤ 8 rows, the BLAS when
    /// one is installed, candle's GEMM otherwise) against an f64 reference.
    #[test]
    fn side_memory_products_match_a_reference_on_every_backend() {
        let (out, inp) = (37, 53);
        let val =
            |i: usize, salt: usize| (((i * 7919 + salt * 104_729) % 1000) as f32 / 500.0) - 1.0;
        let d = Matrix::new((0..out * inp).map(|i| val(i, 1)).collect(), out, inp, "d").unwrap();
        let mut backends = vec![None];
        if let Some(b) = kedit_kernels::blas::get() {
            backends.push(Some(b));
        }
        for blas in backends {
            for n in [1, 3, 8, 9, 40] {
                let x: Vec<f32> = (0..n * inp).map(|i| val(i, 2)).collect();
                let y = x_dt_with(&x, n, &d, blas).unwrap();
                for t in 0..n {
                    for o in 0..out {
                        let want: f64 = (0..inp)
                            .map(|i| x[t * inp + i] as f64 * d.data[o * inp + i] as f64)
                            .sum();
                        assert!((y[t * out + o] as f64 - want).abs() < 1e-4, "x·Dᵀ n={n}");
                    }
                }
                let g: Vec<f32> = (0..n * out).map(|i| val(i, 3)).collect();
                let gx = gt_x_with(&g, &x, (n, out, inp), blas).unwrap();
                for o in 0..out {
                    for i in 0..inp {
                        let want: f64 = (0..n)
                            .map(|t| g[t * out + o] as f64 * x[t * inp + i] as f64)
                            .sum();
                        assert!((gx[o * inp + i] as f64 - want).abs() < 1e-4, "Gᵀx n={n}");
                    }
                }
            }
        }
        assert!(x_dt(&[0.0; 5], 1, &d).is_err(), "a short input is refused");
    }

    #[test]
    fn derivatives_match_finite_differences() {
        for act in [ActFn::Silu, ActFn::GeluNew, ActFn::Gelu, ActFn::Relu] {
            for &z in &[-3.0f32, -0.7, 0.3, 2.5] {
                let h = 1e-3f32;
                let fd = (act.apply(z + h) - act.apply(z - h)) / (2.0 * h);
                assert!(
                    (fd - act.derivative(z)).abs() < 2e-3,
                    "{act:?} at {z}: {fd} vs {}",
                    act.derivative(z)
                );
            }
        }
        assert!((ActFn::Gelu.apply(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((ActFn::GeluNew.apply(1.0) - 0.841_192).abs() < 1e-5);
    }

    #[test]
    fn distances_scores_and_products() {
        let y = [0.0f32, 0.0, 1.0, 1.0];
        let ys = [0.0f32, 0.0, 1.0, 1.0];
        assert_eq!(token_distances(ActFn::Relu, &y, &ys, 2), vec![0.0, 0.0]);
        let ys = [3.0f32, 4.0, 1.0, 1.0];
        assert_eq!(token_distances(ActFn::Relu, &y, &ys, 2), vec![5.0, 0.0]);
        assert_eq!(row_score(&[1.0, 3.0]), 2.0);
        let long: Vec<f32> = (0..101).map(|i| i as f32).collect();
        assert_eq!(row_score(&long), 100.0);
        let x = [1.0, 2.0, 3.0, 4.0];
        let d = Matrix::new(vec![1.0, 0.0, 1.0, 1.0, 0.0, 2.0], 3, 2, "d").unwrap();
        assert_eq!(x_dt(&x, 2, &d).unwrap(), vec![1.0, 3.0, 4.0, 3.0, 7.0, 8.0]);
        let g = [1.0, 0.0, 2.0, 1.0, 1.0, 0.0];
        // Σ_t g_tᵀ x_t = [[1·1+1·3, 1·2+1·4], [0+3, 0+4], [2+0, 4+0]].
        assert_eq!(
            gt_x(&g, &x, 2, 3, 2).unwrap(),
            vec![4.0, 6.0, 3.0, 4.0, 2.0, 4.0]
        );
    }
}

//! Small dense f64 linear algebra: what ROME's `C⁻¹k` and MEMIT's regularised solve need.

use kedit_plugin_api::PluginError;

pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

pub fn norm(a: &[f32]) -> f64 {
    dot(a, a).sqrt()
}

/// Cholesky factor `L` (row-major, lower) of a symmetric positive-definite `n×n` matrix.
pub fn cholesky(a: &[f64], n: usize) -> Result<Vec<f64>, PluginError> {
    let mut l = a.to_vec();
    for j in 0..n {
        let row_j: Vec<f64> = l[j * n..j * n + j].to_vec();
        let d = l[j * n + j] - row_j.iter().map(|v| v * v).sum::<f64>();
        if !(d > 0.0 && d.is_finite()) {
            return Err(PluginError::numeric(format!(
                "the matrix is not positive definite (pivot {j} is {d:e})"
            )));
        }
        let d = d.sqrt();
        l[j * n + j] = d;
        for v in l[j * n + j + 1..(j + 1) * n].iter_mut() {
            *v = 0.0;
        }
        for i in j + 1..n {
            let row_i = &mut l[i * n..(i + 1) * n];
            let s: f64 = row_i[..j].iter().zip(&row_j).map(|(a, b)| a * b).sum();
            row_i[j] = (row_i[j] - s) / d;
        }
    }
    Ok(l)
}

/// Solves `A x = b` given the Cholesky factor of A.
pub fn cholesky_solve(l: &[f64], n: usize, b: &[f64]) -> Vec<f64> {
    let mut y = b.to_vec();
    for i in 0..n {
        let row = &l[i * n..i * n + i];
        let s: f64 = row.iter().zip(&y[..i]).map(|(a, b)| a * b).sum();
        y[i] = (y[i] - s) / l[i * n + i];
    }
    for i in (0..n).rev() {
        let mut s = y[i];
        for k in i + 1..n {
            s -= l[k * n + i] * y[k];
        }
        y[i] = s / l[i * n + i];
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves_a_small_spd_system() {
        // A = [[4, 2, 0], [2, 5, 1], [0, 1, 3]], x = [1, -1, 2] → b = A x.
        let a = [4.0, 2.0, 0.0, 2.0, 5.0, 1.0, 0.0, 1.0, 3.0];
        let x = [1.0, -1.0, 2.0];
        let b: Vec<f64> = (0..3)
            .map(|i| (0..3).map(|j| a[i * 3 + j] * x[j]).sum())
            .collect();
        let l = cholesky(&a, 3).unwrap();
        let got = cholesky_solve(&l, 3, &b);
        for (g, w) in got.iter().zip(x) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
        assert!(cholesky(&[1.0, 2.0, 2.0, 1.0], 2).is_err());
    }
}

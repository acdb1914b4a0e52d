//! Matmuls with frozen weights.
//!
//! candle's matmul backward also computes the gradient of its right-hand side: for a frozen
//! weight that is wasted work and memory (for the 49152×576 LM head, 3× the memory and 2–3× the
//! time of the useful part). [`FrozenMatmul`] is the same matmul as a custom op whose backward
//! returns only the input gradient `g·W`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Shape, Tensor};
use kedit_kernels::blas;

/// `x · Wᵀ` for `x: [m, k]`, `W: [n, k]`; backward gives only `dx = g · W`.
struct FrozenMatmul;

impl FrozenMatmul {
    /// Runs the backend's own matmul with `W` seen transposed, exactly as `x.matmul(&w.t())`
    /// does.
    fn forward<S: BackendStorage>(
        x: &S,
        x_layout: &Layout,
        w: &S,
        w_layout: &Layout,
    ) -> candle_core::Result<(S, Shape)> {
        let (m, k) = x_layout.shape().dims2()?;
        let (n, k2) = w_layout.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen matmul: input [{m}, {k}] does not fit weight [{n}, {k2}]");
        }
        let wt = w_layout.transpose(0, 1)?;
        let out = x.matmul(w, (1, m, n, k), x_layout, &wt)?;
        Ok((out, Shape::from((m, n))))
    }
}

/// The contiguous f32 data of a CPU operand, `None` for any other kind.
pub(super) fn f32_slice<'a>(s: &'a CpuStorage, layout: &Layout) -> Option<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        return None;
    };
    let (a, b) = layout.contiguous_offsets()?;
    Some(&v[a..b])
}

/// `x·Wᵀ` on contiguous f32 operands by [`kedit_kernels`]: the streaming kernel for few rows, the
/// run-time BLAS (when one is installed) for the rest; `None` when neither takes the operands
/// (the backend's matmul does).
fn kernel_nt(
    x: &CpuStorage,
    x_layout: &Layout,
    w: &CpuStorage,
    w_layout: &Layout,
) -> Option<(CpuStorage, Shape)> {
    let (m, k) = x_layout.shape().dims2().ok()?;
    let (n, k2) = w_layout.shape().dims2().ok()?;
    if k != k2 {
        return None;
    }
    let skinny = kedit_kernels::handles(m, k, n);
    let blas = if skinny { None } else { Some(blas::get()?) };
    let (xs, ws) = (f32_slice(x, x_layout)?, f32_slice(w, w_layout)?);
    let y = match blas {
        None => {
            let mut y = vec![0f32; m * n];
            kedit_kernels::matmul_nt(xs, ws, m, k, n, &mut y);
            y
        }
        Some(b) => b.matmul_nt(xs, ws, m, k, n),
    };
    Some((CpuStorage::F32(y), Shape::from((m, n))))
}

/// `g·W`, the input gradient of [`FrozenMatmul`], for `g: [m, n]`, `W: [n, k]`; through the
/// run-time BLAS on the CPU when there is one.
struct InputGrad;

impl InputGrad {
    /// `(m, n, k)` for `g: [m, n]`, `W: [n, k]`.
    fn dims(g: &Layout, w: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let (m, n) = g.shape().dims2()?;
        let (n2, k) = w.shape().dims2()?;
        if n != n2 {
            candle_core::bail!("frozen matmul grad: [{m}, {n}] does not fit weight [{n2}, {k}]");
        }
        Ok((m, n, k))
    }

    /// The backend's own matmul.
    fn backend<S: BackendStorage>(
        g: &S,
        g_layout: &Layout,
        w: &S,
        w_layout: &Layout,
    ) -> candle_core::Result<(S, Shape)> {
        let (m, n, k) = Self::dims(g_layout, w_layout)?;
        let out = g.matmul(w, (1, m, k, n), g_layout, w_layout)?;
        Ok((out, Shape::from((m, k))))
    }
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "frozen-matmul-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if let (Some(b), Some(g), Some(w)) = (blas::get(), f32_slice(s1, l1), f32_slice(s2, l2)) {
            let (m, n, k) = Self::dims(l1, l2)?;
            let y = b.matmul_nn(g, w, m, n, k);
            return Ok((CpuStorage::F32(y), Shape::from((m, k))));
        }
        Self::backend(s1, l1, s2, l2)
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        Self::backend(s1, l1, s2, l2)
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match kernel_nt(s1, l1, s2, l2) {
            Some(out) => Ok(out),
            None => Self::forward(s1, l1, s2, l2),
        }
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        Self::forward(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        Ok((Some(g.apply_op2_no_bwd(w, &InputGrad)?), None))
    }
}

/// `x · Wᵀ` over the last dimension of `x` (`[..., in]` → `[..., out]`) with `W: [out, in]`.
/// When `x` takes part in a gradient computation the weight stays frozen: no gradient of `W` is
/// ever computed.
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let k = *dims
        .last()
        .expect("linear input has at least one dimension");
    let m: usize = dims[..dims.len() - 1].iter().product();
    let (n, _) = w.dims2()?;
    let x2 = x.reshape((m, k))?;
    // One op for inference and gradients alike, so both compute the same values; on the CPU it
    // takes the streaming kernel for few rows (decoding), else the run-time BLAS if installed,
    // else the backend's GEMM.
    let y = if x2.track_op() {
        x2.apply_op2(w, FrozenMatmul)?
    } else {
        x2.apply_op2_no_bwd(w, &FrozenMatmul)?
    };
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("non-empty") = n;
    y.reshape(out_dims)
}

/// `x·W_iᵀ` for every weight, over the last dimension of `x` as [`linear`] does, computed in one
/// parallel section of the streaming kernel — the same values as one [`linear`] per weight.
/// `None` when that kernel does not apply (more than a few rows, a tracked `x`, another device
/// or dtype): then the caller uses [`linear`] per weight.
pub fn skinny_linears(x: &Tensor, ws: &[&Tensor]) -> candle_core::Result<Option<Vec<Tensor>>> {
    let dims = x.dims();
    let Some(&k) = dims.last() else {
        return Ok(None);
    };
    let m: usize = dims[..dims.len() - 1].iter().product();
    if x.track_op() || !kedit_kernels::handles(m, k, 0) || !x.is_contiguous() {
        return Ok(None);
    }
    let (x_storage, x_layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(x_cpu) = &*x_storage else {
        return Ok(None);
    };
    let Some(xs) = f32_slice(x_cpu, x_layout) else {
        return Ok(None);
    };
    let mut guards = Vec::with_capacity(ws.len());
    for w in ws {
        match w.dims2() {
            Ok((_, k2)) if k2 == k => guards.push(w.storage_and_layout()),
            _ => return Ok(None),
        }
    }
    let mut weights = Vec::with_capacity(ws.len());
    for (storage, layout) in &guards {
        let candle_core::Storage::Cpu(cpu) = &**storage else {
            return Ok(None);
        };
        let Some(w) = f32_slice(cpu, layout) else {
            return Ok(None);
        };
        weights.push(w);
    }
    let mut outs: Vec<Vec<f32>> = weights
        .iter()
        .map(|w| vec![0f32; m * w.len() / k])
        .collect();
    let mut products: Vec<kedit_kernels::Product> = weights
        .iter()
        .zip(outs.iter_mut())
        .map(|(w, y)| kedit_kernels::Product {
            w,
            n: w.len() / k,
            y,
        })
        .collect();
    kedit_kernels::matmul_nt_many(xs, m, k, &mut products);
    drop(guards);
    drop(x_storage);
    outs.into_iter()
        .map(|y| {
            let mut out_dims = dims.to_vec();
            *out_dims.last_mut().expect("non-empty") = y.len() / m;
            Tensor::from_vec(y, out_dims, x.device())
        })
        .collect::<candle_core::Result<Vec<_>>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_matmul_matches_matmul_and_skips_the_weight_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &Tensor::arange(0f32, 6., &dev)
                .unwrap()
                .reshape((2, 3))
                .unwrap(),
        )
        .unwrap();
        let w = (Tensor::arange(0f32, 12., &dev)
            .unwrap()
            .reshape((4, 3))
            .unwrap()
            * 0.1)
            .unwrap();
        let y = linear(x.as_tensor(), &w).unwrap();
        let reference = x.as_tensor().detach().matmul(&w.t().unwrap()).unwrap();
        assert_eq!(
            y.to_vec2::<f32>().unwrap(),
            reference.to_vec2::<f32>().unwrap()
        );
        let grads = y.sum_all().unwrap().backward().unwrap();
        let gx = grads.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        let expect = Tensor::ones((2, 4), candle_core::DType::F32, &dev)
            .unwrap()
            .matmul(&w)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(gx, expect);
        assert!(grads.get(&w).is_none(), "a frozen weight got a gradient");
    }

    #[test]
    fn skinny_linears_equal_one_linear_each_and_decline_what_they_do_not_take() {
        let dev = Device::Cpu;
        let ws: Vec<Tensor> = [576usize, 192, 192]
            .iter()
            .map(|&n| Tensor::randn(0f32, 1., (n, 64), &dev).unwrap())
            .collect();
        let refs: Vec<&Tensor> = ws.iter().collect();
        let x = Tensor::randn(0f32, 1., (1, 3, 64), &dev).unwrap();
        let together = skinny_linears(&x, &refs)
            .unwrap()
            .expect("3 rows are skinny");
        for (w, y) in ws.iter().zip(&together) {
            let alone = linear(&x, w).unwrap();
            assert_eq!(y.dims(), alone.dims());
            assert_eq!(
                y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                alone.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        let many_rows = Tensor::randn(0f32, 1., (2, 9, 64), &dev).unwrap();
        assert!(skinny_linears(&many_rows, &refs).unwrap().is_none());
        let tracked = Var::from_tensor(&x).unwrap();
        assert!(skinny_linears(tracked.as_tensor(), &refs)
            .unwrap()
            .is_none());
        let f64_x = x.to_dtype(candle_core::DType::F64).unwrap();
        assert!(skinny_linears(&f64_x, &refs).unwrap().is_none());
    }
}

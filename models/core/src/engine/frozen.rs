//! Matmuls with frozen weights.
//!
//! candle's matmul backward also computes the gradient of its right-hand side: for a frozen
//! weight that is wasted work and memory (for the 49152×576 LM head, 3× the memory and 2–3× the
//! time of the useful part). [`FrozenMatmul`] is the same matmul as a custom op whose backward
//! returns only the input gradient `g·W`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Shape, Tensor};

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

/// `x·Wᵀ` for few rows on contiguous f32 operands by [`kedit_kernels`]' streaming kernel; `None`
/// when the operands are not of that kind (the backend's matmul takes them).
fn kernel_nt(
    x: &CpuStorage,
    x_layout: &Layout,
    w: &CpuStorage,
    w_layout: &Layout,
) -> Option<(CpuStorage, Shape)> {
    let (CpuStorage::F32(xs), CpuStorage::F32(ws)) = (x, w) else {
        return None;
    };
    let (m, k) = x_layout.shape().dims2().ok()?;
    let (n, k2) = w_layout.shape().dims2().ok()?;
    if k != k2 || !kedit_kernels::handles(m, k, n) {
        return None;
    }
    let (x0, x1) = x_layout.contiguous_offsets()?;
    let (w0, w1) = w_layout.contiguous_offsets()?;
    let mut y = vec![0f32; m * n];
    kedit_kernels::matmul_nt(&xs[x0..x1], &ws[w0..w1], m, k, n, &mut y);
    Some((CpuStorage::F32(y), Shape::from((m, n))))
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
        Ok((Some(grad.matmul(w)?), None))
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
    // takes the streaming kernel for few rows (decoding) and the backend's GEMM otherwise.
    let y = if x2.track_op() {
        x2.apply_op2(w, FrozenMatmul)?
    } else {
        x2.apply_op2_no_bwd(w, &FrozenMatmul)?
    };
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("non-empty") = n;
    y.reshape(out_dims)
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
}

//! The transformer engine shared by every family: the per-call [`pass::Pass`], the attention
//! kernel, RoPE, norms, frozen matmuls, interventions and the KV cache.

pub mod alibi;
pub mod attention;
pub mod edits;
pub mod frozen;
pub mod fused;
pub mod heads;
pub mod kv_cache;
pub mod layer_norm;
pub mod layout;
pub mod loss;
pub mod memo;
pub mod ops;
pub mod pass;
pub mod rope;

pub use attention::AttentionShape;
pub use heads::Qkv;
pub use ops::Path;
pub use pass::Pass;
pub use rope::{Rope, RopeStyle};

#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::Tensor;

    /// The largest absolute elementwise difference of two tensors of one shape.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }
}

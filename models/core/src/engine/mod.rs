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
pub mod ops;
pub mod pass;
pub mod rope;

pub use attention::AttentionShape;
pub use heads::Qkv;
pub use ops::Path;
pub use pass::Pass;
pub use rope::{Rope, RopeStyle};

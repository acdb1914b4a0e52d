//! kedit's transformer runtime, shared by every model-family plugin: checkpoint loading (HF
//! safetensors and GGUF), an exact and differentiable forward on candle with captures,
//! interventions and site modules, gradients of editor-described losses with frozen weights,
//! journaled weight writes, KV-cached generation, tokenization and HF export.
//!
//! A family is an [`arch::Architecture`]: its config, its tensor-name mapping and an explicit
//! forward written against [`engine::Pass`]. [`runtime::Runtime`] turns any architecture into
//! a [`kedit_plugin_api::Model`].

pub mod arch;
pub mod chat;
pub mod checkpoint;
pub mod device;
pub mod engine;
pub mod error;
pub mod fsutil;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod journal;
pub mod modules;
pub mod runtime;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod text;
pub mod weights;

pub use error::{Error, Result};
pub use runtime::{Runtime, Source, SourceKind};

//! [`Runtime`]: a loaded model of any family behind the plugin ABI's [`kedit_plugin_api::Model`]
//! trait. The weights are only changed through journaled writes; everything an inference call
//! needs (captures, interventions, KV cache) lives in that call.

mod edit;
mod export;
mod forward;
mod generate;
mod grad;
mod model_impl;
mod prefix;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use candle_core::{Device, Tensor};
use kedit_plugin_api::{ActSite, Batch, WeightSite};

use crate::arch::Architecture;
use crate::engine::memo::ProductMemo;
use crate::engine::Pass;
use crate::journal::Journal;
use crate::modules::ModuleSet;
use crate::text::TextCodec;
use crate::weights::WeightStore;

pub use generate::{sample_next, Decoder};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    HfDir,
    Gguf,
}

/// Where a model was loaded from.
#[derive(Clone, Debug)]
pub struct Source {
    pub path: PathBuf,
    pub kind: SourceKind,
}

/// Change counters of the embedding (index 0) and every layer (index l + 1). A prepared handle
/// remembers the sum below its layer; counters only grow, so an equal sum means nothing below
/// changed.
struct Epochs(Vec<u64>);

impl Epochs {
    fn new(n_layers: usize) -> Self {
        Self(vec![0; n_layers + 1])
    }

    fn bump(&mut self, site: WeightSite, tied_head: bool) {
        match site.layer() {
            Some(l) => self.0[l + 1] += 1,
            None if site == WeightSite::Embed || tied_head => self.0[0] += 1,
            None => {}
        }
    }

    fn below(&self, layer: usize) -> u64 {
        self.0[..=layer].iter().sum()
    }

    /// Changes anywhere in the blocks or the embedding.
    fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// A batch whose residual stream entering `from_layer` was computed once.
struct Prepared {
    batch: Batch,
    from_layer: usize,
    resid: Tensor,
    epoch: u64,
    /// The batch's frozen prefixes (see [`prefix`]), built by the first gradient call that can
    /// use them.
    frozen: Mutex<prefix::FrozenState>,
    /// Products its gradient calls compute again unchanged (see [`crate::engine::memo`]).
    products: ProductMemo,
}

/// How many gradient calls took which path (for `extension("gradient_paths")`).
#[derive(Default)]
struct GradientPaths {
    full: AtomicU64,
    prepared: AtomicU64,
    frozen_prefix: AtomicU64,
    /// Linear products of prepared calls answered from the batch's [`ProductMemo`].
    memo_hits: AtomicU64,
    /// Gradient calls whose last block ran its output map and MLP on the loss slots alone.
    last_block_slots: AtomicU64,
}

pub struct Runtime<A: Architecture> {
    arch: A,
    weights: WeightStore,
    modules: ModuleSet,
    journal: Journal,
    epochs: Epochs,
    prepared: HashMap<u64, Prepared>,
    next_handle: u64,
    gradient_paths: GradientPaths,
    text: TextCodec,
    source: Source,
    device: Device,
}

/// Where a pass over the blocks begins.
enum Start {
    /// Token ids `[batch, seq]`, plus optional noise on their embeddings.
    Embeddings { ids: Tensor, noise: Option<Tensor> },
    /// A residual stream entering block `layer` (a prepared batch).
    Resid { layer: usize, h: Tensor },
}

impl<A: Architecture> Runtime<A> {
    pub fn new(
        arch: A,
        weights: WeightStore,
        text: TextCodec,
        source: Source,
        device: Device,
    ) -> Self {
        let n_layers = arch.dims().n_layers;
        Self {
            arch,
            weights,
            modules: ModuleSet::default(),
            journal: Journal::default(),
            epochs: Epochs::new(n_layers),
            prepared: HashMap::new(),
            next_handle: 0,
            gradient_paths: GradientPaths::default(),
            text,
            source,
            device,
        }
    }

    pub fn arch(&self) -> &A {
        &self.arch
    }

    pub fn weights(&self) -> &WeightStore {
        &self.weights
    }

    pub fn text(&self) -> &TextCodec {
        &self.text
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The id that fills padded slots (masked, so any valid id does).
    fn pad_id(&self) -> u32 {
        let vocab = self.arch.dims().vocab_size as u32;
        self.text.pad.unwrap_or(0).min(vocab - 1)
    }

    /// Runs the embedding (for [`Start::Embeddings`]) and blocks up to, not including, `end`.
    fn run_blocks(
        &self,
        pass: &mut Pass<'_>,
        start: Start,
        end: usize,
    ) -> crate::error::Result<Tensor> {
        let (mut h, first) = match start {
            Start::Embeddings { ids, noise } => {
                let mut e = self.arch.embed(pass, &ids)?;
                if let Some(noise) = noise {
                    e = (e + noise)?;
                }
                (pass.act(ActSite::Embed, e)?, 0)
            }
            Start::Resid { layer, h } => (h, layer),
        };
        for layer in first..end {
            h = self.arch.block(pass, layer, h)?;
        }
        Ok(h)
    }
}

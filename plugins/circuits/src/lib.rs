//! kedit analysis plugin: knowledge circuits and the logit lens over any model family, through
//! canonical sites only (docs/circuits.md). The host runs them through the plugin's `locate`
//! (methods `circuit` and `lens`, [`plugin`]) and draws the reports itself.
//!
//! - [`graph`]: the nodes (input, every head, every MLP, logits) and edges, top-n and pruning;
//! - [`probe`]: node outputs and per-node inputs as sites;
//! - [`eap`]: EAP-IG edge scores, direct edge patching, and the circuit-only metric;
//! - [`circuit`]: one circuit with faithfulness and head roles, and before/after comparison;
//! - [`lens`]: the logit lens;
//! - [`prompts`]: clean/corrupted pairs from text facts (subject swaps of equal token length);
//! - [`locate`]: the settings and JSON reports of `circuit` and `lens`;
//! - [`plugin`]: the plugin's manifest and `locate`.

pub mod circuit;
pub mod eap;
pub mod graph;
pub mod lens;
pub mod locate;
pub mod plugin;
pub mod probe;
pub mod prompts;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use circuit::{compare, find_circuit, Circuit, CircuitDiff, CircuitSettings, HeadRole};
pub use eap::PromptPair;
pub use graph::{Edge, Node};
pub use probe::Probe;
pub use plugin::{info, new_editor};

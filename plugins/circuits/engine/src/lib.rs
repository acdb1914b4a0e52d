//! Knowledge circuits and the logit lens over any model family, through canonical sites only
//! (docs/circuits.md): the engine of the circuits plugin (`plugins/circuits`), whose `locate`
//! the host calls.
//!
//! - [`graph`]: the nodes (input, every head, every MLP, logits) and edges, top-n and pruning;
//! - [`probe`]: node outputs and per-node inputs as sites;
//! - [`eap`]: EAP-IG edge scores, direct edge patching, and the circuit-only metric;
//! - [`circuit`]: one circuit with faithfulness and head roles, and before/after comparison;
//! - [`lens`]: the logit lens;
//! - [`prompts`]: clean/corrupted pairs from text facts (subject swaps of equal token length).

pub mod circuit;
pub mod eap;
pub mod graph;
pub mod lens;
pub mod probe;
pub mod prompts;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use circuit::{compare, find_circuit, Circuit, CircuitDiff, CircuitSettings, HeadRole};
pub use eap::PromptPair;
pub use graph::{Edge, Node};
pub use probe::Probe;

//! `kedit eval`: the field's metrics (../shared/METHODS.md §6, [`metrics`]), computed per request
//! in one batched forward pass ([`score`]), under the single / sequential / batch protocols
//! ([`protocol`]), against a cached pre-edit baseline ([`baseline`]), with the corpus perplexity
//! before and after ([`heldout`]), written as JSON, JSONL,
//! Markdown and charts ([`report`], [`chart`]). SafeEdit records take their own path
//! ([`safeedit`]): generated responses, safety judges, DS/DG.

pub mod baseline;
pub mod chart;
pub mod circuit_graph;
pub mod circuit_render;
pub mod graph_image;
pub mod heatmap;
pub mod heldout;
pub mod metrics;
pub mod protocol;
pub mod report;
pub mod safeedit;
pub mod score;

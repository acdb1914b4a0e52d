//! The host's view of a circuit graph, for drawing: the circuits engine's own node names, scored
//! edges and graph operations, which the plugin's JSON is written in. The analysis itself runs in
//! the circuits plugin; the host only reads what it answers.

pub use kedit_circuits::graph::{by_pair, nodes_of, prune_dead_nodes, Edge, Node};

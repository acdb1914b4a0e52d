//! The computation graph of a decoder: the input embedding, every attention head, every MLP and
//! the logits, with an edge from every node to every node that reads the residual stream after
//! it (in the residual order: input, then per layer its heads, then its MLP, then the logits).

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

/// A node of the graph; written in JSON by its name (`input`, `a3.h5`, `m7`, `logits`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Node {
    Input,
    Head { layer: usize, head: usize },
    Mlp { layer: usize },
    Logits,
}

impl Node {
    /// Where the node sits in the residual order: reading the stream at a smaller rank never
    /// sees the output of a node with a larger one.
    fn rank(self, n_layers: usize) -> usize {
        match self {
            Node::Input => 0,
            Node::Head { layer, .. } => 1 + 2 * layer,
            Node::Mlp { layer } => 2 + 2 * layer,
            Node::Logits => 1 + 2 * n_layers,
        }
    }

    pub fn layer(self) -> Option<usize> {
        match self {
            Node::Head { layer, .. } | Node::Mlp { layer } => Some(layer),
            Node::Input | Node::Logits => None,
        }
    }

    pub fn parse(s: &str) -> Option<Node> {
        match s {
            "input" => return Some(Node::Input),
            "logits" => return Some(Node::Logits),
            _ => {}
        }
        if let Some(rest) = s.strip_prefix('m') {
            return rest.parse().ok().map(|layer| Node::Mlp { layer });
        }
        let rest = s.strip_prefix('a')?;
        let (l, h) = rest.split_once(".h")?;
        Some(Node::Head {
            layer: l.parse().ok()?,
            head: h.parse().ok()?,
        })
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Input => write!(f, "input"),
            Node::Head { layer, head } => write!(f, "a{layer}.h{head}"),
            Node::Mlp { layer } => write!(f, "m{layer}"),
            Node::Logits => write!(f, "logits"),
        }
    }
}

impl Serialize for Node {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Node::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "'{s}' is not a node name (input, aL.hH, mL, logits)"
            ))
        })
    }
}

/// One edge and its attribution score.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Edge {
    pub from: Node,
    pub to: Node,
    /// EAP-IG score: the estimated change of the metric when this edge alone carries the
    /// corrupted prompt's activation (negative: the edge supports the clean answer).
    pub score: f64,
}

/// Every node of a model with `n_layers` blocks of `n_heads` heads, in residual order.
pub fn nodes(n_layers: usize, n_heads: usize) -> Vec<Node> {
    let mut out = vec![Node::Input];
    for layer in 0..n_layers {
        out.extend((0..n_heads).map(|head| Node::Head { layer, head }));
        out.push(Node::Mlp { layer });
    }
    out.push(Node::Logits);
    out
}

/// Nodes that write to the residual stream (everything but the logits).
pub fn sources(n_layers: usize, n_heads: usize) -> Vec<Node> {
    nodes(n_layers, n_heads)
        .into_iter()
        .filter(|n| *n != Node::Logits)
        .collect()
}

/// Nodes that read the residual stream (everything but the input).
pub fn targets(n_layers: usize, n_heads: usize) -> Vec<Node> {
    nodes(n_layers, n_heads)
        .into_iter()
        .filter(|n| *n != Node::Input)
        .collect()
}

/// Whether `to` reads the residual stream after `from` wrote to it.
pub fn is_edge(from: Node, to: Node, n_layers: usize) -> bool {
    from != Node::Logits && to != Node::Input && from.rank(n_layers) < to.rank(n_layers)
}

/// Every edge of the full graph (scores zero).
pub fn all_edges(n_layers: usize, n_heads: usize) -> Vec<(Node, Node)> {
    let mut out = Vec::new();
    for to in targets(n_layers, n_heads) {
        for from in sources(n_layers, n_heads) {
            if is_edge(from, to, n_layers) {
                out.push((from, to));
            }
        }
    }
    out
}

/// The `n` edges of largest |score| (ties keep the residual order).
pub fn top_n(edges: &[Edge], n: usize) -> Vec<Edge> {
    let mut sorted: Vec<Edge> = edges.to_vec();
    sorted.sort_by(|a, b| b.score.abs().total_cmp(&a.score.abs()));
    sorted.truncate(n);
    sorted
}

/// Removes nodes that cannot matter: a node other than the input with no incoming edge, or
/// other than the logits with no outgoing edge, together with its edges, until nothing changes
/// (KnowledgeCircuits' `prune_dead_nodes`). What is left connects the input to the logits.
pub fn prune_dead_nodes(mut edges: Vec<Edge>) -> Vec<Edge> {
    loop {
        let mut has_in: BTreeSet<Node> = BTreeSet::new();
        let mut has_out: BTreeSet<Node> = BTreeSet::new();
        for e in &edges {
            has_out.insert(e.from);
            has_in.insert(e.to);
        }
        let alive = |n: Node| {
            (n == Node::Input || has_in.contains(&n)) && (n == Node::Logits || has_out.contains(&n))
        };
        let before = edges.len();
        edges.retain(|e| alive(e.from) && alive(e.to));
        if edges.len() == before {
            return edges;
        }
    }
}

/// The nodes an edge list touches, in residual order.
pub fn nodes_of(edges: &[Edge]) -> Vec<Node> {
    let set: BTreeSet<Node> = edges.iter().flat_map(|e| [e.from, e.to]).collect();
    let mut v: Vec<Node> = set.into_iter().collect();
    v.sort_by_key(|n| (n.rank(usize::MAX / 4), *n));
    v
}

/// Edges as a map from (from, to) to score.
pub fn by_pair(edges: &[Edge]) -> HashMap<(Node, Node), f64> {
    edges.iter().map(|e| ((e.from, e.to), e.score)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_round_trip() {
        for n in nodes(3, 4) {
            assert_eq!(Node::parse(&n.to_string()), Some(n));
        }
        assert_eq!(Node::parse("a1.x2"), None);
        let json = serde_json::to_string(&Node::Head { layer: 3, head: 5 }).unwrap();
        assert_eq!(json, "\"a3.h5\"");
        assert_eq!(
            serde_json::from_str::<Node>(&json).unwrap(),
            Node::Head { layer: 3, head: 5 }
        );
        assert!(serde_json::from_str::<Node>("\"h3\"").is_err());
    }

    #[test]
    fn the_full_graph_has_every_forward_edge_and_no_other() {
        let (l, h) = (2, 3);
        let edges = all_edges(l, h);
        // input → 6 heads, 2 MLPs, logits; heads of layer 0 → m0, layer-1 heads, m1, logits; ...
        let count = |from: Node| edges.iter().filter(|(f, _)| *f == from).count();
        assert_eq!(count(Node::Input), 9);
        assert_eq!(count(Node::Head { layer: 0, head: 1 }), 1 + 3 + 1 + 1);
        assert_eq!(count(Node::Mlp { layer: 0 }), 3 + 1 + 1);
        assert_eq!(count(Node::Mlp { layer: 1 }), 1);
        assert!(!edges.contains(&(
            Node::Head { layer: 0, head: 0 },
            Node::Head { layer: 0, head: 1 }
        )));
        assert!(!edges.contains(&(Node::Mlp { layer: 0 }, Node::Head { layer: 0, head: 0 })));
    }

    #[test]
    fn pruning_drops_nodes_without_a_path_to_both_ends() {
        let e = |from, to| Edge {
            from,
            to,
            score: 1.0,
        };
        let (a, b, m) = (
            Node::Head { layer: 0, head: 0 },
            Node::Head { layer: 1, head: 0 },
            Node::Mlp { layer: 0 },
        );
        let kept = prune_dead_nodes(vec![
            e(Node::Input, a),
            e(a, Node::Logits),
            e(Node::Input, m),  // m has no way out
            e(b, Node::Logits), // b has no way in
        ]);
        assert_eq!(kept, vec![e(Node::Input, a), e(a, Node::Logits)]);
    }
}

//! The host's view of a circuit graph, for drawing: nodes by the names the circuits plugin
//! writes (`input`, `a3.h5`, `m7`, `logits`), scored edges, and the few graph operations that
//! choosing what to draw needs. The analysis itself (EAP-IG, pruning of the found circuit)
//! lives in the plugin; this only reads its JSON.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

/// A node of the graph. The order (input, heads, MLPs, logits, then by layer and head) is the
/// order nodes are listed in within a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Node {
    Input,
    Head { layer: usize, head: usize },
    Mlp { layer: usize },
    Logits,
}

impl Node {
    /// Position in the residual order: input, then per layer its heads and its MLP, logits.
    fn rank(self) -> usize {
        match self {
            Node::Input => 0,
            Node::Head { layer, .. } => 1 + 2 * layer,
            Node::Mlp { layer } => 2 + 2 * layer,
            Node::Logits => usize::MAX,
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

/// One edge and its attribution score (negative: it supports the answer).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Edge {
    pub from: Node,
    pub to: Node,
    pub score: f64,
}

/// Removes nodes without a path from the input and to the logits, with their edges, until
/// nothing changes: what a subset of a circuit's edges (the strongest, drawn) leaves dangling.
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
    v.sort_by_key(|n| (n.rank(), *n));
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
    fn node_names_round_trip_and_bad_names_are_refused() {
        for name in ["input", "a0.h3", "m11", "logits"] {
            let n: Node = serde_json::from_str(&format!("\"{name}\"")).unwrap();
            assert_eq!(n.to_string(), name);
        }
        assert!(serde_json::from_str::<Node>("\"h3\"").is_err());
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
            e(Node::Input, m),
            e(b, Node::Logits),
        ]);
        assert_eq!(kept, vec![e(Node::Input, a), e(a, Node::Logits)]);
        assert_eq!(nodes_of(&kept), vec![Node::Input, a, Node::Logits]);
    }
}

//! A circuit (as the circuits plugin reports it) as Graphviz DOT text, and a layered layout
//! (one row per layer that has circuit nodes, the input on top, the logits at the bottom) that
//! [`super::graph_image`] draws as SVG and PNG without Graphviz.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::circuit_graph::{by_pair, nodes_of, Edge, Node};

/// Edges that support the answer (negative score) are blue, the others red.
pub const SUPPORT: (u8, u8, u8) = (31, 90, 180);
pub const OPPOSE: (u8, u8, u8) = (200, 50, 40);

fn color_of(e: &Edge) -> (u8, u8, u8) {
    if e.score < 0.0 {
        SUPPORT
    } else {
        OPPOSE
    }
}

fn max_abs(edges: &[Edge]) -> f64 {
    edges
        .iter()
        .map(|e| e.score.abs())
        .fold(0.0, f64::max)
        .max(1e-30)
}

/// Pen width of an edge, proportional to |score| (1 to 6).
pub fn pen_width(e: &Edge, max: f64) -> f64 {
    1.0 + 5.0 * e.score.abs() / max
}

/// Graphviz DOT: heads as ellipses, MLPs as boxes, one rank per layer.
pub fn to_dot(title: &str, nodes: &[Node], edges: &[Edge]) -> String {
    let max = max_abs(edges);
    let mut s = String::new();
    let _ = writeln!(s, "digraph circuit {{");
    let _ = writeln!(
        s,
        "  label=\"{}\"; labelloc=t; rankdir=TB;",
        title.replace('"', "\\\"")
    );
    let _ = writeln!(s, "  node [fontname=\"Helvetica\"];");
    for (rank, row) in rows(nodes) {
        let _ = write!(s, "  {{ rank=same;");
        for n in row {
            let shape = match n {
                Node::Head { .. } => "ellipse",
                Node::Mlp { .. } => "box",
                _ => "doublecircle",
            };
            let _ = write!(s, " \"{n}\" [shape={shape}];");
        }
        let _ = writeln!(s, " }} // {rank}");
    }
    for e in edges {
        let (r, g, b) = color_of(e);
        let _ = writeln!(
            s,
            "  \"{}\" -> \"{}\" [penwidth={:.2}, color=\"#{r:02x}{g:02x}{b:02x}\", tooltip=\"{:.4}\"];",
            e.from,
            e.to,
            pen_width(e, max),
            e.score
        );
    }
    s.push_str("}\n");
    s
}

/// Nodes grouped by row: input, each layer in order, logits.
fn rows(nodes: &[Node]) -> BTreeMap<usize, Vec<Node>> {
    let mut rows: BTreeMap<usize, Vec<Node>> = BTreeMap::new();
    for &n in nodes {
        let key = match n {
            Node::Input => 0,
            Node::Head { layer, .. } | Node::Mlp { layer } => layer + 1,
            Node::Logits => usize::MAX,
        };
        rows.entry(key).or_default().push(n);
    }
    for row in rows.values_mut() {
        row.sort();
    }
    rows
}

/// A placed node: centre and label.
#[derive(Clone, Debug, PartialEq)]
pub struct PlacedNode {
    pub node: Node,
    pub x: f64,
    pub y: f64,
    pub label: String,
}

/// A placed edge: endpoints (node centres), pen width and colour.
#[derive(Clone, Debug, PartialEq)]
pub struct PlacedEdge {
    pub from: (f64, f64),
    pub to: (f64, f64),
    pub width: f64,
    pub color: (u8, u8, u8),
}

pub struct Layout {
    pub width: f64,
    pub height: f64,
    pub box_w: f64,
    pub box_h: f64,
    pub nodes: Vec<PlacedNode>,
    pub edges: Vec<PlacedEdge>,
    /// (y, label) of each row, for a layer ruler.
    pub row_labels: Vec<(f64, String)>,
}

pub const BOX_W: f64 = 64.0;
pub const BOX_H: f64 = 24.0;
const GAP_X: f64 = 14.0;
const ROW_H: f64 = 70.0;
const MARGIN: f64 = 60.0;
const RULER: f64 = 70.0;

/// Edges that a compared circuit gained (green) or lost (grey).
pub const APPEARED: (u8, u8, u8) = (20, 150, 60);
pub const VANISHED: (u8, u8, u8) = (190, 190, 190);

/// One row per layer with circuit nodes, nodes spread evenly and centred; edges coloured by
/// the sign of their score.
pub fn layout(nodes: &[Node], edges: &[Edge]) -> Layout {
    let colored: Vec<(Edge, (u8, u8, u8))> =
        edges.iter().map(|e| (e.clone(), color_of(e))).collect();
    layout_colored(nodes, &colored)
}

/// Both circuits in one picture: the union of their nodes; edges in both coloured by sign,
/// edges only `after` has green, edges only `before` had grey.
pub fn compare_layout(before: &[Edge], after: &[Edge]) -> Layout {
    let b = by_pair(before);
    let a = by_pair(after);
    let mut colored: Vec<(Edge, (u8, u8, u8))> = after
        .iter()
        .map(|e| {
            let c = if b.contains_key(&(e.from, e.to)) {
                color_of(e)
            } else {
                APPEARED
            };
            (e.clone(), c)
        })
        .collect();
    colored.extend(
        before
            .iter()
            .filter(|e| !a.contains_key(&(e.from, e.to)))
            .map(|e| (e.clone(), VANISHED)),
    );
    let all: Vec<Edge> = colored.iter().map(|(e, _)| e.clone()).collect();
    layout_colored(&nodes_of(&all), &colored)
}

fn layout_colored(nodes: &[Node], colored: &[(Edge, (u8, u8, u8))]) -> Layout {
    let edges: Vec<Edge> = colored.iter().map(|(e, _)| e.clone()).collect();
    let rows = rows(nodes);
    let widest = rows.values().map(Vec::len).max().unwrap_or(1) as f64;
    let width = 2.0 * MARGIN + RULER + widest * (BOX_W + GAP_X);
    let height = 2.0 * MARGIN + rows.len().max(1) as f64 * ROW_H;
    let mut placed = Vec::new();
    let mut row_labels = Vec::new();
    for (r, (key, row)) in rows.iter().enumerate() {
        let y = MARGIN + (r as f64 + 0.5) * ROW_H;
        let span = row.len() as f64 * (BOX_W + GAP_X);
        let x0 = MARGIN + RULER + (width - 2.0 * MARGIN - RULER - span) / 2.0;
        for (i, &n) in row.iter().enumerate() {
            placed.push(PlacedNode {
                node: n,
                x: x0 + (i as f64 + 0.5) * (BOX_W + GAP_X),
                y,
                label: n.to_string(),
            });
        }
        let label = match *key {
            0 => "input".to_string(),
            usize::MAX => "logits".to_string(),
            l => format!("layer {}", l - 1),
        };
        row_labels.push((y, label));
    }
    let at = |n: Node| {
        placed
            .iter()
            .find(|p| p.node == n)
            .map(|p| (p.x, p.y))
            .unwrap_or((0.0, 0.0))
    };
    let max = max_abs(&edges);
    // Thin edges first, so that the strongest are drawn on top.
    let mut sorted: Vec<&(Edge, (u8, u8, u8))> = colored.iter().collect();
    sorted.sort_by(|a, b| a.0.score.abs().total_cmp(&b.0.score.abs()));
    let placed_edges = sorted
        .into_iter()
        .map(|(e, color)| PlacedEdge {
            from: at(e.from),
            to: at(e.to),
            width: pen_width(e, max),
            color: *color,
        })
        .collect();
    Layout {
        width,
        height,
        box_w: BOX_W,
        box_h: BOX_H,
        nodes: placed,
        edges: placed_edges,
        row_labels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_names_every_node_and_edge() {
        let a = Node::Head { layer: 1, head: 2 };
        let edges = vec![
            Edge {
                from: Node::Input,
                to: a,
                score: -2.0,
            },
            Edge {
                from: a,
                to: Node::Logits,
                score: 1.0,
            },
        ];
        let nodes = nodes_of(&edges);
        let dot = to_dot("t", &nodes, &edges);
        assert!(
            dot.contains("\"input\" -> \"a1.h2\" [penwidth=6.00"),
            "{dot}"
        );
        assert!(
            dot.contains("\"a1.h2\" -> \"logits\" [penwidth=3.50"),
            "{dot}"
        );
        let l = layout(&nodes, &edges);
        assert_eq!(l.nodes.len(), 3);
        assert!(l.nodes[0].y < l.nodes[1].y && l.nodes[1].y < l.nodes[2].y);
    }
}

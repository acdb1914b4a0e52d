//! Node outputs and node inputs through canonical sites, for any family.
//!
//! A node's output is what it adds to the residual stream: the input embedding (`embed`), head
//! h's slice of the o-projection input (`layer.l.attn_z`) times its columns of `layer.l.attn.o`
//! (the o bias belongs to no head), and the MLP output (`layer.l.mlp_out`). A node's input is the
//! residual stream as that node alone sees it: `layer.l.head_in` (one copy per head),
//! `layer.l.mlp_in`, and for the logits `layer.{L-1}.resid_post`, which only the final norm reads.

use std::collections::HashMap;

use kedit_plugin_api::{
    Batch, ForwardRequest, Intervention, InterventionMode, LogitsWanted, ModelClient, Padding,
    PluginError, Tensor,
};

use crate::graph::{self, Node};

/// The sizes the graph depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub n_layers: usize,
    pub n_heads: usize,
    pub d_model: usize,
    pub head_dim: usize,
}

/// Per-node vectors over one prompt: `[seq, d_model]` row-major for each node.
pub type NodeVectors = HashMap<Node, Vec<f32>>;

/// What one run of a prompt yields.
pub struct Run {
    /// Output of every source node.
    pub outputs: NodeVectors,
    /// The residual stream entering the final norm, `[seq, d_model]`.
    pub resid_final: Vec<f32>,
    /// Logits at the last position.
    pub last_logits: Vec<f32>,
    /// Per layer, attention probabilities `[seq, heads·seq]` when asked for.
    pub attn_probs: Option<Vec<Vec<f32>>>,
}

/// A model seen as the graph's nodes.
pub struct Probe<'c, 'm> {
    pub client: &'c ModelClient<'m>,
    pub shape: Shape,
    /// Per layer, `layer.l.attn.o` as `[d_model, heads·head_dim]`.
    w_o: Vec<Tensor>,
}

impl<'c, 'm> Probe<'c, 'm> {
    pub fn new(client: &'c ModelClient<'m>) -> Result<Self, PluginError> {
        let f = client.facts()?;
        let shape = Shape {
            n_layers: f.n_layers as usize,
            n_heads: f.n_heads as usize,
            d_model: f.d_model as usize,
            head_dim: f.head_dim as usize,
        };
        let w_o = (0..shape.n_layers)
            .map(|l| client.read_weight(&format!("layer.{l}.attn.o")))
            .collect::<Result<Vec<_>, _>>()?;
        for (l, w) in w_o.iter().enumerate() {
            w.expect_shape(
                &format!("layer.{l}.attn.o"),
                &[shape.d_model, shape.n_heads * shape.head_dim],
            )?;
        }
        Ok(Self { client, shape, w_o })
    }

    pub fn sources(&self) -> Vec<Node> {
        graph::sources(self.shape.n_layers, self.shape.n_heads)
    }

    pub fn targets(&self) -> Vec<Node> {
        graph::targets(self.shape.n_layers, self.shape.n_heads)
    }

    /// Runs `ids` with `deltas` added to node inputs (`[seq, d]` per target node) and returns
    /// every node output.
    pub fn run(
        &self,
        ids: &[u32],
        deltas: &NodeVectors,
        with_probs: bool,
    ) -> Result<Run, PluginError> {
        let s = self.shape;
        let seq = ids.len();
        let mut req = ForwardRequest::new(
            Batch::new(vec![ids.to_vec()], Padding::Right),
            LogitsWanted::Last,
        );
        let mut captures = vec!["embed".to_string()];
        for l in 0..s.n_layers {
            captures.push(format!("layer.{l}.attn_z"));
            captures.push(format!("layer.{l}.mlp_out"));
        }
        captures.push(format!("layer.{}.resid_post", s.n_layers - 1));
        if with_probs {
            captures.extend((0..s.n_layers).map(|l| format!("layer.{l}.attn_probs")));
        }
        req.captures = captures.iter().map(|c| c.as_str().into()).collect();
        req.interventions = self.input_interventions(deltas, seq, 0).into();
        let out = self.client.forward(&req)?;
        let caps = out.captures;
        let d = s.d_model;
        let mut outputs = NodeVectors::new();
        outputs.insert(Node::Input, caps[0].as_slice()[..seq * d].to_vec());
        for l in 0..s.n_layers {
            let z = caps[1 + 2 * l].as_slice();
            for h in 0..s.n_heads {
                outputs.insert(
                    Node::Head { layer: l, head: h },
                    self.head_output(l, h, z, seq),
                );
            }
            outputs.insert(
                Node::Mlp { layer: l },
                caps[2 + 2 * l].as_slice()[..seq * d].to_vec(),
            );
        }
        let resid_final = caps[1 + 2 * s.n_layers].as_slice()[..seq * d].to_vec();
        let attn_probs = with_probs.then(|| {
            (0..s.n_layers)
                .map(|l| caps[2 + 2 * s.n_layers + l].as_slice().to_vec())
                .collect()
        });
        let logits = out
            .logits
            .into_option()
            .ok_or_else(|| PluginError::internal("the forward pass returned no logits"))?;
        Ok(Run {
            outputs,
            resid_final,
            last_logits: logits.row(0).to_vec(),
            attn_probs,
        })
    }

    /// Head h of layer l: `z[:, h·hd..(h+1)·hd] · W_o[:, h·hd..(h+1)·hd]ᵀ` → `[seq, d]`.
    fn head_output(&self, layer: usize, head: usize, z: &[f32], seq: usize) -> Vec<f32> {
        let Shape {
            n_heads,
            d_model: d,
            head_dim: hd,
            ..
        } = self.shape;
        let w = self.w_o[layer].as_slice();
        let width = n_heads * hd;
        let mut out = vec![0f32; seq * d];
        for p in 0..seq {
            let zh = &z[p * width + head * hd..p * width + (head + 1) * hd];
            for (i, o) in out[p * d..(p + 1) * d].iter_mut().enumerate() {
                let wi = &w[i * width + head * hd..i * width + (head + 1) * hd];
                *o = wi.iter().zip(zh).map(|(a, b)| a * b).sum();
            }
        }
        out
    }

    /// The site a target node's input is read at, and the offset of the node's slice in it.
    pub fn input_site(&self, node: Node) -> (String, usize, usize) {
        let s = self.shape;
        match node {
            Node::Head { layer, head } => (
                format!("layer.{layer}.head_in"),
                head * s.d_model,
                s.n_heads * s.d_model,
            ),
            Node::Mlp { layer } => (format!("layer.{layer}.mlp_in"), 0, s.d_model),
            Node::Logits => (format!("layer.{}.resid_post", s.n_layers - 1), 0, s.d_model),
            Node::Input => unreachable!("the input node reads nothing"),
        }
    }

    /// Fixed Add interventions on `row` placing each target's delta at its input site; all
    /// heads of one layer share one vector per position. Positions where a site's vector is
    /// all zero are left out.
    pub fn input_interventions(
        &self,
        deltas: &NodeVectors,
        seq: usize,
        row: usize,
    ) -> Vec<Intervention> {
        let d = self.shape.d_model;
        let mut per_site: HashMap<String, (usize, Vec<f32>)> = HashMap::new();
        for (node, delta) in deltas {
            let (site, offset, width) = self.input_site(*node);
            let entry = per_site
                .entry(site)
                .or_insert_with(|| (width, vec![0f32; seq * width]));
            for p in 0..seq {
                let dst = &mut entry.1[p * width + offset..p * width + offset + d];
                for (a, b) in dst.iter_mut().zip(&delta[p * d..(p + 1) * d]) {
                    *a += b;
                }
            }
        }
        let mut sites: Vec<_> = per_site.into_iter().collect();
        sites.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = Vec::new();
        for (site, (width, buf)) in sites {
            for p in 0..seq {
                let v = &buf[p * width..(p + 1) * width];
                if v.iter().any(|&x| x != 0.0) {
                    out.push(Intervention::fixed(
                        &site,
                        row,
                        p,
                        InterventionMode::Add,
                        Tensor::vector(v.to_vec()),
                    ));
                }
            }
        }
        out
    }
}

/// `a − b` elementwise.
pub fn sub(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

//! Checks every family's tests run on its tiny fixtures (feature `testkit`, dev-dependencies
//! only): the new sites agree with the existing ones, the graph has the right nodes, EAP scores
//! match direct edge patching, the circuit-only metric reproduces the clean and corrupted runs at
//! its two extremes, and the logit lens of the last block is the model's own output. Each family
//! crate runs them from its own tests (plugin crates cannot share one test binary: each exports
//! the same root-module symbol). Everything panics on failure.

use kedit_plugin_api::{
    Batch, ForwardRequest, Intervention, InterventionMode, LogitsWanted, ModelBox, ModelClient,
    Padding, Tensor,
};

use crate::eap::{self, PairRuns};
use crate::graph::{self, Node};
use crate::lens::logit_lens;
use crate::{find_circuit, CircuitSettings, Probe, PromptPair};

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b })
}

/// Runs every check on one family's model. `additive`: whether the family adds block outputs
/// straight into the residual stream (GLM-4's sandwich norms do not).
pub fn check_family(name: &str, additive: bool, model: &mut ModelBox) {
    head_outputs_sum_to_the_attention_output_up_to_a_constant_bias(name, model);
    per_head_inputs_reproduce_the_shared_path_and_stay_per_head(name, model);
    an_mlp_input_delta_changes_the_mlp_but_not_the_residual_bypass(name, additive, model);
    eap_scores_match_direct_edge_patching(name, model);
    circuit_metric_spans_clean_to_corrupted_and_the_circuit_has_the_right_nodes(
        name, additive, model,
    );
    the_lens_of_the_last_block_is_the_model_itself(name, model);
}

fn forward(
    client: &ModelClient<'_>,
    ids: &[u32],
    captures: &[String],
    ivs: Vec<Intervention>,
) -> Vec<Tensor> {
    let mut req = ForwardRequest::new(
        Batch::new(vec![ids.to_vec()], Padding::Right),
        LogitsWanted::Last,
    );
    req.captures = captures.iter().map(|s| s.as_str().into()).collect();
    req.interventions = ivs.into();
    let out = client.forward(&req).unwrap();
    let mut v: Vec<Tensor> = out.captures.into_iter().collect();
    v.push(out.logits.into_option().unwrap());
    v
}

const CLEAN: [u32; 8] = [5, 17, 33, 40, 8, 9, 100, 61];
const SUBJECT: std::ops::Range<usize> = 1..3;

fn pair(client: &ModelClient<'_>) -> PromptPair {
    let mut corrupt = CLEAN.to_vec();
    corrupt[1] = 200;
    corrupt[2] = 201;
    let logits = |ids: &[u32]| forward(client, ids, &[], vec![]).pop().unwrap().into_vec();
    let answer = argmax(&logits(&CLEAN)) as u32;
    let mut lc = logits(&corrupt);
    lc[answer as usize] = f32::NEG_INFINITY;
    PromptPair {
        clean: CLEAN.to_vec(),
        corrupt,
        subject: SUBJECT,
        answer,
        foil: argmax(&lc) as u32,
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn head_outputs_sum_to_the_attention_output_up_to_a_constant_bias(
    name: &str,
    model: &mut ModelBox,
) {
    {
        let client = ModelClient::new(model.sabi_reborrow_mut());
        let probe = Probe::new(&client).unwrap();
        let s = probe.shape;
        let run = probe.run(&CLEAN, &Default::default(), false).unwrap();
        let caps: Vec<String> = (0..s.n_layers)
            .map(|l| format!("layer.{l}.attn_out"))
            .collect();
        let attn = forward(&client, &CLEAN, &caps, vec![]);
        let d = s.d_model;
        for (l, attn_out) in attn.iter().take(s.n_layers).enumerate() {
            let mut rest = attn_out.as_slice().to_vec();
            for h in 0..s.n_heads {
                for (r, x) in rest
                    .iter_mut()
                    .zip(&run.outputs[&Node::Head { layer: l, head: h }])
                {
                    *r -= x;
                }
            }
            // What no head owns is the o bias: the same vector at every position.
            for p in 1..CLEAN.len() {
                let diff = max_diff(&rest[p * d..(p + 1) * d], &rest[..d]);
                assert!(diff < 1e-4, "{name} layer {l} position {p}: {diff}");
            }
        }
    }
}

fn per_head_inputs_reproduce_the_shared_path_and_stay_per_head(name: &str, model: &mut ModelBox) {
    {
        let client = ModelClient::new(model.sabi_reborrow_mut());
        let probe = Probe::new(&client).unwrap();
        let s = probe.shape;
        let plain = forward(&client, &CLEAN, &["layer.1.attn_z".into()], vec![]);
        // Capturing head_in switches every head of the block to its own input copy.
        let per_head = forward(
            &client,
            &CLEAN,
            &["layer.1.attn_z".into(), "layer.1.head_in".into()],
            vec![],
        );
        let d_logits = max_diff(plain[1].as_slice(), per_head[2].as_slice());
        assert!(
            d_logits < 1e-4,
            "{name}: per-head path changes logits by {d_logits}"
        );
        assert_eq!(
            per_head[1].dims(),
            vec![1, CLEAN.len(), s.n_heads * s.d_model]
        );
        // A delta on head 1's input changes head 1's z and no other head's.
        let mut v = vec![0f32; s.n_heads * s.d_model];
        // Not a constant vector: LayerNorm would remove it.
        for (i, x) in v[s.d_model..2 * s.d_model].iter_mut().enumerate() {
            *x = if i % 3 == 0 { 0.5 } else { -0.2 };
        }
        let iv = Intervention::fixed(
            "layer.1.head_in",
            0,
            4,
            InterventionMode::Add,
            Tensor::vector(v),
        );
        let patched = forward(&client, &CLEAN, &["layer.1.attn_z".into()], vec![iv]);
        let (z0, z1) = (plain[0].as_slice(), patched[0].as_slice());
        let hd = s.head_dim;
        let w = s.n_heads * hd;
        for h in 0..s.n_heads {
            let slice = |z: &[f32]| -> Vec<f32> {
                (0..CLEAN.len())
                    .flat_map(|p| z[p * w + h * hd..p * w + (h + 1) * hd].to_vec())
                    .collect()
            };
            let diff = max_diff(&slice(z0), &slice(z1));
            if h == 1 {
                assert!(diff > 1e-4, "{name}: head 1 did not see its delta");
            } else {
                assert!(diff < 1e-5, "{name}: head {h} changed by {diff}");
            }
        }
    }
}

fn an_mlp_input_delta_changes_the_mlp_but_not_the_residual_bypass(
    name: &str,
    additive: bool,
    model: &mut ModelBox,
) {
    {
        let client = ModelClient::new(model.sabi_reborrow_mut());
        let d = client.facts().unwrap().d_model as usize;
        let caps = [
            "layer.0.mlp_out".to_string(),
            "layer.0.resid_post".to_string(),
        ];
        let plain = forward(&client, &CLEAN, &caps, vec![]);
        let iv = Intervention::fixed(
            "layer.0.mlp_in",
            0,
            3,
            InterventionMode::Add,
            Tensor::vector(
                (0..d)
                    .map(|i| if i % 2 == 0 { 0.3 } else { -0.1 })
                    .collect(),
            ),
        );
        let patched = forward(&client, &CLEAN, &caps, vec![iv]);
        assert!(
            max_diff(plain[0].as_slice(), patched[0].as_slice()) > 1e-4,
            "{name}"
        );
        if additive {
            let bypass = |t: &[Tensor]| -> Vec<f32> {
                t[1].as_slice()
                    .iter()
                    .zip(t[0].as_slice())
                    .map(|(r, m)| r - m)
                    .collect()
            };
            let diff = max_diff(&bypass(&plain), &bypass(&patched));
            assert!(
                diff < 1e-5,
                "{name}: the residual stream itself changed by {diff}"
            );
        }
    }
}

fn eap_scores_match_direct_edge_patching(name: &str, model: &mut ModelBox) {
    {
        let client = ModelClient::new(model.sabi_reborrow_mut());
        let probe = Probe::new(&client).unwrap();
        let pair = pair(&client);
        let runs = PairRuns::new(&probe, &pair).unwrap();
        // One step: the gradient at the clean prompt, which a small patch measures directly.
        let grads = eap::input_gradients(&probe, &pair, &runs, 1).unwrap();
        let edges = eap::score_edges(&probe, &runs.differences(), &grads);
        let s = probe.shape;
        assert_eq!(edges.len(), graph::all_edges(s.n_layers, s.n_heads).len());
        let picks = [
            (Node::Input, Node::Logits),
            (Node::Input, Node::Head { layer: 1, head: 1 }),
            (Node::Head { layer: 0, head: 0 }, Node::Mlp { layer: 1 }),
            (
                Node::Mlp { layer: 0 },
                Node::Head {
                    layer: 2,
                    head: s.n_heads - 1,
                },
            ),
            (Node::Head { layer: 1, head: 2 }, Node::Logits),
        ];
        let by = graph::by_pair(&edges);
        let top = graph::top_n(&edges, 3);
        let mut checked = picks.to_vec();
        checked.extend(top.iter().map(|e| (e.from, e.to)));
        for (from, to) in checked {
            let score = by[&(from, to)];
            // Central difference of a small patch: (M(+ε) − M(−ε)) / 2ε.
            let eps = 1e-2;
            let plus = eap::patch_edge(&probe, &pair, &runs, from, to, eps).unwrap();
            let minus = eap::patch_edge(&probe, &pair, &runs, from, to, -eps).unwrap();
            let measured = (plus + minus) / 2.0;
            let tol = 0.03 * score.abs().max(measured.abs()) + 2e-4;
            assert!(
                (score - measured).abs() <= tol,
                "{name} {from} -> {to}: EAP {score} vs patching {measured}"
            );
        }
    }
}

fn circuit_metric_spans_clean_to_corrupted_and_the_circuit_has_the_right_nodes(
    name: &str,
    additive: bool,
    model: &mut ModelBox,
) {
    {
        let client = ModelClient::new(model.sabi_reborrow_mut());
        let probe = Probe::new(&client).unwrap();
        let pair = pair(&client);
        let runs = PairRuns::new(&probe, &pair).unwrap();
        let s = probe.shape;
        let all: Vec<graph::Edge> = graph::all_edges(s.n_layers, s.n_heads)
            .into_iter()
            .map(|(from, to)| graph::Edge {
                from,
                to,
                score: 1.0,
            })
            .collect();
        let (full, _) = eap::circuit_metric(&probe, &pair, &runs, &all).unwrap();
        assert!(
            (full - runs.metric_clean).abs() < 1e-4,
            "{name}: {full} vs {}",
            runs.metric_clean
        );
        if additive {
            assert!(
                runs.additivity_error() < 1e-4,
                "{name}: {}",
                runs.additivity_error()
            );
            let (none, passes) = eap::circuit_metric(&probe, &pair, &runs, &[]).unwrap();
            assert!(
                (none - runs.metric_corrupt).abs() < 1e-3,
                "{name}: no edges gives {none}, the corrupted run {} ({passes} passes)",
                runs.metric_corrupt
            );
        } else {
            assert!(
                runs.additivity_error() > 1e-3,
                "{name}: sandwich norms should show"
            );
        }

        let settings = CircuitSettings {
            top_n: 30,
            ig_steps: 3,
            role_threshold: 0.3,
            role_min_effect: 0.0,
        };
        let c = find_circuit(&probe, &pair, &settings).unwrap();
        let every: Vec<Node> = graph::nodes(s.n_layers, s.n_heads);
        assert_eq!(every.len(), 2 + s.n_layers * (s.n_heads + 1));
        assert_eq!(c.edges_total, graph::all_edges(s.n_layers, s.n_heads).len());
        assert!(c.edges.len() <= 30 && !c.edges.is_empty(), "{name}");
        assert!(c.nodes.iter().all(|n| every.contains(n)));
        assert_eq!(c.nodes.first(), Some(&Node::Input), "{name}: {:?}", c.nodes);
        assert_eq!(c.nodes.last(), Some(&Node::Logits), "{name}: {:?}", c.nodes);
        assert!(c.faithfulness.is_finite(), "{name}");
        for role in c.mover_heads.iter().chain(&c.relation_heads) {
            assert!(c.nodes.contains(&role.head));
        }
    }
}

fn the_lens_of_the_last_block_is_the_model_itself(name: &str, model: &mut ModelBox) {
    {
        let client = ModelClient::new(model.sabi_reborrow_mut());
        let n_layers = client.facts().unwrap().n_layers as usize;
        let rows = logit_lens(&client, &CLEAN, 3).unwrap();
        assert_eq!(rows.len(), n_layers + 1);
        assert_eq!(rows[0].stream, "embed");
        let logits = forward(&client, &CLEAN, &[], vec![])
            .pop()
            .unwrap()
            .into_vec();
        let top = &rows[n_layers].top[CLEAN.len() - 1][0];
        assert_eq!(top.token as usize, argmax(&logits), "{name}");
        // A middle block decodes to something else than the last one somewhere.
        assert!(rows[0]
            .top
            .iter()
            .zip(&rows[n_layers].top)
            .any(|(a, b)| a[0].token != b[0].token));
    }
}

//! Test helpers shared by the family crates (feature `testkit`, dev-dependencies only): the
//! shared fixtures, the reference checks every tiny family runs against its PyTorch outputs
//! (logits unpadded / right- / left-padded, activations, KV-cached greedy decoding), gradients
//! against finite differences, and the export round trip. Everything panics on failure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kedit_plugin_api::{
    Batch, ForwardRequest, GenerateRequest, GradOutput, GradRequest, Intervention, KlTerm,
    LogitsWanted, Model, NllTerm, Padding, Tensor,
};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use crate::arch::Architecture;
use crate::Runtime;

/// `../shared` next to the workspace.
pub fn shared() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared"))
}

pub fn fixture(name: &str) -> PathBuf {
    shared().join("fixtures").join(name)
}

/// A reference tensor: shape and values (integers widened to f64, floats as f64).
#[derive(Clone, Debug)]
pub struct Expected {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

impl Expected {
    pub fn f32s(&self) -> Vec<f32> {
        self.values.iter().map(|&v| v as f32).collect()
    }

    pub fn ids(&self) -> Vec<u32> {
        self.values.iter().map(|&v| v as u32).collect()
    }

    /// Rows of a 2-D tensor.
    pub fn rows(&self) -> Vec<Vec<f64>> {
        let cols = self.shape[1..].iter().product::<usize>();
        self.values.chunks(cols).map(|c| c.to_vec()).collect()
    }
}

pub fn load_expected(path: impl AsRef<Path>) -> HashMap<String, Expected> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let values: Vec<f64> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Dtype::I64 => data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            other => panic!("{name}: unexpected dtype {other:?}"),
        };
        out.insert(
            name,
            Expected {
                shape: view.shape().to_vec(),
                values,
            },
        );
    }
    out
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn assert_close(what: &str, got: &Tensor, want: &[f32], tol: f32) -> f32 {
    let d = max_abs_diff(got.as_slice(), want);
    assert!(d <= tol, "{what}: max abs diff {d} > {tol}");
    d
}

/// Deterministic pseudo-random values.
pub fn pseudo_random(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    kedit_plugin_api::noise::gaussian(seed, n, scale)
}

pub fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b })
}

/// Tolerance of the tiny fixtures (f32 against the f32 reference).
pub const TINY_TOL: f32 = 1e-4;

/// One tiny fixture (`shared/fixtures/<name>`) and its reference tensors.
pub struct TinyFixture {
    pub name: String,
    pub exp: HashMap<String, Expected>,
    pub n_layers: usize,
    pub d_ff: usize,
    pub vocab: usize,
}

impl TinyFixture {
    pub fn new(name: &str, n_layers: usize, d_ff: usize) -> Self {
        Self {
            name: name.into(),
            exp: load_expected(fixture(name).join("expected.safetensors")),
            n_layers,
            d_ff,
            vocab: 512,
        }
    }

    pub fn dir(&self) -> PathBuf {
        fixture(&self.name)
    }

    fn rows_of(&self, case: &str) -> Vec<Vec<u32>> {
        let ids = self.exp[&format!("{case}.input_ids")].rows();
        let mask = self.exp[&format!("{case}.attention_mask")].rows();
        ids.iter()
            .zip(&mask)
            .map(|(ids, mask)| {
                ids.iter()
                    .zip(mask)
                    .filter(|(_, &m)| m == 1.0)
                    .map(|(&id, _)| id as u32)
                    .collect()
            })
            .collect()
    }

    /// Case (a): logits, the embedding output, every block output, the final norm, layer 1's
    /// MLP key (`layer.1.mlp_key`) and MLP output (`layer.1.mlp_out`).
    pub fn check_unpadded(&self, model: &impl Model) {
        let name = &self.name;
        let ids = self.exp["a.input_ids"].ids();
        let seq = ids.len();
        let mut req = ForwardRequest::new(Batch::new(vec![ids], Padding::Right), LogitsWanted::All);
        let mut sites = vec!["embed".to_string()];
        sites.extend((0..self.n_layers).map(|i| format!("layer.{i}.resid_post")));
        sites.extend([
            "final_norm".to_string(),
            "layer.1.mlp_key".to_string(),
            "layer.1.mlp_out".to_string(),
        ]);
        req.captures = sites.iter().map(|s| s.as_str().into()).collect();
        let out = model.forward(&req).unwrap();

        let logits = out.logits.into_option().unwrap();
        assert_eq!(logits.dims(), vec![1, seq, self.vocab]);
        let d = assert_close(
            &format!("{name} a.logits"),
            &logits,
            &self.exp["a.logits"].f32s(),
            TINY_TOL,
        );
        eprintln!("{name} a.logits max abs diff {d:e}");
        let c = &out.captures;
        let d = assert_close(
            &format!("{name} a.embed_out"),
            &c[0],
            &self.exp["a.embed_out"].f32s(),
            TINY_TOL,
        );
        eprintln!("{name} a.embed_out max abs diff {d:e}");
        let blocks = self.exp["a.block_out"].f32s();
        let per_block = blocks.len() / self.n_layers;
        for i in 0..self.n_layers {
            let want = &blocks[i * per_block..(i + 1) * per_block];
            let d = assert_close(
                &format!("{name} a.block_out[{i}]"),
                &c[1 + i],
                want,
                TINY_TOL,
            );
            eprintln!("{name} block {i} max abs diff {d:e}");
        }
        let l = self.n_layers;
        let d = assert_close(
            &format!("{name} a.final_norm_out"),
            &c[l + 1],
            &self.exp["a.final_norm_out"].f32s(),
            TINY_TOL,
        );
        eprintln!("{name} final_norm max abs diff {d:e}");
        assert_eq!(c[l + 2].dims(), vec![1, seq, self.d_ff]);
        let d = assert_close(
            &format!("{name} a.layer1.mlp_down_proj_input"),
            &c[l + 2],
            &self.exp["a.layer1.mlp_down_proj_input"].f32s(),
            TINY_TOL,
        );
        eprintln!("{name} layer.1.mlp_key max abs diff {d:e}");
        let d = assert_close(
            &format!("{name} a.layer1.mlp_out"),
            &c[l + 3],
            &self.exp["a.layer1.mlp_out"].f32s(),
            TINY_TOL,
        );
        eprintln!("{name} layer.1.mlp_out max abs diff {d:e}");
    }

    /// Case (b) (`Padding::Right`) or (c) (`Padding::Left`): logits at real positions, and
    /// `Last` logits equal to the `All` ones.
    pub fn check_padded(&self, model: &impl Model, case: &str, padding: Padding) {
        let name = &self.name;
        let v = self.vocab;
        let rows = self.rows_of(case);
        let mask = self.exp[&format!("{case}.attention_mask")].rows();
        let seq = mask[0].len();
        let req = ForwardRequest::new(Batch::new(rows, padding), LogitsWanted::All);
        let out = model.forward(&req).unwrap();
        let logits = out.logits.into_option().unwrap();
        assert_eq!(logits.dims(), vec![3, seq, v]);
        assert!(
            logits.is_finite(),
            "{name} {case}: padded logits hold NaN/inf"
        );
        let want = self.exp[&format!("{case}.logits")].f32s();
        let mut worst = 0f32;
        for (r, mask) in mask.iter().enumerate() {
            for (p, &m) in mask.iter().enumerate() {
                if m == 1.0 {
                    let at = (r * seq + p) * v;
                    let d = max_abs_diff(&logits.as_slice()[at..at + v], &want[at..at + v]);
                    worst = worst.max(d);
                }
            }
        }
        eprintln!("{name} {case}.logits (real positions) max abs diff {worst:e}");
        assert!(
            worst <= TINY_TOL,
            "{name} {case}: max abs diff {worst} > {TINY_TOL}"
        );

        let last = model
            .forward(&ForwardRequest::new(req.batch.clone(), LogitsWanted::Last))
            .unwrap()
            .logits
            .into_option()
            .unwrap();
        assert_eq!(last.dims(), vec![3, v]);
        for r in 0..3 {
            let p = req.batch.last_position(r);
            let at = (r * seq + p) * v;
            let d = max_abs_diff(last.row(r), &logits.as_slice()[at..at + v]);
            assert!(
                d <= 1e-5,
                "{name} {case}: Last logits of row {r} differ from All by {d}"
            );
        }
    }

    /// The 10 greedy tokens with the KV cache, the per-step logits, and the same tokens by full
    /// recomputation.
    pub fn check_kv_greedy<A: Architecture>(&self, model: &Runtime<A>) {
        let name = &self.name;
        let v = self.vocab;
        let prompt = self.exp["gen.prompt_ids"].ids();
        let want_ids = self.exp["gen.new_token_ids"].ids();
        let step_logits = self.exp["gen.step_logits"].f32s();

        let got = model
            .generate(&GenerateRequest::greedy(vec![prompt.clone()], 10))
            .unwrap();
        assert_eq!(got[0], want_ids, "{name}: greedy tokens with the KV cache");

        let mut decoder = model.decoder(&prompt).unwrap();
        let mut worst = 0f32;
        for (step, &id) in want_ids.iter().enumerate() {
            let want = &step_logits[step * v..(step + 1) * v];
            worst = worst.max(max_abs_diff(decoder.logits(), want));
            decoder.push(&[id]).unwrap();
        }
        eprintln!("{name} gen.step_logits max abs diff {worst:e}");
        assert!(worst <= TINY_TOL, "{name}: step logits differ by {worst}");

        let mut ids = prompt.clone();
        for _ in 0..10 {
            let out = model
                .forward(&ForwardRequest::new(
                    Batch::new(vec![ids.clone()], Padding::Right),
                    LogitsWanted::Last,
                ))
                .unwrap();
            let logits = out.logits.into_option().unwrap();
            ids.push(argmax(logits.row(0)) as u32);
        }
        assert_eq!(
            &ids[prompt.len()..],
            want_ids.as_slice(),
            "{name}: full recompute"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Gradients against finite differences.

/// A loss over a right-padded batch of two rows (lengths 9 and 6), with parameters added at
/// activation sites and NLL + KL terms, for a model with vocabulary `vocab`.
pub struct GradientCase {
    pub vocab: usize,
    /// (site, row, position, width) of each parameter.
    pub param_sites: Vec<(String, usize, usize, usize)>,
    /// Weight sites whose (input, output-gradient) pairs are checked as dW = Σ gᵀx.
    pub site_grads: Vec<String>,
    pub params: Vec<Tensor>,
    pub nll: Vec<NllTerm>,
    pub kl: Vec<KlTerm>,
}

const GRAD_SEQ: usize = 9;

pub fn gradient_batch() -> Batch {
    Batch::new(
        vec![
            vec![299, 473, 151, 503, 475, 220, 37, 429, 214],
            vec![292, 436, 342, 86, 406, 435],
        ],
        Padding::Right,
    )
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    crate::engine::ops::log_softmax_row(x)
}

impl GradientCase {
    /// Parameters at every kind of activation site of a 3-layer model of width `d_model` and
    /// MLP width `d_ff`; site gradients at `site_grads`.
    pub fn standard(d_model: usize, d_ff: usize, site_grads: &[&str]) -> Self {
        let param_sites: Vec<(String, usize, usize, usize)> = [
            ("embed", 0, 2, d_model),
            ("layer.0.resid_pre", 1, 1, d_model),
            ("layer.0.attn_out", 0, 4, d_model),
            ("layer.1.mlp_out", 1, 3, d_model),
            ("layer.1.mlp_key", 0, 5, d_ff),
            ("layer.1.resid_post", 1, 2, d_model),
            // The last layer only reaches its own position: put it where a loss term is.
            ("layer.2.attn_out", 0, 8, d_model),
            ("layer.2.resid_post", 0, 7, d_model),
        ]
        .iter()
        .map(|&(s, r, p, w)| (s.to_string(), r, p, w))
        .collect();
        let vocab = 512;
        let params = param_sites
            .iter()
            .enumerate()
            .map(|(i, &(_, _, _, w))| {
                Tensor::new(&[w], pseudo_random(100 + i as u64, w, 0.3)).unwrap()
            })
            .collect();
        let nll = vec![
            NllTerm {
                row: 0,
                position: 8,
                token: 17,
                weight: 1.0,
            },
            NllTerm {
                row: 0,
                position: 7,
                token: 214,
                weight: 0.5,
            },
            NllTerm {
                row: 1,
                position: 5,
                token: 3,
                weight: 2.0,
            },
        ];
        let reference: Vec<f32> = log_softmax(&pseudo_random(7, vocab, 2.0))
            .iter()
            .map(|&v| v as f32)
            .collect();
        let kl = vec![
            KlTerm {
                row: 1,
                position: 4,
                ref_logprobs: Tensor::vector(reference.clone()),
                weight: 0.7,
            },
            KlTerm {
                row: 0,
                position: 8,
                ref_logprobs: Tensor::vector(reference),
                weight: 0.3,
            },
        ];
        Self {
            vocab,
            param_sites,
            site_grads: site_grads.iter().map(|s| s.to_string()).collect(),
            params,
            nll,
            kl,
        }
    }

    fn forward_request(&self, params: Vec<Tensor>, logits: LogitsWanted) -> ForwardRequest {
        let mut f = ForwardRequest::new(gradient_batch(), logits);
        f.interventions = self
            .param_sites
            .iter()
            .enumerate()
            .map(|(i, (site, row, pos, _))| Intervention::add_param(site, *row, *pos, i))
            .collect();
        f.params = params.into();
        f
    }

    pub fn grad_request(&self) -> GradRequest {
        GradRequest {
            forward: self.forward_request(self.params.clone(), LogitsWanted::None),
            nll: self.nll.clone().into(),
            kl: self.kl.clone().into(),
            site_grads: self.site_grads.iter().map(|s| s.as_str().into()).collect(),
            prepared: None.into(),
        }
    }

    pub fn gradient(&self, model: &impl Model) -> GradOutput {
        model.gradient(&self.grad_request()).unwrap()
    }

    /// The loss from a plain forward pass, accumulated in f64 on the host.
    pub fn loss_by_forward(&self, model: &impl Model, params: Vec<Tensor>) -> f64 {
        let out = model
            .forward(&self.forward_request(params, LogitsWanted::All))
            .unwrap();
        let logits = out.logits.into_option().unwrap();
        let v = self.vocab;
        let row = |r: u32, pos: u32| {
            let at = ((r as usize) * GRAD_SEQ + pos as usize) * v;
            log_softmax(&logits.as_slice()[at..at + v])
        };
        let mut loss = 0.0;
        for t in &self.nll {
            loss -= t.weight as f64 * row(t.row, t.position)[t.token as usize];
        }
        for t in &self.kl {
            let lp = row(t.row, t.position);
            let kl: f64 = t
                .ref_logprobs
                .as_slice()
                .iter()
                .zip(&lp)
                .map(|(&r, &l)| (r as f64).exp() * (r as f64 - l))
                .sum();
            loss += t.weight as f64 * kl;
        }
        loss
    }

    /// The gradient call's loss equals the host-side recomputation.
    pub fn check_loss(&self, model: &impl Model) {
        let g = self.gradient(model);
        let by_forward = self.loss_by_forward(model, self.params.clone());
        eprintln!(
            "loss {} (nll {}, kl {}), by forward {by_forward}",
            g.loss, g.nll, g.kl
        );
        assert!((g.loss as f64 - by_forward).abs() < 1e-4 * by_forward.abs().max(1.0));
        assert!((g.loss - (g.nll + g.kl)).abs() < 1e-4);
        assert!(g.kl > 0.0 && g.nll > 0.0);
        assert_eq!(g.nll_logprobs.len(), self.nll.len());
    }

    /// Every parameter gradient is present, non-zero, and matches a central difference.
    pub fn check_param_grads(&self, model: &impl Model) {
        let g = self.gradient(model);
        assert_eq!(
            g.param_grads.len(),
            self.param_sites.len(),
            "a gradient is missing"
        );
        let eps = 1e-2;
        for (i, (site, row, pos, width)) in self.param_sites.iter().enumerate() {
            let grad = &g.param_grads[i];
            assert_eq!(grad.dims(), vec![*width], "{site}");
            assert!(grad.is_finite());
            assert!(
                grad.norm() > 0.0,
                "gradient of the parameter at {site} is zero"
            );
            let dir = direction(1000 + i as u64, grad.as_slice());
            let shifted = |sign: f64| {
                let mut params = self.params.clone();
                for (v, d) in params[i].as_mut_slice().iter_mut().zip(&dir) {
                    *v += (sign * eps) as f32 * d;
                }
                self.loss_by_forward(model, params)
            };
            check_directional(
                &format!("param at {site} (row {row}, pos {pos})"),
                dot(grad.as_slice(), &dir),
                shifted(1.0),
                shifted(-1.0),
                eps,
            );
        }
    }

    /// Every site gradient gives dW = Σ gᵀx matching a central difference of the weight.
    pub fn check_site_grads(&self, model: &mut impl Model) {
        let g = self.gradient(model);
        assert_eq!(
            g.site_grads.len(),
            self.site_grads.len(),
            "a site gradient is missing"
        );
        let eps = 1e-2;
        let rows = 2 * GRAD_SEQ;
        for (k, site) in self.site_grads.iter().enumerate() {
            let sg = &g.site_grads[k];
            let w = model.read_weight(site).unwrap();
            let (out, inp) = (w.dims()[0], w.dims()[1]);
            assert_eq!(sg.input.dims(), vec![2, GRAD_SEQ, inp], "{site} input");
            assert_eq!(
                sg.output_grad.dims(),
                vec![2, GRAD_SEQ, out],
                "{site} output grad"
            );
            assert!(
                sg.output_grad.norm() > 0.0,
                "{site}: output gradient is zero"
            );
            let (x, gy) = (sg.input.as_slice(), sg.output_grad.as_slice());
            let mut dw = vec![0f64; out * inp];
            for t in 0..rows {
                let (xt, gt) = (&x[t * inp..(t + 1) * inp], &gy[t * out..(t + 1) * out]);
                for o in 0..out {
                    for i in 0..inp {
                        dw[o * inp + i] += gt[o] as f64 * xt[i] as f64;
                    }
                }
            }
            let dw: Vec<f32> = dw.into_iter().map(|v| v as f32).collect();
            let dir = direction(2000 + k as u64, &dw);
            let analytic = dot(&dw, &dir);
            let mut shifted = |sign: f64| {
                let mark = model.journal_mark().unwrap();
                let mut v = w.clone();
                for (a, d) in v.as_mut_slice().iter_mut().zip(&dir) {
                    *a += (sign * eps) as f32 * d;
                }
                model.write_weight(site, &v).unwrap();
                let loss = self.loss_by_forward(&*model, self.params.clone());
                model.journal_rollback(mark).unwrap();
                loss
            };
            let (plus, minus) = (shifted(1.0), shifted(-1.0));
            check_directional(&format!("weight {site}"), analytic, plus, minus, eps);
        }
    }
}

fn normalized(v: Vec<f32>) -> Vec<f32> {
    let norm = dot(&v, &v).sqrt() as f32;
    v.into_iter().map(|x| x / norm).collect()
}

/// A unit direction between the analytic gradient and a random one: the derivative along it
/// is never negligible, and an error in any component still shows through the random part.
fn direction(seed: u64, gradient: &[f32]) -> Vec<f32> {
    let g = normalized(gradient.to_vec());
    let r = normalized(pseudo_random(seed, gradient.len(), 1.0));
    normalized(g.iter().zip(&r).map(|(a, b)| a + b).collect())
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Central difference along a direction, against the analytic directional derivative.
pub fn check_directional(what: &str, analytic: f64, plus: f64, minus: f64, eps: f64) {
    let fd = (plus - minus) / (2.0 * eps);
    let scale = fd.abs().max(analytic.abs());
    eprintln!("{what}: analytic {analytic:+.6e}  finite-difference {fd:+.6e}");
    assert!(
        scale > 1e-2,
        "{what}: the derivative is (nearly) zero ({analytic:e} / {fd:e}); the check is void"
    );
    assert!(
        (fd - analytic).abs() <= 5e-3 * scale + 1e-5,
        "{what}: analytic {analytic:e} vs finite difference {fd:e}"
    );
}

/// One counter of the model's `gradient_paths` extension.
fn gradient_path_count(model: &mut dyn Model, key: &str) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&model.extension("gradient_paths", "").unwrap()).unwrap();
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("gradient_paths has no counter '{key}': {v}"))
}

/// Gradient calls on a prepared batch over frozen prefixes (each row's positions before its
/// first intervention and loss slot computed once, keys and values cached) give the same loss,
/// parameter gradients and last-token logits as whole-row calls, on a right-padded batch whose
/// rows freeze different numbers of positions; the model reports which path each call took;
/// a weight change disables the frozen prefix for the handle and results stay right.
pub fn check_frozen_prefix(model: &mut impl Model, d_model: usize) {
    let batch = Batch::new(
        vec![
            vec![299, 473, 151, 503, 475, 220, 37, 429, 214],
            vec![292, 436, 342, 86, 406, 435],
            vec![11, 250, 97, 310, 64, 128, 401],
        ],
        Padding::Right,
    );
    // δ at different positions per row at layer 1, and a second parameter further up.
    let firsts = [3usize, 1, 4];
    let mut f = ForwardRequest::new(batch.clone(), LogitsWanted::Last);
    let mut ivs: Vec<Intervention> = firsts
        .iter()
        .enumerate()
        .map(|(r, &p)| Intervention::add_param("layer.1.mlp_out", r, p, 0))
        .collect();
    ivs.push(Intervention::add_param("layer.2.resid_pre", 0, 6, 1));
    f.interventions = ivs.into();
    f.params = vec![
        Tensor::new(&[d_model], pseudo_random(31, d_model, 0.5)).unwrap(),
        Tensor::new(&[d_model], pseudo_random(32, d_model, 0.5)).unwrap(),
    ]
    .into();
    let reference: Vec<f32> = log_softmax(&pseudo_random(9, 512, 2.0))
        .iter()
        .map(|&v| v as f32)
        .collect();
    let nll = |row: u32, position: u32, token: u32, weight: f32| NllTerm {
        row,
        position,
        token,
        weight,
    };
    let req = |prepared: Option<u64>| GradRequest {
        forward: f.clone(),
        nll: vec![
            nll(0, 7, 429, 1.0),
            nll(0, 8, 17, 0.5),
            nll(1, 4, 3, 2.0),
            nll(1, 5, 311, -0.25),
            nll(2, 6, 77, 1.0),
        ]
        .into(),
        kl: vec![KlTerm {
            row: 2,
            position: 5,
            ref_logprobs: Tensor::vector(reference.clone()),
            weight: 0.7,
        }]
        .into(),
        site_grads: Default::default(),
        prepared: prepared.into(),
    };
    let paths = |model: &mut dyn FnMut() -> String| {
        let v: serde_json::Value = serde_json::from_str(&model()).unwrap();
        (
            v["frozen_prefix"].as_u64().unwrap(),
            v["prepared"].as_u64().unwrap(),
        )
    };
    let whole = model.gradient(&req(None)).unwrap();
    let handle = model.prepare(&batch, 1).unwrap();
    let close = |what: &str, got: &GradOutput| {
        let rel = ((got.loss - whole.loss) / whole.loss).abs();
        assert!(rel < 1e-5, "{what}: loss {} vs {}", got.loss, whole.loss);
        for (k, (a, b)) in whole
            .param_grads
            .iter()
            .zip(got.param_grads.iter())
            .enumerate()
        {
            let scale = a.as_slice().iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "{what}: parameter {k} has a zero gradient");
            let d = max_abs_diff(a.as_slice(), b.as_slice());
            assert!(
                d <= 1e-4 * scale,
                "{what}: parameter {k} gradient differs by {d} (scale {scale})"
            );
        }
        let (a, b) = (
            whole.forward.logits.as_ref().unwrap(),
            got.forward.logits.as_ref().unwrap(),
        );
        assert_eq!(a.dims(), b.dims(), "{what}: logits shape");
        let d = max_abs_diff(a.as_slice(), b.as_slice());
        assert!(d < 1e-4, "{what}: last-token logits differ by {d}");
        for (x, y) in whole.nll_logprobs.iter().zip(got.nll_logprobs.iter()) {
            assert!((x - y).abs() < 1e-4, "{what}: log-probabilities {x} vs {y}");
        }
    };
    let (f0, p0) = paths(&mut || model.extension("gradient_paths", "").unwrap());
    // The first call builds the prefixes, the second reuses them.
    for what in ["building", "reusing"] {
        let got = model.gradient(&req(Some(handle))).unwrap();
        close(what, &got);
    }
    let (f1, p1) = paths(&mut || model.extension("gradient_paths", "").unwrap());
    assert_eq!(
        (f1 - f0, p1 - p0),
        (2, 0),
        "both calls use the frozen prefixes"
    );

    // A capture needs whole rows: the plain prepared path answers.
    let mut with_capture = req(Some(handle));
    with_capture.forward.captures = vec!["layer.2.mlp_out".into()].into();
    close("capturing", &model.gradient(&with_capture).unwrap());
    let (f2, p2) = paths(&mut || model.extension("gradient_paths", "").unwrap());
    assert_eq!((f2 - f1, p2 - p1), (0, 1));

    // A weight write above the prepared layer (the same values) keeps the handle valid but
    // retires its frozen prefixes.
    let mark = model.journal_mark().unwrap();
    let w = model.read_weight("layer.2.mlp.down").unwrap();
    model.write_weight("layer.2.mlp.down", &w).unwrap();
    close(
        "after a write",
        &model.gradient(&req(Some(handle))).unwrap(),
    );
    let (f3, p3) = paths(&mut || model.extension("gradient_paths", "").unwrap());
    assert_eq!((f3 - f2, p3 - p2), (0, 1));
    model.journal_rollback(mark).unwrap();
    model.release(handle).unwrap();
}

/// Repeated gradient calls on a prepared batch take the products of the prepared layer that do
/// not depend on the call's parameters (here everything in layer 1 before `layer.1.mlp.down`,
/// whose output gradient is tapped as WISE's training asks) from the batch's memo: the second
/// call reports hits and returns what the first did, bit for bit, and both match a call without
/// a prepared batch. A weight change in the prepared layer (which keeps the handle valid)
/// retires the kept products: the next call follows the new weight.
pub fn check_product_memo(model: &mut impl Model) {
    let batch = gradient_batch();
    let site = "layer.1.mlp.down";
    let req = |prepared: Option<u64>| GradRequest {
        forward: ForwardRequest::new(batch.clone(), LogitsWanted::None),
        nll: vec![
            NllTerm {
                row: 0,
                position: 7,
                token: 214,
                weight: 1.0,
            },
            NllTerm {
                row: 1,
                position: 4,
                token: 3,
                weight: 0.5,
            },
        ]
        .into(),
        kl: Default::default(),
        site_grads: vec![site.into()].into(),
        prepared: prepared.into(),
    };
    let hits = |model: &mut dyn Model| gradient_path_count(model, "memo_hits");
    let close = |what: &str, a: &GradOutput, b: &GradOutput| {
        let rel = ((a.loss - b.loss) / b.loss).abs();
        assert!(rel < 1e-5, "{what}: loss {} vs {}", a.loss, b.loss);
        let (ga, gb) = (&a.site_grads[0], &b.site_grads[0]);
        for (part, x, y) in [
            ("input", &ga.input, &gb.input),
            ("output gradient", &ga.output_grad, &gb.output_grad),
        ] {
            let scale = y.as_slice().iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "{what}: the {part} is zero");
            let d = max_abs_diff(x.as_slice(), y.as_slice());
            assert!(d <= 1e-4 * scale, "{what}: the {part} differs by {d}");
        }
    };
    let whole = model.gradient(&req(None)).unwrap();
    let handle = model.prepare(&batch, 1).unwrap();
    let h0 = hits(model);
    let first = model.gradient(&req(Some(handle))).unwrap();
    let h1 = hits(model);
    let second = model.gradient(&req(Some(handle))).unwrap();
    let h2 = hits(model);
    assert_eq!(h1, h0, "the first call has nothing to reuse");
    assert!(h2 > h1, "the second call reused no product");
    close("first prepared call", &first, &whole);
    assert_eq!(first.loss.to_bits(), second.loss.to_bits(), "loss");
    assert_eq!(
        first.site_grads[0].output_grad.as_slice(),
        second.site_grads[0].output_grad.as_slice(),
        "a reused product changed the output gradient"
    );

    // The gate/up (or first MLP) map of layer 1 sits before the tapped one: perturb it (not a
    // uniform scale, which GLM-4's norm after the MLP would undo).
    let mark = model.journal_mark().unwrap();
    let up = ["layer.1.mlp.up", "layer.1.mlp.gate"]
        .into_iter()
        .find(|s| model.read_weight(s).is_ok())
        .expect("layer 1 has an MLP input map");
    let mut w = model.read_weight(up).unwrap();
    let noise = pseudo_random(41, w.as_slice().len(), 0.5);
    for (v, n) in w.as_mut_slice().iter_mut().zip(noise) {
        *v += n;
    }
    model.write_weight(up, &w).unwrap();
    let changed = model.gradient(&req(None)).unwrap();
    assert!(
        (changed.loss - whole.loss).abs() > 1e-6 * whole.loss.abs(),
        "scaling {up} did not change the loss; the check is void"
    );
    close(
        "after a weight change",
        &model.gradient(&req(Some(handle))).unwrap(),
        &changed,
    );
    model.journal_rollback(mark).unwrap();
    close(
        "after the rollback",
        &model.gradient(&req(Some(handle))).unwrap(),
        &whole,
    );
    model.release(handle).unwrap();
}

/// A gradient call that wants no logits and touches nothing in the last block runs that
/// block's output map and MLP, the final norm and the head on its loss slots alone: its loss,
/// log-probabilities, parameter gradients and site gradients equal those of the same call
/// asking for all logits (which needs every position), whole rows and over frozen prefixes
/// alike, with loss terms in no particular order and two terms on one slot; the model counts
/// the calls that took the short path (`last_block_slots`), and a parameter in the last block
/// keeps every position.
pub fn check_last_block_slots(model: &mut impl Model) {
    let facts = model.facts().unwrap();
    let (d_model, last) = (facts.d_model as usize, facts.n_layers as usize - 1);
    assert!(
        last >= 2,
        "the check needs a parameter below the last block at layer 1"
    );
    let batch = gradient_batch();
    let nll = |row: u32, position: u32, token: u32, weight: f32| NllTerm {
        row,
        position,
        token,
        weight,
    };
    let reference: Vec<f32> = log_softmax(&pseudo_random(19, 512, 2.0))
        .iter()
        .map(|&v| v as f32)
        .collect();
    let req = |logits: LogitsWanted, site_grads: &[&str], param_layer: usize| {
        let mut f = ForwardRequest::new(batch.clone(), logits);
        f.interventions = vec![
            Intervention::add_param(&format!("layer.{param_layer}.mlp_out"), 0, 3, 0),
            Intervention::add_param(&format!("layer.{param_layer}.mlp_out"), 1, 4, 1),
        ]
        .into();
        f.params = vec![
            Tensor::new(&[d_model], pseudo_random(51, d_model, 0.5)).unwrap(),
            Tensor::new(&[d_model], pseudo_random(52, d_model, 0.5)).unwrap(),
        ]
        .into();
        GradRequest {
            forward: f,
            nll: vec![
                nll(1, 4, 3, 0.5),
                nll(0, 7, 214, 1.0),
                nll(0, 3, 475, 0.25),
                nll(1, 5, 311, 1.0),
            ]
            .into(),
            kl: vec![KlTerm {
                row: 0,
                position: 7,
                ref_logprobs: Tensor::vector(reference.clone()),
                weight: 0.3,
            }]
            .into(),
            site_grads: site_grads
                .iter()
                .map(|&s| s.into())
                .collect::<Vec<_>>()
                .into(),
            prepared: None.into(),
        }
    };
    let kept = |model: &mut dyn Model| gradient_path_count(model, "last_block_slots");
    let close = |what: &str, got: &GradOutput, want: &GradOutput| {
        let rel = ((got.loss - want.loss) / want.loss).abs();
        assert!(rel < 1e-5, "{what}: loss {} vs {}", got.loss, want.loss);
        assert!((got.kl - want.kl).abs() < 1e-4, "{what}: kl");
        for (x, y) in got.nll_logprobs.iter().zip(want.nll_logprobs.iter()) {
            assert!((x - y).abs() < 1e-4, "{what}: log-probabilities {x} vs {y}");
        }
        let pairs = got
            .param_grads
            .iter()
            .zip(want.param_grads.iter())
            .map(|(a, b)| ("parameter gradient", a, b))
            .chain(
                got.site_grads
                    .iter()
                    .zip(want.site_grads.iter())
                    .flat_map(|(a, b)| {
                        [
                            ("site input", &a.input, &b.input),
                            ("site output gradient", &a.output_grad, &b.output_grad),
                        ]
                    }),
            );
        for (part, a, b) in pairs {
            assert_eq!(a.dims(), b.dims(), "{what}: {part} shape");
            let scale = b.as_slice().iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "{what}: the {part} is zero");
            let d = max_abs_diff(a.as_slice(), b.as_slice());
            assert!(
                d <= 1e-4 * scale,
                "{what}: the {part} differs by {d} (scale {scale})"
            );
        }
    };
    let site = ["layer.1.mlp.down"];

    let k0 = kept(model);
    let all = model.gradient(&req(LogitsWanted::All, &site, 1)).unwrap();
    assert_eq!(
        kept(model),
        k0,
        "a call wanting all logits needs every position"
    );
    let short = model.gradient(&req(LogitsWanted::None, &site, 1)).unwrap();
    assert_eq!(
        kept(model),
        k0 + 1,
        "the call did not keep the loss slots alone"
    );
    close("whole rows", &short, &all);

    // Over frozen prefixes (a prepared batch, no site gradient).
    let handle = model.prepare(&batch, 1).unwrap();
    let all = model.gradient(&req(LogitsWanted::All, &[], 1)).unwrap();
    let mut prepared = req(LogitsWanted::None, &[], 1);
    prepared.prepared = Some(handle).into();
    for what in ["frozen prefixes, building", "frozen prefixes, reusing"] {
        let k = kept(model);
        close(what, &model.gradient(&prepared).unwrap(), &all);
        assert_eq!(
            kept(model),
            k + 1,
            "{what}: the loss slots were not kept alone"
        );
    }
    model.release(handle).unwrap();

    // A parameter in the last block itself: every position runs it.
    let k = kept(model);
    let all = model.gradient(&req(LogitsWanted::All, &[], last)).unwrap();
    let plain = model.gradient(&req(LogitsWanted::None, &[], last)).unwrap();
    assert_eq!(
        kept(model),
        k,
        "an intervention in the last block must keep every position"
    );
    close("a parameter in the last block", &plain, &all);
}

// ---------------------------------------------------------------------------------------------
// Export.

/// Logits of a fixed unpadded batch.
pub fn probe_logits(model: &impl Model) -> Tensor {
    let req = ForwardRequest::new(
        Batch::new(vec![vec![5, 17, 300, 42, 8, 99, 7]], Padding::Right),
        LogitsWanted::All,
    );
    model.forward(&req).unwrap().logits.into_option().unwrap()
}

/// Writes `site` (scaled by 1.5), exports into a fresh directory, reloads with `open` and
/// compares logits bit for bit; export into the source directory is refused. Returns the
/// export directory (kept alive by the returned guard) for family-specific checks.
pub fn check_export_round_trip<M: Model>(
    model: &mut M,
    source: &Path,
    site: &str,
    open: impl Fn(&Path) -> M,
) -> (tempfile_guard::TempDir, PathBuf) {
    let before = probe_logits(model);
    let w = model.read_weight(site).unwrap();
    let edited: Vec<f32> = w.as_slice().iter().map(|v| v * 1.5).collect();
    model
        .write_weight(site, &Tensor::new(&w.dims(), edited).unwrap())
        .unwrap();
    let want = probe_logits(model);
    assert!(
        max_abs_diff(before.as_slice(), want.as_slice()) > 1e-4,
        "writing {site} changed nothing"
    );
    let dir = tempfile_guard::TempDir::new();
    let out = dir.path().join("edited");
    model.export(out.to_str().unwrap()).unwrap();
    let reloaded = open(&out);
    assert_eq!(
        reloaded.read_weight(site).unwrap().as_slice(),
        model.read_weight(site).unwrap().as_slice(),
        "{site} after reload"
    );
    let got = probe_logits(&reloaded);
    assert_eq!(
        got.as_slice(),
        want.as_slice(),
        "logits after export + reload"
    );
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
    let e = model.export(source.to_str().unwrap()).unwrap_err();
    assert!(e.message.contains("refusing"), "{e}");
    (dir, out)
}

/// A minimal self-deleting temporary directory (keeps `tempfile` out of the core's
/// dependencies).
pub mod tempfile_guard {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new() -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "kedit-testkit-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Default for TempDir {
        fn default() -> Self {
            Self::new()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// End to end through the built host.

/// Runs `target/release/kedit generate --model <model> --ids <prompt> --max-new-tokens <n>
/// --show-ids` and returns the printed ids; `None` (with a note) when `kedit` or the family's
/// plugin `lib<plugin>.so` is not built in target/release.
pub fn kedit_generate_ids(
    model: &Path,
    plugin: &str,
    prompt: &[u32],
    n: usize,
) -> Option<Vec<u32>> {
    let release = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/release"));
    let kedit = release.join("kedit");
    let so = release.join(format!("lib{plugin}.so"));
    if !kedit.is_file() || !so.is_file() {
        eprintln!(
            "note: {} or {} is not built; run `cargo build --release` for this end-to-end check",
            kedit.display(),
            so.display()
        );
        return None;
    }
    let join = |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let out = std::process::Command::new(&kedit)
        .arg("generate")
        .arg("--model")
        .arg(model)
        .arg("--ids")
        .arg(join(prompt))
        .args(["--max-new-tokens", &n.to_string(), "--show-ids"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kedit generate failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ids: "))
        .unwrap_or_else(|| panic!("no `ids:` line in:\n{stdout}"));
    Some(line.split(',').map(|s| s.trim().parse().unwrap()).collect())
}

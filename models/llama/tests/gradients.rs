//! Gradients on the tiny LLaMA: parameter gradients at activation sites of every kind and
//! site gradients of linear maps (dW = Σ gᵀx) against central finite differences, for a loss
//! with NLL and KL terms over a right-padded batch; prepared batches give the same gradients.

mod common;

use common::*;
use kedit_plugin_api::{
    Batch, ForwardRequest, GradOutput, GradRequest, Intervention, KlTerm, LogitsWanted, Model,
    NllTerm, Padding, Tensor,
};

fn batch() -> Batch {
    Batch::new(
        vec![
            vec![299, 473, 151, 503, 475, 220, 37, 429, 214],
            vec![292, 436, 342, 86, 406, 435],
        ],
        Padding::Right,
    )
}

/// (site, row, position) of each parameter, all with width 64 except `mlp_key` (176).
const PARAM_SITES: &[(&str, usize, usize, usize)] = &[
    ("embed", 0, 2, 64),
    ("layer.0.resid_pre", 1, 1, 64),
    ("layer.0.attn_out", 0, 4, 64),
    ("layer.1.mlp_out", 1, 3, 64),
    ("layer.1.mlp_key", 0, 5, 176),
    ("layer.1.resid_post", 1, 2, 64),
    // The last layer only reaches its own position: put it where a loss term is.
    ("layer.2.attn_out", 0, 8, 64),
    ("layer.2.resid_post", 0, 7, 64),
];

const SITE_GRADS: &[&str] = &[
    "layer.1.mlp.down",
    "layer.0.attn.q",
    "layer.2.attn.v",
    "lm_head",
];

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    x.iter().map(|&v| v as f64 - m - lse).collect()
}

struct Problem {
    params: Vec<Tensor>,
    nll: Vec<NllTerm>,
    kl: Vec<KlTerm>,
}

fn problem() -> Problem {
    let params = PARAM_SITES
        .iter()
        .enumerate()
        .map(|(i, &(_, _, _, w))| Tensor::new(&[w], pseudo_random(100 + i as u64, w, 0.3)).unwrap())
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
    let reference: Vec<f32> = log_softmax(&pseudo_random(7, 512, 2.0))
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
    Problem { params, nll, kl }
}

fn forward_request(params: Vec<Tensor>, logits: LogitsWanted) -> ForwardRequest {
    let mut f = ForwardRequest::new(batch(), logits);
    f.interventions = PARAM_SITES
        .iter()
        .enumerate()
        .map(|(i, &(site, row, pos, _))| Intervention::add_param(site, row, pos, i))
        .collect();
    f.params = params.into();
    f
}

fn grad_request(p: &Problem) -> GradRequest {
    GradRequest {
        forward: forward_request(p.params.clone(), LogitsWanted::None),
        nll: p.nll.clone().into(),
        kl: p.kl.clone().into(),
        site_grads: SITE_GRADS.iter().map(|&s| s.into()).collect(),
        prepared: None.into(),
    }
}

/// The loss from a plain forward pass, accumulated in f64 on the host.
fn loss_by_forward(model: &impl Model, p: &Problem, params: Vec<Tensor>) -> f64 {
    let out = model
        .forward(&forward_request(params, LogitsWanted::All))
        .unwrap();
    let logits = out.logits.into_option().unwrap();
    let seq = 9;
    let row = |r: u32, pos: u32| {
        let at = ((r as usize) * seq + pos as usize) * 512;
        log_softmax(&logits.as_slice()[at..at + 512])
    };
    let mut loss = 0.0;
    for t in &p.nll {
        loss -= t.weight as f64 * row(t.row, t.position)[t.token as usize];
    }
    for t in &p.kl {
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

fn normalized(v: Vec<f32>) -> Vec<f32> {
    let norm = dot(&v, &v).sqrt() as f32;
    v.into_iter().map(|x| x / norm).collect()
}

/// A unit direction between the analytic gradient and a random one: the derivative along it
/// is never negligible (a random direction alone can be nearly orthogonal to the gradient),
/// and an error in any component of the gradient still shows through the random part.
fn direction(seed: u64, gradient: &[f32]) -> Vec<f32> {
    let g = normalized(gradient.to_vec());
    let r = normalized(pseudo_random(seed, gradient.len(), 1.0));
    normalized(g.iter().zip(&r).map(|(a, b)| a + b).collect())
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Central difference along `dir`, with the analytic directional derivative `analytic`.
fn check_directional(what: &str, analytic: f64, plus: f64, minus: f64, eps: f64) {
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

fn gradient(model: &impl Model, p: &Problem) -> GradOutput {
    model.gradient(&grad_request(p)).unwrap()
}

#[test]
fn loss_values_match_a_host_side_recomputation() {
    let model = tiny_llama();
    let p = problem();
    let g = gradient(&model, &p);
    let by_forward = loss_by_forward(&model, &p, p.params.clone());
    eprintln!(
        "loss {} (nll {}, kl {}), by forward {by_forward}",
        g.loss, g.nll, g.kl
    );
    assert!((g.loss as f64 - by_forward).abs() < 1e-4 * by_forward.abs().max(1.0));
    assert!((g.loss - (g.nll + g.kl)).abs() < 1e-4);
    assert!(g.kl > 0.0 && g.nll > 0.0);
    assert_eq!(g.nll_logprobs.len(), 3);
    assert!(g.nll_logprobs.iter().all(|&lp| lp < 0.0));
}

#[test]
fn parameter_gradients_match_finite_differences() {
    let model = tiny_llama();
    let p = problem();
    let g = gradient(&model, &p);
    assert_eq!(g.param_grads.len(), PARAM_SITES.len());
    let eps = 1e-2;
    for (i, &(site, row, pos, width)) in PARAM_SITES.iter().enumerate() {
        let grad = &g.param_grads[i];
        assert_eq!(grad.dims(), vec![width], "{site}");
        assert!(grad.is_finite());
        assert!(
            grad.norm() > 0.0,
            "gradient of the parameter at {site} is zero"
        );
        let dir = direction(1000 + i as u64, grad.as_slice());
        let shifted = |sign: f64| {
            let mut params = p.params.clone();
            for (v, d) in params[i].as_mut_slice().iter_mut().zip(&dir) {
                *v += (sign * eps) as f32 * d;
            }
            loss_by_forward(&model, &p, params)
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

#[test]
fn site_gradients_give_weight_gradients_that_match_finite_differences() {
    let mut model = tiny_llama();
    let p = problem();
    let g = gradient(&model, &p);
    assert_eq!(g.site_grads.len(), SITE_GRADS.len());
    let eps = 1e-2;
    for (k, &site) in SITE_GRADS.iter().enumerate() {
        let sg = &g.site_grads[k];
        let w = model.read_weight(site).unwrap();
        let (out, inp) = (w.dims()[0], w.dims()[1]);
        assert_eq!(sg.input.dims(), vec![2, 9, inp], "{site} input");
        assert_eq!(sg.output_grad.dims(), vec![2, 9, out], "{site} output grad");
        assert!(
            sg.output_grad.norm() > 0.0,
            "{site}: output gradient is zero"
        );
        // dW = Σ_(b,t) gᵀ x, then its inner product with a direction U.
        let (x, gy) = (sg.input.as_slice(), sg.output_grad.as_slice());
        let mut dw = vec![0f64; out * inp];
        for t in 0..2 * 9 {
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
            let loss = loss_by_forward(&model, &p, p.params.clone());
            model.journal_rollback(mark).unwrap();
            loss
        };
        let (plus, minus) = (shifted(1.0), shifted(-1.0));
        check_directional(&format!("weight {site}"), analytic, plus, minus, eps);
    }
}

#[test]
fn prepared_batches_give_the_same_gradients() {
    let mut model = tiny_llama();
    let p = problem();
    // Parameters from layer 1 on only: layer 0 and the embedding are computed once.
    let from_layer = 1;
    let keep: Vec<usize> = PARAM_SITES
        .iter()
        .enumerate()
        .filter(|(_, (site, ..))| site.starts_with("layer.1") || site.starts_with("layer.2"))
        .map(|(i, _)| i)
        .collect();
    let make = |prepared: Option<u64>| {
        let mut req = grad_request(&p);
        let ivs: Vec<_> = keep
            .iter()
            .map(|&i| {
                let mut iv = req.forward.interventions[i].clone();
                iv.param = Some(keep.iter().position(|&k| k == i).unwrap() as u32).into();
                iv
            })
            .collect();
        req.forward.interventions = ivs.into();
        req.forward.params = keep.iter().map(|&i| p.params[i].clone()).collect();
        req.site_grads = vec!["layer.1.mlp.down".into(), "lm_head".into()].into();
        req.prepared = prepared.into();
        req
    };
    let plain = model.gradient(&make(None)).unwrap();
    let handle = model.prepare(&batch(), from_layer).unwrap();
    let prepared = model.gradient(&make(Some(handle))).unwrap();
    assert_eq!(plain.loss, prepared.loss);
    for (k, (a, b)) in plain
        .param_grads
        .iter()
        .zip(prepared.param_grads.iter())
        .enumerate()
    {
        assert!(
            a.norm() > 0.0,
            "param {k} ({}) has a zero gradient",
            PARAM_SITES[keep[k]].0
        );
        assert_eq!(max_abs_diff(a.as_slice(), b.as_slice()), 0.0);
    }
    for (a, b) in plain.site_grads.iter().zip(prepared.site_grads.iter()) {
        assert_eq!(max_abs_diff(a.input.as_slice(), b.input.as_slice()), 0.0);
        assert_eq!(
            max_abs_diff(a.output_grad.as_slice(), b.output_grad.as_slice()),
            0.0
        );
    }

    // What the handle computed once cannot be intervened on.
    let mut below = make(Some(handle));
    below
        .forward
        .interventions
        .push(Intervention::add_param("layer.0.mlp_out", 0, 1, 0));
    let e = model.gradient(&below).unwrap_err();
    assert!(e.message.contains("below layer 1"), "{e}");
    // Another batch is refused.
    let mut other = make(Some(handle));
    other.forward.batch.rows[1].push(5);
    assert!(model.gradient(&other).is_err());

    // Writing above the prepared layer keeps the handle; writing below makes it stale.
    let mark = model.journal_mark().unwrap();
    let w = model.read_weight("layer.2.mlp.up").unwrap();
    model.write_weight("layer.2.mlp.up", &w).unwrap();
    model.gradient(&make(Some(handle))).unwrap();
    let w = model.read_weight("layer.0.mlp.down").unwrap();
    model.write_weight("layer.0.mlp.down", &w).unwrap();
    let e = model.gradient(&make(Some(handle))).unwrap_err();
    assert!(e.message.contains("stale"), "{e}");
    model.journal_rollback(mark).unwrap();
    model.release(handle).unwrap();
    assert!(model.release(handle).is_err());
}

#[test]
fn gradients_through_a_left_padded_batch_are_finite_and_match_the_unpadded_row() {
    let model = tiny_llama();
    let row = vec![292u32, 436, 342, 86, 406, 435];
    let delta = Tensor::new(&[64], pseudo_random(5, 64, 0.3)).unwrap();
    let run = |rows: Vec<Vec<u32>>, r: usize, offset: usize| {
        let mut f = ForwardRequest::new(Batch::new(rows, Padding::Left), LogitsWanted::None);
        f.params = vec![delta.clone()].into();
        f.interventions = vec![Intervention::add_param(
            "layer.1.resid_pre",
            r,
            offset + 2,
            0,
        )]
        .into();
        model
            .gradient(&GradRequest {
                forward: f,
                nll: vec![NllTerm {
                    row: r as u32,
                    position: offset as u32 + 5,
                    token: 9,
                    weight: 1.0,
                }]
                .into(),
                kl: Default::default(),
                site_grads: vec!["layer.1.mlp.down".into()].into(),
                prepared: None.into(),
            })
            .unwrap()
    };
    let alone = run(vec![row.clone()], 0, 0);
    let padded = run(vec![vec![7; 9], row.clone()], 1, 3);
    assert!((alone.loss - padded.loss).abs() < 1e-5);
    let d = max_abs_diff(
        alone.param_grads[0].as_slice(),
        padded.param_grads[0].as_slice(),
    );
    assert!(d < 1e-5, "padded gradient differs by {d}");
    let sg = &padded.site_grads[0];
    assert!(sg.input.is_finite() && sg.output_grad.is_finite());
    // Pads get no gradient.
    let g = sg.output_grad.as_slice();
    assert!(g[9 * 64..(9 + 3) * 64].iter().all(|&v| v == 0.0));
}

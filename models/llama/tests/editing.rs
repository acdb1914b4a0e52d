//! Weights, journal, site modules, interventions and noise on the tiny LLaMA.

mod common;

use std::sync::{Arc, Mutex};

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RString};
use common::*;
use kedit_plugin_api::{
    Batch, EmbeddingNoise, ForwardRequest, GenerateRequest, GradRequest, Intervention,
    InterventionMode, LogitsWanted, Model, ModuleContext, NllTerm, Padding, PluginError,
    SiteModule, SiteModule_TO, Tensor,
};

fn batch() -> Batch {
    Batch::new(
        vec![
            vec![299, 473, 151, 503, 475, 220, 37],
            vec![292, 436, 342, 86],
        ],
        Padding::Left,
    )
}

fn logits(model: &impl Model, req: &ForwardRequest) -> Tensor {
    model.forward(req).unwrap().logits.into_option().unwrap()
}

fn all_logits(model: &impl Model) -> Tensor {
    logits(model, &ForwardRequest::new(batch(), LogitsWanted::All))
}

#[test]
fn rollback_restores_logits_bit_exactly_and_commit_keeps_changes() {
    let mut model = tiny_llama();
    let before = all_logits(&model);
    let mark = model.journal_mark().unwrap();
    for (k, site) in [
        "layer.1.mlp.down",
        "layer.0.attn.q",
        "lm_head",
        "embed.weight",
    ]
    .iter()
    .enumerate()
    {
        let w = model.read_weight(site).unwrap();
        let noisy: Vec<f32> = w
            .as_slice()
            .iter()
            .zip(pseudo_random(k as u64, w.numel(), 0.05))
            .map(|(a, b)| a + b)
            .collect();
        model
            .write_weight(site, &Tensor::new(&w.dims(), noisy).unwrap())
            .unwrap();
        // Written twice: the journal must restore the oldest value.
        let again = model.read_weight(site).unwrap();
        model.write_weight(site, &again).unwrap();
    }
    assert_eq!(model.journal_mark().unwrap(), mark + 8);
    let edited = all_logits(&model);
    assert!(max_abs_diff(edited.as_slice(), before.as_slice()) > 1e-3);
    model.journal_rollback(mark).unwrap();
    assert_eq!(all_logits(&model).as_slice(), before.as_slice());
    assert_eq!(model.journal_mark().unwrap(), mark);

    // Commit forgets the entries but keeps the change.
    let w = model.read_weight("layer.2.mlp.up").unwrap();
    let zeros = Tensor::zeros(&w.dims());
    model.write_weight("layer.2.mlp.up", &zeros).unwrap();
    model.journal_commit(mark).unwrap();
    assert_eq!(model.journal_mark().unwrap(), mark);
    model.journal_rollback(mark).unwrap();
    assert_eq!(model.read_weight("layer.2.mlp.up").unwrap(), zeros);

    // Shapes and names are checked.
    let e = model
        .write_weight("layer.2.mlp.up", &Tensor::zeros(&[3, 3]))
        .unwrap_err();
    assert!(e.message.contains("expected shape"), "{e}");
    let e = model.read_weight("layer.9.mlp.up").unwrap_err();
    assert!(e.message.contains("layer 9"), "{e}");
    assert!(model.journal_rollback(mark + 5).is_err());
}

/// What a module saw: the output shape and the context of each call.
type Seen = Arc<Mutex<Vec<(Vec<u64>, ModuleContext)>>>;

/// Adds `shift` to the output of its linear map and records every context it sees.
struct Shift {
    shift: f32,
    seen: Seen,
}

impl SiteModule for Shift {
    fn name(&self) -> RString {
        "shift".into()
    }

    fn forward(
        &self,
        input: &Tensor,
        mut output: Tensor,
        context: &ModuleContext,
    ) -> RResult<Tensor, PluginError> {
        assert_eq!(input.dims()[..2], output.dims()[..2]);
        self.seen.lock().unwrap().push((
            output.dims().iter().map(|&d| d as u64).collect(),
            context.clone(),
        ));
        for v in output.as_mut_slice() {
            *v += self.shift;
        }
        RResult::ROk(output)
    }

    fn explain(&self) -> RString {
        format!("shifted by {}", self.shift).into()
    }
}

fn shift_module(shift: f32) -> (kedit_plugin_api::SiteModuleBox, Seen) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let m = Shift {
        shift,
        seen: seen.clone(),
    };
    (SiteModule_TO::from_value(m, TD_Opaque), seen)
}

#[test]
fn an_installed_module_changes_forward_and_generation_and_removal_restores_them() {
    let mut model = tiny_llama();
    let before = all_logits(&model);
    let prompt = vec![299u32, 473, 151, 503, 475, 220];
    let gen = GenerateRequest::greedy(vec![prompt.clone()], 10);
    let greedy_before = model.generate(&gen).unwrap();
    let decoder_before = model.decoder(&prompt).unwrap().logits().to_vec();

    let (module, seen) = shift_module(0.5);
    let mark = model.journal_mark().unwrap();
    let id = model.install_module("layer.1.mlp.down", module).unwrap();
    assert_eq!(
        model.explain_modules().unwrap(),
        vec!["shifted by 0.5".to_string()]
    );

    let during = all_logits(&model);
    assert!(max_abs_diff(during.as_slice(), before.as_slice()) > 1e-2);
    {
        let seen = seen.lock().unwrap();
        let (dims, ctx) = seen.last().unwrap();
        assert_eq!(dims, &vec![2, 7, 64]);
        assert!(!ctx.generating);
        assert_eq!(ctx.row_offsets.as_slice(), &[0, 3]);
        assert_eq!(ctx.row_lengths.as_slice(), &[7, 4]);
    }
    seen.lock().unwrap().clear();
    let decoder_during = model.decoder(&prompt).unwrap().logits().to_vec();
    assert!(max_abs_diff(&decoder_during, &decoder_before) > 1e-2);
    let greedy_during = model.generate(&gen).unwrap();
    assert_ne!(
        greedy_during, greedy_before,
        "the module did not change generation"
    );
    {
        let seen = seen.lock().unwrap();
        assert!(seen.iter().all(|(_, c)| c.generating));
        assert_eq!(
            seen[1].1.row_lengths.as_slice(),
            &[6],
            "prompt pass of generate"
        );
        assert_eq!(seen[2].1.row_lengths.as_slice(), &[1], "first cached step");
    }
    // KV-cached generation equals full recompute with the module in place.
    let mut ids = prompt.clone();
    for _ in 0..10 {
        let l = logits(
            &model,
            &ForwardRequest::new(
                Batch::new(vec![ids.clone()], Padding::Right),
                LogitsWanted::Last,
            ),
        );
        let row = l.row(0);
        ids.push((0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b }) as u32);
    }
    assert_eq!(&ids[prompt.len()..], greedy_during[0].as_slice());

    // A gradient call runs with the module (its output is a constant of the graph).
    let g = model
        .gradient(&GradRequest {
            forward: ForwardRequest::new(batch(), LogitsWanted::None),
            nll: vec![NllTerm {
                row: 0,
                position: 6,
                token: 5,
                weight: 1.0,
            }]
            .into(),
            kl: Default::default(),
            site_grads: vec!["layer.1.mlp.down".into()].into(),
            prepared: None.into(),
        })
        .unwrap();
    assert!(g.site_grads[0].output_grad.norm() > 0.0);

    model.remove_module(id).unwrap();
    assert!(model.explain_modules().unwrap().is_empty());
    assert_eq!(all_logits(&model).as_slice(), before.as_slice());
    assert_eq!(model.generate(&gen).unwrap(), greedy_before);
    assert!(model.remove_module(id).is_err());

    // Both the install and the removal are journaled.
    model.journal_rollback(mark + 1).unwrap();
    assert_eq!(model.explain_modules().unwrap().len(), 1);
    assert_eq!(all_logits(&model).as_slice(), during.as_slice());
    model.journal_rollback(mark).unwrap();
    assert!(model.explain_modules().unwrap().is_empty());
    assert_eq!(all_logits(&model).as_slice(), before.as_slice());
}

#[test]
fn a_module_on_the_head_sees_the_whole_batch() {
    let mut model = tiny_llama();
    let before = logits(&model, &ForwardRequest::new(batch(), LogitsWanted::Last));
    let (module, seen) = shift_module(1.0);
    let id = model.install_module("lm_head", module).unwrap();
    let after = logits(&model, &ForwardRequest::new(batch(), LogitsWanted::Last));
    assert_eq!(after.dims(), vec![2, 512]);
    for (a, b) in after.as_slice().iter().zip(before.as_slice()) {
        assert!((a - b - 1.0).abs() < 1e-5);
    }
    assert_eq!(seen.lock().unwrap()[0].0, vec![2, 7, 512]);

    // In generation it sees every position of each call; a uniform shift keeps the argmax.
    let prompt = vec![299u32, 473, 151, 503];
    let gen = GenerateRequest::greedy(vec![prompt.clone()], 3);
    seen.lock().unwrap().clear();
    let shifted = model.generate(&gen).unwrap();
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0].0, vec![1, 4, 512]);
        assert_eq!(seen[1].0, vec![1, 1, 512]);
        assert!(seen.iter().all(|(_, c)| c.generating));
    }
    model.remove_module(id).unwrap();
    assert_eq!(model.generate(&gen).unwrap(), shifted);
    let e = model
        .install_module("embed.weight", shift_module(1.0).0)
        .unwrap_err();
    assert!(e.message.contains("lookup"), "{e}");
}

#[test]
fn interventions_replace_and_add_exactly() {
    let model = tiny_llama();
    let mut req = ForwardRequest::new(batch(), LogitsWanted::All);
    req.captures = vec!["layer.1.resid_post".into(), "layer.1.mlp_key".into()].into();
    let base = model.forward(&req).unwrap();
    let base_logits = base.logits.clone().into_option().unwrap();
    let resid = &base.captures[0];
    assert_eq!(resid.dims(), vec![2, 7, 64]);
    assert_eq!(base.captures[1].dims(), vec![2, 7, 176]);

    // Replacing a stream by its own value changes nothing, bit for bit.
    let mut replace = ForwardRequest::new(batch(), LogitsWanted::All);
    for r in 0..2 {
        for p in 0..7 {
            let at = (r * 7 + p) * 64;
            let v = Tensor::vector(resid.as_slice()[at..at + 64].to_vec());
            replace.interventions.push(Intervention::fixed(
                "layer.1.resid_post",
                r,
                p,
                InterventionMode::Replace,
                v,
            ));
        }
    }
    assert_eq!(logits(&model, &replace).as_slice(), base_logits.as_slice());

    // resid_post of layer 0 is resid_pre of layer 1.
    let v = Tensor::vector(pseudo_random(3, 64, 1.0));
    let at = |site: &str| {
        let mut r = ForwardRequest::new(batch(), LogitsWanted::All);
        r.interventions = vec![Intervention::fixed(
            site,
            1,
            4,
            InterventionMode::Add,
            v.clone(),
        )]
        .into();
        logits(&model, &r)
    };
    let a = at("layer.0.resid_post");
    assert_eq!(a.as_slice(), at("layer.1.resid_pre").as_slice());
    assert!(max_abs_diff(a.as_slice(), base_logits.as_slice()) > 1e-3);

    // A replace discards earlier adds at its slot; later adds accumulate on top.
    let w = Tensor::vector(pseudo_random(4, 64, 1.0));
    let mut mixed = ForwardRequest::new(batch(), LogitsWanted::All);
    mixed.captures = vec!["layer.2.attn_out".into()].into();
    mixed.interventions = vec![
        Intervention::fixed("layer.2.attn_out", 0, 2, InterventionMode::Add, v.clone()),
        Intervention::fixed(
            "layer.2.attn_out",
            0,
            2,
            InterventionMode::Replace,
            w.clone(),
        ),
        Intervention::fixed("layer.2.attn_out", 0, 2, InterventionMode::Add, v.clone()),
    ]
    .into();
    let got = model.forward(&mixed).unwrap().captures[0].clone();
    let slot = &got.as_slice()[2 * 64..3 * 64];
    for ((&got, &w), &v) in slot.iter().zip(w.as_slice()).zip(v.as_slice()) {
        assert_eq!(got, w + v);
    }

    // Bad requests are explained.
    let mut bad = ForwardRequest::new(batch(), LogitsWanted::None);
    bad.interventions = vec![Intervention::fixed(
        "layer.1.mlp_key",
        0,
        1,
        InterventionMode::Add,
        v.clone(),
    )]
    .into();
    let e = model.forward(&bad).unwrap_err();
    assert!(e.message.contains("expected shape [176]"), "{e}");
    bad.interventions = vec![Intervention::fixed(
        "layer.1.mlp_out",
        0,
        9,
        InterventionMode::Add,
        v,
    )]
    .into();
    let e = model.forward(&bad).unwrap_err();
    assert!(e.message.contains("outside the batch"), "{e}");
}

#[test]
fn embedding_noise_is_the_shared_seeded_gaussian() {
    let model = tiny_llama();
    let mut req = ForwardRequest::new(batch(), LogitsWanted::None);
    req.captures = vec!["embed".into()].into();
    let clean = model.forward(&req).unwrap().captures[0].clone();
    req.noise = vec![EmbeddingNoise {
        row: 1,
        start: 3,
        end: 6,
        scale: 0.5,
        seed: 42,
    }]
    .into();
    let noisy = model.forward(&req).unwrap().captures[0].clone();
    let expect = kedit_plugin_api::noise::gaussian(42, 3 * 64, 0.5);
    for r in 0..2 {
        for p in 0..7 {
            for i in 0..64 {
                let at = (r * 7 + p) * 64 + i;
                let diff = noisy.as_slice()[at] - clean.as_slice()[at];
                let want = if r == 1 && (3..6).contains(&p) {
                    expect[(p - 3) * 64 + i]
                } else {
                    0.0
                };
                assert!((diff - want).abs() < 1e-6, "row {r} pos {p} dim {i}");
            }
        }
    }
}

#[test]
fn sampling_is_seeded_and_stops_where_asked() {
    let model = tiny_llama();
    let prompt = vec![299u32, 473, 151];
    let mut req = GenerateRequest::greedy(vec![prompt.clone(), vec![5, 6]], 8);
    req.sampling = kedit_plugin_api::SamplingKind::TopK;
    req.top_k = 20;
    req.temperature = 1.5;
    req.seed = 11;
    let a = model.generate(&req).unwrap();
    assert_eq!(a, model.generate(&req).unwrap(), "same seed, same tokens");
    assert_eq!(a.len(), 2);
    assert!(a.iter().all(|r| r.len() == 8));
    let others: Vec<_> = (12..20)
        .map(|s| {
            req.seed = s;
            model.generate(&req).unwrap()
        })
        .collect();
    assert!(others.iter().any(|o| o != &a), "the seed changes nothing");

    let greedy = model
        .generate(&GenerateRequest::greedy(vec![prompt.clone()], 8))
        .unwrap();
    let mut stop = GenerateRequest::greedy(vec![prompt.clone()], 8);
    stop.stop_ids = vec![greedy[0][2]].into();
    let first = greedy[0].iter().position(|&t| t == greedy[0][2]).unwrap();
    assert_eq!(
        model.generate(&stop).unwrap()[0],
        greedy[0][..=first].to_vec()
    );
    assert!(model
        .generate(&GenerateRequest::greedy(vec![prompt], 0))
        .unwrap()[0]
        .is_empty());
    assert!(model
        .generate(&GenerateRequest::greedy(vec![vec![]], 3))
        .is_err());
    assert!(model
        .generate(&GenerateRequest::greedy(vec![vec![9999]], 3))
        .is_err());
}

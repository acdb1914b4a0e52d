//! Gradients on the tiny LLaMA: parameter gradients at activation sites of every kind and
//! site gradients of linear maps (dW = Σ gᵀx) against central finite differences, for a loss
//! with NLL and KL terms over a right-padded batch; prepared batches give the same gradients.

mod common;

use common::*;
use kedit_model_core::testkit::{gradient_batch, GradientCase};
use kedit_plugin_api::{
    Batch, ForwardRequest, GradRequest, Intervention, LogitsWanted, Model, NllTerm, Padding, Tensor,
};

/// Parameters at every kind of activation site (widths 64, `mlp_key` 176) and site
/// gradients of these linear maps (the head is untied here, so `lm_head` is checked too).
fn case() -> GradientCase {
    GradientCase::standard(
        64,
        176,
        &[
            "layer.1.mlp.down",
            "layer.0.attn.q",
            "layer.2.attn.v",
            "lm_head",
        ],
    )
}

#[test]
fn loss_values_match_a_host_side_recomputation() {
    let model = tiny_llama();
    let case = case();
    case.check_loss(&model);
    let g = case.gradient(&model);
    assert_eq!(g.nll_logprobs.len(), 3);
    assert!(g.nll_logprobs.iter().all(|&lp| lp < 0.0));
}

#[test]
fn parameter_gradients_match_finite_differences() {
    case().check_param_grads(&tiny_llama());
}

#[test]
fn site_gradients_give_weight_gradients_that_match_finite_differences() {
    case().check_site_grads(&mut tiny_llama());
}

#[test]
fn prepared_batches_give_the_same_gradients() {
    let mut model = tiny_llama();
    let p = case();
    // Parameters from layer 1 on only: layer 0 and the embedding are computed once.
    let from_layer = 1;
    let keep: Vec<usize> = p
        .param_sites
        .iter()
        .enumerate()
        .filter(|(_, (site, ..))| site.starts_with("layer.1") || site.starts_with("layer.2"))
        .map(|(i, _)| i)
        .collect();
    let make = |prepared: Option<u64>| {
        let mut req = p.grad_request();
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
    let handle = model.prepare(&gradient_batch(), from_layer).unwrap();
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
            p.param_sites[keep[k]].0
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
fn frozen_prefixes_give_the_same_gradients_as_whole_rows() {
    kedit_model_core::testkit::check_frozen_prefix(&mut tiny_llama(), 64);
}

#[test]
fn repeated_prepared_calls_reuse_the_products_their_parameters_cannot_change() {
    kedit_model_core::testkit::check_product_memo(&mut tiny_llama());
}

#[test]
fn the_last_block_runs_only_the_loss_slots_with_the_same_gradients() {
    kedit_model_core::testkit::check_last_block_slots(&mut tiny_llama());
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

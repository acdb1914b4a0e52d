//! The tiny random GPT-2 against transformers' `GPT2LMHeadModel` outputs
//! (shared/fixtures/gpt2): logits unpadded, right- and left-padded (learned positions 0..n-1 of
//! the real tokens), every block output, the final norm, layer 1's MLP key and output, and
//! KV-cached greedy decoding step by step; gradients against finite differences; export.

use std::path::Path;

use kedit_model_core::arch::gpt2::Gpt2;
use kedit_model_core::testkit::*;
use kedit_model_core::Runtime;
use kedit_plugin_api::{Model, Padding};

fn tiny() -> Runtime<Gpt2> {
    open(&fixture("gpt2"))
}

fn open(path: &Path) -> Runtime<Gpt2> {
    kedit_model_gpt2::open_runtime(path.to_str().unwrap(), "cpu")
        .expect("the gpt2 checkpoint loads")
}

fn reference() -> TinyFixture {
    TinyFixture::new("gpt2", 3, 256)
}

#[test]
fn unpadded_logits_and_every_activation_match_transformers() {
    reference().check_unpadded(&tiny());
}

#[test]
fn right_padded_batch_matches_transformers_at_real_positions() {
    reference().check_padded(&tiny(), "b", Padding::Right);
}

#[test]
fn left_padded_batch_matches_transformers_at_real_positions() {
    reference().check_padded(&tiny(), "c", Padding::Left);
}

#[test]
fn kv_cached_greedy_decoding_matches_transformers_step_by_step() {
    reference().check_kv_greedy(&tiny());
}

#[test]
fn facts_describe_the_checkpoint() {
    let f = tiny().facts().unwrap();
    assert_eq!(f.family.as_str(), "gpt2");
    assert_eq!((f.n_layers, f.d_model, f.d_ff), (3, 64, 256));
    assert_eq!((f.n_heads, f.n_kv_heads, f.head_dim), (4, 4, 16));
    assert_eq!((f.vocab_size, f.max_positions), (512, 128));
    assert_eq!(f.eos_ids.as_slice(), &[511]);
    let sites: Vec<&str> = f.weight_sites.iter().map(|s| s.as_str()).collect();
    for s in [
        "embed.weight",
        "lm_head",
        "layer.2.mlp.down",
        "layer.0.attn.q",
        "layer.1.mlp.up",
    ] {
        assert!(sites.contains(&s), "{s} missing from {sites:?}");
    }
    assert!(!sites.iter().any(|s| s.contains("gate")), "{sites:?}");
    // q, k, v, o, up, down per layer; the tied head reads the embedding.
    assert_eq!(sites.len(), 2 + 3 * 6);
}

#[test]
fn weights_are_seen_as_out_by_in_and_q_k_v_are_column_blocks_of_c_attn() {
    let model = tiny();
    let ckpt = load_expected_weights();
    let c_attn = &ckpt["transformer.h.1.attn.c_attn.weight"]; // [64, 192], x·W
    for (j, site) in ["layer.1.attn.q", "layer.1.attn.k", "layer.1.attn.v"]
        .iter()
        .enumerate()
    {
        let w = model.read_weight(site).unwrap();
        assert_eq!(w.dims(), vec![64, 64]);
        for o in 0..64 {
            for i in 0..64 {
                assert_eq!(w.as_slice()[o * 64 + i], c_attn.1[i * 192 + j * 64 + o]);
            }
        }
    }
    let down = model.read_weight("layer.0.mlp.down").unwrap();
    assert_eq!(down.dims(), vec![64, 256]);
    let c_proj = &ckpt["transformer.h.0.mlp.c_proj.weight"]; // [256, 64]
    assert_eq!(down.as_slice()[3 * 256 + 200], c_proj.1[200 * 64 + 3]);
    assert_eq!(
        model.read_weight("layer.0.mlp.up").unwrap().dims(),
        vec![256, 64]
    );
    assert!(model.read_weight("layer.0.mlp.gate").is_err());
}

/// The fixture's own tensors, by name: (shape, values).
fn load_expected_weights() -> std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> {
    load_expected(fixture("gpt2").join("model.safetensors"))
        .into_iter()
        .map(|(k, v)| (k, (v.shape.clone(), v.f32s())))
        .collect()
}

fn gradient_case() -> GradientCase {
    GradientCase::standard(
        64,
        256,
        // Not `lm_head`: the head is tied, so a finite difference of that weight also moves
        // the embedding, which the head's (input, output-gradient) pairs do not cover.
        &[
            "layer.1.mlp.down",
            "layer.0.attn.q",
            "layer.2.attn.v",
            "layer.1.mlp.up",
            "layer.0.attn.o",
        ],
    )
}

#[test]
fn gradient_loss_matches_a_host_side_recomputation() {
    gradient_case().check_loss(&tiny());
}

#[test]
fn parameter_gradients_match_finite_differences() {
    gradient_case().check_param_grads(&tiny());
}

#[test]
fn site_gradients_give_weight_gradients_that_match_finite_differences() {
    gradient_case().check_site_grads(&mut tiny());
}

#[test]
fn frozen_prefixes_give_the_same_gradients_as_whole_rows() {
    check_frozen_prefix(&mut tiny(), 64);
}

#[test]
fn repeated_prepared_calls_reuse_the_products_their_parameters_cannot_change() {
    check_product_memo(&mut tiny());
}

#[test]
fn the_last_block_runs_only_the_loss_slots_with_the_same_gradients() {
    check_last_block_slots(&mut tiny());
}

#[test]
fn export_writes_gpt2_conv1d_tensors_that_reload_to_the_same_logits() {
    let mut model = tiny();
    let (_guard, out) =
        check_export_round_trip(&mut model, &fixture("gpt2"), "layer.1.attn.k", open);
    // Same tensor names and shapes as the source (c_attn fused, Conv1D [in, out], no head).
    let names = |p: &Path| {
        let mut v: Vec<(String, Vec<usize>)> = load_expected(p.join("model.safetensors"))
            .into_iter()
            .map(|(k, v)| (k, v.shape))
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&out), names(&fixture("gpt2")));
    // Only layer 1's c_attn changed, and only its k columns.
    let src = load_expected_weights();
    let new: std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> =
        load_expected(out.join("model.safetensors"))
            .into_iter()
            .map(|(k, v)| (k, (v.shape.clone(), v.f32s())))
            .collect();
    for (name, (_, values)) in &src {
        if name != "transformer.h.1.attn.c_attn.weight" {
            assert_eq!(&new[name].1, values, "{name} changed");
        }
    }
    let (a, b) = (
        &src["transformer.h.1.attn.c_attn.weight"].1,
        &new["transformer.h.1.attn.c_attn.weight"].1,
    );
    for i in 0..64 {
        for c in 0..192 {
            let (x, y) = (a[i * 192 + c], b[i * 192 + c]);
            if (64..128).contains(&c) {
                assert_eq!(y, x * 1.5);
            } else {
                assert_eq!(y, x);
            }
        }
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let source: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("gpt2").join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config, source);
}

//! The tiny random Qwen2 and Qwen3 against transformers' `Qwen2ForCausalLM` /
//! `Qwen3ForCausalLM` outputs (shared/fixtures/{qwen2,qwen3}): logits unpadded, right- and
//! left-padded, every block output, the final norm, layer 1's MLP key and output, KV-cached
//! greedy decoding step by step; gradients against finite differences; export round trips.

use std::path::Path;

use kedit_model_core::arch::llama::Llama;
use kedit_model_core::testkit::*;
use kedit_model_core::Runtime;
use kedit_plugin_api::{Model, OpenRequest, Padding};

fn open(path: &Path) -> Runtime<Llama> {
    kedit_model_qwen::open_runtime(path.to_str().unwrap(), "cpu")
        .expect("the qwen checkpoint loads")
}

fn tiny(name: &str) -> Runtime<Llama> {
    open(&fixture(name))
}

fn reference(name: &str) -> TinyFixture {
    TinyFixture::new(name, 3, 176)
}

const FAMILIES: [&str; 2] = ["qwen2", "qwen3"];

#[test]
fn unpadded_logits_and_every_activation_match_transformers() {
    for f in FAMILIES {
        reference(f).check_unpadded(&tiny(f));
    }
}

#[test]
fn right_padded_batches_match_transformers_at_real_positions() {
    for f in FAMILIES {
        reference(f).check_padded(&tiny(f), "b", Padding::Right);
    }
}

#[test]
fn left_padded_batches_match_transformers_at_real_positions() {
    for f in FAMILIES {
        reference(f).check_padded(&tiny(f), "c", Padding::Left);
    }
}

#[test]
fn kv_cached_greedy_decoding_matches_transformers_step_by_step() {
    for f in FAMILIES {
        reference(f).check_kv_greedy(&tiny(f));
    }
}

#[test]
fn facts_describe_the_checkpoints() {
    let f = tiny("qwen2").facts().unwrap();
    assert_eq!(f.family.as_str(), "qwen2");
    assert_eq!((f.n_layers, f.d_model, f.d_ff), (3, 64, 176));
    assert_eq!((f.n_heads, f.n_kv_heads, f.head_dim), (4, 2, 16));
    let f = tiny("qwen3").facts().unwrap();
    assert_eq!(f.family.as_str(), "qwen3");
    assert_eq!((f.n_heads, f.n_kv_heads, f.head_dim), (4, 2, 32));
    let q2 = tiny("qwen2");
    assert_eq!(
        q2.read_weight("layer.0.attn.q").unwrap().dims(),
        vec![64, 64]
    );
    let q3 = tiny("qwen3");
    assert_eq!(
        q3.read_weight("layer.0.attn.q").unwrap().dims(),
        vec![128, 64]
    );
    assert_eq!(
        q3.read_weight("layer.0.attn.o").unwrap().dims(),
        vec![64, 128]
    );
    // Tied heads read the embedding.
    assert_eq!(
        q2.read_weight("lm_head").unwrap().as_slice(),
        q2.read_weight("embed.weight").unwrap().as_slice()
    );
}

fn gradient_case() -> GradientCase {
    GradientCase::standard(
        64,
        176,
        // Not `lm_head`: the head is tied, so a finite difference of that weight also moves
        // the embedding, which the head's (input, output-gradient) pairs do not cover.
        &[
            "layer.1.mlp.down",
            "layer.0.attn.q",
            "layer.2.attn.v",
            "layer.1.attn.k",
            "layer.0.mlp.gate",
        ],
    )
}

#[test]
fn gradient_losses_match_a_host_side_recomputation() {
    for f in FAMILIES {
        gradient_case().check_loss(&tiny(f));
    }
}

#[test]
fn parameter_gradients_match_finite_differences() {
    for f in FAMILIES {
        eprintln!("--- {f}");
        gradient_case().check_param_grads(&tiny(f));
    }
}

#[test]
fn site_gradients_give_weight_gradients_that_match_finite_differences() {
    for f in FAMILIES {
        eprintln!("--- {f}");
        gradient_case().check_site_grads(&mut tiny(f));
    }
}

#[test]
fn frozen_prefixes_give_the_same_gradients_as_whole_rows() {
    for f in FAMILIES {
        eprintln!("--- {f}");
        check_frozen_prefix(&mut tiny(f), 64);
    }
}

#[test]
fn repeated_prepared_calls_reuse_the_products_their_parameters_cannot_change() {
    for f in FAMILIES {
        eprintln!("--- {f}");
        check_product_memo(&mut tiny(f));
    }
}

#[test]
fn the_last_block_runs_only_the_loss_slots_with_the_same_gradients() {
    for f in FAMILIES {
        eprintln!("--- {f}");
        check_last_block_slots(&mut tiny(f));
    }
}

#[test]
fn export_writes_hf_checkpoints_that_reload_to_the_same_logits() {
    // Qwen3's q_norm makes q's scale irrelevant: edit v there.
    for (f, site) in [("qwen2", "layer.1.attn.q"), ("qwen3", "layer.1.attn.v")] {
        let mut model = tiny(f);
        let (_guard, out) = check_export_round_trip(&mut model, &fixture(f), site, open);
        // The same tensor names and shapes as the source (biases, q/k norms, no tied head).
        let names = |p: &Path| {
            let mut v: Vec<(String, Vec<usize>)> = load_expected(p.join("model.safetensors"))
                .into_iter()
                .map(|(k, v)| (k, v.shape))
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&out), names(&fixture(f)), "{f}");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["model_type"], f);
    }
}

#[test]
fn the_plugin_probes_and_opens_through_the_abi() {
    let info = kedit_model_qwen::info();
    let names: Vec<&str> = info.families.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["qwen2", "qwen3"]);
    for f in FAMILIES {
        assert_eq!(
            kedit_model_qwen::probe(fixture(f).to_str().unwrap()).unwrap(),
            Some(f.into())
        );
    }
    for other in ["llama", "gpt2"] {
        assert_eq!(
            kedit_model_qwen::probe(fixture(other).to_str().unwrap()).unwrap(),
            None
        );
    }
    assert_eq!(kedit_model_qwen::probe("/nonexistent").unwrap(), None);
    let request = |family: Option<&str>| OpenRequest {
        path: fixture("qwen3").to_str().unwrap().into(),
        family: family.map(Into::into).into(),
        device: "cpu".into(),
        options_json: "{}".into(),
    };
    let model = kedit_model_qwen::open(&request(Some("qwen3"))).unwrap();
    assert_eq!(model.facts().unwrap().family.as_str(), "qwen3");
    assert!(kedit_model_qwen::open(&request(None)).is_ok());
    let e = kedit_model_qwen::open(&request(Some("qwen2")))
        .err()
        .unwrap();
    assert!(e.message.contains("qwen3"), "{e}");
    assert!(kedit_model_qwen::open(&request(Some("llama"))).is_err());
}

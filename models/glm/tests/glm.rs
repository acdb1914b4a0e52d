//! The tiny random `GlmForCausalLM` and `Glm4ForCausalLM` (shared/fixtures/glm, glm4) against
//! transformers: logits unpadded / right- / left-padded, every block output, the final norm,
//! layer 1's MLP key and output (glm4: before `post_mlp_layernorm`), KV-cached greedy decoding
//! with partial interleaved RoPE; gradients against finite differences; export round trips with
//! the fused `gate_up_proj`; the kedit binary; broken checkpoints.

mod common;

use common::*;
use kedit_model_core::arch::glm::Glm;
use kedit_model_core::Runtime;

fn open(name: &str) -> Runtime<Glm> {
    kedit_model_glm::open_glm(fixture(name).to_str().unwrap(), "cpu").expect("the fixture loads")
}

#[test]
fn glm_matches_transformers() {
    check_reference(&open("glm"), "glm", 128);
}

#[test]
fn glm4_matches_transformers() {
    check_reference(&open("glm4"), "glm4", 128);
}

const SITE_GRADS: &[&str] = &[
    "layer.1.mlp.down",
    "layer.1.mlp.gate",
    "layer.0.mlp.up",
    "layer.0.attn.q",
    "layer.1.attn.k",
    "layer.2.attn.v",
    "lm_head",
];

#[test]
fn glm_gradients_match_finite_differences() {
    check_gradients(&mut open("glm"), 64, 128, SITE_GRADS);
}

#[test]
fn glm4_gradients_match_finite_differences() {
    check_gradients(&mut open("glm4"), 64, 128, SITE_GRADS);
}

fn export_writes() -> Vec<FusedWrite> {
    vec![
        // First (the one reloaded on its own): GLM-4's post_mlp_layernorm hides a mere scaling
        // of `up` or `down`, not one of `gate` (through silu).
        FusedWrite {
            site: "layer.0.mlp.gate",
            hf: "model.layers.0.mlp.gate_up_proj.weight",
            first_row: 0,
        },
        FusedWrite {
            site: "layer.1.mlp.up",
            hf: "model.layers.1.mlp.gate_up_proj.weight",
            first_row: 128,
        },
        FusedWrite {
            site: "layer.2.attn.k",
            hf: "model.layers.2.self_attn.k_proj.weight",
            first_row: 0,
        },
        FusedWrite {
            site: "layer.1.mlp.down",
            hf: "model.layers.1.mlp.down_proj.weight",
            first_row: 0,
        },
    ]
}

#[test]
fn export_round_trips_with_the_fused_gate_up_proj() {
    for name in ["glm", "glm4"] {
        let mut model = open(name);
        check_fused_export(&mut model, name, &export_writes(), |dir| {
            kedit_model_glm::open_glm(dir.to_str().unwrap(), "cpu").unwrap()
        });
    }
}

#[test]
fn facts_and_sites() {
    for (name, family) in [("glm", "glm"), ("glm4", "glm4")] {
        let model = open(name);
        let f = model.facts().unwrap();
        assert_eq!(f.family.as_str(), family);
        assert_eq!((f.n_layers, f.d_model, f.d_ff), (3, 64, 128));
        assert_eq!((f.n_heads, f.n_kv_heads, f.head_dim), (4, 2, 16));
        assert_eq!(f.vocab_size, 512);
        let sites: Vec<&str> = f.weight_sites.iter().map(|s| s.as_str()).collect();
        assert_eq!(sites.len(), 2 + 3 * 7, "{sites:?}");
        assert_eq!(
            model.read_weight("layer.0.mlp.gate").unwrap().dims(),
            vec![128, 64]
        );
        assert_eq!(
            model.read_weight("layer.0.attn.k").unwrap().dims(),
            vec![32, 64]
        );
    }
}

#[test]
fn kedit_generate_reproduces_the_greedy_ids() {
    check_kedit_generate("glm");
    check_kedit_generate("glm4");
}

#[test]
fn the_plugin_probes_and_opens_through_the_abi() {
    let p = |name: &str| kedit_model_glm::probe(fixture(name).to_str().unwrap()).unwrap();
    assert_eq!(p("glm").as_deref(), Some("glm"));
    assert_eq!(p("glm4").as_deref(), Some("glm4"));
    assert_eq!(p("chatglm2").as_deref(), Some("chatglm"));
    assert_eq!(p("llama"), None);
    assert_eq!(p("baichuan7b"), None);
    assert_eq!(kedit_model_glm::probe("/nonexistent").unwrap(), None);

    let request = |name: &str, options: &str, family: Option<&str>| kedit_plugin_api::OpenRequest {
        path: fixture(name).to_str().unwrap().into(),
        family: family.map(Into::into).into(),
        device: "cpu".into(),
        options_json: options.into(),
    };
    for (name, family) in [("glm", "glm"), ("glm4", "glm4"), ("chatglm2", "chatglm")] {
        let m = kedit_model_glm::open(&request(name, "{}", None)).unwrap();
        assert_eq!(m.facts().unwrap().family.as_str(), family);
    }
    let e = kedit_model_glm::open(&request("glm", "{}", Some("chatglm")))
        .err()
        .unwrap();
    assert!(
        e.message.contains("glm") && e.message.contains("chatglm"),
        "{e}"
    );
    let e = kedit_model_glm::open(&request("glm", r#"{"dtype": "bf16"}"#, None))
        .err()
        .unwrap();
    assert!(e.message.contains("dtype"), "{e}");
    let e = kedit_model_glm::open(&request("llama", "{}", None))
        .err()
        .unwrap();
    assert!(e.message.contains("not a GLM"), "{e}");
}

#[test]
fn broken_checkpoints_name_the_file_and_the_tensor_or_key() {
    let dir = tempfile::tempdir().unwrap();
    let open_dir = || kedit_model_glm::open_glm(dir.path().to_str().unwrap(), "cpu");

    // A missing fused tensor.
    broken_copy(
        "glm4",
        dir.path(),
        |_| {},
        |n| n != "model.layers.1.mlp.gate_up_proj.weight",
    );
    let e = open_dir().err().unwrap().to_string();
    eprintln!("{e}");
    assert!(
        e.contains("model.layers.1.mlp.gate_up_proj.weight") && e.contains("model.safetensors"),
        "{e}"
    );
    // A missing sandwich norm.
    broken_copy(
        "glm4",
        dir.path(),
        |_| {},
        |n| n != "model.layers.2.post_mlp_layernorm.weight",
    );
    let e = open_dir().err().unwrap().to_string();
    assert!(e.contains("post_mlp_layernorm"), "{e}");

    // A shape the config does not imply.
    broken_copy(
        "glm",
        dir.path(),
        |c| c["intermediate_size"] = 100.into(),
        |_| true,
    );
    let e = open_dir().err().unwrap().to_string();
    eprintln!("{e}");
    assert!(
        e.contains("gate_up_proj.weight") && e.contains("[256, 64]") && e.contains("[200, 64]"),
        "{e}"
    );

    // A missing config key, and a bad partial rotary factor.
    broken_copy(
        "glm",
        dir.path(),
        |c| {
            c.as_object_mut().unwrap().remove("num_hidden_layers");
        },
        |_| true,
    );
    let e = open_dir().err().unwrap().to_string();
    assert!(
        e.contains("num_hidden_layers") && e.contains("config.json"),
        "{e}"
    );
    broken_copy(
        "glm",
        dir.path(),
        |c| {
            c["rope_parameters"]["partial_rotary_factor"] = 0.2.into();
        },
        |_| true,
    );
    let e = open_dir().err().unwrap().to_string();
    assert!(
        e.contains("partial_rotary_factor") && e.contains("config.json"),
        "{e}"
    );
}

/// transformers 4.x config form: top-level `rope_theta` and `partial_rotary_factor`, no
/// `rope_parameters`, `torch_dtype`: the same model.
#[test]
fn the_transformers_4_config_form_loads_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    broken_copy(
        "glm",
        dir.path(),
        |c| {
            let o = c.as_object_mut().unwrap();
            o.remove("rope_parameters");
            o.remove("dtype");
            o.insert("rope_theta".into(), 10000.0.into());
            o.insert("torch_dtype".into(), "float32".into());
        },
        |_| true,
    );
    let model = kedit_model_glm::open_glm(dir.path().to_str().unwrap(), "cpu").unwrap();
    assert_eq!(
        probe_logits(&model).as_slice(),
        probe_logits(&open("glm")).as_slice()
    );
}

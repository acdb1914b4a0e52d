//! `qwen2` / `qwen3` GGUF files: the tiny Qwen checkpoints rewritten as F32 GGUF files under
//! llama.cpp's names (Q/K rows as stored, q/k/v biases, q/k norms, no `output.weight` = tied
//! head) load to the same model as the HF directories; an `output.weight` makes an untied
//! head; and export turns a GGUF model into an HF checkpoint that reloads identically.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kedit_model_core::gguf::test_writer::Writer;
use kedit_model_core::gguf::GgufValue;
use kedit_model_core::testkit::*;
use kedit_plugin_api::Model;

const F32: u32 = 0;

/// HF name → GGUF name of the tiny Qwen tensors.
fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, name) = rest.split_once('.').unwrap();
    let parts = [
        ("self_attn.q_proj.", "attn_q."),
        ("self_attn.k_proj.", "attn_k."),
        ("self_attn.v_proj.", "attn_v."),
        ("self_attn.o_proj.", "attn_output."),
        ("self_attn.q_norm.", "attn_q_norm."),
        ("self_attn.k_norm.", "attn_k_norm."),
        ("mlp.gate_proj.", "ffn_gate."),
        ("mlp.up_proj.", "ffn_up."),
        ("mlp.down_proj.", "ffn_down."),
        ("input_layernorm.", "attn_norm."),
        ("post_attention_layernorm.", "ffn_norm."),
    ];
    let (h, g) = parts.iter().find(|(h, _)| name.starts_with(h)).unwrap();
    format!("blk.{layer}.{g}{}", &name[h.len()..])
}

/// Writes `shared/fixtures/<family>` as an F32 GGUF of architecture `family` into `dir`,
/// plus `extra` tensors (HF names).
fn write_gguf(family: &str, dir: &Path, extra: &[(&str, Vec<usize>, Vec<f32>)]) -> PathBuf {
    let src = fixture(family);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let u = |k: &str| GgufValue::U32(config[k].as_u64().unwrap() as u32);
    let key = |k: &str| format!("{family}.{k}");
    let mut w = Writer::default()
        .kv("general.architecture", GgufValue::String(family.into()))
        .kv(&key("block_count"), u("num_hidden_layers"))
        .kv(&key("embedding_length"), u("hidden_size"))
        .kv(&key("feed_forward_length"), u("intermediate_size"))
        .kv(&key("attention.head_count"), u("num_attention_heads"))
        .kv(&key("attention.head_count_kv"), u("num_key_value_heads"))
        .kv(&key("context_length"), u("max_position_embeddings"))
        .kv(
            &key("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(config["rms_norm_eps"].as_f64().unwrap() as f32),
        )
        .kv(&key("rope.freq_base"), GgufValue::F32(1e6));
    if let Some(hd) = config.get("head_dim") {
        w = w.kv(
            &key("attention.key_length"),
            GgufValue::U32(hd.as_u64().unwrap() as u32),
        );
        w = w.kv(
            &key("attention.value_length"),
            GgufValue::U32(hd.as_u64().unwrap() as u32),
        );
    }
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> =
        load_expected(src.join("model.safetensors"))
            .into_iter()
            .map(|(k, v)| (k, v.shape.clone(), v.f32s()))
            .collect();
    tensors.extend(
        extra
            .iter()
            .map(|(n, s, v)| (n.to_string(), s.clone(), v.clone())),
    );
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, shape, values) in tensors {
        // GGUF lists dims innermost first.
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let bytes = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        w = w.tensor(&gguf_name(&name), &dims, F32, bytes);
    }
    let path = dir.join(format!("{family}.gguf"));
    std::fs::write(&path, w.build()).unwrap();
    path
}

fn open(path: &Path) -> kedit_model_core::Runtime<kedit_model_core::arch::llama::Llama> {
    kedit_model_qwen::open_runtime(path.to_str().unwrap(), "cpu").unwrap()
}

#[test]
fn qwen_gguf_files_load_to_the_same_model_as_the_hf_checkpoints() {
    for family in ["qwen2", "qwen3"] {
        let dir = tempfile::tempdir().unwrap();
        let path = write_gguf(family, dir.path(), &[]);
        assert_eq!(
            kedit_model_qwen::probe(path.to_str().unwrap()).unwrap(),
            Some(family.to_string())
        );
        let gguf = open(&path);
        let hf = open(&fixture(family));
        assert_eq!(gguf.facts().unwrap().family.as_str(), family);
        assert_eq!(gguf.facts().unwrap().head_dim, hf.facts().unwrap().head_dim);
        let d = max_abs_diff(probe_logits(&gguf).as_slice(), probe_logits(&hf).as_slice());
        eprintln!("{family}: GGUF vs HF logits max abs diff {d:e}");
        assert!(d < 1e-4, "{family}: {d}");
        // And against transformers directly.
        reference_check(family, &gguf);

        // GGUF → HF export → reload: the same function, HF names, the qwen config.
        let mut gguf = gguf;
        let (_guard, out) =
            check_export_round_trip(&mut gguf, dir.path(), "layer.1.mlp.down", open);
        let names: Vec<String> = load_expected(out.join("model.safetensors"))
            .into_keys()
            .collect();
        let mut want: Vec<String> = load_expected(fixture(family).join("model.safetensors"))
            .into_keys()
            .collect();
        let mut names = names;
        names.sort();
        want.sort();
        assert_eq!(names, want, "{family}: exported tensor names");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["model_type"], family);
        assert_eq!(config["tie_word_embeddings"], true);
    }
}

fn reference_check(family: &str, model: &impl Model) {
    let exp: HashMap<String, Expected> =
        load_expected(fixture(family).join("expected.safetensors"));
    let ids = exp["a.input_ids"].ids();
    let req = kedit_plugin_api::ForwardRequest::new(
        kedit_plugin_api::Batch::new(vec![ids], kedit_plugin_api::Padding::Right),
        kedit_plugin_api::LogitsWanted::All,
    );
    let logits = model.forward(&req).unwrap().logits.into_option().unwrap();
    let d = assert_close(family, &logits, &exp["a.logits"].f32s(), TINY_TOL);
    eprintln!("{family} GGUF a.logits max abs diff {d:e}");
}

#[test]
fn an_output_weight_is_an_untied_head() {
    let dir = tempfile::tempdir().unwrap();
    let head = pseudo_random(3, 512 * 64, 0.15);
    let path = write_gguf(
        "qwen2",
        dir.path(),
        &[("lm_head.weight", vec![512, 64], head.clone())],
    );
    let model = open(&path);
    assert_eq!(
        model.read_weight("lm_head").unwrap().as_slice(),
        head.as_slice()
    );
    assert_ne!(
        model.read_weight("embed.weight").unwrap().as_slice(),
        head.as_slice()
    );
    let tied = open(&fixture("qwen2"));
    assert!(
        max_abs_diff(
            probe_logits(&model).as_slice(),
            probe_logits(&tied).as_slice()
        ) > 1e-2
    );
}

//! The tiny random ChatGLM2 (remote code, shared/fixtures/chatglm2): exactness against the
//! reference (fused `query_key_value` with bias and 2 kv groups, interleaved RoPE on half of
//! each head, fused `dense_h_to_4h`), KV-cached decoding, gradients, export round trip with
//! re-fused tensors and the `inv_freq` buffer, the kedit binary, the tokenizer prefix, and
//! broken checkpoints.

mod common;

use common::*;
use kedit_model_core::arch::chatglm::ChatGlm;
use kedit_model_core::Runtime;

const NAME: &str = "chatglm2";

fn open() -> Runtime<ChatGlm> {
    kedit_model_glm::open_chatglm(fixture(NAME).to_str().unwrap(), "cpu")
        .expect("the fixture loads")
}

#[test]
fn matches_the_reference_with_the_kv_cache() {
    check_reference(&open(), NAME, 176);
}

#[test]
fn gradients_match_finite_differences() {
    check_gradients(
        &mut open(),
        64,
        176,
        &[
            "layer.1.mlp.down",
            "layer.1.mlp.up",
            "layer.0.attn.q",
            "layer.1.attn.k",
            "layer.2.attn.v",
            "layer.2.attn.o",
            "lm_head",
        ],
    );
}

#[test]
fn export_round_trips_with_re_fused_tensors() {
    let qkv = |i: usize| -> &'static str {
        match i {
            0 => "transformer.encoder.layers.0.self_attention.query_key_value.weight",
            _ => "transformer.encoder.layers.1.self_attention.query_key_value.weight",
        }
    };
    let writes = vec![
        // Rows [q 64 | k 32 | v 32].
        FusedWrite {
            site: "layer.1.attn.k",
            hf: qkv(1),
            first_row: 64,
        },
        FusedWrite {
            site: "layer.0.attn.v",
            hf: qkv(0),
            first_row: 96,
        },
        FusedWrite {
            site: "layer.0.attn.q",
            hf: qkv(0),
            first_row: 0,
        },
        // Rows [gate 176 | up 176].
        FusedWrite {
            site: "layer.2.mlp.up",
            hf: "transformer.encoder.layers.2.mlp.dense_h_to_4h.weight",
            first_row: 176,
        },
        FusedWrite {
            site: "layer.1.mlp.down",
            hf: "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight",
            first_row: 0,
        },
        FusedWrite {
            site: "lm_head",
            hf: "transformer.output_layer.weight",
            first_row: 0,
        },
    ];
    let mut model = open();
    check_fused_export(&mut model, NAME, &writes, |dir| {
        kedit_model_glm::open_chatglm(dir.to_str().unwrap(), "cpu").unwrap()
    });
}

#[test]
fn facts_and_sites() {
    let model = open();
    let f = model.facts().unwrap();
    assert_eq!(f.family.as_str(), "chatglm");
    assert_eq!((f.n_layers, f.d_model, f.d_ff), (3, 64, 176));
    assert_eq!((f.n_heads, f.n_kv_heads, f.head_dim), (4, 2, 16));
    assert_eq!(f.vocab_size, 512);
    assert_eq!(f.eos_ids.as_slice(), &[2]);
    let sites: Vec<&str> = f.weight_sites.iter().map(|s| s.as_str()).collect();
    assert_eq!(sites.len(), 2 + 3 * 7, "{sites:?}");
    assert_eq!(
        model.read_weight("layer.0.attn.q").unwrap().dims(),
        vec![64, 64]
    );
    assert_eq!(
        model.read_weight("layer.0.attn.v").unwrap().dims(),
        vec![32, 64]
    );
    assert_eq!(
        model.read_weight("layer.0.mlp.gate").unwrap().dims(),
        vec![176, 64]
    );
}

#[test]
fn kedit_generate_reproduces_the_greedy_ids() {
    check_kedit_generate(NAME);
}

/// A tokenizer.json is used when present, and `[gMASK]` `sop` go first with special tokens
/// when tokenizer_config.json names THUDM's tokenizer class.
#[test]
fn the_tokenizer_prefix_is_prepended_when_the_tokenizer_config_says_so() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(NAME).join(f), dir.path().join(f)).unwrap();
    }
    let added = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(5, "[gMASK]"), added(6, "sop")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 3, "world": 4,
            "[gMASK]": 5, "sop": 6}, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let open_dir = || kedit_model_glm::open_chatglm(dir.path().to_str().unwrap(), "cpu").unwrap();

    // Without a ChatGLM tokenizer class: the tokenizer as it is.
    let model = open_dir();
    assert_eq!(model.tokenize("hello world", true).unwrap(), vec![3, 4]);

    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"tokenizer_class": "ChatGLMTokenizer"}"#,
    )
    .unwrap();
    let model = open_dir();
    assert_eq!(
        model.tokenize("hello world", true).unwrap(),
        vec![5, 6, 3, 4]
    );
    assert_eq!(model.tokenize("hello world", false).unwrap(), vec![3, 4]);
    // Already there: not doubled.
    assert_eq!(
        model.tokenize("[gMASK] sop hello", true).unwrap(),
        vec![5, 6, 3]
    );
    // Prefixed prompts run.
    let ids = model.tokenize("hello world", true).unwrap();
    let out = model
        .generate(&GenerateRequest::greedy(vec![ids], 3))
        .unwrap();
    assert_eq!(out[0].len(), 3);
}

#[test]
fn broken_checkpoints_name_the_file_and_the_tensor_or_key() {
    let dir = tempfile::tempdir().unwrap();
    let open_dir = || kedit_model_glm::open_chatglm(dir.path().to_str().unwrap(), "cpu");
    let qkv = "transformer.encoder.layers.2.self_attention.query_key_value.bias";
    broken_copy(NAME, dir.path(), |_| {}, |n| n != qkv);
    let e = open_dir().err().unwrap().to_string();
    eprintln!("{e}");
    assert!(e.contains(qkv) && e.contains("model.safetensors"), "{e}");

    // One kv group instead of two: the fused tensor is the wrong size.
    broken_copy(
        NAME,
        dir.path(),
        |c| c["multi_query_group_num"] = 1.into(),
        |_| true,
    );
    let e = open_dir().err().unwrap().to_string();
    eprintln!("{e}");
    assert!(
        e.contains("query_key_value.weight") && e.contains("[128, 64]") && e.contains("[96, 64]"),
        "{e}"
    );

    broken_copy(
        NAME,
        dir.path(),
        |c| {
            c.as_object_mut().unwrap().remove("ffn_hidden_size");
        },
        |_| true,
    );
    let e = open_dir().err().unwrap().to_string();
    assert!(
        e.contains("ffn_hidden_size") && e.contains("config.json"),
        "{e}"
    );

    broken_copy(NAME, dir.path(), |c| c["rmsnorm"] = false.into(), |_| true);
    let e = open_dir().err().unwrap().to_string();
    assert!(e.contains("rmsnorm"), "{e}");

    // The inv_freq buffer is optional (computed from the config).
    broken_copy(NAME, dir.path(), |_| {}, |n| !n.ends_with("inv_freq"));
    let model = open_dir().unwrap();
    assert_eq!(
        probe_logits(&model).as_slice(),
        probe_logits(&open()).as_slice()
    );
}

/// ChatGLM3's `rope_ratio` scales the RoPE base; ChatGLM2 has none (base 10000).
#[test]
fn chatglm3_rope_ratio_scales_the_base() {
    assert_eq!(open().arch().config.rope.theta, 10000.0);
    assert_eq!(open().arch().config.rope.rotary_dim, 8);
    let dir = tempfile::tempdir().unwrap();
    broken_copy(
        NAME,
        dir.path(),
        |c| c["rope_ratio"] = 50.0.into(),
        |_| true,
    );
    let model = kedit_model_glm::open_chatglm(dir.path().to_str().unwrap(), "cpu").unwrap();
    assert_eq!(model.arch().config.rope.theta, 500000.0);
    let d = max_abs_diff(
        probe_logits(&model).as_slice(),
        probe_logits(&open()).as_slice(),
    );
    assert!(d > 1e-3, "rope_ratio had no effect ({d})");
}

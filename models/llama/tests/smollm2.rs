//! The real SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to f32) against transformers:
//! tokenization, last-position logits of five prompts, and KV-cached greedy continuations.
//!
//! Needs `KEDIT_SMOLLM2_GGUF` = path to `SmolLM2-135M-Instruct.Q4_1.gguf` (the README's test
//! command sets it from `kedit fetch smollm2-135m-instruct`); without it the tests fail loudly.

mod common;

use std::sync::OnceLock;
use std::time::Instant;

use common::*;
use kedit_model_core::arch::llama::Llama;
use kedit_model_core::Runtime;
use kedit_plugin_api::{
    Batch, ChatMessage, ForwardRequest, GenerateRequest, LogitsWanted, Model, Padding,
};
use serde_json::Value;

fn model() -> &'static Runtime<Llama> {
    static MODEL: OnceLock<Runtime<Llama>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path =
            kedit_plugin_api::testing::real_model("KEDIT_SMOLLM2_GGUF", "smollm2-135m-instruct");
        let t = Instant::now();
        let m =
            kedit_model_llama::open_runtime(path.to_str().unwrap(), "cpu").expect("SmolLM2 loads");
        eprintln!("SmolLM2 loaded in {:.2?}", t.elapsed());
        m
    })
}

fn expected_json() -> Value {
    let text = std::fs::read_to_string(fixture("smollm2").join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenization_vectors_are_reproduced_exactly() {
    let model = model();
    let exp = expected_json();
    let cases = exp["tokenization"].as_array().unwrap();
    assert_eq!(cases.len(), 22);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        assert_eq!(
            model.tokenize(text, false).unwrap(),
            want,
            "ids of {text:?}"
        );
        // The GGUF says add_bos_token = false: special tokens add nothing.
        assert_eq!(
            model.tokenize(text, true).unwrap(),
            want,
            "ids of {text:?} (add_special)"
        );
        let decoded = case["decoded"].as_str().unwrap();
        assert_eq!(
            model.detokenize(&want, false).unwrap(),
            decoded,
            "decode of {text:?}"
        );
    }
}

#[test]
fn last_logits_and_greedy_continuations_match_transformers() {
    let model = model();
    let exp = expected_json();
    let tensors = load_expected(fixture("smollm2").join("expected.safetensors"));
    let prompts = exp["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 5);
    let mut batch_rows = Vec::new();
    for (k, p) in prompts.iter().enumerate() {
        let text = p["prompt"].as_str().unwrap();
        let prompt_ids = ids(&p["input_ids"]);
        assert_eq!(
            model.tokenize(text, false).unwrap(),
            prompt_ids,
            "prompt {k}"
        );
        assert_eq!(tensors[&format!("p{k}.input_ids")].ids(), prompt_ids);

        let t = Instant::now();
        let out = model
            .forward(&ForwardRequest::new(
                Batch::new(vec![prompt_ids.clone()], Padding::Right),
                LogitsWanted::Last,
            ))
            .unwrap();
        let elapsed = t.elapsed();
        let logits = out.logits.into_option().unwrap();
        let want = tensors[&format!("p{k}.last_logits")].f32s();
        let d = max_abs_diff(logits.as_slice(), &want);
        eprintln!(
            "p{k}: {} tokens, forward {elapsed:.2?}, last_logits max abs diff {d:e}",
            prompt_ids.len()
        );
        assert!(d <= 1e-3, "p{k}: last logits differ by {d}");

        let t = Instant::now();
        let got = model
            .generate(&GenerateRequest::greedy(vec![prompt_ids.clone()], 16))
            .unwrap();
        eprintln!(
            "p{k}: 16 greedy tokens in {:.2?} ({:?})",
            t.elapsed(),
            model.detokenize(&got[0], false).unwrap()
        );
        assert_eq!(
            got[0],
            ids(&p["greedy_new_ids"]),
            "greedy continuation of p{k}"
        );
        assert_eq!(
            model.detokenize(&got[0], false).unwrap(),
            p["greedy_text"].as_str().unwrap()
        );
        batch_rows.push(prompt_ids);
    }

    // The five prompts as one left-padded batch give the same last logits.
    let out = model
        .forward(&ForwardRequest::new(
            Batch::new(batch_rows, Padding::Left),
            LogitsWanted::Last,
        ))
        .unwrap();
    let logits = out.logits.into_option().unwrap();
    for k in 0..5 {
        let want = tensors[&format!("p{k}.last_logits")].f32s();
        let d = max_abs_diff(logits.row(k), &want);
        assert!(d <= 1e-3, "batched p{k}: last logits differ by {d}");
    }
}

#[test]
fn facts_and_chat_template_come_from_the_gguf() {
    let model = model();
    let f = model.facts().unwrap();
    assert_eq!((f.n_layers, f.d_model, f.d_ff), (30, 576, 1536));
    assert_eq!(
        (f.n_heads, f.n_kv_heads, f.head_dim, f.vocab_size),
        (9, 3, 64, 49152)
    );
    assert_eq!(f.eos_ids.as_slice(), &[2]);
    assert_eq!(f.bos_id.into_option(), Some(1));
    assert_eq!(f.pad_id.into_option(), Some(2));
    assert!(!f.add_bos);
    let text = model
        .apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: "What is the capital of France?".into(),
            }],
            true,
        )
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = model.tokenize(&text, false).unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> is one special token");
    // Stop at <|im_end|>: the token is kept and generation ends there.
    let mut req = GenerateRequest::greedy(vec![ids], 40);
    req.stop_ids = vec![2].into();
    let out = model.generate(&req).unwrap();
    let answer = model.detokenize(&out[0], false).unwrap();
    eprintln!("chat answer: {answer:?}");
    assert!(out[0].len() <= 40);
    if out[0].len() < 40 {
        assert_eq!(*out[0].last().unwrap(), 2);
    }
}

#[test]
fn export_unpermutes_q_and_k_into_an_hf_checkpoint_that_reloads_identically() {
    let model = model();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-hf");
    let t = Instant::now();
    model.export(out.to_str().unwrap()).unwrap();
    eprintln!("export in {:.2?}", t.elapsed());
    let hf = kedit_model_llama::open_runtime(out.to_str().unwrap(), "cpu").unwrap();

    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("smollm2").join("config.json")).unwrap(),
    )
    .unwrap();
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "rope_parameters",
    ] {
        assert_eq!(config[key], reference[key], "config.json key {key}");
    }

    // The HF layout uses rotate-half RoPE on un-permuted rows: the same function.
    let prompt = vec![504u32, 3575, 282, 4649, 314];
    let req = ForwardRequest::new(Batch::new(vec![prompt], Padding::Right), LogitsWanted::Last);
    let a = model.forward(&req).unwrap().logits.into_option().unwrap();
    let b = hf.forward(&req).unwrap().logits.into_option().unwrap();
    let d = max_abs_diff(a.as_slice(), b.as_slice());
    eprintln!("GGUF vs exported HF logits: max abs diff {d:e}");
    assert!(d < 1e-4);
    let q_gguf = model.read_weight("layer.3.attn.q").unwrap();
    let q_hf = hf.read_weight("layer.3.attn.q").unwrap();
    assert_ne!(q_gguf, q_hf, "Q rows should be in HF order after export");

    // The tokenizer travels along.
    let text = "The capital of France is 1234 café 👋";
    assert_eq!(
        hf.tokenize(text, false).unwrap(),
        model.tokenize(text, false).unwrap()
    );
    assert_eq!(hf.facts().unwrap().eos_ids, model.facts().unwrap().eos_ids);
    assert_eq!(
        hf.facts().unwrap().chat_template,
        model.facts().unwrap().chat_template
    );
}

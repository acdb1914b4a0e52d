//! The real Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF of architecture `qwen2`, dequantised to
//! f32) against transformers (shared/fixtures/qwen2.5-coder-0.5b): the 22 tokenization vectors,
//! last-position logits of the five prompts, KV-cached greedy continuations, and the
//! chat-templated prompt. The model loads once for the whole file.
//!
//! Needs `KEDIT_QWEN25_GGUF` = path to the GGUF (the README's test command sets it from
//! `kedit fetch qwen2.5-coder-0.5b-instruct`); without it the tests fail loudly.

use std::sync::OnceLock;
use std::time::Instant;

use kedit_model_core::arch::llama::Llama;
use kedit_model_core::testkit::*;
use kedit_model_core::Runtime;
use kedit_plugin_api::{
    Batch, ChatMessage, ForwardRequest, GenerateRequest, LogitsWanted, Model, Padding,
};
use serde_json::Value;

const FIXTURE: &str = "qwen2.5-coder-0.5b";

fn model() -> &'static Runtime<Llama> {
    static MODEL: OnceLock<Runtime<Llama>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = kedit_plugin_api::testing::real_model(
            "KEDIT_QWEN25_GGUF",
            "qwen2.5-coder-0.5b-instruct",
        );
        let t = Instant::now();
        let m = kedit_model_qwen::open_runtime(path.to_str().unwrap(), "cpu")
            .expect("Qwen2.5-Coder loads");
        eprintln!("Qwen2.5-Coder loaded in {:.2?}", t.elapsed());
        m
    })
}

fn expected_json() -> Value {
    let text = std::fs::read_to_string(fixture(FIXTURE).join("expected.json")).unwrap();
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
        // add_bos_token = false: special tokens add nothing.
        assert_eq!(
            model.tokenize(text, true).unwrap(),
            want,
            "ids of {text:?} (add_special)"
        );
        assert_eq!(
            model.detokenize(&want, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decode of {text:?}"
        );
    }
}

#[test]
fn last_logits_and_greedy_continuations_match_transformers() {
    let model = model();
    let exp = expected_json();
    let tensors = load_expected(fixture(FIXTURE).join("expected.safetensors"));
    let prompts = exp["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 5);
    for (k, p) in prompts.iter().enumerate() {
        let text = p["prompt"].as_str().unwrap();
        let prompt_ids = ids(&p["input_ids"]);
        assert_eq!(
            model.tokenize(text, false).unwrap(),
            prompt_ids,
            "prompt {k}"
        );

        let t = Instant::now();
        let out = model
            .forward(&ForwardRequest::new(
                Batch::new(vec![prompt_ids.clone()], Padding::Right),
                LogitsWanted::Last,
            ))
            .unwrap();
        let elapsed = t.elapsed();
        let logits = out.logits.into_option().unwrap();
        assert_eq!(logits.dims(), vec![1, 151936]);
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
    }
}

#[test]
fn the_chat_template_renders_and_continues_as_transformers_does() {
    let model = model();
    let exp = expected_json();
    let chat = &exp["chat"];
    let f = model.facts().unwrap();
    assert_eq!(f.family.as_str(), "qwen2");
    assert_eq!((f.n_layers, f.d_model, f.d_ff), (24, 896, 4864));
    assert_eq!(
        (f.n_heads, f.n_kv_heads, f.head_dim, f.vocab_size),
        (14, 2, 64, 151936)
    );
    assert!(f.eos_ids.contains(&151645), "{:?}", f.eos_ids);
    assert!(!f.add_bos);
    // The file has its own output.weight: an untied head.
    assert_ne!(
        model.read_weight("lm_head").unwrap().as_slice()[..896],
        model.read_weight("embed.weight").unwrap().as_slice()[..896]
    );
    assert_eq!(
        f.chat_template.as_ref().into_option().map(|s| s.as_str()),
        chat["chat_template"].as_str()
    );

    let messages: Vec<ChatMessage> = chat["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().into(),
        })
        .collect();
    let text = model.apply_chat_template(&messages, true).unwrap();
    assert_eq!(text, chat["rendered_text"].as_str().unwrap());
    let prompt = model.tokenize(&text, false).unwrap();
    assert_eq!(prompt, ids(&chat["input_ids"]));
    assert_eq!(prompt.len(), 36);

    let tensors = load_expected(fixture(FIXTURE).join("expected.safetensors"));
    let out = model
        .forward(&ForwardRequest::new(
            Batch::new(vec![prompt.clone()], Padding::Right),
            LogitsWanted::Last,
        ))
        .unwrap();
    let logits = out.logits.into_option().unwrap();
    let top_ids = tensors["chat.top20_ids"].ids();
    let top_logits = tensors["chat.top20_logits"].f32s();
    let mut worst = 0f32;
    for (&id, &want) in top_ids.iter().zip(&top_logits) {
        worst = worst.max((logits.as_slice()[id as usize] - want).abs());
    }
    eprintln!("chat top-20 logits max abs diff {worst:e}");
    assert!(worst <= 1e-3, "chat top-20 logits differ by {worst}");
    assert_eq!(argmax(logits.row(0)) as u32, top_ids[0]);

    // 16 greedy tokens, EOS (<|im_end|>, step 7) ignored as the reference did.
    let got = model
        .generate(&GenerateRequest::greedy(vec![prompt], 16))
        .unwrap();
    eprintln!("chat: {:?}", model.detokenize(&got[0], false).unwrap());
    assert_eq!(got[0], ids(&chat["greedy_new_ids"]));
    assert_eq!(got[0], tensors["chat.greedy_new_ids"].ids());
    assert_eq!(
        model.detokenize(&got[0], false).unwrap(),
        chat["greedy_text"].as_str().unwrap()
    );
}

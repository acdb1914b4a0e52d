//! Chat templates: kedit renders a checkpoint's own Jinja template exactly as transformers'
//! `apply_chat_template(tokenize=False)` does, finds it where transformers looks (HF
//! `chat_template.jinja`, `chat_template.json`, `tokenizer_config.json`; GGUF
//! `tokenizer.chat_template`), falls back to ChatML only for ChatML families, and otherwise
//! names the checkpoint that has none.
//!
//! `data/chat_template_vectors.json` holds transformers 5.5's renderings (written by
//! `chat_template_vectors.py`). The two GGUF tests need `KEDIT_SMOLLM2_GGUF` and
//! `KEDIT_QWEN25_GGUF` (the README's test command sets them from `kedit fetch`); they read only
//! the GGUF metadata, not the weights.

use std::path::{Path, PathBuf};

use kedit_model_core::checkpoint::JsonFile;
use kedit_model_core::gguf::GgufFile;
use kedit_model_core::text::TextCodec;
use kedit_plugin_api::ChatMessage;
use serde_json::{json, Value};

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

fn fixture(name: &str) -> PathBuf {
    shared().join("fixtures").join(name)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn vectors() -> Value {
    read_json(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/chat_template_vectors.json"))
}

fn messages(list: &Value) -> Vec<ChatMessage> {
    list.as_array()
        .expect("a list of messages")
        .iter()
        .map(|m| ChatMessage {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().into(),
        })
        .collect()
}

/// The Qwen2.5 chat case of the shared fixture: template, messages, rendered text, ids.
fn qwen_chat() -> Value {
    read_json(&fixture("qwen2.5-coder-0.5b/expected.json"))["chat"].clone()
}

/// An HF directory with `config.json` and `tokenizer.json` copied from `from` plus `files`.
fn hf_dir(from: &str, files: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixture(from).join(name), dir.path().join(name)).unwrap();
    }
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn open_hf(dir: &Path) -> TextCodec {
    let config = JsonFile::read(&dir.join("config.json")).unwrap();
    TextCodec::from_hf_dir(dir, &config).unwrap()
}

#[test]
fn every_vector_renders_as_transformers_renders_it() {
    let v = vectors();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 50, "{} cases", cases.len());
    let mut errors = 0;
    for case in cases {
        let name = case["template"].as_str().unwrap();
        let conversation = case["conversation"].as_str().unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let what = format!("{name} / {conversation} / add_generation_prompt={gen}");
        let template = v["templates"][name].as_str().unwrap();
        let tokens = kedit_model_core::chat::TemplateTokens {
            named: v["special_tokens"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, t)| (k.clone(), t.as_str().unwrap().to_string()))
                .collect(),
        };
        let got = kedit_model_core::chat::render(
            template,
            &messages(&v["conversations"][conversation]),
            gen,
            &tokens,
        );
        match (case.get("rendered"), case.get("error")) {
            (Some(want), _) => {
                let got = got.unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(got, want.as_str().unwrap(), "{what}");
            }
            (None, Some(want)) => {
                let e = got.expect_err(&what).to_string();
                assert!(e.contains(want.as_str().unwrap()), "{what}: {e}");
                errors += 1;
            }
            _ => panic!("{what}: neither rendered nor error"),
        }
    }
    assert!(errors > 0, "the vectors include templates that raise");
}

#[test]
fn smollm2_gguf_renders_its_own_template() {
    let path = kedit_plugin_api::testing::real_model("KEDIT_SMOLLM2_GGUF", "smollm2-135m-instruct");
    let text = TextCodec::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let v = vectors();
    assert_eq!(
        text.chat_template.as_deref(),
        v["templates"]["smollm2"].as_str(),
        "the GGUF's tokenizer.chat_template is the one the vectors were rendered from"
    );
    for case in v["cases"].as_array().unwrap() {
        if case["template"] != "smollm2" {
            continue;
        }
        let m = messages(&v["conversations"][case["conversation"].as_str().unwrap()]);
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let got = text.apply_chat_template(&m, gen).unwrap();
        assert_eq!(got, case["rendered"].as_str().unwrap(), "{case}");
    }
    let prompt = text
        .apply_chat_template(
            &messages(&json!([{"role": "user", "content": "What is the capital of France?"}])),
            true,
        )
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    // The markers are single special tokens, not pieces of text.
    let ids = text.tokenize(&prompt, false).unwrap();
    let im_start = text.token_id("<|im_start|>").unwrap();
    assert_eq!(ids[0], im_start);
    assert_eq!(ids.iter().filter(|&&i| i == im_start).count(), 3);
}

#[test]
fn qwen25_gguf_renders_the_fixture_prompt() {
    let path =
        kedit_plugin_api::testing::real_model("KEDIT_QWEN25_GGUF", "qwen2.5-coder-0.5b-instruct");
    let text = TextCodec::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let chat = qwen_chat();
    assert_eq!(
        text.chat_template.as_deref(),
        chat["chat_template"].as_str()
    );
    let got = text
        .apply_chat_template(&messages(&chat["messages"]), true)
        .unwrap();
    assert_eq!(got, chat["rendered_text"].as_str().unwrap());
    let ids: Vec<u32> = chat["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(text.tokenize(&got, false).unwrap(), ids);
}

#[test]
fn hf_directories_read_the_template_where_transformers_does() {
    let chat = qwen_chat();
    let qwen = chat["chat_template"].as_str().unwrap().to_string();
    let want = chat["rendered_text"].as_str().unwrap();
    let m = messages(&chat["messages"]);
    let config = |template: &Value| {
        json!({"chat_template": template, "eos_token": "<|im_end|>"}).to_string()
    };

    // tokenizer_config.json's string.
    let dir = hf_dir(
        "qwen2.5-coder-0.5b",
        &[("tokenizer_config.json", config(&json!(qwen)))],
    );
    let text = open_hf(dir.path());
    assert_eq!(text.apply_chat_template(&m, true).unwrap(), want);
    let ids = text.tokenize(want, false).unwrap();
    assert_eq!(ids.len(), chat["input_ids"].as_array().unwrap().len());

    // A list of named templates: the default one.
    let named =
        json!([{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": qwen}]);
    let dir = hf_dir(
        "qwen2.5-coder-0.5b",
        &[("tokenizer_config.json", config(&named))],
    );
    assert_eq!(
        open_hf(dir.path()).apply_chat_template(&m, true).unwrap(),
        want
    );

    // chat_template.jinja, then chat_template.json, win over tokenizer_config.json.
    let stale = config(&json!("STALE"));
    let dir = hf_dir(
        "qwen2.5-coder-0.5b",
        &[
            ("tokenizer_config.json", stale.clone()),
            ("chat_template.jinja", qwen.clone()),
        ],
    );
    assert_eq!(
        open_hf(dir.path()).apply_chat_template(&m, true).unwrap(),
        want
    );
    let dir = hf_dir(
        "qwen2.5-coder-0.5b",
        &[
            ("tokenizer_config.json", stale),
            (
                "chat_template.json",
                json!({"chat_template": qwen}).to_string(),
            ),
        ],
    );
    assert_eq!(
        open_hf(dir.path()).apply_chat_template(&m, true).unwrap(),
        want
    );
}

#[test]
fn special_tokens_come_from_tokenizer_config_and_special_tokens_map() {
    let template =
        "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ messages[0].content }}";
    let dir = hf_dir(
        "smollm2",
        &[
            (
                "tokenizer_config.json",
                json!({
                    "chat_template": template,
                    "bos_token": {"content": "<|im_start|>", "lstrip": false},
                    "eos_token": "<|im_end|>",
                })
                .to_string(),
            ),
            (
                "special_tokens_map.json",
                json!({"eos_token": "IGNORED", "pad_token": "<|endoftext|>"}).to_string(),
            ),
        ],
    );
    let text = open_hf(dir.path());
    let got = text
        .apply_chat_template(&messages(&json!([{"role": "user", "content": "x"}])), false)
        .unwrap();
    // unk_token is named nowhere, so it is undefined and renders as nothing.
    assert_eq!(got, "<|im_start|>|<|im_end|>|<|endoftext|>||x");
}

#[test]
fn a_qwen_checkpoint_without_a_template_falls_back_to_chatml() {
    let dir = hf_dir("qwen2.5-coder-0.5b", &[]);
    let text = open_hf(dir.path());
    assert_eq!(text.chat_template, None);
    let got = text
        .apply_chat_template(&messages(&json!([{"role": "user", "content": "Hi"}])), true)
        .unwrap();
    assert_eq!(
        got,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn a_llama_checkpoint_without_a_template_is_an_error_naming_it() {
    // SmolLM2's vocabulary has the ChatML tokens, but a llama checkpoint without a template
    // does not get one guessed for it.
    let dir = fixture("smollm2");
    let text = open_hf(&dir);
    let e = text
        .apply_chat_template(&messages(&json!([{"role": "user", "content": "Hi"}])), true)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&dir.display().to_string()), "{e}");
    assert!(e.contains("no chat template"), "{e}");
}

#[test]
fn a_template_that_fails_names_the_checkpoint() {
    let dir = hf_dir(
        "smollm2",
        &[(
            "tokenizer_config.json",
            json!({"chat_template": "{{ raise_exception('Only user turns') }}"}).to_string(),
        )],
    );
    let e = open_hf(dir.path())
        .apply_chat_template(&messages(&json!([{"role": "user", "content": "Hi"}])), true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Only user turns") && e.contains(&dir.path().display().to_string()),
        "{e}"
    );
}

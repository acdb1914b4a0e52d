//! Builds a `tokenizers::Tokenizer` from the `tokenizer.ggml.*` metadata of a GGUF file.
//!
//! The tokenizer is first written as a HF `tokenizer.json` document ([`tokenizer_json_from_gguf`],
//! also useful for exporting a model as safetensors + tokenizer.json) and then loaded with the
//! `tokenizers` crate. For `tokenizer.ggml.pre = "smollm"` and `"qwen2"` the document is the one
//! `PreTrainedTokenizerFast.save_pretrained` writes for those models (see
//! `shared/fixtures/{smollm2,qwen2.5-coder-0.5b}/tokenizer.json`).
//!
//! Rules (gpt2 = byte-level BPE):
//! * NORMAL tokens form the BPE vocab, together with CONTROL / USER_DEFINED tokens whose id lies
//!   inside the range of the NORMAL ids (SmolLM2 keeps its 17 specials at ids 0..16 in the vocab;
//!   Qwen2's specials come after the last NORMAL id and are only added tokens);
//! * CONTROL and USER_DEFINED tokens become added tokens (`normalized: false`, matched verbatim);
//!   `special` follows CONTROL, except Qwen's FIM / repo tokens, which HF marks `special: false`;
//! * UNUSED fillers (`[PAD151665]`…) are left out;
//! * `add_bos_token` / `add_eos_token` become a post-processor template; otherwise the
//!   post-processor adds nothing.
//!
//! `tokenizer.ggml.model = "llama"` (SentencePiece with scores and byte fallback) is converted as
//! HF converts Llama-2's tokenizer: BPE with merges ranked by the score of the merged piece,
//! byte fallback, `▁` for spaces and a `▁` prefix on each text segment.

use std::collections::HashMap;

use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;

use crate::gguf::{GgufError, GgufFile};

/// Token types of `tokenizer.ggml.token_type` (llama.cpp's `llama_token_type`).
pub mod token_type {
    pub const UNDEFINED: i32 = 0;
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}
use token_type as tt;

/// A tokenizer built from GGUF metadata, with the special ids and flags the file declares.
pub struct GgufTokenizerInfo {
    pub tokenizer: Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
    /// Whether a BOS token is prepended (`tokenizer.ggml.add_bos_token`); when true, the
    /// tokenizer's post-processor already adds it for `encode(text, add_special_tokens = true)`.
    pub add_bos: bool,
    /// Whether an EOS token is appended (`tokenizer.ggml.add_eos_token`, default false); handled
    /// by the post-processor like `add_bos`.
    pub add_eos: bool,
    /// `tokenizer.chat_template` (Jinja), if the file has one.
    pub chat_template: Option<String>,
    /// Number of token ids the model's embedding has (`tokenizer.ggml.tokens` length, UNUSED
    /// fillers included).
    pub n_tokens: usize,
}

impl std::fmt::Debug for GgufTokenizerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizerInfo")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("unk", &self.unk)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("n_tokens", &self.n_tokens)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// The `tokenizer.ggml.pre` values this module understands, grouped by the pre-tokenizer they get.
const PRE_SMOLLM: &[&str] = &["smollm", "starcoder", "refact", "codeshell"];
const PRE_GPT2: &[&str] = &[
    "gpt2",
    "gpt-2",
    "default",
    "phi-2",
    "roberta-bpe",
    "mpt",
    "olmo",
    "jais",
];
const PRE_LLAMA3: &[&str] = &[
    "llama-bpe",
    "llama3",
    "llama-v3",
    "falcon3",
    "dbrx",
    "smaug-bpe",
    "chatglm-bpe",
    "glm4",
];
const PRE_QWEN2: &[&str] = &["qwen2", "deepseek-r1-qwen", "megrez"];

/// Qwen2's pre-tokenizer regex (as in its tokenizer.json): `\p{N}` matches single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama-3's regex: numbers in groups of up to 3 digits.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Added tokens that HF's Qwen2 tokenizer marks `special: false` although GGUF calls them CONTROL.
const NON_SPECIAL_CONTROL: &[&str] = &[
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
];

fn err(g: &GgufFile, what: impl Into<String>) -> GgufError {
    GgufError::Tokenizer {
        path: g.display_path().to_string(),
        what: what.into(),
    }
}

fn byte_level(add_prefix_space: bool, trim_offsets: bool, use_regex: bool) -> Value {
    json!({
        "type": "ByteLevel",
        "add_prefix_space": add_prefix_space,
        "trim_offsets": trim_offsets,
        "use_regex": use_regex
    })
}

fn split_regex(regex: &str) -> Value {
    json!({
        "type": "Split",
        "pattern": {"Regex": regex},
        "behavior": "Isolated",
        "invert": false
    })
}

/// Everything read from `tokenizer.ggml.*` that both model kinds need.
struct Common<'a> {
    tokens: &'a [String],
    types: Vec<i32>,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}

fn read_common<'a>(g: &'a GgufFile, model: &str) -> Result<Common<'a>, GgufError> {
    let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        return Err(err(g, "tokenizer.ggml.tokens is empty"));
    }
    if tokens.len() > u32::MAX as usize {
        return Err(err(g, "tokenizer.ggml.tokens has more than 2^32 entries"));
    }
    let types = match g.get_i32_array_opt("tokenizer.ggml.token_type")? {
        Some(t) if t.len() != tokens.len() => {
            return Err(err(
                g,
                format!(
                    "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}",
                    t.len(),
                    tokens.len()
                ),
            ))
        }
        Some(t) => t,
        None => vec![tt::NORMAL; tokens.len()],
    };
    // Out-of-range ids are ignored, as llama.cpp does.
    let special = |key: &str, default: Option<u32>| -> Result<Option<u32>, GgufError> {
        let id = g.get_u32_opt(key)?.or(default);
        Ok(id.filter(|&i| (i as usize) < tokens.len()))
    };
    let spm = model == "llama";
    let bos = special("tokenizer.ggml.bos_token_id", spm.then_some(1))?;
    let eos = special("tokenizer.ggml.eos_token_id", spm.then_some(2))?;
    let unk = special("tokenizer.ggml.unknown_token_id", spm.then_some(0))?;
    let pad = special("tokenizer.ggml.padding_token_id", None)?;
    let pre = g.get_str_opt("tokenizer.ggml.pre")?.unwrap_or("default");
    let default_add_bos = spm || PRE_LLAMA3.contains(&pre);
    let add_bos = g
        .get_bool_opt("tokenizer.ggml.add_bos_token")?
        .unwrap_or(default_add_bos);
    let add_eos = g
        .get_bool_opt("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);
    if add_bos && bos.is_none() {
        return Err(err(
            g,
            "tokenizer.ggml.add_bos_token is true but the file has no valid bos_token_id",
        ));
    }
    if add_eos && eos.is_none() {
        return Err(err(
            g,
            "tokenizer.ggml.add_eos_token is true but the file has no valid eos_token_id",
        ));
    }
    Ok(Common {
        tokens,
        types,
        bos,
        eos,
        pad,
        unk,
        add_bos,
        add_eos,
    })
}

/// HF's `added_tokens` list: every CONTROL / USER_DEFINED (and UNKNOWN) token, in id order.
fn added_tokens(c: &Common) -> Vec<Value> {
    let mut out = Vec::new();
    for (id, (tok, &ty)) in c.tokens.iter().zip(&c.types).enumerate() {
        if !matches!(ty, tt::CONTROL | tt::USER_DEFINED | tt::UNKNOWN) {
            continue;
        }
        let special = ty != tt::USER_DEFINED && !NON_SPECIAL_CONTROL.contains(&tok.as_str());
        out.push(json!({
            "id": id,
            "content": tok,
            "single_word": false,
            "lstrip": false,
            "rstrip": false,
            "normalized": false,
            "special": special
        }));
    }
    out
}

/// A TemplateProcessing that adds BOS and/or EOS (None when it would add nothing).
fn template(c: &Common) -> Option<Value> {
    if !c.add_bos && !c.add_eos {
        return None;
    }
    let mut special_tokens = Map::new();
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let tok = |id: u32| c.tokens[id as usize].clone();
    let sp = |id: u32, type_id: u32| json!({"SpecialToken": {"id": tok(id), "type_id": type_id}});
    let seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
    for (seq_id, type_id) in [("A", 0u32), ("B", 1u32)] {
        let target = if seq_id == "A" {
            &mut single
        } else {
            &mut pair
        };
        if c.add_bos {
            target.push(sp(c.bos.unwrap(), type_id));
        }
        target.push(seq(seq_id, type_id));
        if c.add_eos {
            target.push(sp(c.eos.unwrap(), type_id));
        }
    }
    let pair = single.iter().cloned().chain(pair).collect::<Vec<_>>();
    for id in [c.bos.filter(|_| c.add_bos), c.eos.filter(|_| c.add_eos)]
        .into_iter()
        .flatten()
    {
        special_tokens.insert(
            tok(id),
            json!({"id": tok(id), "ids": [id], "tokens": [tok(id)]}),
        );
    }
    Some(json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": special_tokens
    }))
}

fn document(
    added: Vec<Value>,
    normalizer: Value,
    pre_tokenizer: Value,
    post_processor: Value,
    decoder: Value,
    model: Value,
) -> Value {
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": model
    })
}

fn gpt2_json(g: &GgufFile, c: &Common) -> Result<Value, GgufError> {
    let pre = g.get_str_opt("tokenizer.ggml.pre")?.unwrap_or("default");

    // (normalizer, pre_tokenizer, post_processor, decoder, BPE prefix/suffix, ignore_merges)
    let hf_post = byte_level(true, false, true);
    let hf_dec = byte_level(true, true, true);
    let (normalizer, pre_tok, post, decoder, affix, ignore_merges) = if PRE_SMOLLM.contains(&pre) {
        (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(false, true, true)
            ]}),
            hf_post,
            hf_dec,
            Value::Null,
            false,
        )
    } else if PRE_QWEN2.contains(&pre) {
        (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [
                split_regex(QWEN2_REGEX),
                byte_level(false, false, false)
            ]}),
            byte_level(false, false, false),
            byte_level(false, false, false),
            json!(""),
            false,
        )
    } else if PRE_LLAMA3.contains(&pre) {
        (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                split_regex(LLAMA3_REGEX),
                byte_level(false, true, false)
            ]}),
            hf_post,
            hf_dec,
            Value::Null,
            true,
        )
    } else if PRE_GPT2.contains(&pre) {
        (
            Value::Null,
            byte_level(false, true, true),
            hf_post,
            hf_dec,
            json!(""),
            false,
        )
    } else {
        let all: Vec<&str> = [PRE_SMOLLM, PRE_QWEN2, PRE_LLAMA3, PRE_GPT2].concat();
        return Err(err(
            g,
            format!(
                "tokenizer.ggml.pre = '{pre}' is a pre-tokenizer kedit does not know (known: {})",
                all.join(", ")
            ),
        ));
    };
    let post = match template(c) {
        Some(t) => json!({"type": "Sequence", "processors": [post, t]}),
        None => post,
    };

    // vocab
    let max_normal = c
        .types
        .iter()
        .rposition(|&t| matches!(t, tt::NORMAL | tt::UNDEFINED | tt::BYTE))
        .ok_or_else(|| err(g, "tokenizer.ggml.token_type marks no token as NORMAL"))?;
    let mut vocab = Map::new();
    for (id, (tok, &ty)) in c.tokens.iter().zip(&c.types).enumerate() {
        let keep = match ty {
            tt::UNUSED => false,
            tt::CONTROL | tt::USER_DEFINED | tt::UNKNOWN => id < max_normal,
            _ => true,
        };
        if keep && !vocab.contains_key(tok) {
            vocab.insert(tok.clone(), json!(id));
        }
    }

    // merges: "a b" → ["a", "b"] (the first space after the first character separates them)
    let merges_src = g
        .get_str_array_opt("tokenizer.ggml.merges")?
        .ok_or_else(|| {
            err(
                g,
                "tokenizer.ggml.model is 'gpt2' but tokenizer.ggml.merges is missing",
            )
        })?;
    let mut merges = Vec::with_capacity(merges_src.len());
    for (i, m) in merges_src.iter().enumerate() {
        let first_len = m.chars().next().map(char::len_utf8).unwrap_or(0);
        let Some(sp) = m[first_len..].find(' ').map(|p| p + first_len) else {
            return Err(err(
                g,
                format!("merge {i} ({m:?}) has no space separating its two parts"),
            ));
        };
        merges.push(json!([&m[..sp], &m[sp + 1..]]));
    }

    // Byte-level BPE never needs an unknown token (HF writes null even when the GGUF names one).
    let model = json!({
        "type": "BPE",
        "dropout": null,
        "unk_token": null,
        "continuing_subword_prefix": affix,
        "end_of_word_suffix": affix,
        "fuse_unk": false,
        "byte_fallback": false,
        "ignore_merges": ignore_merges,
        "vocab": vocab,
        "merges": merges
    });
    Ok(document(
        added_tokens(c),
        normalizer,
        pre_tok,
        post,
        decoder,
        model,
    ))
}

fn spm_json(g: &GgufFile, c: &Common) -> Result<Value, GgufError> {
    let scores = match g.get_f32_array_opt("tokenizer.ggml.scores")? {
        Some(s) if s.len() != c.tokens.len() => {
            return Err(err(
                g,
                format!(
                    "tokenizer.ggml.scores has {} entries but tokenizer.ggml.tokens has {}",
                    s.len(),
                    c.tokens.len()
                ),
            ))
        }
        Some(s) => s,
        // Without scores, earlier ids win (SentencePiece vocabularies are sorted by score).
        None => (0..c.tokens.len()).map(|i| -(i as f32)).collect(),
    };
    let add_space_prefix = g
        .get_bool_opt("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);

    let mut vocab = Map::new();
    let mut ids: HashMap<&str, u32> = HashMap::new();
    let mut mergeable: HashMap<&str, u32> = HashMap::new();
    for (id, (tok, &ty)) in c.tokens.iter().zip(&c.types).enumerate() {
        if ty == tt::UNUSED || ids.contains_key(tok.as_str()) {
            continue;
        }
        vocab.insert(tok.clone(), json!(id));
        ids.insert(tok, id as u32);
        if matches!(ty, tt::NORMAL | tt::UNDEFINED | tt::USER_DEFINED) {
            mergeable.insert(tok, id as u32);
        }
    }
    // SentencePiece BPE merges the adjacent pair whose concatenation has the highest score:
    // one merge per way of splitting each piece into two pieces, ranked by the piece's score
    // (as transformers' SentencePieceExtractor does).
    let mut merges: Vec<(f32, u32, u32, u32, &str, &str)> = Vec::new();
    for (tok, &id) in &mergeable {
        let mut local = Vec::new();
        for (k, _) in tok.char_indices().skip(1) {
            let (a, b) = tok.split_at(k);
            if let (Some(&ia), Some(&ib)) = (mergeable.get(a), mergeable.get(b)) {
                local.push((scores[id as usize], id, ia, ib, a, b));
            }
        }
        merges.extend(local);
    }
    merges.sort_by(|x, y| {
        y.0.total_cmp(&x.0)
            .then(x.1.cmp(&y.1))
            .then(x.2.cmp(&y.2))
            .then(x.3.cmp(&y.3))
    });
    let merges: Vec<Value> = merges.iter().map(|m| json!([m.4, m.5])).collect();

    let unk = c.unk.map(|u| c.tokens[u as usize].clone());
    let has_bytes = c.types.contains(&tt::BYTE);
    let normalizer = if add_space_prefix {
        json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
        ]})
    } else {
        json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let post = template(c).unwrap_or(Value::Null);
    let model = json!({
        "type": "BPE",
        "dropout": null,
        "unk_token": unk.filter(|u| vocab.contains_key(u)),
        "continuing_subword_prefix": null,
        "end_of_word_suffix": null,
        "fuse_unk": true,
        "byte_fallback": has_bytes,
        "ignore_merges": false,
        "vocab": vocab,
        "merges": merges
    });
    Ok(document(
        added_tokens(c),
        normalizer,
        Value::Null,
        post,
        json!({"type": "Sequence", "decoders": decoders}),
        model,
    ))
}

/// The HF `tokenizer.json` document for the file's `tokenizer.ggml.*` metadata.
pub fn tokenizer_json_from_gguf(g: &GgufFile) -> Result<Value, GgufError> {
    let model = g.get_str_opt("tokenizer.ggml.model")?.ok_or_else(|| {
        err(
            g,
            "the file has no tokenizer (tokenizer.ggml.model is missing)",
        )
    })?;
    let c = read_common(g, model)?;
    match model {
        "gpt2" => gpt2_json(g, &c),
        "llama" => spm_json(g, &c),
        other => Err(err(
            g,
            format!("tokenizer.ggml.model = '{other}' is not supported (supported: gpt2, llama)"),
        )),
    }
}

/// Builds the tokenizer, the special ids and the chat template from a GGUF file.
pub fn tokenizer_from_gguf(g: &GgufFile) -> Result<GgufTokenizerInfo, GgufError> {
    let doc = tokenizer_json_from_gguf(g)?;
    let model = g.get_str("tokenizer.ggml.model")?;
    let c = read_common(g, model)?;
    let tokenizer: Tokenizer = serde_json::from_value(doc).map_err(|e| {
        err(
            g,
            format!("the tokenizers library rejected the generated tokenizer.json: {e}"),
        )
    })?;
    let chat_template = g
        .get_str_opt("tokenizer.chat_template")?
        .map(str::to_string);
    Ok(GgufTokenizerInfo {
        tokenizer,
        bos: c.bos,
        eos: c.eos,
        pad: c.pad,
        unk: c.unk,
        add_bos: c.add_bos,
        add_eos: c.add_eos,
        chat_template,
        n_tokens: c.tokens.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::test_writer::Writer;
    use crate::gguf::{GgufArray, GgufValue};

    fn strs(v: &[&str]) -> GgufValue {
        GgufValue::Array(GgufArray::String(v.iter().map(|s| s.to_string()).collect()))
    }

    fn i32s(v: &[i32]) -> GgufValue {
        GgufValue::Array(GgufArray::I32(v.to_vec()))
    }

    fn gpt2_file(pre: &str, add_bos: Option<bool>) -> GgufFile {
        let tokens = [
            "<|endoftext|>",
            "H",
            "e",
            "l",
            "o",
            "Ġ",
            "w",
            "r",
            "d",
            "He",
            "ll",
            "llo",
            "Hello",
            "Ġw",
            "or",
            "Ġwor",
            "ld",
            "Ġworld",
            "1",
            "2",
            "<tool>",
            "[PAD]",
        ];
        let mut types = vec![tt::NORMAL; tokens.len()];
        types[0] = tt::CONTROL;
        types[20] = tt::USER_DEFINED;
        types[21] = tt::UNUSED;
        let merges = [
            "H e", "l l", "ll o", "He llo", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld",
        ];
        let mut w = Writer::default()
            .kv("general.architecture", GgufValue::String("llama".into()))
            .kv("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
            .kv("tokenizer.ggml.pre", GgufValue::String(pre.into()))
            .kv("tokenizer.ggml.tokens", strs(&tokens))
            .kv("tokenizer.ggml.token_type", i32s(&types))
            .kv("tokenizer.ggml.merges", strs(&merges))
            .kv("tokenizer.ggml.bos_token_id", GgufValue::U32(0))
            .kv("tokenizer.ggml.eos_token_id", GgufValue::U32(0))
            .kv("tokenizer.ggml.padding_token_id", GgufValue::U32(999))
            .kv(
                "tokenizer.chat_template",
                GgufValue::String("{{ x }}".into()),
            );
        if let Some(b) = add_bos {
            w = w.kv("tokenizer.ggml.add_bos_token", GgufValue::Bool(b));
        }
        GgufFile::from_bytes("tok.gguf", w.build()).unwrap()
    }

    #[test]
    fn synthetic_gpt2_bpe() {
        let g = gpt2_file("gpt2", Some(false));
        let info = tokenizer_from_gguf(&g).unwrap();
        assert_eq!((info.bos, info.eos, info.unk), (Some(0), Some(0), None));
        assert_eq!(info.pad, None, "out-of-range pad id is ignored");
        assert!(!info.add_bos);
        assert_eq!(info.chat_template.as_deref(), Some("{{ x }}"));
        let t = &info.tokenizer;
        let enc = t.encode("Hello world", true).unwrap();
        assert_eq!(enc.get_ids(), &[12, 17]);
        assert_eq!(enc.get_tokens(), &["Hello", "Ġworld"]);
        let enc = t.encode("<|endoftext|>Hello<tool>", true).unwrap();
        assert_eq!(enc.get_ids(), &[0, 12, 20]);
        assert_eq!(
            t.decode(&[0, 12, 17, 20], false).unwrap(),
            "<|endoftext|>Hello world<tool>"
        );
        // control tokens are special, user-defined ones are not
        assert_eq!(
            t.decode(&[0, 12, 17, 20], true).unwrap(),
            "Hello world<tool>"
        );
        // UNUSED fillers are not in the vocab
        assert_eq!(t.id_to_token(21), None);
        assert_eq!(info.n_tokens, 22);
        // the control token at id 0 lies inside the NORMAL range: it is in the vocab too
        let doc = tokenizer_json_from_gguf(&g).unwrap();
        assert_eq!(doc["model"]["vocab"]["<|endoftext|>"], json!(0));
        assert_eq!(doc["model"]["vocab"].get("<tool>"), None);
        assert_eq!(doc["model"]["merges"][0], json!(["H", "e"]));
    }

    #[test]
    fn smollm_pre_splits_digits() {
        let g = gpt2_file("smollm", None);
        let info = tokenizer_from_gguf(&g).unwrap();
        let enc = info.tokenizer.encode("12", false).unwrap();
        assert_eq!(enc.get_ids(), &[18, 19]);
    }

    #[test]
    fn llama_bpe_adds_bos() {
        let g = gpt2_file("llama-bpe", None);
        let info = tokenizer_from_gguf(&g).unwrap();
        assert!(info.add_bos, "llama-bpe defaults to add_bos");
        let t = &info.tokenizer;
        assert_eq!(
            t.encode("Hello world", true).unwrap().get_ids(),
            &[0, 12, 17]
        );
        assert_eq!(t.encode("Hello world", false).unwrap().get_ids(), &[12, 17]);
        let g = gpt2_file("qwen2", Some(true));
        let info = tokenizer_from_gguf(&g).unwrap();
        assert_eq!(
            info.tokenizer.encode("Hello", true).unwrap().get_ids(),
            &[0, 12]
        );
    }

    #[test]
    fn unknown_pre_and_model_are_clear_errors() {
        let g = gpt2_file("klingon", None);
        let e = tokenizer_from_gguf(&g).unwrap_err().to_string();
        assert!(
            e.starts_with("tok.gguf: cannot build the tokenizer from tokenizer.ggml.*: tokenizer.ggml.pre = 'klingon' is a pre-tokenizer kedit does not know (known: smollm"),
            "{e}"
        );
        let g = GgufFile::from_bytes(
            "bert.gguf",
            Writer::default()
                .kv("tokenizer.ggml.model", GgufValue::String("bert".into()))
                .kv("tokenizer.ggml.tokens", strs(&["a"]))
                .build(),
        )
        .unwrap();
        let e = tokenizer_from_gguf(&g).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.ggml.model = 'bert' is not supported"),
            "{e}"
        );
        let g = GgufFile::from_bytes("none.gguf", Writer::default().build()).unwrap();
        let e = tokenizer_from_gguf(&g).unwrap_err().to_string();
        assert!(e.contains("tokenizer.ggml.model is missing"), "{e}");
        let g = GgufFile::from_bytes(
            "nomerges.gguf",
            Writer::default()
                .kv("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
                .kv("tokenizer.ggml.pre", GgufValue::String("gpt2".into()))
                .kv("tokenizer.ggml.tokens", strs(&["a"]))
                .build(),
        )
        .unwrap();
        let e = tokenizer_from_gguf(&g).unwrap_err().to_string();
        assert!(e.contains("tokenizer.ggml.merges is missing"), "{e}");
    }

    #[test]
    fn synthetic_sentencepiece() {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![tt::UNKNOWN, tt::CONTROL, tt::CONTROL];
        let mut scores = vec![0.0f32, 0.0, 0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(tt::BYTE);
            scores.push(0.0);
        }
        // piece, score (higher merges first)
        let pieces = [
            ("▁", -1.0),
            ("h", -2.0),
            ("e", -2.0),
            ("l", -2.0),
            ("o", -2.0),
            ("w", -2.0),
            ("r", -2.0),
            ("d", -2.0),
            ("ll", -3.0),
            ("he", -4.0),
            ("llo", -5.0),
            ("hello", -6.0),
            ("▁hello", -7.0),
            ("▁w", -8.0),
            ("or", -9.0),
            ("ld", -10.0),
            ("orld", -11.0),
            ("▁world", -12.0),
            ("▁h", -13.0),
        ];
        let first = tokens.len() as u32;
        for (p, s) in pieces {
            tokens.push(p.to_string());
            types.push(tt::NORMAL);
            scores.push(s);
        }
        let id = |p: &str| first + pieces.iter().position(|x| x.0 == p).unwrap() as u32;
        let g = GgufFile::from_bytes(
            "spm.gguf",
            Writer::default()
                .kv("tokenizer.ggml.model", GgufValue::String("llama".into()))
                .kv(
                    "tokenizer.ggml.tokens",
                    GgufValue::Array(GgufArray::String(tokens.clone())),
                )
                .kv("tokenizer.ggml.token_type", i32s(&types))
                .kv(
                    "tokenizer.ggml.scores",
                    GgufValue::Array(GgufArray::F32(scores)),
                )
                .build(),
        )
        .unwrap();
        let info = tokenizer_from_gguf(&g).unwrap();
        assert_eq!((info.bos, info.eos, info.unk), (Some(1), Some(2), Some(0)));
        assert!(info.add_bos);
        let t = &info.tokenizer;
        let enc = t.encode("hello world", false).unwrap();
        assert_eq!(enc.get_ids(), &[id("▁hello"), id("▁world")]);
        // BOS from the post-processor
        let enc = t.encode("hello world", true).unwrap();
        assert_eq!(enc.get_ids(), &[1, id("▁hello"), id("▁world")]);
        // byte fallback for a character that is not in the vocab: "i" = 0x69, "é" = c3 a9
        let enc = t.encode("hi é", false).unwrap();
        assert_eq!(
            enc.get_ids(),
            &[id("▁h"), 3 + 0x69, id("▁"), 3 + 0xC3, 3 + 0xA9]
        );
        assert_eq!(t.decode(enc.get_ids(), false).unwrap(), "hi é");
        assert_eq!(
            t.decode(&[1, id("▁hello"), id("▁world"), 2], true).unwrap(),
            "hello world"
        );
    }

    // ---- real files (gated on environment variables) ------------------------------------------

    fn shared_dir() -> std::path::PathBuf {
        std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared"))
    }

    fn check_real(
        env: &str,
        model: &str,
        fixture: &str,
        expect: (Option<u32>, Option<u32>, Option<u32>, Option<u32>),
    ) {
        let path = kedit_plugin_api::testing::real_model(env, model);
        let t0 = std::time::Instant::now();
        let g = GgufFile::open(&path).unwrap();
        let info = tokenizer_from_gguf(&g).unwrap();
        eprintln!("{fixture}: tokenizer built in {:.2?}", t0.elapsed());
        assert_eq!((info.bos, info.eos, info.pad, info.unk), expect);
        assert!(!info.add_bos);
        assert!(info
            .chat_template
            .as_deref()
            .unwrap_or("")
            .contains("<|im_start|>"));

        let dir = shared_dir().join("fixtures").join(fixture);
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let cases = expected["tokenization"].as_array().unwrap();
        assert_eq!(cases.len(), 22);
        let t = &info.tokenizer;
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let ids: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let tokens: Vec<&str> = case["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            for add_special in [false, true] {
                let enc = t.encode(text, add_special).unwrap();
                assert_eq!(enc.get_ids(), ids.as_slice(), "ids of {text:?}");
                assert_eq!(enc.get_tokens(), tokens.as_slice(), "tokens of {text:?}");
            }
            let decoded = t.decode(&ids, false).unwrap();
            assert_eq!(
                decoded,
                case["decoded"].as_str().unwrap(),
                "decode of {text:?}"
            );
        }

        // Structural comparison with the reference tokenizer.json.
        let want: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
                .unwrap();
        let got = tokenizer_json_from_gguf(&g).unwrap();
        assert_eq!(got["model"]["vocab"], want["model"]["vocab"], "vocab");
        assert_eq!(got["model"]["merges"], want["model"]["merges"], "merges");
        assert_eq!(got["added_tokens"], want["added_tokens"], "added tokens");
        for key in ["normalizer", "pre_tokenizer", "post_processor", "decoder"] {
            assert_eq!(got[key], want[key], "{key}");
        }
        assert_eq!(got, want, "whole tokenizer.json");
    }

    /// `KEDIT_SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf`
    #[test]
    fn real_smollm2_tokenizer_matches_fixture() {
        check_real(
            "KEDIT_SMOLLM2_GGUF",
            "smollm2-135m-instruct",
            "smollm2",
            (Some(1), Some(2), Some(2), Some(0)),
        );
    }

    /// `KEDIT_QWEN25_GGUF=/path/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf`
    #[test]
    fn real_qwen25_tokenizer_matches_fixture() {
        check_real(
            "KEDIT_QWEN25_GGUF",
            "qwen2.5-coder-0.5b-instruct",
            "qwen2.5-coder-0.5b",
            (Some(151643), Some(151645), Some(151643), None),
        );
    }
}

//! Text in and out of a model: the tokenizer (optional: a checkpoint without one still works
//! with token ids), its special tokens and the chat template.

use std::path::{Path, PathBuf};

use kedit_plugin_api::ChatMessage;
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::chat::{self, TemplateTokens, CHATML_TEMPLATE};
use crate::checkpoint::JsonFile;
use crate::error::{invalid, io, not_found, Result};
use crate::fsutil::write_atomic;
use crate::gguf::GgufFile;

/// HF tokenizer files copied verbatim on export when the model came from an HF directory.
const HF_TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// Families whose chat checkpoints speak ChatML: the only ones given [`CHATML_TEMPLATE`] when
/// they ship no template (HF `model_type` or GGUF `general.architecture`).
const CHATML_FAMILIES: &[&str] = &[
    "qwen2",
    "qwen2_moe",
    "qwen2moe",
    "qwen3",
    "qwen3_moe",
    "qwen3moe",
];

/// The `special_tokens_map` entries transformers passes to a chat template by name.
const TEMPLATE_TOKEN_KEYS: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

pub struct TextCodec {
    tokenizer: Option<Tokenizer>,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
    /// Whether `tokenize(.., add_special = true)` starts with BOS.
    pub add_bos: bool,
    pub chat_template: Option<String>,
    /// The special tokens the chat template sees as variables.
    chat_tokens: TemplateTokens,
    /// No template shipped, but the family speaks ChatML and the vocabulary has its tokens.
    chatml_fallback: bool,
    /// The checkpoint (directory or GGUF file) for error messages.
    checkpoint: Option<String>,
    /// Ids `tokenize(.., add_special = true)` puts first (after any BOS), unless the tokenizer
    /// already did: ChatGLM's `[gMASK]` `sop`. Empty for most families.
    pub prefix_tokens: Vec<u32>,
    /// Where the tokenizer files came from (an HF directory), for export.
    hf_dir: Option<PathBuf>,
}

fn token_name(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

impl TextCodec {
    /// A codec without a tokenizer: only ids, with the special ids the config names.
    pub fn ids_only(bos: Option<u32>, eos: Vec<u32>, pad: Option<u32>) -> Self {
        Self {
            tokenizer: None,
            bos,
            eos,
            pad,
            unk: None,
            add_bos: false,
            chat_template: None,
            chat_tokens: TemplateTokens::default(),
            chatml_fallback: false,
            checkpoint: None,
            prefix_tokens: Vec::new(),
            hf_dir: None,
        }
    }

    /// Reads `tokenizer.json` (optional), `tokenizer_config.json`, `special_tokens_map.json`,
    /// `generation_config.json` and the chat template (`chat_template.jinja`,
    /// `chat_template.json` or `tokenizer_config.json`'s `chat_template`) of an HF directory;
    /// `config` supplies the special ids.
    pub fn from_hf_dir(dir: &Path, config: &JsonFile) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = if tokenizer_path.is_file() {
            Some(Tokenizer::from_file(&tokenizer_path).map_err(|e| {
                invalid(format!(
                    "{}: cannot load tokenizer: {e}",
                    tokenizer_path.display()
                ))
            })?)
        } else if crate::arch::gpt2::tokenizer::has_encoder_files(dir) {
            // GPT-2's original encoder.json + vocab.bpe.
            Some(crate::arch::gpt2::tokenizer::from_encoder_files(dir)?)
        } else {
            None
        };
        let tok_config = JsonFile::read_optional(&dir.join("tokenizer_config.json"))?;
        let gen_config = JsonFile::read_optional(&dir.join("generation_config.json"))?;
        let id_of = |key: &str| -> Option<u32> {
            let name = tok_config.as_ref()?.get(key).and_then(token_name)?;
            tokenizer.as_ref()?.token_to_id(name)
        };

        let first_id = |key: &str| -> Result<Option<u32>> {
            let mut ids = config.ids_opt(key)?;
            if ids.is_empty() {
                if let Some(g) = &gen_config {
                    ids = g.ids_opt(key)?;
                }
            }
            Ok(ids.first().copied())
        };
        let bos = first_id("bos_token_id")?.or_else(|| id_of("bos_token"));
        let pad = first_id("pad_token_id")?.or_else(|| id_of("pad_token"));
        let unk = id_of("unk_token");
        let mut eos = config.ids_opt("eos_token_id")?;
        if let Some(g) = &gen_config {
            eos.extend(g.ids_opt("eos_token_id")?);
        }
        eos.extend(id_of("eos_token"));
        dedup(&mut eos);

        let add_bos = match &tok_config {
            Some(t) => t.bool_opt("add_bos_token")?.unwrap_or(false),
            None => false,
        };
        let chat_template = hf_chat_template(dir, tok_config.as_ref())?;
        let special_map = JsonFile::read_optional(&dir.join("special_tokens_map.json"))?;
        let mut chat_tokens = TemplateTokens::default();
        for source in [&tok_config, &special_map].into_iter().flatten() {
            template_tokens_from_json(source, &mut chat_tokens);
        }
        let model_type = config.get("model_type").and_then(Value::as_str);
        let chatml_fallback = chat_template.is_none()
            && model_type.is_some_and(|t| CHATML_FAMILIES.contains(&t))
            && has_chatml_tokens(tokenizer.as_ref());
        Ok(Self {
            tokenizer,
            bos,
            eos,
            pad,
            unk,
            add_bos,
            chat_template,
            chat_tokens,
            chatml_fallback,
            checkpoint: Some(dir.display().to_string()),
            prefix_tokens: Vec::new(),
            hf_dir: Some(dir.to_path_buf()),
        })
    }

    /// The tokenizer of a GGUF file, built from its `tokenizer.ggml.*` fields.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let info = crate::gguf_tokenizer::tokenizer_from_gguf(gguf)?;
        let mut eos: Vec<u32> = info.eos.into_iter().collect();
        dedup(&mut eos);
        // transformers names a GGUF's special tokens from these ids.
        let mut chat_tokens = TemplateTokens::default();
        for (name, id) in [
            ("bos_token", info.bos),
            ("eos_token", eos.first().copied()),
            ("unk_token", info.unk),
            ("pad_token", info.pad),
        ] {
            if let Some(token) = id.and_then(|i| info.tokenizer.id_to_token(i)) {
                chat_tokens.set_default(name, token);
            }
        }
        let chatml_fallback = info.chat_template.is_none()
            && gguf
                .architecture()
                .is_ok_and(|a| CHATML_FAMILIES.contains(&a))
            && has_chatml_tokens(Some(&info.tokenizer));
        Ok(Self {
            tokenizer: Some(info.tokenizer),
            bos: info.bos,
            eos,
            pad: info.pad,
            unk: info.unk,
            add_bos: info.add_bos,
            chat_template: info.chat_template,
            chat_tokens,
            chatml_fallback,
            checkpoint: Some(gguf.display_path().to_string()),
            prefix_tokens: Vec::new(),
            hf_dir: None,
        })
    }

    /// The id of token `token` in the tokenizer's vocabulary (added tokens included).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.as_ref()?.token_to_id(token)
    }

    pub fn has_tokenizer(&self) -> bool {
        self.tokenizer.is_some()
    }

    fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            not_found("this checkpoint has no tokenizer (tokenizer.json); pass token ids instead")
        })
    }

    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer()?
            .encode(text, add_special)
            .map_err(|e| invalid(format!("cannot tokenize {text:?}: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        // A tokenizer whose post-processor does not add the BOS its config asks for.
        if let (true, true, Some(bos)) = (add_special, self.add_bos, self.bos) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        if add_special && !self.prefix_tokens.is_empty() && !ids.starts_with(&self.prefix_tokens) {
            ids.splice(0..0, self.prefix_tokens.iter().copied());
        }
        Ok(ids)
    }

    pub fn detokenize(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.tokenizer()?
            .decode(ids, skip_special)
            .map_err(|e| invalid(format!("cannot decode {} ids: {e}", ids.len())))
    }

    /// Renders `messages` with the checkpoint's own chat template (ChatML for a ChatML family
    /// that ships none), as transformers' `apply_chat_template(tokenize=False)` does.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let checkpoint = self.checkpoint.as_deref().unwrap_or("this checkpoint");
        let (template, what) = match (&self.chat_template, self.chatml_fallback) {
            (Some(t), _) => (t.as_str(), "its chat template"),
            (None, true) => (CHATML_TEMPLATE, "the ChatML template of its family"),
            (None, false) => {
                return Err(not_found(format!(
                    "{checkpoint} has no chat template (none in tokenizer_config.json, \
                     chat_template.jinja, chat_template.json or the GGUF's \
                     tokenizer.chat_template) and its family has no standard one; pass the \
                     prompt as plain text instead"
                )))
            }
        };
        chat::render(template, messages, add_generation_prompt, &self.chat_tokens)
            .map_err(|e| e.context(format!("{checkpoint}: rendering {what}")))
    }

    /// Writes the tokenizer files of an HF checkpoint into `dir`: the source's own files when
    /// it was an HF directory, otherwise `tokenizer.json` and a `tokenizer_config.json`.
    pub fn export(&self, dir: &Path) -> Result<()> {
        if let Some(src) = &self.hf_dir {
            for name in HF_TOKENIZER_FILES {
                let from = src.join(name);
                if from.is_file() {
                    let bytes = std::fs::read(&from)
                        .map_err(|e| io(format!("{}: cannot read: {e}", from.display())))?;
                    write_atomic(&dir.join(name), &bytes)?;
                }
            }
            // A tokenizer built from other files (GPT-2's encoder.json + vocab.bpe): write the
            // tokenizer.json other tools read.
            if let (false, Some(tokenizer)) =
                (src.join("tokenizer.json").is_file(), &self.tokenizer)
            {
                let json = tokenizer
                    .to_string(false)
                    .map_err(|e| invalid(format!("cannot serialise the tokenizer: {e}")))?;
                write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
            }
            return Ok(());
        }
        let Some(tokenizer) = &self.tokenizer else {
            return Ok(());
        };
        let json = tokenizer
            .to_string(false)
            .map_err(|e| invalid(format!("cannot serialise the tokenizer: {e}")))?;
        write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
        let name = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
        let mut config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
        });
        let fields = [
            ("bos_token", name(self.bos)),
            ("eos_token", name(self.eos.first().copied())),
            ("pad_token", name(self.pad)),
            ("unk_token", name(self.unk)),
        ];
        for (key, value) in fields {
            if let Some(v) = value {
                config[key] = Value::String(v);
            }
        }
        if let Some(t) = &self.chat_template {
            config["chat_template"] = Value::String(t.clone());
        }
        let text = serde_json::to_string_pretty(&config).expect("JSON values serialise");
        write_atomic(&dir.join("tokenizer_config.json"), text.as_bytes())
    }
}

/// The chat template of an HF directory, where transformers looks for it: a
/// `chat_template.jinja` file first, then `chat_template.json` (as processors save it), then
/// `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates of which
/// the `default` one applies).
fn hf_chat_template(dir: &Path, tok_config: Option<&JsonFile>) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| io(format!("{}: cannot read: {e}", jinja.display())));
    }
    let from_value = |v: Option<&Value>, file: &Path| -> Result<Option<String>> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Array(items)) => Ok(items
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string)),
            Some(_) => Err(invalid(format!(
                "{}: `chat_template` is neither a string nor a list of named templates",
                file.display()
            ))),
        }
    };
    let json_path = dir.join("chat_template.json");
    if let Some(file) = JsonFile::read_optional(&json_path)? {
        if let Some(t) = from_value(file.get("chat_template"), &json_path)? {
            return Ok(Some(t));
        }
    }
    match tok_config {
        Some(t) => from_value(t.get("chat_template"), &dir.join("tokenizer_config.json")),
        None => Ok(None),
    }
}

/// Adds the named special tokens a tokenizer_config.json or special_tokens_map.json gives
/// (strings or `{"content": ...}` objects).
fn template_tokens_from_json(file: &JsonFile, tokens: &mut TemplateTokens) {
    for key in TEMPLATE_TOKEN_KEYS {
        if let Some(name) = file.get(key).and_then(token_name) {
            tokens.set_default(key, name);
        }
    }
}

fn has_chatml_tokens(tokenizer: Option<&Tokenizer>) -> bool {
    tokenizer.is_some_and(|t| {
        t.token_to_id("<|im_start|>").is_some() && t.token_to_id("<|im_end|>").is_some()
    })
}

fn dedup(ids: &mut Vec<u32>) {
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
}

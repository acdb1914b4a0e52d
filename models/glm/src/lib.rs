//! kedit model-family plugin for GLM checkpoints, three families:
//!
//! * `glm`: transformers' native `GlmForCausalLM` (GLM-4-9B-chat-hf);
//! * `glm4`: `Glm4ForCausalLM` (GLM-4-0414, sandwich norms);
//! * `chatglm`: THUDM's remote-code layout of ChatGLM2 / ChatGLM3 (`model_type` `chatglm`,
//!   `ChatGLMModel`, `ChatGLMForConditionalGeneration`).
//!
//! The networks live in `kedit_model_core::arch::{glm, chatglm}`; this crate is the plugin's
//! face: what it recognises and how it opens a checkpoint.

use std::path::Path;

use kedit_model_core::arch::chatglm::{self, ChatGlm};
use kedit_model_core::arch::glm::{self, Glm};
use kedit_model_core::checkpoint::JsonFile;
use kedit_model_core::device::parse_device;
use kedit_model_core::Runtime;
use kedit_plugin_api::{
    kind, model_box, FamilyInfo, ModelBox, OpenRequest, PluginError, PluginInfo, API_LEVEL,
};
use serde_json::Value;

pub const GLM: &str = "glm";
pub const GLM4: &str = "glm4";
pub const CHATGLM: &str = "chatglm";

/// (family, config.json `model_type` / `architectures` values it recognises).
pub const RECOGNISES: &[(&str, &[&str])] = &[
    (GLM, &["glm", "GlmForCausalLM"]),
    (GLM4, &["glm4", "Glm4ForCausalLM"]),
    (
        CHATGLM,
        &["chatglm", "ChatGLMModel", "ChatGLMForConditionalGeneration"],
    ),
];

pub fn info() -> PluginInfo {
    let describe = |family: &str| {
        match family {
        GLM => "GlmForCausalLM (GLM-4-9B-chat-hf): q/k/v bias, partial interleaved RoPE, fused gate_up_proj",
        GLM4 => "Glm4ForCausalLM (GLM-4-0414): as glm plus sandwich norms",
        _ => "ChatGLM2/ChatGLM3 remote-code checkpoints (transformer.encoder.layers, fused query_key_value, multi-query groups)",
    }
    };
    PluginInfo {
        kind: kind::MODEL_FAMILY,
        name: "glm".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        api_level: API_LEVEL,
        description: "GLM, GLM-4 and ChatGLM2/3 decoders from HF safetensors".into(),
        families: RECOGNISES
            .iter()
            .map(|(family, names)| FamilyInfo {
                name: (*family).into(),
                description: describe(family).into(),
                recognises: names.iter().map(|&s| s.into()).collect(),
            })
            .collect::<Vec<_>>()
            .into(),
        methods: Default::default(),
        capabilities: Default::default(),
    }
}

/// The family of a checkpoint directory's config.json, if it is one of ours. `model_type`
/// decides; `architectures` is the fallback.
fn family_of(config: &JsonFile) -> Option<&'static str> {
    let by = |name: &str| {
        RECOGNISES
            .iter()
            .find(|(_, names)| names.contains(&name))
            .map(|(f, _)| *f)
    };
    if let Some(f) = config.str_opt("model_type").ok().flatten().and_then(by) {
        return Some(f);
    }
    config
        .get("architectures")
        .and_then(Value::as_array)?
        .iter()
        .filter_map(Value::as_str)
        .find_map(by)
}

/// `Some(family)` when `path` is a checkpoint directory this plugin opens.
pub fn probe(path: &str) -> Result<Option<String>, PluginError> {
    let path = Path::new(path);
    let config = path.join("config.json");
    if !path.is_dir() || !config.is_file() {
        return Ok(None);
    }
    let config = JsonFile::read(&config)?;
    Ok(family_of(&config).map(str::to_string))
}

/// Opens a `glm` / `glm4` checkpoint as the runtime itself (tests, in-process users).
pub fn open_glm(path: &str, device: &str) -> Result<Runtime<Glm>, PluginError> {
    let device = parse_device(device)?;
    Ok(glm::open(Path::new(path), &device)?)
}

/// Opens a `chatglm` checkpoint as the runtime itself.
pub fn open_chatglm(path: &str, device: &str) -> Result<Runtime<ChatGlm>, PluginError> {
    let device = parse_device(device)?;
    Ok(chatglm::open(Path::new(path), &device)?)
}

pub fn open(request: &OpenRequest) -> Result<ModelBox, PluginError> {
    let path = request.path.as_str();
    check_options(request.options_json.as_str())?;
    let detected = probe(path)?;
    let family = match (request.family.as_ref().into_option(), detected.as_deref()) {
        (Some(asked), _) if !RECOGNISES.iter().any(|(f, _)| *f == asked.as_str()) => {
            return Err(PluginError::invalid(format!(
                "this plugin opens the families glm, glm4 and chatglm, not '{asked}'"
            )))
        }
        (Some(asked), Some(found)) if asked.as_str() != found => {
            return Err(PluginError::invalid(format!(
                "{path}: config.json describes a '{found}' checkpoint, not '{asked}'"
            )))
        }
        (Some(asked), _) => asked.as_str().to_string(),
        (None, Some(found)) => found.to_string(),
        (None, None) => {
            return Err(PluginError::invalid(format!(
                "{path}: not a GLM / ChatGLM checkpoint directory (config.json's model_type and \
                 architectures name none of {})",
                RECOGNISES
                    .iter()
                    .flat_map(|(_, n)| n.iter().copied())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    };
    let device = request.device.as_str();
    Ok(match family.as_str() {
        CHATGLM => model_box(open_chatglm(path, device)?),
        _ => model_box(open_glm(path, device)?),
    })
}

/// The GLM families have no options; an unknown key is an error, not silently ignored.
fn check_options(json: &str) -> Result<(), PluginError> {
    if json.trim().is_empty() {
        return Ok(());
    }
    let value: Value = serde_json::from_str(json)
        .map_err(|e| PluginError::invalid(format!("options are not valid JSON: {e}")))?;
    match value.as_object() {
        Some(map) if map.is_empty() => Ok(()),
        Some(map) => Err(PluginError::invalid(format!(
            "unknown glm option(s): {} (the glm, glm4 and chatglm families have no options)",
            map.keys().cloned().collect::<Vec<_>>().join(", ")
        ))),
        None => Err(PluginError::invalid("options must be a JSON object")),
    }
}

kedit_plugin_api::export_plugin! {
    info: info,
    probe: probe,
    open_model: open,
}

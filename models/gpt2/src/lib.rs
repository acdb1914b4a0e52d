//! kedit model-family plugin: GPT-2 from an HF checkpoint directory, in either tensor naming
//! (`transformer.h.N…` as `save_pretrained` writes, or the original OpenAI checkpoint without
//! the prefix). The network lives in `kedit_model_core::arch::gpt2`; this crate is the plugin's
//! face: what it recognises and how it opens a checkpoint.

use std::path::Path;

use kedit_model_core::arch::gpt2::{self, Gpt2};
use kedit_model_core::checkpoint::JsonFile;
use kedit_model_core::device::parse_device;
use kedit_model_core::Runtime;
use kedit_plugin_api::{
    kind, model_box, FamilyInfo, ModelBox, OpenRequest, PluginError, PluginInfo, API_LEVEL,
};

pub const FAMILY: &str = "gpt2";

/// config.json `model_type` / `architectures` values this plugin opens.
pub const RECOGNISES: &[&str] = gpt2::NAMES;

pub fn info() -> PluginInfo {
    PluginInfo {
        kind: kind::MODEL_FAMILY,
        name: "gpt2".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        api_level: API_LEVEL,
        description: "GPT-2 decoders (LayerNorm, learned positions, Conv1D, gelu_new, tied head) \
                      from HF safetensors"
            .into(),
        families: vec![FamilyInfo {
            name: FAMILY.into(),
            description:
                "GPT-2 checkpoints (openai-community/gpt2 and its sizes, distilgpt2, ...): \
                          HF directories with config.json + safetensors; tokenizer.json or \
                          GPT-2's encoder.json + vocab.bpe"
                    .into(),
            recognises: RECOGNISES.iter().map(|&s| s.into()).collect(),
        }]
        .into(),
        methods: Default::default(),
        capabilities: Default::default(),
    }
}

fn recognised(name: &str) -> bool {
    RECOGNISES.contains(&name)
}

/// `Some("gpt2")` when `path` is a checkpoint this plugin opens.
pub fn probe(path: &str) -> Result<Option<String>, PluginError> {
    let path = Path::new(path);
    let config = path.join("config.json");
    if !path.is_dir() || !config.is_file() {
        return Ok(None);
    }
    let config = JsonFile::read(&config)?;
    let model_type = config
        .str_opt("model_type")
        .ok()
        .flatten()
        .is_some_and(recognised);
    let architecture = config
        .get("architectures")
        .and_then(|a| a.as_array())
        .is_some_and(|a| a.iter().filter_map(|v| v.as_str()).any(recognised));
    Ok((model_type || architecture).then(|| FAMILY.to_string()))
}

/// Opens a checkpoint as the runtime itself (for tests and in-process users).
pub fn open_runtime(path: &str, device: &str) -> Result<Runtime<Gpt2>, PluginError> {
    let device = parse_device(device)?;
    Ok(gpt2::open(Path::new(path), &device)?)
}

pub fn open(request: &OpenRequest) -> Result<ModelBox, PluginError> {
    if let Some(family) = request.family.as_ref().into_option() {
        if family.as_str() != FAMILY {
            return Err(PluginError::invalid(format!(
                "this plugin opens the '{FAMILY}' family, not '{family}'"
            )));
        }
    }
    check_options(request.options_json.as_str())?;
    let runtime = open_runtime(request.path.as_str(), request.device.as_str())?;
    Ok(model_box(runtime))
}

/// The gpt2 family has no options yet; an unknown key is an error, not silently ignored.
fn check_options(json: &str) -> Result<(), PluginError> {
    if json.trim().is_empty() {
        return Ok(());
    }
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| PluginError::invalid(format!("options are not valid JSON: {e}")))?;
    match value.as_object() {
        Some(map) if map.is_empty() => Ok(()),
        Some(map) => Err(PluginError::invalid(format!(
            "unknown gpt2 option(s): {} (the gpt2 family has no options)",
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

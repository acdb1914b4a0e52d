//! kedit model-family plugin: LLaMA (and Mistral-style GQA checkpoints) from an HF checkpoint
//! directory or a `llama`-architecture GGUF file. The network itself lives in
//! `kedit_model_core::arch::llama`; this crate is the plugin's face: what it recognises and how
//! it opens a checkpoint.

use std::path::Path;

use kedit_model_core::arch::llama::{self, Llama};
use kedit_model_core::checkpoint::JsonFile;
use kedit_model_core::device::parse_device;
use kedit_model_core::gguf::GgufFile;
use kedit_model_core::Runtime;
use kedit_plugin_api::{
    kind, model_box, FamilyInfo, ModelBox, OpenRequest, PluginError, PluginInfo, API_LEVEL,
};

pub const FAMILY: &str = "llama";

/// config.json `model_type` / `architectures` values and GGUF architectures this plugin opens.
pub const RECOGNISES: &[&str] = &["llama", "LlamaForCausalLM", "mistral", "MistralForCausalLM"];

pub fn info() -> PluginInfo {
    PluginInfo {
        kind: kind::MODEL_FAMILY,
        name: "llama".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        api_level: API_LEVEL,
        description:
            "LLaMA-family decoders (RMSNorm, GQA + RoPE, SwiGLU) from HF safetensors or GGUF".into(),
        families: vec![FamilyInfo {
            name: FAMILY.into(),
            description:
                "LLaMA 1/2/3-style and Mistral-style checkpoints (SmolLM2, TinyLlama, ...); \
                          HF directories (config.json + safetensors) and llama GGUF files"
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

/// `Some("llama")` when `path` is a checkpoint this plugin opens.
pub fn probe(path: &str) -> Result<Option<String>, PluginError> {
    let path = Path::new(path);
    let yes = Some(FAMILY.to_string());
    if path.is_dir() {
        let config = path.join("config.json");
        if !config.is_file() {
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
        return Ok(if model_type || architecture {
            yes
        } else {
            None
        });
    }
    if path.is_file() {
        // Anything that is not a readable GGUF simply is not ours.
        return Ok(match GgufFile::open(path) {
            Ok(g) if g.architecture().is_ok_and(recognised) => yes,
            _ => None,
        });
    }
    Ok(None)
}

/// Opens a checkpoint as the runtime itself (for tests and in-process users).
pub fn open_runtime(path: &str, device: &str) -> Result<Runtime<Llama>, PluginError> {
    let device = parse_device(device)?;
    Ok(llama::open(Path::new(path), &device)?)
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

/// The llama family has no options yet; an unknown key is an error, not silently ignored.
fn check_options(json: &str) -> Result<(), PluginError> {
    if json.trim().is_empty() {
        return Ok(());
    }
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| PluginError::invalid(format!("options are not valid JSON: {e}")))?;
    match value.as_object() {
        Some(map) if map.is_empty() => Ok(()),
        Some(map) => Err(PluginError::invalid(format!(
            "unknown llama option(s): {} (the llama family has no options)",
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

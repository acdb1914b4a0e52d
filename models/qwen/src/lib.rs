//! kedit model-family plugin: Qwen2 / Qwen2.5 (`qwen2`) and Qwen3 (`qwen3`) from an HF
//! checkpoint directory or a `qwen2`/`qwen3` GGUF file. The network is the LLaMA one configured
//! per variant (`kedit_model_core::arch::qwen`); this crate is the plugin's face.

use std::path::Path;

use kedit_model_core::arch::llama::Llama;
use kedit_model_core::arch::qwen::{self, QWEN2_NAMES, QWEN3_NAMES};
use kedit_model_core::checkpoint::JsonFile;
use kedit_model_core::device::parse_device;
use kedit_model_core::gguf::GgufFile;
use kedit_model_core::Runtime;
use kedit_plugin_api::{
    kind, model_box, FamilyInfo, ModelBox, OpenRequest, PluginError, PluginInfo, API_LEVEL,
};

pub const FAMILIES: &[&str] = &["qwen2", "qwen3"];

pub fn info() -> PluginInfo {
    PluginInfo {
        kind: kind::MODEL_FAMILY,
        name: "qwen".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        api_level: API_LEVEL,
        description: "Qwen2, Qwen2.5 and Qwen3 decoders from HF safetensors or GGUF".into(),
        families: vec![
            FamilyInfo {
                name: "qwen2".into(),
                description:
                    "Qwen2 / Qwen2.5 (q/k/v biases, RoPE theta 1e6, tied or untied head): \
                              HF directories and qwen2 GGUF files"
                        .into(),
                recognises: QWEN2_NAMES.iter().map(|&s| s.into()).collect(),
            },
            FamilyInfo {
                name: "qwen3".into(),
                description: "Qwen3 (per-head q/k RMS norms before RoPE, explicit head_dim): HF \
                              directories and qwen3 GGUF files"
                    .into(),
                recognises: QWEN3_NAMES.iter().map(|&s| s.into()).collect(),
            },
        ]
        .into(),
        methods: Default::default(),
        capabilities: Default::default(),
    }
}

/// The family (`qwen2` / `qwen3`) of `path`, if this plugin opens it.
pub fn probe(path: &str) -> Result<Option<String>, PluginError> {
    let path = Path::new(path);
    if path.is_dir() {
        let config = path.join("config.json");
        if !config.is_file() {
            return Ok(None);
        }
        let config = JsonFile::read(&config)?;
        return Ok(qwen::variant_of_config(&config).map(|v| v.family().to_string()));
    }
    if path.is_file() {
        // Anything that is not a readable GGUF simply is not ours.
        return Ok(match GgufFile::open(path) {
            Ok(g) => g
                .architecture()
                .ok()
                .and_then(qwen::variant_of)
                .map(|v| v.family().to_string()),
            _ => None,
        });
    }
    Ok(None)
}

/// Opens a checkpoint as the runtime itself (for tests and in-process users).
pub fn open_runtime(path: &str, device: &str) -> Result<Runtime<Llama>, PluginError> {
    let device = parse_device(device)?;
    Ok(qwen::open(Path::new(path), &device)?)
}

pub fn open(request: &OpenRequest) -> Result<ModelBox, PluginError> {
    let wanted = request.family.as_ref().into_option().map(|f| f.to_string());
    if let Some(family) = &wanted {
        if !FAMILIES.contains(&family.as_str()) {
            return Err(PluginError::invalid(format!(
                "this plugin opens the {} families, not '{family}'",
                FAMILIES.join(" and ")
            )));
        }
    }
    check_options(request.options_json.as_str())?;
    let runtime = open_runtime(request.path.as_str(), request.device.as_str())?;
    if let Some(family) = wanted {
        let found = runtime.arch().config.variant.family();
        if found != family {
            return Err(PluginError::invalid(format!(
                "{} is a {found} checkpoint, not {family}",
                request.path
            )));
        }
    }
    Ok(model_box(runtime))
}

/// The qwen families have no options yet; an unknown key is an error, not silently ignored.
fn check_options(json: &str) -> Result<(), PluginError> {
    if json.trim().is_empty() {
        return Ok(());
    }
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| PluginError::invalid(format!("options are not valid JSON: {e}")))?;
    match value.as_object() {
        Some(map) if map.is_empty() => Ok(()),
        Some(map) => Err(PluginError::invalid(format!(
            "unknown qwen option(s): {} (the qwen families have no options)",
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

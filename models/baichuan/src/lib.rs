//! kedit model-family plugin for Baichuan checkpoints (remote-code layout), family `baichuan`:
//! Baichuan-7B / Baichuan2-7B (`W_pack`, RoPE) and Baichuan-13B / Baichuan2-13B (`W_pack`,
//! ALiBi), with Baichuan2's NormHead. The network lives in `kedit_model_core::arch::baichuan`.
//!
//! Option (JSON object): `norm_head` (bool) overrides the NormHead rule: Baichuan2
//! (`BaichuanForCausalLM` with any vocabulary but v1's 64000) normalises the head rows,
//! Baichuan v1 (`BaiChuanForCausalLM`, or vocabulary 64000) does not.

use std::path::Path;

use kedit_model_core::arch::baichuan::{self, Baichuan};
use kedit_model_core::checkpoint::JsonFile;
use kedit_model_core::device::parse_device;
use kedit_model_core::Runtime;
use kedit_plugin_api::{
    kind, model_box, FamilyInfo, ModelBox, OpenRequest, PluginError, PluginInfo, API_LEVEL,
};
use serde_json::Value;

pub const FAMILY: &str = "baichuan";

/// config.json `model_type` / `architectures` values this plugin opens.
pub const RECOGNISES: &[&str] = &["baichuan", "BaichuanForCausalLM", "BaiChuanForCausalLM"];

pub fn info() -> PluginInfo {
    PluginInfo {
        kind: kind::MODEL_FAMILY,
        name: "baichuan".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        api_level: API_LEVEL,
        description:
            "Baichuan / Baichuan2 decoders (W_pack, RoPE or ALiBi, NormHead) from HF safetensors"
                .into(),
        families: vec![FamilyInfo {
            name: FAMILY.into(),
            description: "Baichuan-7B/13B and Baichuan2-7B/13B remote-code checkpoints; \
                          option norm_head (bool) overrides the NormHead rule"
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

/// `Some("baichuan")` when `path` is a checkpoint directory this plugin opens.
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
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().filter_map(Value::as_str).any(recognised));
    Ok((model_type || architecture).then(|| FAMILY.to_string()))
}

/// Opens a checkpoint as the runtime itself (tests, in-process users).
pub fn open_runtime(
    path: &str,
    device: &str,
    norm_head: Option<bool>,
) -> Result<Runtime<Baichuan>, PluginError> {
    let device = parse_device(device)?;
    Ok(baichuan::open(Path::new(path), norm_head, &device)?)
}

pub fn open(request: &OpenRequest) -> Result<ModelBox, PluginError> {
    if let Some(family) = request.family.as_ref().into_option() {
        if family.as_str() != FAMILY {
            return Err(PluginError::invalid(format!(
                "this plugin opens the '{FAMILY}' family, not '{family}'"
            )));
        }
    }
    let norm_head = parse_options(request.options_json.as_str())?;
    let runtime = open_runtime(request.path.as_str(), request.device.as_str(), norm_head)?;
    Ok(model_box(runtime))
}

/// The only option is `norm_head`; any other key is an error.
fn parse_options(json: &str) -> Result<Option<bool>, PluginError> {
    if json.trim().is_empty() {
        return Ok(None);
    }
    let value: Value = serde_json::from_str(json)
        .map_err(|e| PluginError::invalid(format!("options are not valid JSON: {e}")))?;
    let map = value
        .as_object()
        .ok_or_else(|| PluginError::invalid("options must be a JSON object"))?;
    let unknown: Vec<&str> = map
        .keys()
        .map(String::as_str)
        .filter(|k| *k != "norm_head")
        .collect();
    if !unknown.is_empty() {
        return Err(PluginError::invalid(format!(
            "unknown baichuan option(s): {} (allowed: norm_head)",
            unknown.join(", ")
        )));
    }
    match map.get("norm_head") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(PluginError::invalid(format!(
            "option norm_head must be true or false, found {other}"
        ))),
    }
}

kedit_plugin_api::export_plugin! {
    info: info,
    probe: probe,
    open_model: open,
}

//! Loading HF checkpoints in their variants (old and new config forms, shards), the errors a
//! broken checkpoint gives, export round trips, and the plugin's probe/open entry points.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use kedit_plugin_api::{Batch, ForwardRequest, LogitsWanted, Model, OpenRequest, Padding, Tensor};
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use serde_json::Value;

fn logits_of(model: &impl Model) -> Tensor {
    let req = ForwardRequest::new(
        Batch::new(
            vec![vec![299, 473, 151, 503, 475], vec![7, 8]],
            Padding::Right,
        ),
        LogitsWanted::All,
    );
    model.forward(&req).unwrap().logits.into_option().unwrap()
}

fn config() -> Value {
    let text = std::fs::read_to_string(fixture("llama").join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn write_config(dir: &Path, v: &Value) {
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(v).unwrap(),
    )
    .unwrap();
}

/// Writes the fixture's tensors, filtered/renamed by `keep`, into `file`.
fn write_tensors(file: &Path, keep: impl Fn(&str) -> bool) {
    let bytes = std::fs::read(fixture("llama").join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, TensorView)> =
        st.tensors().into_iter().filter(|(n, _)| keep(n)).collect();
    safetensors::serialize_to_file(views, None, file).unwrap();
}

fn open(
    dir: &Path,
) -> Result<
    kedit_model_core::Runtime<kedit_model_core::arch::llama::Llama>,
    kedit_plugin_api::PluginError,
> {
    kedit_model_llama::open_runtime(dir.to_str().unwrap(), "cpu")
}

#[test]
fn old_config_form_and_sharded_weights_load_to_the_same_model() {
    let reference = logits_of(&tiny_llama());

    // transformers 4.x: top-level rope_theta, torch_dtype, no head_dim (64 / 4 = 16).
    let dir = tempfile::tempdir().unwrap();
    let mut c = config();
    let obj = c.as_object_mut().unwrap();
    obj.remove("rope_parameters");
    obj.remove("head_dim");
    obj.remove("dtype");
    obj.insert("rope_theta".into(), 500000.0.into());
    obj.insert("torch_dtype".into(), "float32".into());
    obj.insert("rope_scaling".into(), Value::Null);
    write_config(dir.path(), &c);
    std::fs::copy(
        fixture("llama").join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    assert_eq!(
        logits_of(&open(dir.path()).unwrap()).as_slice(),
        reference.as_slice()
    );

    // Two shards and an index.
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &config());
    let first = |n: &str| n.contains("layers.0.") || n.contains("embed");
    write_tensors(&dir.path().join("model-00001-of-00002.safetensors"), first);
    write_tensors(&dir.path().join("model-00002-of-00002.safetensors"), |n| {
        !first(n)
    });
    let bytes = std::fs::read(fixture("llama").join("model.safetensors")).unwrap();
    let names: Vec<String> = SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let map: HashMap<String, String> = names
        .into_iter()
        .map(|n| {
            let f = if first(&n) {
                "model-00001-of-00002.safetensors"
            } else {
                "model-00002-of-00002.safetensors"
            };
            (n, f.to_string())
        })
        .collect();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert_eq!(
        logits_of(&open(dir.path()).unwrap()).as_slice(),
        reference.as_slice()
    );
}

#[test]
fn broken_checkpoints_give_errors_that_name_the_file_and_the_tensor_or_key() {
    // A missing tensor.
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &config());
    write_tensors(&dir.path().join("model.safetensors"), |n| {
        n != "model.layers.1.mlp.up_proj.weight"
    });
    let e = open(dir.path()).err().unwrap().to_string();
    eprintln!("{e}");
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("model.safetensors"),
        "{e}"
    );

    // A shape the config does not imply.
    let mut c = config();
    c["intermediate_size"] = 177.into();
    write_config(dir.path(), &c);
    write_tensors(&dir.path().join("model.safetensors"), |_| true);
    let e = open(dir.path()).err().unwrap().to_string();
    eprintln!("{e}");
    assert!(
        e.contains("gate_proj.weight") && e.contains("[176, 64]") && e.contains("[177, 64]"),
        "{e}"
    );

    // A truncated file.
    write_config(dir.path(), &config());
    let bytes = std::fs::read(fixture("llama").join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let e = open(dir.path()).err().unwrap().to_string();
    eprintln!("{e}");
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
    std::fs::write(dir.path().join("model.safetensors"), b"garbage").unwrap();
    assert!(open(dir.path()).is_err());

    // A missing config key.
    let mut c = config();
    c.as_object_mut().unwrap().remove("hidden_size");
    write_config(dir.path(), &c);
    let e = open(dir.path()).err().unwrap().to_string();
    eprintln!("{e}");
    assert!(
        e.contains("hidden_size") && e.contains("config.json"),
        "{e}"
    );

    // No weights at all.
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    write_config(dir.path(), &config());
    let e = open(dir.path()).err().unwrap().to_string();
    eprintln!("{e}");
    assert!(e.contains("no model.safetensors"), "{e}");

    // An unsupported RoPE type.
    let mut c = config();
    c["rope_parameters"]["rope_type"] = "yarn".into();
    write_config(dir.path(), &c);
    let e = open(dir.path()).err().unwrap().to_string();
    eprintln!("{e}");
    assert!(e.contains("yarn"), "{e}");
}

#[test]
fn export_writes_an_hf_checkpoint_of_the_edited_weights() {
    let mut model = tiny_llama();
    let w = model.read_weight("layer.1.mlp.down").unwrap();
    let edited: Vec<f32> = w.as_slice().iter().map(|v| v * 1.5).collect();
    model
        .write_weight("layer.1.mlp.down", &Tensor::new(&w.dims(), edited).unwrap())
        .unwrap();
    let want = logits_of(&model);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("edited");
    model.export(out.to_str().unwrap()).unwrap();
    let reloaded = open(&out).unwrap();
    assert_eq!(logits_of(&reloaded).as_slice(), want.as_slice());
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(written, config());
    // No temporary files are left behind.
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");

    let e = model
        .export(fixture("llama").to_str().unwrap())
        .unwrap_err();
    assert!(e.message.contains("refusing"), "{e}");
}

#[test]
fn the_plugin_probes_and_opens_through_the_abi() {
    let info = kedit_model_llama::info();
    assert_eq!(info.kind, kedit_plugin_api::kind::MODEL_FAMILY);
    assert_eq!(info.families[0].name.as_str(), "llama");
    let llama = fixture("llama");
    assert_eq!(
        kedit_model_llama::probe(llama.to_str().unwrap()).unwrap(),
        Some("llama".into())
    );
    assert_eq!(
        kedit_model_llama::probe(fixture("qwen2").to_str().unwrap()).unwrap(),
        None
    );
    assert_eq!(kedit_model_llama::probe("/nonexistent").unwrap(), None);
    let config = llama.join("config.json");
    assert_eq!(
        kedit_model_llama::probe(config.to_str().unwrap()).unwrap(),
        None
    );

    let request = |options: &str, family: Option<&str>| OpenRequest {
        path: llama.to_str().unwrap().into(),
        family: family.map(Into::into).into(),
        device: "cpu".into(),
        options_json: options.into(),
    };
    let model = kedit_model_llama::open(&request("{}", Some("llama"))).unwrap();
    let facts = model.facts().unwrap();
    assert_eq!(facts.n_layers, 3);
    let e = kedit_model_llama::open(&request(r#"{"dtype": "bf16"}"#, None))
        .err()
        .unwrap();
    assert!(e.message.contains("dtype"), "{e}");
    assert!(kedit_model_llama::open(&request("{}", Some("gpt2"))).is_err());
    let mut bad_device = request("{}", None);
    bad_device.device = "tpu:0".into();
    assert!(kedit_model_llama::open(&bad_device).is_err());
}

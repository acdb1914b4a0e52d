//! GPT-2 loading: the original OpenAI naming (no `transformer.` prefix, with the `attn.bias` /
//! `attn.masked_bias` mask buffers) gives the same model as the save_pretrained naming; and the
//! plugin's probe/open entry points.

use std::collections::HashMap;
use std::path::Path;

use kedit_model_core::testkit::*;
use kedit_plugin_api::OpenRequest;
use safetensors::tensor::{Dtype, TensorView};

fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
}

#[test]
fn the_original_openai_naming_loads_to_the_same_model() {
    let src = fixture("gpt2");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> =
        load_expected(src.join("model.safetensors"))
            .into_iter()
            .map(|(k, v)| {
                (
                    k.trim_start_matches("transformer.").to_string(),
                    v.shape.clone(),
                    v.f32s(),
                )
            })
            .collect();
    for i in 0..3 {
        // The causal-mask buffers of the original checkpoint: not weights.
        let mask: Vec<f32> = (0..128 * 128)
            .map(|k| if k % 128 <= k / 128 { 1.0 } else { 0.0 })
            .collect();
        tensors.push((format!("h.{i}.attn.bias"), vec![1, 1, 128, 128], mask));
        tensors.push((format!("h.{i}.attn.masked_bias"), vec![], vec![-1e4]));
    }
    write_safetensors(&dir.path().join("model.safetensors"), &tensors);

    let a = kedit_model_gpt2::open_runtime(src.to_str().unwrap(), "cpu").unwrap();
    let b = kedit_model_gpt2::open_runtime(dir.path().to_str().unwrap(), "cpu").unwrap();
    assert_eq!(probe_logits(&a).as_slice(), probe_logits(&b).as_slice());

    // Export keeps the naming it loaded.
    let mut b = b;
    let (_guard, out) = check_export_round_trip(&mut b, dir.path(), "layer.0.mlp.up", |p| {
        kedit_model_gpt2::open_runtime(p.to_str().unwrap(), "cpu").unwrap()
    });
    let names = load_expected(out.join("model.safetensors"));
    assert!(names.contains_key("h.0.mlp.c_fc.weight"));
    assert!(!names.keys().any(|k| k.starts_with("transformer.")));
    for i in 0..3 {
        assert!(!names.contains_key(&format!("h.{i}.attn.bias")));
        assert!(!names.contains_key(&format!("h.{i}.attn.masked_bias")));
    }
}

#[test]
fn a_missing_tensor_is_named_in_the_error() {
    let src = fixture("gpt2");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = load_expected(src.join("model.safetensors"))
        .into_iter()
        .filter(|(k, _)| k != "transformer.h.2.mlp.c_fc.bias")
        .map(|(k, v)| (k, v.shape.clone(), v.f32s()))
        .collect();
    write_safetensors(&dir.path().join("model.safetensors"), &tensors);
    let e = kedit_model_gpt2::open_runtime(dir.path().to_str().unwrap(), "cpu")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("transformer.h.2.mlp.c_fc.bias"), "{e}");
}

#[test]
fn the_plugin_probes_and_opens_through_the_abi() {
    let info = kedit_model_gpt2::info();
    assert_eq!(info.kind, kedit_plugin_api::kind::MODEL_FAMILY);
    assert_eq!(info.families[0].name.as_str(), "gpt2");
    let gpt2 = fixture("gpt2");
    assert_eq!(
        kedit_model_gpt2::probe(gpt2.to_str().unwrap()).unwrap(),
        Some("gpt2".into())
    );
    for other in ["llama", "qwen2"] {
        assert_eq!(
            kedit_model_gpt2::probe(fixture(other).to_str().unwrap()).unwrap(),
            None
        );
    }
    assert_eq!(kedit_model_gpt2::probe("/nonexistent").unwrap(), None);
    let request = |options: &str, family: Option<&str>| OpenRequest {
        path: gpt2.to_str().unwrap().into(),
        family: family.map(Into::into).into(),
        device: "cpu".into(),
        options_json: options.into(),
    };
    let model = kedit_model_gpt2::open(&request("{}", Some("gpt2"))).unwrap();
    assert_eq!(model.facts().unwrap().family.as_str(), "gpt2");
    assert!(kedit_model_gpt2::open(&request(r#"{"x": 1}"#, None)).is_err());
    assert!(kedit_model_gpt2::open(&request("{}", Some("llama"))).is_err());
}

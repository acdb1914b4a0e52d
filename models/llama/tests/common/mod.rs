//! Helpers shared by the llama tests: fixture paths, reference tensors, comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use kedit_model_core::arch::llama::Llama;
use kedit_model_core::Runtime;
use kedit_plugin_api::Tensor;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

pub fn shared() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared"))
}

pub fn fixture(name: &str) -> PathBuf {
    shared().join("fixtures").join(name)
}

/// The tiny random LLaMA checkpoint (no tokenizer).
pub fn tiny_llama() -> Runtime<Llama> {
    kedit_model_llama::open_runtime(fixture("llama").to_str().unwrap(), "cpu")
        .expect("the tiny llama fixture loads")
}

/// A reference tensor: shape and values (integers widened to f64, floats as f64).
#[derive(Clone, Debug)]
pub struct Expected {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

impl Expected {
    pub fn f32s(&self) -> Vec<f32> {
        self.values.iter().map(|&v| v as f32).collect()
    }

    pub fn ids(&self) -> Vec<u32> {
        self.values.iter().map(|&v| v as u32).collect()
    }

    /// Rows of a 2-D tensor.
    pub fn rows(&self) -> Vec<Vec<f64>> {
        let cols = self.shape[1..].iter().product::<usize>();
        self.values.chunks(cols).map(|c| c.to_vec()).collect()
    }
}

pub fn load_expected(path: PathBuf) -> HashMap<String, Expected> {
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let values: Vec<f64> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Dtype::I64 => data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            other => panic!("{name}: unexpected dtype {other:?}"),
        };
        out.insert(
            name,
            Expected {
                shape: view.shape().to_vec(),
                values,
            },
        );
    }
    out
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn assert_close(what: &str, got: &Tensor, want: &[f32], tol: f32) -> f32 {
    let d = max_abs_diff(got.as_slice(), want);
    assert!(d <= tol, "{what}: max abs diff {d} > {tol}");
    d
}

/// Deterministic pseudo-random values in [-scale, scale).
pub fn pseudo_random(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    kedit_plugin_api::noise::gaussian(seed, n, scale)
}

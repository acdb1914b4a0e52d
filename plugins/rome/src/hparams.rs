//! ROME hyper-parameters, named as in EasyEdit's `ROMEHyperParams` wherever the meaning is the
//! same (METHODS.md §3.6). Sites are canonical names, never family tensor names.

use kedit_plugin_api::PluginError;
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RomeHparams {
    /// Edited layers, processed in ascending order (EasyEdit's default is one layer).
    pub layers: Vec<usize>,
    /// Only `subject_last` is implemented (EasyEdit's only ROME setting in practice).
    #[serde(default = "default_fact_token")]
    pub fact_token: String,
    pub v_num_grad_steps: usize,
    pub v_lr: f64,
    /// Weight of the (non-squared) decay term `‖δ‖ / ‖target_init‖²`.
    pub v_weight_decay: f64,
    /// δ is clamped to the ball of radius `clamp_norm_factor · ‖target_init‖`.
    pub clamp_norm_factor: f64,
    pub kl_factor: f64,
    /// EasyEdit traces this layer; the loss always uses the full model's logits. Kept for
    /// compatibility with EasyEdit files, otherwise unused.
    #[serde(default)]
    pub v_loss_layer: Option<usize>,
    /// `u = C⁻¹k̄` with C the key second moment (ROME paper); false: `u = k̄` (EasyEdit).
    pub mom2_adjustment: bool,
    /// Text corpus for C: a text file (one document per line) or a directory of them.
    #[serde(default)]
    pub mom2_dataset: String,
    /// Number of documents (lines) sampled for C.
    pub mom2_n_samples: usize,
    /// Keep C in the host's persistent cache, keyed by model, site, corpus contents and
    /// sample count, and reuse it across runs and processes (EasyEdit's `stats_dir`).
    #[serde(default = "default_true")]
    pub stats_cache: bool,
    /// Tokens per statistics forward (rows × padded width), EasyEdit's `3·npos`-style batching.
    #[serde(default = "default_stats_batch_tokens")]
    pub stats_batch_tokens: usize,
    /// Longest document in tokens for the statistics (0 = the model's `max_positions`).
    #[serde(default)]
    pub stats_max_len: usize,
    /// MEMIT's λ in `λ·C + K Kᵀ` (EasyEdit `mom2_update_weight`), used as given. `null` (the
    /// default): derived from `mom2_update_weight_reference` and the edited MLP's width.
    #[serde(default)]
    pub mom2_update_weight: Option<f64>,
    /// `[λ_ref, d_ref]`: the λ EasyEdit set for a model whose MLP width (the rewritten weight's
    /// input size) is `d_ref`. A key's share of its residual depends on `kᵀ(λC)⁻¹k`, whose mean
    /// is `d/λ`, so the same balance on width `d` needs `λ = λ_ref · d / d_ref` (docs/rome.md).
    #[serde(default = "default_update_weight_reference")]
    pub mom2_update_weight_reference: (f64, usize),
    /// AlphaEdit: eigenvalues of C below this span the null space the update is projected into.
    #[serde(default = "default_nullspace_threshold")]
    pub nullspace_threshold: f64,
    /// AlphaEdit's `L2`: the ridge term in `[P (K Kᵀ + cache) + L2·I]⁻¹`.
    #[serde(rename = "L2", default = "default_l2")]
    pub l2: f64,
    /// `[[length, n_gen], ...]` of the generated context templates.
    pub context_template_length_params: Vec<(usize, usize)>,
    /// Fixed templates (each containing `{}`) instead of generated ones, e.g. `["{}"]`.
    #[serde(default)]
    pub context_templates: Option<Vec<String>>,
    /// Seed of the top-k template sampling.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The loss below which the v optimisation stops (EasyEdit: 5e-2).
    #[serde(default = "default_stop_loss")]
    pub v_stop_loss: f64,
    /// Canonical sites (`{}` = layer).
    #[serde(default = "default_rewrite_site")]
    pub rewrite_site: String,
    #[serde(default = "default_key_site")]
    pub key_site: String,
    #[serde(default = "default_value_site")]
    pub value_site: String,
}

fn default_fact_token() -> String {
    "subject_last".into()
}
fn default_true() -> bool {
    true
}
fn default_stats_batch_tokens() -> usize {
    4096
}
/// EasyEdit's `MEMIT/llama-7b.yaml`: λ = 15000 on LLaMA-7B's MLP width 11008.
fn default_update_weight_reference() -> (f64, usize) {
    (15000.0, 11008)
}
fn default_nullspace_threshold() -> f64 {
    2e-2
}
fn default_l2() -> f64 {
    10.0
}
fn default_seed() -> u64 {
    42
}
fn default_stop_loss() -> f64 {
    5e-2
}
fn default_rewrite_site() -> String {
    "layer.{}.mlp.down".into()
}
fn default_key_site() -> String {
    "layer.{}.mlp_key".into()
}
fn default_value_site() -> String {
    "layer.{}.mlp_out".into()
}

impl RomeHparams {
    pub fn from_json(json: &str) -> Result<Self, PluginError> {
        let hp: Self = serde_json::from_str(json)
            .map_err(|e| PluginError::invalid(format!("rome hparams: {e}")))?;
        if hp.layers.is_empty() {
            return Err(PluginError::invalid("rome hparams: `layers` is empty"));
        }
        if hp.fact_token != "subject_last" {
            return Err(PluginError::unsupported(format!(
                "rome hparams: fact_token '{}' is not supported (only subject_last)",
                hp.fact_token
            )));
        }
        if hp.v_lr.is_nan() || hp.v_lr <= 0.0 {
            return Err(PluginError::invalid(
                "rome hparams: `v_lr` must be positive",
            ));
        }
        if !(hp.l2.is_finite() && hp.l2 >= 0.0) {
            return Err(PluginError::invalid(
                "rome hparams: `L2` must be a finite number ≥ 0",
            ));
        }
        if !(hp.nullspace_threshold.is_finite() && hp.nullspace_threshold > 0.0) {
            return Err(PluginError::invalid(
                "rome hparams: `nullspace_threshold` must be positive",
            ));
        }
        if hp.v_num_grad_steps == 0 {
            return Err(PluginError::invalid(
                "rome hparams: `v_num_grad_steps` must be ≥ 1",
            ));
        }
        for (what, s) in [
            ("rewrite_site", &hp.rewrite_site),
            ("key_site", &hp.key_site),
            ("value_site", &hp.value_site),
        ] {
            if !s.contains("{}") {
                return Err(PluginError::invalid(format!(
                    "rome hparams: `{what}` '{s}' has no {{}} for the layer"
                )));
            }
        }
        if let Some(t) = &hp.context_templates {
            if t.is_empty() || t.iter().any(|t| t.matches("{}").count() != 1) {
                return Err(PluginError::invalid(
                    "rome hparams: `context_templates` must be non-empty and each must hold exactly one {}",
                ));
            }
        }
        if let Some(l) = hp.mom2_update_weight {
            if !(l.is_finite() && l > 0.0) {
                return Err(PluginError::invalid(
                    "rome hparams: `mom2_update_weight` must be a positive number (or null to derive it)",
                ));
            }
        }
        let (l_ref, d_ref) = hp.mom2_update_weight_reference;
        if !(l_ref.is_finite() && l_ref > 0.0 && d_ref > 0) {
            return Err(PluginError::invalid(
                "rome hparams: `mom2_update_weight_reference` must be [positive λ, positive width]",
            ));
        }
        if hp.mom2_adjustment && hp.mom2_dataset.is_empty() {
            return Err(PluginError::invalid(
                "rome hparams: `mom2_adjustment` needs `mom2_dataset` (a text file or directory)",
            ));
        }
        Ok(hp)
    }

    /// MEMIT's λ for a rewritten weight with `d_in` inputs (the MLP width).
    pub fn update_weight(&self, d_in: usize) -> f64 {
        self.mom2_update_weight.unwrap_or_else(|| {
            let (l_ref, d_ref) = self.mom2_update_weight_reference;
            l_ref * d_in as f64 / d_ref as f64
        })
    }
}

/// Defaults for every family: EasyEdit's `ROME/llama-7b.yaml` (METHODS.md §3.6).
pub const DEFAULT_HPARAMS: &str = r#"{
  "layers": [5],
  "fact_token": "subject_last",
  "v_num_grad_steps": 25,
  "v_lr": 0.5,
  "v_weight_decay": 1e-3,
  "clamp_norm_factor": 4.0,
  "kl_factor": 0.0625,
  "v_loss_layer": null,
  "mom2_adjustment": false,
  "mom2_dataset": "../shared/data/corpus",
  "mom2_n_samples": 100000,
  "stats_cache": true,
  "stats_batch_tokens": 4096,
  "stats_max_len": 0,
  "context_template_length_params": [[5, 10], [10, 10]],
  "context_templates": null,
  "seed": 42,
  "v_stop_loss": 0.05,
  "rewrite_site": "layer.{}.mlp.down",
  "key_site": "layer.{}.mlp_key",
  "value_site": "layer.{}.mlp_out"
}"#;

/// MEMIT defaults for every family: EasyEdit's `MEMIT/llama-7b.yaml` (METHODS.md §3.7).
pub const MEMIT_DEFAULT_HPARAMS: &str = r#"{
  "layers": [4, 5, 6, 7, 8],
  "fact_token": "subject_last",
  "v_num_grad_steps": 25,
  "v_lr": 0.5,
  "v_weight_decay": 1e-3,
  "clamp_norm_factor": 4.0,
  "kl_factor": 0.0625,
  "v_loss_layer": null,
  "mom2_adjustment": true,
  "mom2_update_weight": null,
  "mom2_update_weight_reference": [15000.0, 11008],
  "mom2_dataset": "../shared/data/corpus",
  "mom2_n_samples": 100000,
  "stats_cache": true,
  "stats_batch_tokens": 4096,
  "stats_max_len": 0,
  "context_template_length_params": [[10, 5]],
  "context_templates": null,
  "seed": 42,
  "v_stop_loss": 0.05,
  "rewrite_site": "layer.{}.mlp.down",
  "key_site": "layer.{}.mlp_key",
  "value_site": "layer.{}.resid_post"
}"#;

/// AlphaEdit defaults: MEMIT's, with EasyEdit's `AlphaEdit/llama3-8b.yaml` changes (METHODS.md
/// §3.8): `v_lr` 0.1, `L2` 1, null-space threshold 2e-2.
pub fn alphaedit_default_hparams() -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(MEMIT_DEFAULT_HPARAMS).expect("MEMIT defaults parse");
    v["v_lr"] = 0.1.into();
    v["L2"] = 1.0.into();
    v["nullspace_threshold"] = 2e-2.into();
    serde_json::to_string_pretty(&v).expect("JSON value serialises")
}

/// Per-family AlphaEdit overrides: MEMIT's layers and loss settings; GPT-2 (XL) with `L2` 10.
pub const ALPHAEDIT_FAMILY_DEFAULTS: &[(&str, &str)] = &[
    (
        "gpt2",
        r#"{"layers": [13, 14, 15, 16, 17], "v_num_grad_steps": 20, "v_weight_decay": 0.5, "clamp_norm_factor": 0.75, "v_loss_layer": 47, "L2": 10.0}"#,
    ),
    ("llama", r#"{"layers": [4, 5, 6, 7, 8]}"#),
    ("qwen", r#"{"layers": [4, 5, 6, 7, 8]}"#),
    ("qwen2", r#"{"layers": [4, 5, 6, 7, 8]}"#),
    ("qwen3", r#"{"layers": [4, 5, 6, 7, 8]}"#),
    ("chatglm", r#"{"layers": [13, 14, 15, 16, 17]}"#),
    ("glm", r#"{"layers": [13, 14, 15, 16, 17]}"#),
    ("baichuan", r#"{"layers": [4, 5, 6, 7, 8]}"#),
];

/// Per-family MEMIT overrides (EasyEdit's per-model MEMIT files).
pub const MEMIT_FAMILY_DEFAULTS: &[(&str, &str)] = &[
    (
        "gpt2",
        r#"{"layers": [13, 14, 15, 16, 17], "v_num_grad_steps": 20, "v_weight_decay": 0.5, "clamp_norm_factor": 0.75, "mom2_update_weight_reference": [20000.0, 6400], "v_loss_layer": 47}"#,
    ),
    ("llama", r#"{"layers": [4, 5, 6, 7, 8]}"#),
    ("qwen", r#"{"layers": [4, 5, 6, 7, 8]}"#),
    ("qwen2", r#"{"layers": [4, 5, 6, 7, 8]}"#),
    ("qwen3", r#"{"layers": [4, 5, 6, 7, 8]}"#),
    ("chatglm", r#"{"layers": [13, 14, 15, 16, 17]}"#),
    ("glm", r#"{"layers": [13, 14, 15, 16, 17]}"#),
    ("baichuan", r#"{"layers": [4, 5, 6, 7, 8]}"#),
];

/// Per-family overrides, following EasyEdit's per-model ROME files.
pub const FAMILY_DEFAULTS: &[(&str, &str)] = &[
    // gpt2-xl.yaml: layer 17 (of 48), 20 steps, wd 0.5, loss layer 47.
    (
        "gpt2",
        r#"{"layers": [17], "v_num_grad_steps": 20, "v_weight_decay": 0.5, "v_loss_layer": 47}"#,
    ),
    (
        "llama",
        r#"{"layers": [5], "v_num_grad_steps": 25, "v_weight_decay": 1e-3}"#,
    ),
    // qwen-7b.yaml (Qwen 1): wd 0.5, 20 steps, loss layer 31.
    (
        "qwen",
        r#"{"layers": [5], "v_num_grad_steps": 20, "v_weight_decay": 0.5, "v_loss_layer": 31}"#,
    ),
    // qwen2/2.5-7b: as LLaMA with loss layer 27.
    (
        "qwen2",
        r#"{"layers": [5], "v_num_grad_steps": 25, "v_weight_decay": 1e-3, "v_loss_layer": 27}"#,
    ),
    (
        "qwen3",
        r#"{"layers": [5], "v_num_grad_steps": 25, "v_weight_decay": 1e-3}"#,
    ),
    // chatglm2-6b.yaml: wd 0.5, 20 steps, loss layer 27.
    (
        "chatglm",
        r#"{"layers": [5], "v_num_grad_steps": 20, "v_weight_decay": 0.5, "v_loss_layer": 27}"#,
    ),
    (
        "glm",
        r#"{"layers": [5], "v_num_grad_steps": 20, "v_weight_decay": 0.5, "v_loss_layer": 27}"#,
    ),
    (
        "baichuan",
        r#"{"layers": [5], "v_num_grad_steps": 25, "v_weight_decay": 1e-3}"#,
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family's overrides name only default keys, and the merged hparams parse.
    fn check_family_defaults(method: &str, base: &serde_json::Value, families: &[(&str, &str)]) {
        for (family, json) in families {
            let mut merged = base.clone();
            let over: serde_json::Value = serde_json::from_str(json).unwrap();
            for (k, v) in over.as_object().unwrap() {
                assert!(
                    merged.get(k).is_some(),
                    "{method} {family}: {k} is not a default key"
                );
                merged[k] = v.clone();
            }
            RomeHparams::from_json(&merged.to_string()).unwrap();
        }
    }

    #[test]
    fn memit_lambda_scales_with_the_mlp_width_unless_given() {
        let hp = RomeHparams::from_json(MEMIT_DEFAULT_HPARAMS).unwrap();
        assert_eq!(hp.mom2_update_weight, None);
        // LLaMA-7B's own width gives back EasyEdit's λ; SmolLM2's 1536 gives 2093.
        assert_eq!(hp.update_weight(11008), 15000.0);
        assert!((hp.update_weight(1536) - 2093.02).abs() < 0.01);
        let mut v: serde_json::Value = serde_json::from_str(MEMIT_DEFAULT_HPARAMS).unwrap();
        let gpt2: serde_json::Value = serde_json::from_str(MEMIT_FAMILY_DEFAULTS[0].1).unwrap();
        v["mom2_update_weight_reference"] = gpt2["mom2_update_weight_reference"].clone();
        let g = RomeHparams::from_json(&v.to_string()).unwrap();
        assert_eq!(g.update_weight(6400), 20000.0, "gpt2-xl's own width");
        assert_eq!(g.update_weight(3072), 9600.0, "GPT-2 small");
        v["mom2_update_weight"] = 15000.0.into();
        let given = RomeHparams::from_json(&v.to_string()).unwrap();
        assert_eq!(
            given.update_weight(1536),
            15000.0,
            "a given λ is used as given"
        );
        for bad in [
            serde_json::json!({"mom2_update_weight": 0.0}),
            serde_json::json!({"mom2_update_weight_reference": [15000.0, 0]}),
            serde_json::json!({"mom2_update_weight_reference": [-1.0, 11008]}),
        ] {
            let mut b: serde_json::Value = serde_json::from_str(MEMIT_DEFAULT_HPARAMS).unwrap();
            for (k, x) in bad.as_object().unwrap() {
                b[k] = x.clone();
            }
            assert!(RomeHparams::from_json(&b.to_string()).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_parse_for_every_family_and_unknown_keys_are_rejected() {
        let base: serde_json::Value = serde_json::from_str(DEFAULT_HPARAMS).unwrap();
        RomeHparams::from_json(DEFAULT_HPARAMS).unwrap();
        check_family_defaults("rome", &base, FAMILY_DEFAULTS);
        let mbase: serde_json::Value = serde_json::from_str(MEMIT_DEFAULT_HPARAMS).unwrap();
        check_family_defaults("memit", &mbase, MEMIT_FAMILY_DEFAULTS);
        let abase: serde_json::Value = serde_json::from_str(&alphaedit_default_hparams()).unwrap();
        let a = RomeHparams::from_json(&abase.to_string()).unwrap();
        assert_eq!((a.l2, a.nullspace_threshold, a.v_lr), (1.0, 2e-2, 0.1));
        check_family_defaults("alphaedit", &abase, ALPHAEDIT_FAMILY_DEFAULTS);
        let mut bad = base.clone();
        bad["v_lr_typo"] = 1.0.into();
        let e = RomeHparams::from_json(&bad.to_string()).unwrap_err();
        assert!(e.message.contains("v_lr_typo"), "{e}");
    }
}

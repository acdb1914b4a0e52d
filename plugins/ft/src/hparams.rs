//! FT-L hyper-parameters, named as in EasyEdit's `FTHyperParams` wherever the meaning is the same.

use kedit_plugin_api::PluginError;
use serde::Deserialize;

/// How the loss scores the target.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// EasyEdit's default FT-L: every target token is scored at the last prompt position.
    PromptLast,
    /// Teacher forcing: target token j is scored after the prompt and target tokens < j (FT-M).
    TargetNew,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FtHparams {
    /// Layers whose weight is tuned.
    pub layers: Vec<usize>,
    /// Canonical weight site template, `{}` standing for the layer.
    #[serde(default = "default_rewrite_site")]
    pub rewrite_site: String,
    pub num_steps: usize,
    pub lr: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Elementwise clamp of the tuned weight to `[W₀ − c, W₀ + c]`; `false`/absent disables it.
    #[serde(default, deserialize_with = "float_or_false")]
    pub norm_constraint: Option<f64>,
    pub objective_optimization: Objective,
    /// Steps stop (and no update is taken) once the loss falls below this.
    #[serde(default = "default_stop_loss")]
    pub stop_loss: f64,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

fn default_rewrite_site() -> String {
    "layer.{}.mlp.down".into()
}

fn default_stop_loss() -> f64 {
    1e-2
}

fn default_batch_size() -> usize {
    1
}

fn float_or_false<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum FloatOrBool {
        F(f64),
        B(bool),
    }
    match Option::<FloatOrBool>::deserialize(d)? {
        None | Some(FloatOrBool::B(false)) => Ok(None),
        Some(FloatOrBool::F(v)) => Ok(Some(v)),
        Some(FloatOrBool::B(true)) => Err(serde::de::Error::custom(
            "norm_constraint: give the clamp radius as a number, or false",
        )),
    }
}

impl FtHparams {
    pub fn from_json(json: &str) -> Result<Self, PluginError> {
        let hp: Self = serde_json::from_str(json)
            .map_err(|e| PluginError::invalid(format!("ft hparams: {e}")))?;
        if hp.layers.is_empty() {
            return Err(PluginError::invalid("ft hparams: `layers` is empty"));
        }
        if hp.batch_size == 0 {
            return Err(PluginError::invalid("ft hparams: `batch_size` must be ≥ 1"));
        }
        if hp.lr.is_nan() || hp.lr <= 0.0 {
            return Err(PluginError::invalid("ft hparams: `lr` must be positive"));
        }
        if !hp.rewrite_site.contains("{}") {
            return Err(PluginError::invalid(format!(
                "ft hparams: `rewrite_site` '{}' has no {{}} for the layer",
                hp.rewrite_site
            )));
        }
        Ok(hp)
    }
}

/// Defaults for every family: EasyEdit's `FT/llama-7b.yaml` (Adam, lr 5e-4, no weight decay,
/// no norm constraint, prompt_last).
pub const DEFAULT_HPARAMS: &str = r#"{
  "layers": [21],
  "rewrite_site": "layer.{}.mlp.down",
  "num_steps": 25,
  "lr": 5e-4,
  "weight_decay": 0.0,
  "norm_constraint": false,
  "objective_optimization": "prompt_last",
  "stop_loss": 0.01,
  "batch_size": 1
}"#;

/// Per-family overrides, following EasyEdit's per-model FT files.
pub const FAMILY_DEFAULTS: &[(&str, &str)] = &[
    ("gpt2", r#"{"layers": [0], "norm_constraint": 5e-4}"#),
    ("llama", r#"{"layers": [21]}"#),
    ("qwen2", r#"{"layers": [21]}"#),
    ("chatglm", r#"{"layers": [21]}"#),
    ("baichuan", r#"{"layers": [21]}"#),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_unknown_keys_are_rejected() {
        let hp = FtHparams::from_json(DEFAULT_HPARAMS).unwrap();
        assert_eq!(hp.objective_optimization, Objective::PromptLast);
        assert_eq!(hp.norm_constraint, None);
        let e = FtHparams::from_json(r#"{"layers":[1],"num_steps":1,"lr":1.0,"objective_optimization":"prompt_last","lr_typo":3}"#)
            .unwrap_err();
        assert!(e.message.contains("lr_typo"), "{e}");
        let hp = FtHparams::from_json(r#"{"layers":[1],"num_steps":1,"lr":1.0,"objective_optimization":"target_new","norm_constraint":0.5}"#).unwrap();
        assert_eq!(hp.norm_constraint, Some(0.5));
    }
}

//! WISE hyper-parameters, named as in EasyEdit's `WISEHyperParams` wherever the meaning is the
//! same (`act_margin` is EasyEdit's YAML spelling of `alpha`, `beta`, `gamma`).

use kedit_plugin_api::PluginError;
use serde::Deserialize;

use crate::merge::MergeAlg;
use crate::score::ActFn;

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// EasyEdit's default: the prompt tokens (as counted in the padded prompt batch) carry no label.
    OnlyLabel,
    /// Every non-pad token is a label.
    All,
}

/// Which score of an edit's last iteration sets the routing threshold `ε` (`act_ratio · ε`).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdFrom {
    /// EasyEdit's `save_editing_activation`: the mean over the templated training rows, every
    /// position included (left pads and generated prefixes).
    TrainingRows,
    /// The real tokens of the `{}` row, i.e. the edit's own `prompt target` text: the input the
    /// router scores at inference, without pads or template prefixes (docs/wise.md, "The routing threshold").
    EditInput,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WiseHparams {
    /// The layer whose linear map gets the side memory (EasyEdit `inner_params`).
    pub layer: usize,
    /// Canonical weight site template, `{}` standing for the layer.
    pub inner_site: String,
    /// The model's activation function, applied to both outputs before the routing distance
    /// (EasyEdit `hidden_act` / `activation_function`).
    pub act_fn: ActFn,
    pub mask_ratio: f64,
    pub edit_lr: f64,
    /// SGD weight decay (EasyEdit hard-codes 1e-5).
    pub weight_decay: f64,
    pub n_iter: usize,
    /// Elementwise clamp of the side memory to `[W − c, W + c]`; `false` disables it.
    #[serde(deserialize_with = "float_or_false")]
    pub norm_constraint: Option<f64>,
    /// `[α, β, γ]`: irrelevant inputs below α, edits above β, with margin γ.
    pub act_margin: [f64; 3],
    pub act_ratio: f64,
    /// What `ε` is the minimum of (default `training_rows`, EasyEdit's).
    #[serde(default = "training_rows")]
    pub threshold_from: ThresholdFrom,
    pub save_freq: u64,
    pub merge_freq: u64,
    pub merge_alg: MergeAlg,
    pub densities: f64,
    pub weights: f64,
    pub objective_optimization: Objective,
    /// Top-1 activation retrieval among saved side memories (true) or one merged memory (false).
    pub retrieve: bool,
    /// EasyEdit's memory replay (App. B.3); not implemented, so only `false` is accepted.
    pub replay: bool,
    pub use_chat_template: bool,
    /// Context templates (each with one `{}`); absent: EasyEdit's 10 generated prefixes + `{}`.
    #[serde(default)]
    pub context_templates: Option<Vec<String>>,
    /// Seed of the shard masks and of DARE's random drops.
    pub seed: u64,
    /// A file of irrelevant inputs for the routing loss (EasyEdit's `loc_prompts`; edit i uses
    /// entry i mod n): a JSON array of strings or of ZsRE records (`loc` + `loc_ans`), or text
    /// with one per line. Absent: each request's own locality prompt (which Loc then scores).
    #[serde(default)]
    pub irrelevant_prompts: Option<String>,
}

fn training_rows() -> ThresholdFrom {
    ThresholdFrom::TrainingRows
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

impl WiseHparams {
    pub fn from_json(json: &str) -> Result<Self, PluginError> {
        let hp: Self = serde_json::from_str(json)
            .map_err(|e| PluginError::invalid(format!("wise hparams: {e}")))?;
        let bad = |m: String| Err(PluginError::invalid(format!("wise hparams: {m}")));
        if !hp.inner_site.contains("{}") {
            return bad(format!(
                "`inner_site` '{}' has no {{}} for the layer",
                hp.inner_site
            ));
        }
        if !(0.0..=1.0).contains(&hp.mask_ratio) {
            return bad(format!("`mask_ratio` {} is not in [0, 1]", hp.mask_ratio));
        }
        if !(hp.edit_lr.is_finite() && hp.edit_lr > 0.0) {
            return bad(format!("`edit_lr` {} must be positive", hp.edit_lr));
        }
        if hp.n_iter == 0 {
            return bad("`n_iter` must be ≥ 1".into());
        }
        if hp.save_freq == 0
            || hp.merge_freq == 0
            || hp.merge_freq.checked_rem(hp.save_freq) != Some(0)
        {
            return bad(format!(
                "`merge_freq` ({}) must be a positive multiple of `save_freq` ({})",
                hp.merge_freq, hp.save_freq
            ));
        }
        if hp.densities.is_nan() || hp.densities <= 0.0 {
            return bad(format!("`densities` {} must be positive", hp.densities));
        }
        if hp.replay {
            return Err(PluginError::unsupported(
                "wise hparams: `replay: true` (EasyEdit's memory replay) is not implemented",
            ));
        }
        if let Some(t) = &hp.context_templates {
            if t.is_empty() {
                return bad("`context_templates` is empty".into());
            }
            if let Some(bad_t) = t.iter().find(|t| !t.contains("{}")) {
                return bad(format!("context template '{bad_t}' has no {{}}"));
            }
            if hp.threshold_from == ThresholdFrom::EditInput && !t.iter().any(|t| t == "{}") {
                return bad(
                    "`threshold_from = \"edit_input\"` scores the bare `{}` row, and \
                     `context_templates` has none"
                        .into(),
                );
            }
        }
        Ok(hp)
    }

    pub fn site(&self) -> String {
        kedit_plugin_api::site::layer_site(&self.inner_site, self.layer)
    }
}

/// Defaults for every family: EasyEdit's `WISE/llama-7b.yaml`.
pub const DEFAULT_HPARAMS: &str = r#"{
  "layer": 27,
  "inner_site": "layer.{}.mlp.down",
  "act_fn": "silu",
  "mask_ratio": 0.2,
  "edit_lr": 1.0,
  "weight_decay": 1e-5,
  "n_iter": 70,
  "norm_constraint": 1.0,
  "act_margin": [5.0, 20.0, 10.0],
  "act_ratio": 0.88,
  "threshold_from": "training_rows",
  "save_freq": 500,
  "merge_freq": 1000,
  "merge_alg": "ties",
  "densities": 0.53,
  "weights": 1.0,
  "objective_optimization": "only_label",
  "retrieve": true,
  "replay": false,
  "use_chat_template": false,
  "context_templates": null,
  "seed": 0,
  "irrelevant_prompts": null
}"#;

/// Per-family overrides, following EasyEdit's WISE files: GPT-2 edits `c_fc` (the up
/// projection, whose output the MLP's gelu_new reads), Qwen2.5 uses layer 23 and the chat
/// template; families without a WISE file keep the LLaMA values.
pub const FAMILY_DEFAULTS: &[(&str, &str)] = &[
    (
        "gpt2",
        r#"{"layer": 8, "inner_site": "layer.{}.mlp.up", "act_fn": "gelu_new", "n_iter": 40, "act_ratio": 0.8}"#,
    ),
    ("llama", r#"{"layer": 27}"#),
    ("qwen2", r#"{"layer": 23, "use_chat_template": true}"#),
    ("chatglm", r#"{"layer": 27}"#),
    ("baichuan", r#"{"layer": 27}"#),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(over: &str) -> String {
        let mut base: serde_json::Value = serde_json::from_str(DEFAULT_HPARAMS).unwrap();
        let over: serde_json::Value = serde_json::from_str(over).unwrap();
        for (k, v) in over.as_object().unwrap() {
            base[k] = v.clone();
        }
        base.to_string()
    }

    #[test]
    fn defaults_and_family_overrides_parse() {
        let hp = WiseHparams::from_json(DEFAULT_HPARAMS).unwrap();
        assert_eq!(hp.site(), "layer.27.mlp.down");
        assert_eq!(hp.merge_alg, MergeAlg::Ties);
        for (family, json) in FAMILY_DEFAULTS {
            WiseHparams::from_json(&merged(json)).unwrap_or_else(|e| panic!("{family}: {e}"));
        }
        let gpt2 = WiseHparams::from_json(&merged(FAMILY_DEFAULTS[0].1)).unwrap();
        assert_eq!(gpt2.site(), "layer.8.mlp.up");
        assert_eq!(gpt2.act_fn, ActFn::GeluNew);
    }

    #[test]
    fn bad_values_are_named() {
        let e = WiseHparams::from_json(&merged(r#"{"n_itr": 3}"#)).unwrap_err();
        assert!(e.message.contains("n_itr"), "{e}");
        let e = WiseHparams::from_json(&merged(r#"{"merge_freq": 700}"#)).unwrap_err();
        assert!(e.message.contains("merge_freq"), "{e}");
        let e = WiseHparams::from_json(&merged(r#"{"merge_alg": "avg"}"#)).unwrap_err();
        assert!(e.message.contains("avg"), "{e}");
        let e = WiseHparams::from_json(&merged(r#"{"replay": true}"#)).unwrap_err();
        assert!(e.message.contains("replay"), "{e}");
        let hp = WiseHparams::from_json(&merged(r#"{"norm_constraint": false}"#)).unwrap();
        assert_eq!(hp.norm_constraint, None);
    }
}

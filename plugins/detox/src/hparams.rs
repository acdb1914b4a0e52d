//! DINM hyper-parameters, named as in EasyEdit's `DINMHyperParams` wherever the meaning is the
//! same (METHODS.md §5). `kl_gradient` and `chat_template` are kedit's own.

use kedit_plugin_api::PluginError;
use serde::Deserialize;

/// EasyEdit's suffix system prompt S, appended to the adversarial prompt while editing.
pub const SUFFIX_SYSTEM_PROMPT: &str =
    "If the user's request is reasonable, give the correct answer. Please give the right response:";

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DinmHparams {
    /// Blocks to edit. Empty (EasyEdit's yaml default): each case locates its own toxic layer.
    #[serde(default)]
    pub layers: Vec<usize>,
    /// Canonical weight site template of the tuned W^V, `{}` standing for the layer.
    #[serde(default = "default_rewrite_site")]
    pub rewrite_site: String,
    pub num_steps: usize,
    /// Adam's learning rate, used as given. `null` (the default): derived from `lr_reference`
    /// and the tuned weight's input width (`DinmHparams::learning_rate`).
    #[serde(default)]
    pub lr: Option<f64>,
    /// `[lr_ref, d_ref]`: the learning rate EasyEdit set for a model whose tuned weight (the MLP
    /// output projection) has `d_ref` inputs. Adam moves every element by about `lr` per step,
    /// in the direction of `sign(δ_i x_j)` early on, so one step changes the layer's output at a
    /// trained position by about `lr·‖x‖₁`, a sum over the `d` inputs: the same step on width `d`
    /// needs `lr = lr_ref · d_ref / d` (docs/dinm.md, "Learning rate across widths").
    #[serde(default = "default_lr_reference")]
    pub lr_reference: (f64, usize),
    #[serde(default)]
    pub weight_decay: f64,
    /// Weight of the edit NLL L_e in `kl_factor·L_e + L_c`. EasyEdit's name: despite it, this
    /// factor multiplies the *edit* loss, never the KL constraint.
    pub kl_factor: f64,
    /// Elementwise clamp of the tuned weight to `[W₀ − c, W₀ + c]`; `false`/absent disables it.
    #[serde(default, deserialize_with = "float_or_false")]
    pub norm_constraint: Option<f64>,
    #[serde(default = "default_suffix")]
    pub suffix_system_prompt: String,
    /// A step is taken only while the total loss is at least this (EasyEdit: 1e-4).
    #[serde(default = "default_stop_loss")]
    pub stop_loss: f64,
    /// Whether the general-knowledge constraint L_c contributes to the gradient. EasyEdit
    /// computes the post-edit constraint logits under `no_grad`, so L_c only enters the stopping
    /// test; `false` reproduces that, `true` (kedit's default) trains on the whole loss.
    #[serde(default = "yes")]
    pub kl_gradient: bool,
    /// Render edit and constraint prompts with the model's chat template where it has one.
    /// EasyEdit feeds plain text (`false`).
    #[serde(default = "yes")]
    pub chat_template: bool,
    /// Generation limits of the SafeEdit evaluation (EasyEdit's `max_length`,
    /// `max_output_length`); editing itself does not truncate.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    #[serde(default = "default_max_output_length")]
    pub max_output_length: usize,
}

fn default_rewrite_site() -> String {
    "layer.{}.mlp.down".into()
}

fn default_suffix() -> String {
    SUFFIX_SYSTEM_PROMPT.into()
}

fn default_lr_reference() -> (f64, usize) {
    (5e-4, 11008)
}

fn default_stop_loss() -> f64 {
    1e-4
}

fn yes() -> bool {
    true
}

fn default_max_length() -> usize {
    2048
}

fn default_max_output_length() -> usize {
    600
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

impl DinmHparams {
    pub fn from_json(json: &str) -> Result<Self, PluginError> {
        let hp: Self = serde_json::from_str(json)
            .map_err(|e| PluginError::invalid(format!("dinm hparams: {e}")))?;
        if let Some(lr) = hp.lr {
            if !(lr.is_finite() && lr > 0.0) {
                return Err(PluginError::invalid(
                    "dinm hparams: `lr` must be a positive number (or null to derive it)",
                ));
            }
        }
        let (lr_ref, d_ref) = hp.lr_reference;
        if !(lr_ref.is_finite() && lr_ref > 0.0 && d_ref > 0) {
            return Err(PluginError::invalid(
                "dinm hparams: `lr_reference` must be [positive learning rate, positive width]",
            ));
        }
        if hp.kl_factor.is_nan() || hp.kl_factor < 0.0 {
            return Err(PluginError::invalid(
                "dinm hparams: `kl_factor` (the weight of the edit NLL) must be ≥ 0",
            ));
        }
        if !hp.rewrite_site.contains("{}") {
            return Err(PluginError::invalid(format!(
                "dinm hparams: `rewrite_site` '{}' has no {{}} for the layer",
                hp.rewrite_site
            )));
        }
        Ok(hp)
    }

    /// Adam's learning rate for a tuned weight with `d_in` inputs (the MLP width).
    pub fn learning_rate(&self, d_in: usize) -> f64 {
        self.lr.unwrap_or_else(|| {
            let (lr_ref, d_ref) = self.lr_reference;
            lr_ref * d_ref as f64 / d_in as f64
        })
    }
}

/// Defaults for every family: EasyEdit's `DINM/llama-7b.yaml` (layers located, 10 Adam steps,
/// no weight decay, 0.1 on the edit NLL, no norm constraint), its learning rate 5e-4 as the
/// reference for LLaMA-7B's MLP width 11008, plus kedit's two switches.
pub const DEFAULT_HPARAMS: &str = r#"{
  "layers": [],
  "rewrite_site": "layer.{}.mlp.down",
  "num_steps": 10,
  "lr": null,
  "lr_reference": [5e-4, 11008],
  "weight_decay": 0.0,
  "kl_factor": 0.1,
  "norm_constraint": false,
  "suffix_system_prompt": "If the user's request is reasonable, give the correct answer. Please give the right response:",
  "stop_loss": 1e-4,
  "kl_gradient": true,
  "chat_template": true,
  "max_length": 2048,
  "max_output_length": 600
}"#;

/// Per-family overrides. EasyEdit ships DINM yamls for gpt2-xl, llama-7b and mistral-7b only;
/// Qwen, GLM and Baichuan have LLaMA-style `down_proj` MLPs and take the llama-7b values.
pub const FAMILY_DEFAULTS: &[(&str, &str)] = &[
    // gpt2-xl.yaml: the same optimiser (5e-4, set for GPT-2 XL's width 6400), shorter generation
    // limits (c_proj's bias is not a weight site, so only its weight is tuned).
    (
        "gpt2",
        r#"{"lr_reference": [5e-4, 6400], "max_length": 1024, "max_output_length": 300}"#,
    ),
    ("llama", r#"{}"#),
    ("qwen", r#"{}"#),
    ("qwen2", r#"{}"#),
    ("qwen3", r#"{}"#),
    ("chatglm", r#"{}"#),
    ("glm", r#"{}"#),
    ("baichuan", r#"{}"#),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults with one family's overrides applied, each of which must name a default key.
    fn family_hparams(family: &str, json: &str) -> serde_json::Value {
        let mut merged: serde_json::Value = serde_json::from_str(DEFAULT_HPARAMS).unwrap();
        let over: serde_json::Value = serde_json::from_str(json).unwrap();
        for (k, v) in over.as_object().unwrap() {
            assert!(
                merged.get(k).is_some(),
                "{family}: {k} is not a default key"
            );
            merged[k] = v.clone();
        }
        merged
    }

    #[test]
    fn defaults_and_every_family_override_parse() {
        let hp = DinmHparams::from_json(DEFAULT_HPARAMS).unwrap();
        assert!(hp.layers.is_empty() && hp.kl_gradient && hp.norm_constraint.is_none());
        assert_eq!(hp.suffix_system_prompt, SUFFIX_SYSTEM_PROMPT);
        for (family, json) in FAMILY_DEFAULTS {
            DinmHparams::from_json(&family_hparams(family, json).to_string()).unwrap();
        }
    }

    #[test]
    fn learning_rate_is_derived_from_the_width_unless_given() {
        let hp = DinmHparams::from_json(DEFAULT_HPARAMS).unwrap();
        assert_eq!(hp.lr, None);
        // LLaMA-7B's width gives EasyEdit's 5e-4 back; SmolLM2's 1536 a step of equal reach.
        assert_eq!(hp.learning_rate(11008), 5e-4);
        let smol = hp.learning_rate(1536);
        assert!((smol - 3.5833e-3).abs() < 1e-7, "{smol}");
        assert_eq!(smol, 5e-4 * 11008.0 / 1536.0);
        // GPT-2 takes gpt2-xl.yaml's 5e-4 at its width 6400.
        let (family, gpt2) = FAMILY_DEFAULTS.iter().find(|(f, _)| *f == "gpt2").unwrap();
        let mut v = family_hparams(family, gpt2);
        let hp = DinmHparams::from_json(&v.to_string()).unwrap();
        assert_eq!(hp.learning_rate(6400), 5e-4);
        assert_eq!(hp.learning_rate(3200), 1e-3);
        // A number is used as given, whatever the width.
        v["lr"] = 5e-4.into();
        let hp = DinmHparams::from_json(&v.to_string()).unwrap();
        assert_eq!(hp.learning_rate(1536), 5e-4);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        let e = DinmHparams::from_json(
            r#"{"num_steps":1,"lr":1e-3,"kl_factor":0.1,"kl_gradiant":false}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("kl_gradiant"), "{e}");
        let e = DinmHparams::from_json(r#"{"num_steps":1,"lr":0,"kl_factor":0.1}"#).unwrap_err();
        assert!(e.message.contains("lr"), "{e}");
        for bad in [r#"[0.0, 11008]"#, r#"[5e-4, 0]"#, r#"[-1.0, 11008]"#] {
            let json = format!(r#"{{"num_steps":1,"kl_factor":0.1,"lr_reference":{bad}}}"#);
            let e = DinmHparams::from_json(&json).unwrap_err();
            assert!(e.message.contains("lr_reference"), "{bad}: {e}");
        }
        let hp = DinmHparams::from_json(
            r#"{"num_steps":1,"lr":1e-3,"kl_factor":0.1,"kl_gradient":false,"norm_constraint":0.5}"#,
        )
        .unwrap();
        assert!(!hp.kl_gradient && hp.chat_template);
        assert_eq!(hp.norm_constraint, Some(0.5));
    }
}

//! Hyper-parameters reach an editor as one JSON object, built in layers (later wins):
//!
//! 1. the method's defaults from the editor's manifest (`MethodInfo::default_hparams_json`),
//! 2. the manifest's defaults for the model's family (`MethodInfo::family_defaults`),
//! 3. the config file's `[hparams]`,
//! 4. `--hparams FILE.toml`.
//!
//! Objects merge key by key (recursively); anything else is replaced whole. A user-given key the
//! editor's defaults never mention is an error — a misspelt hyper-parameter must not silently
//! fall back to its default.

use std::collections::BTreeSet;

use anyhow::{bail, Context, Result};
use kedit_plugin_api::MethodInfo;
use serde_json::{Map, Value};

/// User-given hparams and where they came from (for error messages).
#[derive(Clone, Debug)]
pub struct HparamsLayer {
    pub origin: String,
    pub values: toml::Table,
}

/// The merged hparams of `method` for a model of `family`.
pub fn merge_hparams(method: &MethodInfo, family: &str, user: &[HparamsLayer]) -> Result<Value> {
    let what = format!("method {}", method.name);
    let mut merged = parse_object(&method.default_hparams_json, &format!("defaults of {what}"))?;
    let mut known: BTreeSet<String> = merged
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .collect();
    for per_family in method.family_defaults.iter() {
        let layer = parse_object(
            &per_family.hparams_json,
            &format!("{} defaults of {what}", per_family.family),
        )?;
        known.extend(
            layer
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, _)| k.clone()),
        );
        if per_family.family.as_str().eq_ignore_ascii_case(family) {
            deep_merge(&mut merged, layer);
        }
    }
    for layer in user {
        // An editor that declares no defaults at all takes whatever it is given.
        if !known.is_empty() {
            if let Some(unknown) = layer.values.keys().find(|k| !known.contains(*k)) {
                bail!(
                    "unknown hparam `{unknown}` in {} for {what}; known hparams: {}",
                    layer.origin,
                    known.iter().cloned().collect::<Vec<_>>().join(", ")
                );
            }
        }
        deep_merge(
            &mut merged,
            toml_to_json(toml::Value::Table(layer.values.clone())),
        );
    }
    Ok(merged)
}

fn parse_object(json: &str, what: &str) -> Result<Value> {
    if json.trim().is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    let value: Value = serde_json::from_str(json)
        .with_context(|| format!("the editor's {what} are not valid JSON"))?;
    if !value.is_object() {
        bail!("the editor's {what} are not a JSON object");
    }
    Ok(value)
}

/// Merges `over` into `base`: objects key by key, everything else replaced.
pub fn deep_merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(base), Value::Object(over)) => {
            for (key, value) in over {
                match base.get_mut(&key) {
                    Some(existing) => deep_merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, over) => *base = over,
    }
}

/// TOML to JSON; datetimes become their TOML text.
pub fn toml_to_json(value: toml::Value) -> Value {
    match value {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(items.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(table) => Value::Object(
            table
                .into_iter()
                .map(|(k, v)| (k, toml_to_json(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kedit_plugin_api::FamilyDefaults;
    use serde_json::json;

    fn method() -> MethodInfo {
        MethodInfo {
            name: "ft".into(),
            description: "".into(),
            default_hparams_json:
                r#"{"lr": 0.5, "steps": 25, "layers": [5], "norm": {"clamp": 4, "kind": "l2"}}"#
                    .into(),
            family_defaults: vec![
                FamilyDefaults {
                    family: "llama".into(),
                    hparams_json: r#"{"layers": [3], "norm": {"clamp": 2}}"#.into(),
                },
                FamilyDefaults {
                    family: "gpt2".into(),
                    hparams_json: r#"{"layers": [17], "gpt2_only": true}"#.into(),
                },
            ]
            .into(),
        }
    }

    fn layer(origin: &str, toml_text: &str) -> HparamsLayer {
        HparamsLayer {
            origin: origin.into(),
            values: toml::from_str(toml_text).unwrap(),
        }
    }

    #[test]
    fn layers_apply_in_order_defaults_family_config_file() {
        let merged = merge_hparams(
            &method(),
            "llama",
            &[
                layer("[hparams] of kedit.toml", "steps = 10\nlr = 0.1\n"),
                layer("--hparams h.toml", "lr = 0.2\n[norm]\nkind = \"max\"\n"),
            ],
        )
        .unwrap();
        assert_eq!(
            merged,
            json!({"lr": 0.2, "steps": 10, "layers": [3], "norm": {"clamp": 2, "kind": "max"}})
        );
    }

    #[test]
    fn other_families_defaults_do_not_apply_but_their_keys_are_known() {
        let merged =
            merge_hparams(&method(), "qwen2", &[layer("x", "gpt2_only = false\n")]).unwrap();
        assert_eq!(merged["layers"], json!([5]));
        assert_eq!(merged["gpt2_only"], json!(false));
    }

    #[test]
    fn an_unknown_user_hparam_is_an_error_naming_it_and_the_known_ones() {
        let e = merge_hparams(
            &method(),
            "llama",
            &[layer("[hparams] of kedit.toml", "lrr = 1\n")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("unknown hparam `lrr` in [hparams] of kedit.toml for method ft"),
            "{e}"
        );
        assert!(e.contains("gpt2_only, layers, lr, norm, steps"), "{e}");
    }

    #[test]
    fn broken_defaults_are_reported_as_the_editors_fault() {
        let mut m = method();
        m.default_hparams_json = "{oops".into();
        let e = merge_hparams(&m, "llama", &[]).unwrap_err().to_string();
        assert!(
            e.contains("defaults of method ft are not valid JSON"),
            "{e}"
        );
    }
}

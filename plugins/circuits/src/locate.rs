//! The analyses behind the plugin's `locate`: one knowledge circuit per request (`circuit`) and
//! the logit lens of a prompt (`lens`). Settings arrive as the hparams JSON (defaults:
//! [`CIRCUIT_DEFAULT_HPARAMS`], [`LENS_DEFAULT_HPARAMS`]); the answer is a JSON report that the
//! host renders (docs/circuits.md lists its fields).

use kedit_plugin_api::{EditRequest, ModelClient, PluginError};
use serde::{Deserialize, Serialize};

use kedit_circuits::circuit::{
    check_edges, compare, faithfulness_curve, find_circuit, Circuit, CircuitDiff, CircuitSettings,
    CurvePoint, EdgeCheck,
};
use kedit_circuits::eap::PromptPair;
use kedit_circuits::lens::{logit_lens, LensRow};
use kedit_circuits::probe::Probe;
use kedit_circuits::prompts::{answer_token, build_pair, PairOutcome, TextFact};

pub const CIRCUIT_DEFAULT_HPARAMS: &str = r#"{"top_n": 3000, "ig_steps": 20, "role_threshold": 0.5, "role_min_effect": 0.03, "check_edges": 0, "curve": [], "include_wrong": false, "swaps": []}"#;
pub const LENS_DEFAULT_HPARAMS: &str = r#"{"top": 5}"#;

/// Settings of `circuit`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitHparams {
    pub top_n: usize,
    pub ig_steps: usize,
    pub role_threshold: f64,
    pub role_min_effect: f64,
    /// Patch each of the circuit's K strongest edges alone and report the measured change.
    pub check_edges: usize,
    /// Circuit sizes (top-n before pruning) whose faithfulness is also measured.
    pub curve: Vec<usize>,
    /// Also analyse facts whose clean top token is not the answer.
    pub include_wrong: bool,
    /// Subjects to corrupt the prompt with, tried in order (the other facts of a data set).
    pub swaps: Vec<String>,
    /// Reuse this pair instead of building one, with the request's `target_new` as the answer:
    /// the same prompts analysed again after an edit.
    pub pair: Option<PromptPair>,
    /// A circuit to compare the new one with (the report gains `diff`).
    pub compare_to: Option<Circuit>,
}

impl Default for CircuitHparams {
    fn default() -> Self {
        let s = CircuitSettings::default();
        Self {
            top_n: s.top_n,
            ig_steps: s.ig_steps,
            role_threshold: s.role_threshold,
            role_min_effect: s.role_min_effect,
            check_edges: 0,
            curve: Vec::new(),
            include_wrong: false,
            swaps: Vec::new(),
            pair: None,
            compare_to: None,
        }
    }
}

impl CircuitHparams {
    pub fn from_json(json: &str) -> Result<Self, PluginError> {
        let text = if json.trim().is_empty() { "{}" } else { json };
        serde_json::from_str(text)
            .map_err(|e| PluginError::invalid(format!("circuit hparams: {e}")))
    }

    pub fn settings(&self) -> CircuitSettings {
        CircuitSettings {
            top_n: self.top_n,
            ig_steps: self.ig_steps,
            role_threshold: self.role_threshold,
            role_min_effect: self.role_min_effect,
        }
    }
}

/// What `circuit` found for one request.
#[derive(Debug, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum CircuitReport {
    Found(Box<FoundCircuit>),
    /// Not analysed: the model's top token is not the answer (without `include_wrong`).
    Wrong {
        reason: String,
    },
    /// Not analysed: no swap of the same token length changes the prediction.
    NoSwap {
        reason: String,
    },
}

#[derive(Debug, Serialize)]
pub struct FoundCircuit {
    pub circuit: Circuit,
    pub pair: PromptPair,
    pub answer: String,
    /// The pieces of the pair as text.
    pub answer_token: Vec<String>,
    pub foil_token: Vec<String>,
    pub tokens: Vec<String>,
    pub subject_range: [usize; 2],
    /// Set when the pair was built here (not handed in).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt_prompt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt_subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correct: Option<bool>,
    pub edge_checks: Vec<EdgeCheck>,
    pub faithfulness_curve: Vec<CurvePoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<CircuitDiff>,
}

/// The answer a circuit is found for: the true answer when the record has one.
fn fact_of(r: &EditRequest) -> Result<TextFact, PluginError> {
    let answer = r
        .ground_truth
        .as_ref()
        .into_option()
        .map(|s| s.to_string())
        .unwrap_or_else(|| r.target_new.to_string());
    if r.subject.is_empty() || answer.trim().is_empty() {
        return Err(PluginError::invalid(format!(
            "record {}: a circuit needs a subject and an answer",
            r.id
        )));
    }
    Ok(TextFact {
        prompt: r.prompt.to_string(),
        subject: r.subject.to_string(),
        answer,
    })
}

fn tokens_of(client: &ModelClient<'_>, ids: &[u32]) -> Vec<String> {
    ids.iter()
        .map(|&t| {
            client
                .detokenize(&[t], false)
                .unwrap_or_else(|_| format!("<{t}>"))
        })
        .collect()
}

/// The circuit of one request.
pub fn circuit_of(
    client: &ModelClient<'_>,
    request: &EditRequest,
    hp: &CircuitHparams,
) -> Result<CircuitReport, PluginError> {
    let (pair, answer, built) = match &hp.pair {
        Some(given) => {
            let target = request.target_new.to_string();
            let mut pair = given.clone();
            pair.answer = answer_token(client, &given.clean, &request.prompt, &target)?;
            // The old answer is the natural foil once the edit moved the top token away.
            if pair.foil == pair.answer {
                pair.foil = given.answer;
            }
            (pair, target, None)
        }
        None => {
            let fact = fact_of(request)?;
            match build_pair(client, &fact, &hp.swaps, !hp.include_wrong)? {
                PairOutcome::Built(built) => (built.pair.clone(), fact.answer, Some(built)),
                PairOutcome::Wrong => {
                    return Ok(CircuitReport::Wrong {
                        reason: "the model's top token is not the answer".into(),
                    })
                }
                PairOutcome::NoSwap => {
                    return Ok(CircuitReport::NoSwap {
                        reason: "no subject of the same token length that changes the prediction"
                            .into(),
                    })
                }
            }
        }
    };
    let probe = Probe::new(client)?;
    let settings = hp.settings();
    let circuit = find_circuit(&probe, &pair, &settings)?;
    let k = hp.check_edges.min(circuit.edges.len());
    let edge_checks = check_edges(&probe, &pair, &circuit.edges[..k])?;
    let faithfulness_curve = if hp.curve.is_empty() {
        Vec::new()
    } else {
        faithfulness_curve(&probe, &pair, &hp.curve, settings.ig_steps)?
    };
    let diff = hp
        .compare_to
        .as_ref()
        .map(|before| compare(before, &circuit));
    Ok(CircuitReport::Found(Box::new(FoundCircuit {
        answer,
        answer_token: tokens_of(client, &[pair.answer]),
        foil_token: tokens_of(client, &[pair.foil]),
        tokens: tokens_of(client, &pair.clean),
        subject_range: [pair.subject.start, pair.subject.end],
        corrupt_prompt: built.as_ref().map(|b| b.corrupt_prompt.clone()),
        corrupt_subject: built.as_ref().map(|b| b.corrupt_subject.clone()),
        correct: built.as_ref().map(|b| b.correct),
        circuit,
        pair,
        edge_checks,
        faithfulness_curve,
        diff,
    })))
}

/// Settings of `lens`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LensHparams {
    /// Tokens kept per stream and position.
    pub top: usize,
}

impl Default for LensHparams {
    fn default() -> Self {
        Self { top: 5 }
    }
}

/// The logit lens of one prompt: its token ids and one row per stream.
#[derive(Debug, Serialize)]
pub struct LensReport {
    pub ids: Vec<u32>,
    pub streams: Vec<LensRow>,
}

pub fn lens_of(
    client: &ModelClient<'_>,
    request: &EditRequest,
    hparams_json: &str,
) -> Result<LensReport, PluginError> {
    let text = if hparams_json.trim().is_empty() {
        "{}"
    } else {
        hparams_json
    };
    let hp: LensHparams = serde_json::from_str(text)
        .map_err(|e| PluginError::invalid(format!("lens hparams: {e}")))?;
    if hp.top == 0 {
        return Err(PluginError::invalid("lens: top must be at least 1"));
    }
    let ids = client.tokenize(&request.prompt, true)?;
    let streams = logit_lens(client, &ids, hp.top)?;
    Ok(LensReport { ids, streams })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_defaults_are_the_defaults() {
        let hp = CircuitHparams::from_json(CIRCUIT_DEFAULT_HPARAMS).unwrap();
        let d = CircuitHparams::default();
        assert_eq!(
            (hp.top_n, hp.ig_steps, hp.check_edges, hp.include_wrong),
            (d.top_n, d.ig_steps, d.check_edges, d.include_wrong)
        );
        assert_eq!(
            (hp.role_threshold, hp.role_min_effect),
            (d.role_threshold, d.role_min_effect)
        );
        assert!(hp.curve.is_empty() && hp.swaps.is_empty() && hp.pair.is_none());
        let lens: LensHparams = serde_json::from_str(LENS_DEFAULT_HPARAMS).unwrap();
        assert_eq!(lens.top, LensHparams::default().top);
    }

    #[test]
    fn unknown_settings_are_refused_by_name() {
        let err = CircuitHparams::from_json(r#"{"top": 5}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `top`"), "{err}");
        assert_eq!(CircuitHparams::from_json("").unwrap().top_n, 3000);
    }

    #[test]
    fn a_pair_round_trips_through_json() {
        let pair = PromptPair {
            clean: vec![1, 2, 3],
            corrupt: vec![1, 4, 3],
            subject: 1..2,
            answer: 7,
            foil: 8,
        };
        let json = serde_json::json!({ "pair": pair }).to_string();
        assert_eq!(CircuitHparams::from_json(&json).unwrap().pair, Some(pair));
    }
}

//! Requests written into the config file (`[[edit.requests]]`) or given as flags.

use abi_stable::std_types::{ROption, RString};
use anyhow::{bail, Result};
use kedit_plugin_api::{EditRequest, PromptAnswer};
use serde_json::json;

use crate::config::InlineRequest;

/// A `[[edit.requests]]` entry (`index` counts from 0); `origin` names the config file.
pub fn inline_request(origin: &str, index: usize, r: &InlineRequest) -> Result<EditRequest> {
    let place = format!("{origin}: [[edit.requests]] #{}", index + 1);
    check_subject(&place, &r.subject, &r.prompt)?;
    let locality = r
        .locality_prompt
        .0
        .iter()
        .zip(&r.locality_ground_truth.0)
        .map(|(p, a)| PromptAnswer {
            prompt: p.as_str().into(),
            answer: a.as_str().into(),
            label: "neighborhood".into(),
        })
        .collect();
    let source = json!({
        "prompt": r.prompt,
        "subject": r.subject,
        "target_new": r.target_new,
        "ground_truth": r.ground_truth,
        "rephrase": r.rephrase.0,
        "locality_prompt": r.locality_prompt.0,
        "locality_ground_truth": r.locality_ground_truth.0,
    });
    Ok(EditRequest {
        id: format!("inline-{}", index + 1).into(),
        prompt: r.prompt.as_str().into(),
        subject: r.subject.as_str().into(),
        target_new: r.target_new.as_str().into(),
        ground_truth: r.ground_truth.clone().map(RString::from).into(),
        rephrase: r
            .rephrase
            .0
            .iter()
            .map(|s| RString::from(s.as_str()))
            .collect(),
        locality,
        source_json: source.to_string().into(),
        ..Default::default()
    })
}

/// The request of `--prompt/--subject/--target [--ground-truth]`.
pub fn flag_request(
    prompt: &str,
    subject: Option<&str>,
    target: &str,
    ground_truth: Option<&str>,
) -> Result<EditRequest> {
    let subject = subject.unwrap_or("");
    check_subject("--subject", subject, prompt)?;
    let source = json!({
        "prompt": prompt, "subject": subject, "target_new": target, "ground_truth": ground_truth,
    });
    Ok(EditRequest {
        id: "cli".into(),
        prompt: prompt.into(),
        subject: subject.into(),
        target_new: target.into(),
        ground_truth: match ground_truth {
            Some(g) => ROption::RSome(g.into()),
            None => ROption::RNone,
        },
        source_json: source.to_string().into(),
        ..Default::default()
    })
}

fn check_subject(place: &str, subject: &str, prompt: &str) -> Result<()> {
    if !subject.is_empty() && !prompt.contains(subject) {
        bail!("{place}: subject {subject:?} does not occur in the prompt {prompt:?}");
    }
    Ok(())
}

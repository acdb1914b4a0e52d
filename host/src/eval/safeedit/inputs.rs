//! The five inputs of a SafeEdit record (METHODS.md §5.5) — the adversarial prompt and the four
//! generalisation inputs — checked, rendered as the model reads them, and answered greedily in
//! one left-padded batch.

use anyhow::{bail, Result};
use kedit_plugin_api::{EditRequest, GenerateRequest, PromptAnswer};

use crate::data::GENERALIZATION_INPUTS;
use crate::model::ModelHandle;

/// Names of the five inputs, in the paper's order; each is the metric's suffix (`DS` for the
/// adversarial prompt, `DG_onlyQ` … for the others).
pub const INPUT_NAMES: [&str; 5] = ["adversarial", "onlyQ", "otherA", "otherQ", "otherAQ"];

/// The metric each input is scored into.
pub const METRIC_NAMES: [&str; 5] = ["DS", "DG_onlyQ", "DG_otherA", "DG_otherQ", "DG_otherAQ"];

/// One record's inputs.
#[derive(Clone, Debug)]
pub struct CaseInputs {
    /// `(input index into INPUT_NAMES, the dataset's text)`; the generalisation inputs are
    /// absent for a record that has no `generalization test` at all.
    pub inputs: Vec<(usize, String)>,
    pub knowledge: Option<PromptAnswer>,
}

/// Checks a record and collects its inputs. `where_` names the file and record for errors.
pub fn case_inputs(where_: &str, request: &EditRequest) -> Result<CaseInputs> {
    let Some(safety) = request.safety.as_ref().into_option() else {
        bail!("{where_}: not a SafeEdit record (no safety fields); read the data with --format safeedit");
    };
    if request.prompt.trim().is_empty() {
        bail!("{where_}: field `adversarial prompt` is empty");
    }
    let mut inputs = vec![(0, request.prompt.to_string())];
    let given = &safety.generalization;
    if !given.is_empty() {
        for (k, label) in GENERALIZATION_INPUTS.iter().enumerate() {
            match given.iter().find(|g| g.label.as_str() == *label) {
                Some(g) if !g.prompt.trim().is_empty() => {
                    inputs.push((k + 1, g.prompt.to_string()))
                }
                Some(_) => bail!("{where_}: field `generalization test`.`{label}` is empty"),
                None => bail!(
                    "{where_}: field `generalization test`.`{label}` is missing (a record gives \
                     all four generalisation inputs or none)"
                ),
            }
        }
    }
    Ok(CaseInputs {
        inputs,
        knowledge: safety.knowledge_constrain.clone().into_option(),
    })
}

/// How an input is turned into tokens.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Rendering {
    /// Rendered as a user turn with the model's chat template.
    pub templated: bool,
    /// Appended to the input after a space (DINM's suffix system prompt, post-edit only).
    pub suffix: Option<String>,
    /// Longest prompt in tokens; longer ones lose their start (as EasyEdit truncates).
    pub max_prompt_tokens: usize,
}

/// An input as token ids, and how many tokens were cut from its start.
pub fn render(model: &ModelHandle, text: &str, how: &Rendering) -> Result<(Vec<u32>, usize)> {
    let user = match &how.suffix {
        Some(s) => format!("{text} {s}"),
        None => text.to_string(),
    };
    let mut ids = if how.templated {
        model.tokenize(&model.chat_prompt(&user)?, false)?
    } else {
        model.tokenize(&user, true)?
    };
    let cut = ids.len().saturating_sub(how.max_prompt_tokens.max(1));
    ids.drain(..cut);
    Ok((ids, cut))
}

/// The knowledge-constrain text: prompt (rendered like the inputs, without a suffix) and the
/// answer's tokens after it.
pub fn knowledge_ids(
    model: &ModelHandle,
    pair: &PromptAnswer,
    templated: bool,
) -> Result<(Vec<u32>, Vec<u32>)> {
    if templated {
        let prompt = model.tokenize(&model.chat_prompt(&pair.prompt)?, false)?;
        Ok((prompt, model.tokenize(&pair.answer, false)?))
    } else {
        let prompt = model.tokenize(&pair.prompt, true)?;
        Ok((prompt, model.tokenize(&format!(" {}", pair.answer), false)?))
    }
}

/// Greedy responses to `prompts`, as one left-padded batch, stopping at EOS; the text without
/// special tokens, trimmed.
pub fn respond(
    model: &ModelHandle,
    prompts: Vec<Vec<u32>>,
    max_new_tokens: usize,
) -> Result<Vec<String>> {
    let n = prompts.len();
    let mut request = GenerateRequest::greedy(prompts, max_new_tokens);
    request.stop_ids = model.facts().eos_ids.clone();
    let rows = model.generate(&request)?;
    if rows.len() != n {
        bail!("the model answered {} of {n} prompts", rows.len());
    }
    rows.iter()
        .map(|ids| Ok(model.detokenize(ids, true)?.trim().to_string()))
        .collect()
}

//! Clean/corrupted prompt pairs from text facts: the subject's token span, the answer's first
//! token, and a corruption that swaps the subject for another fact's subject of the same token
//! length (every other token unchanged, so positions line up) after which the model's top token
//! is no longer the answer.

use std::ops::Range;

use kedit_plugin_api::{Batch, ForwardRequest, LogitsWanted, ModelClient, Padding, PluginError};

use crate::eap::PromptPair;

/// A fact as text.
#[derive(Clone, Debug)]
pub struct TextFact {
    pub prompt: String,
    pub subject: String,
    /// The object, without a leading space (known_1000's `attribute`).
    pub answer: String,
}

/// A pair built from a fact, with what it was built from.
#[derive(Clone, Debug)]
pub struct BuiltPair {
    pub pair: PromptPair,
    pub corrupt_prompt: String,
    pub corrupt_subject: String,
    /// Whether the model's top token on the clean prompt is the answer's first token.
    pub correct: bool,
}

/// Token ids of `prompt` and the span of `subject` (its first occurrence) in them.
pub fn subject_span(
    client: &ModelClient<'_>,
    prompt: &str,
    subject: &str,
) -> Result<(Vec<u32>, Range<usize>), PluginError> {
    let start = prompt.find(subject).ok_or_else(|| {
        PluginError::invalid(format!("subject '{subject}' does not occur in '{prompt}'"))
    })?;
    let ids = client.tokenize(prompt, true)?;
    let before = client.tokenize(&prompt[..start], true)?.len();
    let upto = client
        .tokenize(&prompt[..start + subject.len()], true)?
        .len();
    if upto <= before || upto > ids.len() {
        return Err(PluginError::invalid(format!(
            "subject '{subject}' has no tokens of its own in '{prompt}'"
        )));
    }
    Ok((ids, before..upto))
}

/// The first token the answer adds after the prompt (`prompt + " " + answer`).
pub fn answer_token(
    client: &ModelClient<'_>,
    prompt_ids: &[u32],
    prompt: &str,
    answer: &str,
) -> Result<u32, PluginError> {
    let full = client.tokenize(&format!("{prompt} {}", answer.trim_start()), true)?;
    if full.len() > prompt_ids.len() && full[..prompt_ids.len()] == *prompt_ids {
        return Ok(full[prompt_ids.len()]);
    }
    client
        .tokenize(&format!(" {}", answer.trim_start()), false)?
        .first()
        .copied()
        .ok_or_else(|| PluginError::invalid(format!("answer '{answer}' has no tokens")))
}

fn last_logits(client: &ModelClient<'_>, ids: &[u32]) -> Result<Vec<f32>, PluginError> {
    let out = client.forward(&ForwardRequest::new(
        Batch::new(vec![ids.to_vec()], Padding::Right),
        LogitsWanted::Last,
    ))?;
    Ok(out
        .logits
        .into_option()
        .ok_or_else(|| PluginError::internal("the forward pass returned no logits"))?
        .into_vec())
}

fn argmax_except(row: &[f32], skip: u32) -> u32 {
    let mut best = if skip == 0 { 1 } else { 0 };
    for (i, &v) in row.iter().enumerate() {
        if i as u32 != skip && v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// What [`build_pair`] found.
#[derive(Clone, Debug)]
pub enum PairOutcome {
    Built(BuiltPair),
    /// The model's top token on the clean prompt is not the answer (and `only_correct`).
    Wrong,
    /// No swap fits.
    NoSwap,
}

/// Builds the pair of `fact`, corrupting it with the first of `swaps` (other subjects) that
/// has the same token length in the prompt, leaves every other token as it was, and makes the
/// model's top token something other than the answer, which becomes the foil. With
/// `only_correct`, a fact the model does not answer is not paired.
pub fn build_pair(
    client: &ModelClient<'_>,
    fact: &TextFact,
    swaps: &[String],
    only_correct: bool,
) -> Result<PairOutcome, PluginError> {
    let (clean, span) = subject_span(client, &fact.prompt, &fact.subject)?;
    let answer = answer_token(client, &clean, &fact.prompt, &fact.answer)?;
    let clean_logits = last_logits(client, &clean)?;
    let correct = argmax_except(&clean_logits, u32::MAX) == answer;
    if only_correct && !correct {
        return Ok(PairOutcome::Wrong);
    }
    for other in swaps {
        if other == &fact.subject || other.is_empty() {
            continue;
        }
        let corrupt_prompt = fact.prompt.replacen(&fact.subject, other, 1);
        let Ok((corrupt, other_span)) = subject_span(client, &corrupt_prompt, other) else {
            continue;
        };
        let lines_up = other_span == span
            && corrupt.len() == clean.len()
            && corrupt[..span.start] == clean[..span.start]
            && corrupt[span.end..] == clean[span.end..];
        if !lines_up {
            continue;
        }
        // A swap after which the model still gives the answer corrupts nothing.
        let corrupt_logits = last_logits(client, &corrupt)?;
        if argmax_except(&corrupt_logits, u32::MAX) == answer {
            continue;
        }
        let foil = argmax_except(&corrupt_logits, answer);
        return Ok(PairOutcome::Built(BuiltPair {
            pair: PromptPair {
                clean,
                corrupt,
                subject: span,
                answer,
                foil,
            },
            corrupt_prompt,
            corrupt_subject: other.clone(),
            correct,
        }));
    }
    Ok(PairOutcome::NoSwap)
}

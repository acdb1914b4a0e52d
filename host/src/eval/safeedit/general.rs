//! "General ability kept" (issue #7, point 5): perplexity on a held-out slice of a text corpus,
//! and the KL divergence of the knowledge-constrain answers from the pre-edit model.
//!
//! The held-out slice is the corpus's **last** lines: ROME's key statistics read its first
//! documents, so the end of the file is text no editor has seen.

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use kedit_plugin_api::{Batch, ForwardRequest, LogitsWanted, Padding};
use serde::{Deserialize, Serialize};

use crate::model::ModelHandle;

/// Upper bound on the logits of one forward pass (rows × positions × vocabulary floats).
const MAX_LOGITS_PER_PASS: usize = 16 << 20;

/// The held-out documents, tokenized (a report read back has the description only).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeldOut {
    pub file: String,
    /// How many lines the file has, and which were taken (the last `docs.len()` non-empty ones).
    pub lines_in_file: usize,
    pub max_tokens: usize,
    pub tokens: usize,
    #[serde(skip, default)]
    pub docs: Vec<Vec<u32>>,
}

impl HeldOut {
    pub fn load(model: &ModelHandle, file: &Path, docs: usize, max_tokens: usize) -> Result<Self> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the perplexity corpus {}", file.display()))?;
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            bail!("the perplexity corpus {} has no text", file.display());
        }
        let mut out = Vec::new();
        for line in lines.iter().rev().take(docs).rev() {
            let mut ids = model.tokenize(line, true)?;
            ids.truncate(max_tokens);
            if ids.len() >= 2 {
                out.push(ids);
            }
        }
        if out.is_empty() {
            bail!(
                "the perplexity corpus {}: its last {docs} lines have fewer than 2 tokens each",
                file.display()
            );
        }
        Ok(Self {
            file: file.display().to_string(),
            lines_in_file: text.lines().count(),
            max_tokens,
            tokens: out.iter().map(|d| d.len() - 1).sum(),
            docs: out,
        })
    }

    /// exp(mean NLL) over every predicted token of every document (pooled, as a corpus
    /// perplexity is).
    pub fn perplexity(&self, model: &ModelHandle) -> Result<f64> {
        let mut nll = 0.0;
        let mut count = 0usize;
        for_each_pass(model, &self.docs, |row, logits| {
            for (j, &token) in row[1..].iter().enumerate() {
                nll -= log_softmax_at(logits.at(j), token);
                count += 1;
            }
        })?;
        Ok((nll / count.max(1) as f64).exp())
    }
}

/// One row's logits in a pass.
struct RowLogits<'a> {
    data: &'a [f32],
    /// Where the row's first real position starts in `data`.
    base: usize,
    vocab: usize,
}

impl RowLogits<'_> {
    /// The logits at real position `j` of the row.
    fn at(&self, j: usize) -> &[f32] {
        let start = self.base + j * self.vocab;
        &self.data[start..start + self.vocab]
    }
}

/// Runs `rows` through the model (right-padded, several rows per pass) and calls `visit` with
/// each row and its logits.
fn for_each_pass(
    model: &ModelHandle,
    rows: &[Vec<u32>],
    mut visit: impl FnMut(&[u32], &RowLogits<'_>),
) -> Result<()> {
    let vocab = model.facts().vocab_size as usize;
    let longest = rows.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let per_pass = (MAX_LOGITS_PER_PASS / (longest * vocab)).max(1);
    for chunk in rows.chunks(per_pass) {
        let batch = Batch::new(chunk.to_vec(), Padding::Right);
        let output = model.forward(&ForwardRequest::new(batch.clone(), LogitsWanted::All))?;
        let Some(logits) = output.logits.into_option() else {
            bail!("the model returned no logits");
        };
        let seq = batch.padded_len();
        if logits.dims() != [chunk.len(), seq, vocab] {
            bail!(
                "logits have shape {:?}, expected [{}, {seq}, {vocab}]",
                logits.dims(),
                chunk.len()
            );
        }
        let data = logits.as_slice();
        for (b, row) in chunk.iter().enumerate() {
            let logits = RowLogits {
                data,
                base: (b * seq + batch.offset(b)) * vocab,
                vocab,
            };
            visit(row, &logits);
        }
    }
    Ok(())
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&v| (v as f64 - lse) as f32).collect()
}

fn log_softmax_at(logits: &[f32], token: u32) -> f64 {
    super::super::metrics::argmax_and_logprob(logits, token).1
}

/// The model's log-distributions at the positions that predict a knowledge answer.
pub struct AnswerDistributions {
    rows: Vec<Vec<f32>>,
}

/// `prompt_ids ⊕ answer_ids` through the model; the log-softmax at each position that predicts
/// an answer token.
pub fn answer_distributions(
    model: &ModelHandle,
    prompt_ids: &[u32],
    answer_ids: &[u32],
) -> Result<AnswerDistributions> {
    if prompt_ids.is_empty() || answer_ids.is_empty() {
        bail!("a knowledge-constrain text has an empty prompt or answer");
    }
    let row: Vec<u32> = prompt_ids.iter().chain(answer_ids).copied().collect();
    let start = prompt_ids.len() - 1;
    let mut rows = Vec::new();
    for_each_pass(model, std::slice::from_ref(&row), |_, logits| {
        rows = (start..start + answer_ids.len())
            .map(|j| log_softmax(logits.at(j)))
            .collect();
    })?;
    Ok(AnswerDistributions { rows })
}

/// Mean over answer positions of KL(P_pre ‖ P_post) = Σ_v p_pre (log p_pre − log p_post), nats.
pub fn mean_kl(pre: &AnswerDistributions, post: &AnswerDistributions) -> Result<f64> {
    if pre.rows.len() != post.rows.len() || pre.rows.is_empty() {
        bail!(
            "knowledge answers have {} positions before and {} after the edit",
            pre.rows.len(),
            post.rows.len()
        );
    }
    let total: f64 = pre
        .rows
        .iter()
        .zip(&post.rows)
        .map(|(p, q)| {
            p.iter()
                .zip(q)
                .map(|(&lp, &lq)| (lp as f64).exp() * (lp as f64 - lq as f64))
                .sum::<f64>()
        })
        .sum();
    Ok(total / pre.rows.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_against_itself_and_positive_otherwise() {
        let a = AnswerDistributions {
            rows: vec![log_softmax(&[1.0, 2.0, 3.0]), log_softmax(&[0.0, 0.0, 0.0])],
        };
        assert!(mean_kl(&a, &a).unwrap().abs() < 1e-9);
        let b = AnswerDistributions {
            rows: vec![log_softmax(&[3.0, 2.0, 1.0]), log_softmax(&[0.0, 0.0, 0.0])],
        };
        // Row 0: p = softmax(1,2,3), q its reverse; row 1 identical.
        let p: Vec<f64> = log_softmax(&[1.0, 2.0, 3.0])
            .iter()
            .map(|&v| v as f64)
            .collect();
        let q: Vec<f64> = log_softmax(&[3.0, 2.0, 1.0])
            .iter()
            .map(|&v| v as f64)
            .collect();
        let kl0: f64 = p.iter().zip(&q).map(|(lp, lq)| lp.exp() * (lp - lq)).sum();
        assert!((mean_kl(&a, &b).unwrap() - kl0 / 2.0).abs() < 1e-6);
        assert!(kl0 > 0.1);
    }
}

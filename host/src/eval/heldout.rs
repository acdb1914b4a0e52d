//! Perplexity on a held-out slice of a text corpus: whether a model still models ordinary text
//! after its edits (SafeEdit's general ability, issue #7; WISE's "no collapse" over many
//! sequential edits, issue #6).
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
pub(crate) struct RowLogits<'a> {
    data: &'a [f32],
    /// Where the row's first real position starts in `data`.
    base: usize,
    vocab: usize,
}

impl RowLogits<'_> {
    /// The logits at real position `j` of the row.
    pub(crate) fn at(&self, j: usize) -> &[f32] {
        let start = self.base + j * self.vocab;
        &self.data[start..start + self.vocab]
    }
}

/// Runs `rows` through the model (right-padded, several rows per pass) and calls `visit` with
/// each row and its logits.
pub(crate) fn for_each_pass(
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

fn log_softmax_at(logits: &[f32], token: u32) -> f64 {
    super::metrics::argmax_and_logprob(logits, token).1
}

//! "General ability kept" (issue #7, point 5): perplexity on a held-out slice of a text corpus
//! ([`crate::eval::heldout`]), and the KL divergence of the knowledge-constrain answers from the
//! pre-edit model.

use anyhow::{bail, Result};

use crate::eval::heldout::for_each_pass;
use crate::model::ModelHandle;

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

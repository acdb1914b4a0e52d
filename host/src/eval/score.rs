//! Scoring one request on the model as it is now: every teacher-forced row the request needs
//! (rewrite, rephrases, locality, portability, and ROME's new/true candidates) goes into one
//! left-padded forward pass, and the per-position argmax and log-probabilities are reduced by
//! [`super::metrics`].

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Result};
use kedit_plugin_api::{
    Batch, EditRequest, ForwardRequest, GenerateRequest, LogitsWanted, Padding, SamplingKind,
};
use serde::{Deserialize, Serialize};

use super::metrics::{self, RowScore};
use crate::model::ModelHandle;

/// Metric names in the order reports show them.
pub const METRIC_ORDER: &[&str] = &[
    "rewrite_acc",
    "rephrase_acc",
    "locality",
    "portability_acc",
    "ES",
    "EM",
    "PS",
    "PM",
    "NS",
    "NM",
    "S",
    "rewrite_ppl",
    "fluency",
];

/// What to compute, beyond the teacher-forced accuracies that are always computed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ScoreSettings {
    /// ROME's CounterFact ES/EM, PS/PM, NS/NM (needs `ground_truth`).
    pub counterfact: bool,
    /// n-gram entropy of a sampled generation from the rewrite prompt.
    pub fluency: bool,
    /// Total length (prompt included, as ROME's `generate_fast(max_out_len)`) of the generation.
    pub gen_length: usize,
    pub top_k: u32,
    pub seed: u64,
    /// Upper bound on the logits one forward pass may return (batch × seq × vocab floats); the
    /// rows of a record are split into several passes above it.
    pub max_logits: usize,
    /// Wrap the rewrite, rephrase and portability prompts (not the locality ones) in the
    /// model's chat template as one user turn before the answer, as EasyEdit's
    /// `test_prediction_acc` does when the method's hparams set `use_chat_template` — the form
    /// such a method trained its edits on. Left out of the baseline key when off, so baselines
    /// cached before the setting existed stay valid.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub chat_prompts: bool,
}

impl Default for ScoreSettings {
    fn default() -> Self {
        Self {
            counterfact: true,
            fluency: true,
            gen_length: 100,
            top_k: 5,
            seed: 0,
            max_logits: 64 << 20,
            chat_prompts: false,
        }
    }
}

/// One request's numbers on one model state.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RecordScore {
    /// Metric name → value (fractions; `fluency` in bits; `rewrite_ppl` a perplexity).
    pub metrics: BTreeMap<String, f64>,
    /// The model's teacher-forced argmax at the answer positions of each locality probe — the
    /// pre-edit ones are what post-edit locality is measured against.
    pub locality_argmax: Vec<Vec<u32>>,
    /// The generation scored for fluency (prompt included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<String>,
}

/// A row of token ids whose tokens from `answer_start` on are the answer.
#[derive(Clone, Debug)]
struct RowSpec {
    tokens: Vec<u32>,
    answer_start: usize,
}

/// EasyEdit's tokenisation: `tok(x + " " + y)`, the answer being everything after
/// `len(tok(x))` tokens.
fn easyedit_row(model: &ModelHandle, prompt: &str, answer: &str) -> Result<RowSpec> {
    let prompt_len = model.tokenize(prompt, true)?.len();
    let tokens = model.tokenize(&format!("{prompt} {answer}"), true)?;
    Ok(RowSpec {
        answer_start: prompt_len.min(tokens.len()),
        tokens,
    })
}

/// ROME's tokenisation: `tok(p) ⊕ tok(" " + o)`.
fn rome_row(model: &ModelHandle, prompt: &str, answer: &str) -> Result<RowSpec> {
    let mut tokens = model.tokenize(prompt, true)?;
    let answer_start = tokens.len();
    tokens.extend(model.tokenize(&format!(" {answer}"), false)?);
    Ok(RowSpec {
        tokens,
        answer_start,
    })
}

/// Runs the rows (deduplicated) through the model in as few left-padded passes as
/// `max_logits` allows and scores each one.
fn score_rows(model: &ModelHandle, specs: &[RowSpec], max_logits: usize) -> Result<Vec<RowScore>> {
    let vocab = model.facts().vocab_size as usize;
    let mut unique: Vec<&Vec<u32>> = Vec::new();
    let mut index_of: HashMap<&Vec<u32>, usize> = HashMap::new();
    for s in specs {
        if s.tokens.is_empty() {
            bail!("an evaluation row has no tokens");
        }
        index_of.entry(&s.tokens).or_insert_with(|| {
            unique.push(&s.tokens);
            unique.len() - 1
        });
    }
    // Per unique row: argmax and logits-derived log-softmax at every real position, computed
    // lazily per needed position; we keep the raw logits of the needed positions only.
    let mut per_row: Vec<Vec<Vec<f32>>> = vec![Vec::new(); unique.len()];
    let mut start = 0;
    while start < unique.len() {
        let mut end = start + 1;
        let mut longest = unique[start].len();
        while end < unique.len() {
            let l = longest.max(unique[end].len());
            if (end + 1 - start) * l * vocab > max_logits {
                break;
            }
            longest = l;
            end += 1;
        }
        let rows: Vec<Vec<u32>> = unique[start..end].iter().map(|r| (*r).clone()).collect();
        let batch = Batch::new(rows, Padding::Left);
        let request = ForwardRequest::new(batch.clone(), LogitsWanted::All);
        let output = model.forward(&request)?;
        let Some(logits) = output.logits.into_option() else {
            bail!("the model returned no logits for an evaluation pass");
        };
        let seq = batch.padded_len();
        let dims = logits.dims();
        if dims != [end - start, seq, vocab] {
            bail!(
                "evaluation logits have shape {dims:?}, expected [{}, {seq}, {vocab}]",
                end - start
            );
        }
        let data = logits.as_slice();
        for (b, u) in (start..end).enumerate() {
            let offset = batch.offset(b);
            per_row[u] = (0..unique[u].len())
                .map(|i| {
                    let at = (b * seq + offset + i) * vocab;
                    data[at..at + vocab].to_vec()
                })
                .collect();
        }
        start = end;
    }
    Ok(specs
        .iter()
        .map(|s| {
            let logits = &per_row[index_of[&s.tokens]];
            let mut score = RowScore::default();
            for j in s.answer_start.max(1)..s.tokens.len() {
                let (best, lp) = metrics::argmax_and_logprob(&logits[j - 1], s.tokens[j]);
                score.target.push(s.tokens[j]);
                score.argmax.push(best);
                score.logprobs.push(lp);
            }
            score
        })
        .collect())
}

/// Row groups of one request, in the order the specs are pushed.
struct Layout {
    rewrite: usize,
    rephrase: Vec<usize>,
    locality: Vec<usize>,
    portability: Vec<usize>,
    /// (new, true) row pairs for the rewrite prompt, the rephrases and the locality prompts.
    cf_rewrite: Option<(usize, usize)>,
    cf_rephrase: Vec<(usize, usize)>,
    cf_neighborhood: Vec<(usize, usize)>,
}

/// Scores `request` on the model as it is. `pre_locality` holds the pre-edit argmax of each
/// locality probe; without it (the pre-edit pass itself) locality is agreement with itself, 1.
pub fn score_request(
    model: &ModelHandle,
    request: &EditRequest,
    index: usize,
    settings: &ScoreSettings,
    pre_locality: Option<&[Vec<u32>]>,
) -> Result<RecordScore> {
    let mut specs = Vec::new();
    let mut push = |s: RowSpec| {
        specs.push(s);
        specs.len() - 1
    };
    let target = request.target_new.as_str();
    let in_scope = |prompt: &str| -> Result<String> {
        if settings.chat_prompts {
            model.chat_prompt(prompt)
        } else {
            Ok(prompt.to_string())
        }
    };
    let rewrite = push(easyedit_row(model, &in_scope(&request.prompt)?, target)?);
    let mut layout = Layout {
        rewrite,
        rephrase: Vec::new(),
        locality: Vec::new(),
        portability: Vec::new(),
        cf_rewrite: None,
        cf_rephrase: Vec::new(),
        cf_neighborhood: Vec::new(),
    };
    for p in request.rephrase.iter() {
        layout
            .rephrase
            .push(push(easyedit_row(model, &in_scope(p)?, target)?));
    }
    for l in request.locality.iter() {
        layout
            .locality
            .push(push(easyedit_row(model, &l.prompt, &l.answer)?));
    }
    for p in request.portability.iter() {
        layout
            .portability
            .push(push(easyedit_row(model, &in_scope(&p.prompt)?, &p.answer)?));
    }
    let truth = request.ground_truth.as_ref().into_option();
    if let (true, Some(truth)) = (settings.counterfact, truth) {
        let mut pair = |prompt: &str| -> Result<(usize, usize)> {
            Ok((
                push(rome_row(model, prompt, target)?),
                push(rome_row(model, prompt, truth)?),
            ))
        };
        layout.cf_rewrite = Some(pair(&request.prompt)?);
        for p in request.rephrase.iter() {
            layout.cf_rephrase.push(pair(p)?);
        }
        for l in request.locality.iter() {
            layout.cf_neighborhood.push(pair(&l.prompt)?);
        }
    }
    let rows = score_rows(model, &specs, settings.max_logits)?;
    let mut out = RecordScore::default();
    let mut put = |name: &str, value: Option<f64>| {
        if let Some(v) = value {
            out.metrics.insert(name.to_string(), v);
        }
    };
    let acc = |ids: &[usize]| metrics::mean(ids.iter().map(|&i| rows[i].accuracy()));
    put("rewrite_acc", Some(rows[layout.rewrite].accuracy()));
    put("rephrase_acc", acc(&layout.rephrase));
    put("portability_acc", acc(&layout.portability));
    put(
        "rewrite_ppl",
        Some(metrics::perplexity(&rows[layout.rewrite].logprobs)),
    );
    let locality_argmax: Vec<Vec<u32>> = layout
        .locality
        .iter()
        .map(|&i| rows[i].argmax.clone())
        .collect();
    let locality = match pre_locality {
        None => metrics::mean(locality_argmax.iter().map(|_| 1.0)),
        Some(pre) => {
            if pre.len() != locality_argmax.len() {
                bail!(
                    "request {}: the pre-edit baseline has {} locality probes, the request {}",
                    request.id,
                    pre.len(),
                    locality_argmax.len()
                );
            }
            metrics::mean(
                locality_argmax
                    .iter()
                    .zip(pre)
                    .map(|(post, pre)| metrics::agreement(post, pre)),
            )
        }
    };
    put("locality", locality);
    let pairs = |ps: &[(usize, usize)], f: fn(f64, f64) -> (f64, f64)| {
        let values: Vec<(f64, f64)> = ps
            .iter()
            .map(|&(n, t)| f(rows[n].mean_nll(), rows[t].mean_nll()))
            .collect();
        (
            metrics::mean(values.iter().map(|v| v.0)),
            metrics::mean(values.iter().map(|v| v.1)),
        )
    };
    if let Some(cf) = layout.cf_rewrite {
        let (es, em) = pairs(&[cf], metrics::efficacy_pair);
        put("ES", es);
        put("EM", em);
        let (ps, pm) = pairs(&layout.cf_rephrase, metrics::efficacy_pair);
        put("PS", ps);
        put("PM", pm);
        let (ns, nm) = pairs(&layout.cf_neighborhood, metrics::neighborhood_pair);
        put("NS", ns);
        put("NM", nm);
    }
    if settings.fluency {
        let text = sample_text(model, &request.prompt, index, settings)?;
        put("fluency", Some(metrics::generation_entropy(&text)));
        out.generation = Some(text);
    }
    out.locality_argmax = locality_argmax;
    Ok(out)
}

/// ROME's `generate_fast`: top-k sampling until the sequence (prompt included) is `gen_length`
/// tokens long (or EOS); the text includes the prompt. Seeded by the run's seed and the
/// request's index, so the pre- and post-edit generations of a request use the same draws.
pub fn sample_text(
    model: &ModelHandle,
    prompt: &str,
    index: usize,
    settings: &ScoreSettings,
) -> Result<String> {
    let ids = model.tokenize(prompt, true)?;
    let new = settings.gen_length.saturating_sub(ids.len()).max(1);
    let mut request = GenerateRequest::greedy(vec![ids.clone()], new);
    request.sampling = SamplingKind::TopK;
    request.top_k = settings.top_k;
    request.temperature = 1.0;
    request.seed = settings
        .seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(index as u64);
    request.stop_ids = model.facts().eos_ids.clone();
    let generated = model
        .generate(&request)?
        .into_iter()
        .next()
        .unwrap_or_default();
    let mut all = ids;
    all.extend(generated);
    model.detokenize(&all, true)
}

/// Means over records of every metric present, plus ROME's S = hmean(ES, PS, NS) of the means.
pub fn aggregate<'a>(scores: impl IntoIterator<Item = &'a RecordScore>) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for s in scores {
        for (k, v) in &s.metrics {
            if v.is_finite() {
                let e = sums.entry(k.clone()).or_default();
                e.0 += v;
                e.1 += 1;
            }
        }
    }
    let mut out: BTreeMap<String, f64> = sums
        .into_iter()
        .map(|(k, (s, n))| (k, s / n as f64))
        .collect();
    if let (Some(es), Some(ps), Some(ns)) = (out.get("ES"), out.get("PS"), out.get("NS")) {
        if let Some(s) = metrics::harmonic_mean(&[*es, *ps, *ns]) {
            out.insert("S".into(), s);
        }
    }
    out
}

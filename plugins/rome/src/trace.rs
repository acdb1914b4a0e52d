//! Causal tracing (ROME §2.1, Meng et al. 2022): which hidden states carry a fact.
//!
//! Three runs of the same prompt: clean; corrupted, with Gaussian noise on the subject's input
//! embeddings; and corrupted with one clean state restored. The restored run's probability of
//! the true answer, against the corrupted baseline, is the state's indirect effect. States are
//! the residual stream leaving each block (`layer.l.resid_post`) at each token, and the MLP and
//! attention outputs (`mlp_out`, `attn_out`), restored over a window of layers centred on l as
//! ROME does for those two kinds.
//!
//! Everything goes through canonical sites, so every family is traced the same way. Each
//! corrupted run is `samples` rows of one batch with noise seeds `seed + s`; the same noise is
//! used for every restoration, so that restoring nothing reproduces the baseline exactly.
//! Many restorations share one forward pass (rows = restorations × samples, up to a token
//! budget), and restorations at tokens before the subject are not run: the noise cannot reach
//! them through causal attention, so their clean state equals the corrupted one and the score
//! is the baseline by construction.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;
use std::time::Instant;

use kedit_plugin_api::{
    Batch, EditRequest, EmbeddingNoise, ErrorKind, ForwardRequest, Intervention, InterventionMode,
    LogitsWanted, ModelClient, Padding, PluginError, ProgressMut, Tensor,
};
use serde::{Deserialize, Serialize};

/// Which hidden states a grid restores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The residual stream leaving block l (ROME's "hidden state", no window).
    Resid,
    /// MLP outputs of the window of layers around l.
    Mlp,
    /// Attention outputs of the window of layers around l.
    Attn,
}

impl Kind {
    fn site(self, layer: usize) -> String {
        match self {
            Kind::Resid => format!("layer.{layer}.resid_post"),
            Kind::Mlp => format!("layer.{layer}.mlp_out"),
            Kind::Attn => format!("layer.{layer}.attn_out"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Resid => "resid",
            Kind::Mlp => "mlp",
            Kind::Attn => "attn",
        }
    }
}

/// Settings of a trace, as `locate` receives them (JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceHparams {
    /// Corrupted rows per run (ROME: 10).
    pub samples: usize,
    /// Noise standard deviation in multiples of the token-embedding std (ROME: 3).
    pub noise_factor: f32,
    /// An absolute noise standard deviation instead of `noise_factor × std`.
    pub noise_scale: Option<f32>,
    /// Layers restored together for `mlp` and `attn`, centred on the grid's layer (ROME: 10).
    pub window: usize,
    pub kinds: Vec<Kind>,
    /// Sample s of the corruption uses noise seed `seed + s`.
    pub seed: u64,
    /// Upper bound on rows × tokens of one forward pass.
    pub batch_tokens: usize,
    /// Stop after the clean run when its top token is not the answer (ROME's averages leave
    /// such facts out, so their restorations would be wasted); the trace then has no grids.
    pub only_correct: bool,
}

impl Default for TraceHparams {
    fn default() -> Self {
        Self {
            samples: 10,
            noise_factor: 3.0,
            noise_scale: None,
            window: 10,
            kinds: vec![Kind::Resid, Kind::Mlp, Kind::Attn],
            seed: 1,
            batch_tokens: 4096,
            only_correct: false,
        }
    }
}

impl TraceHparams {
    pub fn from_json(json: &str) -> Result<Self, PluginError> {
        let text = if json.trim().is_empty() { "{}" } else { json };
        let hp: Self = serde_json::from_str(text)
            .map_err(|e| PluginError::invalid(format!("causal tracing hparams: {e}")))?;
        if hp.samples == 0 {
            return Err(PluginError::invalid(
                "causal tracing hparams: samples must be at least 1",
            ));
        }
        if hp.window == 0 {
            return Err(PluginError::invalid(
                "causal tracing hparams: window must be at least 1",
            ));
        }
        if hp.kinds.is_empty() {
            return Err(PluginError::invalid(
                "causal tracing hparams: kinds is empty (use resid, mlp, attn)",
            ));
        }
        if !(hp.noise_factor.is_finite() && hp.noise_factor >= 0.0) {
            return Err(PluginError::invalid(format!(
                "causal tracing hparams: noise_factor {} must be finite and not negative",
                hp.noise_factor
            )));
        }
        if let Some(s) = hp.noise_scale {
            if !(s.is_finite() && s >= 0.0) {
                return Err(PluginError::invalid(format!(
                    "causal tracing hparams: noise_scale {s} must be finite and not negative"
                )));
            }
        }
        Ok(hp)
    }
}

/// The scores of one kind: `scores[token][layer]` is p(answer) with that state restored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KindGrid {
    pub kind: Kind,
    /// Layers restored together around each layer (1 for `resid`).
    pub window: usize,
    pub scores: Vec<Vec<f32>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TopToken {
    pub id: u32,
    pub token: String,
    pub prob: f32,
}

/// The result of tracing one request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Trace {
    pub id: String,
    pub prompt: String,
    pub subject: String,
    pub answer: String,
    pub token_ids: Vec<u32>,
    /// Each token decoded on its own (special tokens kept).
    pub tokens: Vec<String>,
    /// Token positions of the subject, `[start, end)`.
    pub subject_range: [usize; 2],
    pub answer_id: u32,
    pub answer_token: String,
    pub n_layers: usize,
    /// p(answer) of the clean run.
    pub clean_prob: f32,
    /// p(answer) of the corrupted run, averaged over the samples (`null` in the JSON when
    /// `only_correct` stopped after the clean run).
    pub corrupted_prob: f32,
    /// The clean run's most likely next token.
    pub clean_top: TopToken,
    /// Whether the clean run's most likely token is the answer's first token (ROME averages
    /// only such facts).
    pub correct_prediction: bool,
    /// Standard deviation of the token-embedding matrix, over every entry.
    pub embedding_std: f32,
    /// The noise standard deviation used.
    pub noise_scale: f32,
    pub grids: Vec<KindGrid>,
    pub settings: TraceHparams,
    pub forward_passes: usize,
    pub seconds: f64,
}

/// What `locate` returns for the tracing methods.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LocateReport {
    pub method: String,
    pub traces: Vec<Trace>,
}

/// Runs causal tracing for every request, with `hparams_json` as [`TraceHparams`].
pub fn locate(
    model: &ModelClient<'_>,
    method: &str,
    requests: &[EditRequest],
    hparams_json: &str,
    progress: &mut ProgressMut<'_>,
) -> Result<String, PluginError> {
    let hp = TraceHparams::from_json(hparams_json)?;
    let mut traces = Vec::with_capacity(requests.len());
    for r in requests {
        traces.push(trace_request(model, r, &hp, progress)?);
    }
    serde_json::to_string(&LocateReport {
        method: format!("{method}: causal tracing"),
        traces,
    })
    .map_err(|e| PluginError::internal(format!("causal tracing: cannot serialise the result: {e}")))
}

/// The answer a request is traced for: the true answer when the record has one.
fn answer_of(r: &EditRequest) -> &str {
    match r.ground_truth.as_ref().into_option() {
        Some(g) if !g.is_empty() => g.as_str(),
        _ => r.target_new.as_str(),
    }
}

/// Traces one request given as text: the prompt is tokenized with special tokens, the answer's
/// first token is the model's tokenization of `" " + answer` (unless it starts with a space).
pub fn trace_request(
    model: &ModelClient<'_>,
    r: &EditRequest,
    hp: &TraceHparams,
    progress: &mut ProgressMut<'_>,
) -> Result<Trace, PluginError> {
    let what = if r.id.is_empty() {
        format!("request '{}'", r.prompt)
    } else {
        format!("request '{}'", r.id)
    };
    let prompt = r.prompt.as_str();
    let subject = r.subject.as_str();
    if subject.is_empty() {
        return Err(PluginError::invalid(format!(
            "{what}: causal tracing needs a subject"
        )));
    }
    let Some(at) = prompt.find(subject) else {
        return Err(PluginError::invalid(format!(
            "{what}: the subject '{subject}' does not occur in the prompt '{prompt}'"
        )));
    };
    let answer = answer_of(r);
    if answer.trim().is_empty() {
        return Err(PluginError::invalid(format!(
            "{what}: no answer to trace (ground_truth and target_new are empty)"
        )));
    }
    let answer_text = if answer.starts_with(' ') {
        answer.to_string()
    } else {
        format!(" {answer}")
    };
    let answer_id = *model
        .tokenize(&answer_text, false)?
        .first()
        .ok_or_else(|| {
            PluginError::invalid(format!("{what}: the answer '{answer}' has no tokens"))
        })?;
    let ids = model.tokenize(prompt, true)?;
    let subject_range =
        subject_tokens(model, prompt, at, subject, &ids).map_err(|e| e.context(what.clone()))?;
    let mut t = trace_tokens(model, &ids, subject_range, answer_id, hp, progress)
        .map_err(|e| e.context(what.clone()))?;
    t.id = r.id.to_string();
    t.prompt = prompt.to_string();
    t.subject = subject.to_string();
    t.answer = answer.to_string();
    Ok(t)
}

/// The token positions of the subject, which starts at byte `at` of `prompt`. Tokens are
/// decoded one by one and matched on the text without whitespace (SentencePiece-style decoders
/// drop a token's leading space when it stands alone); when the pieces do not spell the prompt
/// (a multi-byte character split across tokens), the prefix is tokenized instead.
fn subject_tokens(
    model: &ModelClient<'_>,
    prompt: &str,
    at: usize,
    subject: &str,
    ids: &[u32],
) -> Result<Range<usize>, PluginError> {
    let squash = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    let mut pieces = Vec::with_capacity(ids.len());
    for &id in ids {
        pieces.push(squash(&model.detokenize(&[id], true)?));
    }
    if pieces.concat() == squash(prompt) {
        let start = squash(&prompt[..at]).chars().count();
        let end = start + squash(subject).chars().count();
        let mut pos = 0;
        let (mut first, mut last) = (None, None);
        for (i, p) in pieces.iter().enumerate() {
            let n = p.chars().count();
            if n > 0 && pos + n > start && pos < end {
                first.get_or_insert(i);
                last = Some(i);
            }
            pos += n;
        }
        if let (Some(a), Some(b)) = (first, last) {
            return Ok(a..b + 1);
        }
    }
    let before = model.tokenize(prompt[..at].trim_end(), true)?.len();
    let through = model.tokenize(&prompt[..at + subject.len()], true)?.len();
    let end = through.min(ids.len());
    let start = before.min(end.saturating_sub(1));
    if start >= end {
        return Err(PluginError::invalid(format!(
            "cannot find the subject '{subject}' among the prompt's tokens"
        )));
    }
    Ok(start..end)
}

/// Noise std per model source, so that tracing many facts reads the embedding matrix once.
static EMBED_STD: Mutex<Option<HashMap<String, f32>>> = Mutex::new(None);

/// The standard deviation of every entry of the token-embedding matrix. ROME measures it over
/// the subjects' embeddings of its known facts; the whole vocabulary needs no dataset and gives
/// the same order of magnitude (docs/tracing.md).
pub fn embedding_std(model: &ModelClient<'_>) -> Result<f32, PluginError> {
    let facts = model.facts()?;
    let key = format!("{}|{}", facts.source, model.journal_mark()?);
    if let Some(s) = EMBED_STD.lock().unwrap().as_ref().and_then(|m| m.get(&key)) {
        return Ok(*s);
    }
    let w = model.read_weight("embed.weight")?;
    let n = w.numel().max(1) as f64;
    let mean = w.as_slice().iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = w
        .as_slice()
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    let std = var.sqrt() as f32;
    EMBED_STD
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(key, std);
    Ok(std)
}

/// Layers restored together for the grid column `layer` (ROME's window, clipped to the model).
pub fn window_layers(kind: Kind, layer: usize, window: usize, n_layers: usize) -> Range<usize> {
    match kind {
        Kind::Resid => layer..layer + 1,
        Kind::Mlp | Kind::Attn => {
            let lo = layer.saturating_sub(window / 2);
            let hi = (layer + window.div_ceil(2)).min(n_layers);
            lo..hi
        }
    }
}

/// A token as text for labels; a checkpoint without a tokenizer gets `[id]`.
fn token_label(model: &ModelClient<'_>, id: u32) -> Result<String, PluginError> {
    match model.detokenize(&[id], false) {
        Ok(t) => Ok(t),
        Err(e) if e.kind == ErrorKind::NotFound => Ok(format!("[{id}]")),
        Err(e) => Err(e),
    }
}

fn softmax_prob(logits: &[f32], token: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    (((logits[token] - max) as f64).exp() / sum) as f32
}

/// One restoration: the states of `sites` (indices into the clean captures) at `position`.
struct Restore {
    kind: usize,
    token: usize,
    layer: usize,
    sites: Range<usize>,
}

/// Traces a tokenized prompt: `subject` is the corrupted token range, `answer_id` the token
/// whose probability is measured.
pub fn trace_tokens(
    model: &ModelClient<'_>,
    ids: &[u32],
    subject: Range<usize>,
    answer_id: u32,
    hp: &TraceHparams,
    progress: &mut ProgressMut<'_>,
) -> Result<Trace, PluginError> {
    let t0 = Instant::now();
    let facts = model.facts()?;
    let n_layers = facts.n_layers as usize;
    let n = ids.len();
    if n == 0 {
        return Err(PluginError::invalid(
            "causal tracing: the prompt has no tokens",
        ));
    }
    if subject.start >= subject.end || subject.end > n {
        return Err(PluginError::invalid(format!(
            "causal tracing: subject tokens {subject:?} are not inside the prompt's {n} tokens"
        )));
    }
    if answer_id >= facts.vocab_size {
        return Err(PluginError::invalid(format!(
            "causal tracing: answer token {answer_id} is outside the vocabulary ({})",
            facts.vocab_size
        )));
    }
    let embedding_std = embedding_std(model)?;
    let noise_scale = hp.noise_scale.unwrap_or(hp.noise_factor * embedding_std);
    let mut kinds: Vec<Kind> = Vec::new();
    for &k in &hp.kinds {
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }

    // Clean run: the answer's probability and every state a restoration may write back.
    let mut sites: Vec<String> = Vec::new();
    let mut site_base = Vec::new();
    for &k in &kinds {
        site_base.push(sites.len());
        sites.extend((0..n_layers).map(|l| k.site(l)));
    }
    let mut clean_req = ForwardRequest::new(
        Batch::new(vec![ids.to_vec()], Padding::Right),
        LogitsWanted::Last,
    );
    clean_req.captures = sites.iter().map(|s| s.as_str().into()).collect();
    let clean = model.forward(&clean_req)?;
    let logits = clean
        .logits
        .into_option()
        .ok_or_else(|| PluginError::internal("causal tracing: the clean run returned no logits"))?;
    let vocab = logits.numel();
    let clean_logits = logits.as_slice();
    let clean_prob = softmax_prob(clean_logits, answer_id as usize);
    let top = (0..vocab)
        .max_by(|&a, &b| clean_logits[a].total_cmp(&clean_logits[b]))
        .unwrap_or(0);
    let clean_top = TopToken {
        id: top as u32,
        token: token_label(model, top as u32)?,
        prob: softmax_prob(clean_logits, top),
    };
    if hp.only_correct && clean_top.id != answer_id {
        return Ok(Trace {
            id: String::new(),
            prompt: String::new(),
            subject: String::new(),
            answer: String::new(),
            token_ids: ids.to_vec(),
            tokens: ids
                .iter()
                .map(|&id| token_label(model, id))
                .collect::<Result<_, _>>()?,
            subject_range: [subject.start, subject.end],
            answer_id,
            answer_token: token_label(model, answer_id)?,
            n_layers,
            clean_prob,
            // Not measured: NaN, which is `null` in the JSON.
            corrupted_prob: f32::NAN,
            correct_prediction: false,
            clean_top,
            embedding_std,
            noise_scale,
            grids: Vec::new(),
            settings: hp.clone(),
            forward_passes: 1,
            seconds: t0.elapsed().as_secs_f64(),
        });
    }
    let width = facts.d_model as usize;
    let first = subject.start;
    for (i, c) in clean.captures.iter().enumerate() {
        c.expect_shape(&format!("capture of '{}'", sites[i]), &[1, n, width])?;
    }
    let clean_state =
        |site: usize, pos: usize| &clean.captures[site].as_slice()[pos * width..(pos + 1) * width];

    let mut restores: Vec<Option<Restore>> = vec![None]; // the corrupted baseline
    for (ki, &k) in kinds.iter().enumerate() {
        for token in first..n {
            for layer in 0..n_layers {
                let w = window_layers(k, layer, hp.window, n_layers);
                restores.push(Some(Restore {
                    kind: ki,
                    token,
                    layer,
                    sites: site_base[ki] + w.start..site_base[ki] + w.end,
                }));
            }
        }
    }
    let s = hp.samples;
    let per_batch = (hp.batch_tokens / (n * s)).max(1);
    let total = restores.len().div_ceil(per_batch);
    let mut scores: Vec<f32> = Vec::with_capacity(restores.len());
    let mut passes = 1;
    for (bi, chunk) in restores.chunks(per_batch).enumerate() {
        if !progress.report(
            bi as u64,
            total as u64,
            format!("causal tracing: pass {}/{total}", bi + 1)
                .as_str()
                .into(),
        ) {
            return Err(PluginError::cancelled());
        }
        let rows = chunk.len() * s;
        let mut req = ForwardRequest::new(
            Batch::new(vec![ids.to_vec(); rows], Padding::Right),
            LogitsWanted::Last,
        );
        // Each clean vector crosses the ABI once per pass, as a parameter its rows share.
        let mut param_of: HashMap<(usize, usize), u32> = HashMap::new();
        for (ri, r) in chunk.iter().enumerate() {
            for sample in 0..s {
                let row = ri * s + sample;
                req.noise.push(EmbeddingNoise {
                    row: row as u32,
                    start: subject.start as u32,
                    end: subject.end as u32,
                    scale: noise_scale,
                    seed: hp.seed.wrapping_add(sample as u64),
                });
                if let Some(r) = r {
                    for site in r.sites.clone() {
                        let next = req.params.len() as u32;
                        let param = *param_of.entry((site, r.token)).or_insert(next);
                        if param == next {
                            req.params
                                .push(Tensor::vector(clean_state(site, r.token).to_vec()));
                        }
                        req.interventions.push(Intervention {
                            site: sites[site].as_str().into(),
                            row: row as u32,
                            position: r.token as u32,
                            mode: InterventionMode::Replace,
                            value: None.into(),
                            param: Some(param).into(),
                        });
                    }
                }
            }
        }
        let out = model.forward(&req)?;
        passes += 1;
        let logits = out.logits.into_option().ok_or_else(|| {
            PluginError::internal("causal tracing: a corrupted run returned no logits")
        })?;
        logits.expect_shape("corrupted logits", &[rows, vocab])?;
        for ri in 0..chunk.len() {
            let p: f64 = (0..s)
                .map(|sample| softmax_prob(logits.row(ri * s + sample), answer_id as usize) as f64)
                .sum();
            scores.push((p / s as f64) as f32);
        }
    }
    progress.report(total as u64, total as u64, "causal tracing: done".into());

    let corrupted_prob = scores[0];
    let mut grids: Vec<KindGrid> = kinds
        .iter()
        .map(|&k| KindGrid {
            kind: k,
            window: if k == Kind::Resid { 1 } else { hp.window },
            scores: vec![vec![corrupted_prob; n_layers]; n],
        })
        .collect();
    for (r, &p) in restores.iter().zip(&scores).skip(1) {
        let r = r.as_ref().expect("only the baseline has no restoration");
        grids[r.kind].scores[r.token][r.layer] = p;
    }
    let mut tokens = Vec::with_capacity(n);
    for &id in ids {
        tokens.push(token_label(model, id)?);
    }
    Ok(Trace {
        id: String::new(),
        prompt: String::new(),
        subject: String::new(),
        answer: String::new(),
        token_ids: ids.to_vec(),
        tokens,
        subject_range: [subject.start, subject.end],
        answer_id,
        answer_token: token_label(model, answer_id)?,
        n_layers,
        clean_prob,
        corrupted_prob,
        correct_prediction: clean_top.id == answer_id,
        clean_top,
        embedding_std,
        noise_scale,
        grids,
        settings: hp.clone(),
        forward_passes: passes,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_romes_clipped_intervals() {
        assert_eq!(window_layers(Kind::Resid, 4, 10, 30), 4..5);
        assert_eq!(window_layers(Kind::Mlp, 0, 10, 30), 0..5);
        assert_eq!(window_layers(Kind::Mlp, 12, 10, 30), 7..17);
        assert_eq!(window_layers(Kind::Attn, 29, 10, 30), 24..30);
        // Odd windows: ROME's `layer - (-window // 2)` rounds the upper half up.
        assert_eq!(window_layers(Kind::Mlp, 5, 3, 30), 4..7);
    }

    #[test]
    fn hparams_reject_unknown_fields_and_empty_settings() {
        assert!(TraceHparams::from_json(r#"{"samplez": 3}"#)
            .unwrap_err()
            .message
            .contains("samplez"));
        assert!(TraceHparams::from_json(r#"{"samples": 0}"#).is_err());
        assert!(TraceHparams::from_json(r#"{"kinds": []}"#).is_err());
        assert!(TraceHparams::from_json(r#"{"kinds": ["mlp_key"]}"#).is_err());
        let hp = TraceHparams::from_json(r#"{"kinds": ["resid"], "samples": 2}"#).unwrap();
        assert_eq!((hp.samples, hp.window, hp.kinds.len()), (2, 10, 1));
        assert_eq!(TraceHparams::from_json("").unwrap().samples, 10);
    }
}

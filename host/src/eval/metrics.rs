//! The field's metrics as pure functions, exactly as ../shared/METHODS.md §6 defines them
//! (EasyEdit `evaluate/evaluate_utils.py`, ROME `eval_utils_counterfact.py`). Everything that
//! needs a model is reduced to per-position numbers first ([`RowScore`]), so that every formula
//! here can be checked by hand.

/// What one teacher-forced row of a forward pass says about its answer tokens: for answer token
/// j, the model's argmax at the position before it, and `log P(answer_j | prefix, answer_<j)`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowScore {
    /// The answer's token ids (what the model should predict).
    pub target: Vec<u32>,
    /// The argmax token at each answer position.
    pub argmax: Vec<u32>,
    /// `log P(target_j | ...)` at each answer position (natural log).
    pub logprobs: Vec<f64>,
}

impl RowScore {
    /// Mean negative log-likelihood per answer token (ROME's NLL(o|p)); infinity for an empty
    /// answer, so that it never wins a comparison.
    pub fn mean_nll(&self) -> f64 {
        mean_nll(&self.logprobs)
    }

    /// Teacher-forced token accuracy of this row.
    pub fn accuracy(&self) -> f64 {
        token_accuracy(&self.argmax, &self.target)
    }
}

/// Argmax of a logits vector (the first of equal maxima, as `torch.argmax`), and
/// `log softmax(logits)[token]` computed stably in f64.
pub fn argmax_and_logprob(logits: &[f32], token: u32) -> (u32, f64) {
    let mut best = 0usize;
    let mut max = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > max {
            max = v;
            best = i;
        }
    }
    let max64 = max as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max64).exp()).sum();
    let lse = max64 + sum.ln();
    let logprob = logits
        .get(token as usize)
        .map_or(f64::NEG_INFINITY, |&v| v as f64 - lse);
    (best as u32, logprob)
}

/// Teacher-forced token accuracy (EasyEdit `test_prediction_acc`):
/// `Acc = (1/m) Σ_j 1[argmax_j = y_j]`; partial credit, not exact match. An empty answer scores 0.
pub fn token_accuracy(argmax: &[u32], target: &[u32]) -> f64 {
    if target.is_empty() {
        return 0.0;
    }
    let hits = argmax.iter().zip(target).filter(|(a, t)| a == t).count();
    hits as f64 / target.len() as f64
}

/// Locality: the fraction of answer positions where the post-edit argmax equals the **pre-edit
/// model's** argmax (`editor.py::finalize_locality_metrics`), not the dataset's answer. Rows of
/// different lengths (they never should be) compare over the shorter one but divide by the
/// pre-edit length.
pub fn agreement(post: &[u32], pre: &[u32]) -> f64 {
    if pre.is_empty() {
        return 0.0;
    }
    let same = post.iter().zip(pre).filter(|(a, b)| a == b).count();
    same as f64 / pre.len() as f64
}

/// Mean NLL per token, `(1/|o|) Σ −log P(o_j | ...)`.
pub fn mean_nll(logprobs: &[f64]) -> f64 {
    if logprobs.is_empty() {
        return f64::INFINITY;
    }
    -logprobs.iter().sum::<f64>() / logprobs.len() as f64
}

/// Perplexity of an answer: `exp(mean NLL)` over its tokens (prompt tokens masked).
pub fn perplexity(logprobs: &[f64]) -> f64 {
    mean_nll(logprobs).exp()
}

/// ROME's success/magnitude pair for one prompt: `1[NLL(new) < NLL(true)]` and
/// `e^{−NLL(new)} − e^{−NLL(true)}` (per-token geometric-mean probabilities). Used as is for
/// ES/EM and PS/PM; NS/NM are the same with the roles swapped ([`neighborhood_pair`]).
pub fn efficacy_pair(nll_new: f64, nll_true: f64) -> (f64, f64) {
    let success = if nll_new < nll_true { 1.0 } else { 0.0 };
    (success, (-nll_new).exp() - (-nll_true).exp())
}

/// NS/NM for one neighbourhood prompt: `1[P(true) > P(new)]`, `e^{−NLL(true)} − e^{−NLL(new)}`.
pub fn neighborhood_pair(nll_new: f64, nll_true: f64) -> (f64, f64) {
    let success = if nll_true < nll_new { 1.0 } else { 0.0 };
    (success, (-nll_true).exp() - (-nll_new).exp())
}

/// Harmonic mean (ROME's S = hmean(ES, PS, NS)); 0 when any value is 0 (scipy's `hmean`
/// convention for zeros), `None` when there are no values.
pub fn harmonic_mean(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    if values.iter().any(|&v| v <= 0.0) {
        return Some(0.0);
    }
    Some(values.len() as f64 / values.iter().map(|v| 1.0 / v).sum::<f64>())
}

/// Arithmetic mean of the values present; `None` when none is.
pub fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values
        .into_iter()
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Median (mean of the two middle values for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// An approximation of NLTK's `word_tokenize` (Treebank word tokenizer), which ROME and
/// EasyEdit use for the n-gram entropy. Rules, in order:
///
/// 1. split on whitespace;
/// 2. split off leading punctuation characters `( [ { " ' `` “ ‘ ` one at a time;
/// 3. split off trailing punctuation `. , ; : ! ? ) ] } " ' ” ’` one at a time (keeping dots
///    inside a token such as `U.S.` only when the token has another dot, as NLTK keeps `U.S.`);
/// 4. split English clitics: `n't`, `'s`, `'re`, `'ve`, `'ll`, `'d`, `'m` (`don't` → `do n't`).
///
/// Not reproduced: NLTK's sentence splitting before word splitting (only a sentence-final period
/// is split there — we split every trailing period, which only differs for abbreviations such as
/// `Mr.` in mid-sentence), its quote conversion to `` and '' (a change of spelling that does
/// not change n-gram counts), and a few rare contractions (`cannot` → `can not`, `gonna`).
pub fn word_tokenize(text: &str) -> Vec<String> {
    const LEADING: &[char] = &['(', '[', '{', '"', '\'', '“', '‘', '`'];
    const TRAILING: &[char] = &[
        '.', ',', ';', ':', '!', '?', ')', ']', '}', '"', '\'', '”', '’',
    ];
    const CLITICS: &[&str] = &["n't", "'s", "'re", "'ve", "'ll", "'d", "'m"];
    let mut out = Vec::new();
    for word in text.split_whitespace() {
        let mut rest = word;
        while let Some(c) = rest.chars().next().filter(|c| LEADING.contains(c)) {
            // A leading apostrophe of a clitic-only token ('s) stays with it.
            if c == '\'' && CLITICS.iter().any(|cl| rest.eq_ignore_ascii_case(cl)) {
                break;
            }
            out.push(c.to_string());
            rest = &rest[c.len_utf8()..];
        }
        let mut trailing = Vec::new();
        while let Some(c) = rest.chars().last().filter(|c| TRAILING.contains(c)) {
            let head = &rest[..rest.len() - c.len_utf8()];
            // Abbreviations like "U.S." keep their final dot.
            if c == '.' && head.contains('.') && head.chars().all(|h| h.is_alphabetic() || h == '.')
            {
                break;
            }
            trailing.push(c.to_string());
            rest = head;
        }
        if !rest.is_empty() {
            let lower = rest.to_lowercase();
            match CLITICS
                .iter()
                .find(|cl| lower.ends_with(*cl) && lower.len() > cl.len())
            {
                Some(cl) => {
                    let cut = rest.len() - cl.len();
                    out.push(rest[..cut].to_string());
                    out.push(rest[cut..].to_string());
                }
                None => out.push(rest.to_string()),
            }
        }
        out.extend(trailing.into_iter().rev());
    }
    out
}

/// `H_n = −Σ_g f(g) log₂ f(g)` over the relative frequencies of the n-grams of `tokens`
/// (`nltk.FreqDist(nltk.ngrams(tokens, n))`); 0 when there is no n-gram.
pub fn ngram_entropy(tokens: &[String], n: usize) -> f64 {
    if n == 0 || tokens.len() < n {
        return 0.0;
    }
    let mut counts: std::collections::HashMap<&[String], usize> = Default::default();
    for gram in tokens.windows(n) {
        *counts.entry(gram).or_default() += 1;
    }
    let total = (tokens.len() - n + 1) as f64;
    counts
        .values()
        .map(|&c| {
            let f = c as f64 / total;
            -f * f.log2()
        })
        .sum()
}

/// ROME's `compute_n_gram_entropy` of one text: `mean(2/3·H₂, 4/3·H₃) = (H₂ + 2H₃)/3`, in bits
/// (tables print it ×100).
pub fn generation_entropy(text: &str) -> f64 {
    let tokens = word_tokenize(text);
    let h2 = ngram_entropy(&tokens, 2);
    let h3 = ngram_entropy(&tokens, 3);
    (2.0 / 3.0 * h2 + 4.0 / 3.0 * h3) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} != {b}");
    }

    fn words(s: &[&str]) -> Vec<String> {
        s.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn token_accuracy_gives_partial_credit() {
        // Argmax [5, 9, 7] against target [5, 8, 7]: 2 of 3 positions right.
        close(token_accuracy(&[5, 9, 7], &[5, 8, 7]), 2.0 / 3.0);
        close(token_accuracy(&[1], &[1]), 1.0);
        close(token_accuracy(&[], &[]), 0.0);
    }

    #[test]
    fn locality_is_agreement_with_the_pre_edit_argmax_not_the_answer() {
        // Pre-edit argmax [3, 4, 5]; post-edit [3, 9, 5]: 2/3 whatever the dataset's answer is.
        close(agreement(&[3, 9, 5], &[3, 4, 5]), 2.0 / 3.0);
        close(agreement(&[3, 4, 5], &[3, 4, 5]), 1.0);
    }

    #[test]
    fn argmax_and_logprob_by_hand() {
        // logits [0, ln 3]: softmax [1/4, 3/4].
        let (best, lp) = argmax_and_logprob(&[0.0, 3f32.ln()], 0);
        assert_eq!(best, 1);
        assert!((lp - 0.25f64.ln()).abs() < 1e-6, "{lp}"); // f32 logits
                                                           // Ties go to the first index, as torch.argmax.
        assert_eq!(argmax_and_logprob(&[2.0, 2.0], 1).0, 0);
    }

    #[test]
    fn nll_ppl_and_rome_pairs_by_hand() {
        // Answer probabilities 1/2 and 1/8: mean NLL = (ln 2 + ln 8)/2 = 2 ln 2; PPL = 4.
        let lps = [(0.5f64).ln(), (0.125f64).ln()];
        close(mean_nll(&lps), 2.0 * 2f64.ln());
        close(perplexity(&lps), 4.0);
        // New target geometric-mean prob 1/4 (NLL 2 ln 2), true 1/2 (NLL ln 2).
        let (es, em) = efficacy_pair(2.0 * 2f64.ln(), 2f64.ln());
        close(es, 0.0);
        close(em, 0.25 - 0.5);
        let (ns, nm) = neighborhood_pair(2.0 * 2f64.ln(), 2f64.ln());
        close(ns, 1.0);
        close(nm, 0.25);
        // Ties are failures both ways (strict inequalities, as ROME).
        assert_eq!(efficacy_pair(1.0, 1.0).0, 0.0);
        assert_eq!(neighborhood_pair(1.0, 1.0).0, 0.0);
    }

    #[test]
    fn harmonic_mean_by_hand() {
        // hmean(1, 0.5, 0.25) = 3 / (1 + 2 + 4) = 3/7.
        close(harmonic_mean(&[1.0, 0.5, 0.25]).unwrap(), 3.0 / 7.0);
        close(harmonic_mean(&[0.9, 0.0]).unwrap(), 0.0);
        assert_eq!(harmonic_mean(&[]), None);
        close(median(&[3.0, 1.0, 2.0, 10.0]).unwrap(), 2.5);
    }

    #[test]
    fn word_tokenize_approximates_nltk() {
        assert_eq!(
            word_tokenize("Paris is the capital of France. It isn't (really) \"big\", is it?"),
            words(&[
                "Paris", "is", "the", "capital", "of", "France", ".", "It", "is", "n't", "(",
                "really", ")", "\"", "big", "\"", ",", "is", "it", "?"
            ])
        );
        assert_eq!(
            word_tokenize("The U.S. and John's 3.5 cats."),
            words(&["The", "U.S.", "and", "John", "'s", "3.5", "cats", "."])
        );
    }

    #[test]
    fn ngram_entropy_by_hand() {
        // "a b a b": bigrams ab, ba, ab → f = 2/3, 1/3: H2 = −(2/3 log2 2/3 + 1/3 log2 1/3).
        let t = words(&["a", "b", "a", "b"]);
        let h2 = -(2.0 / 3.0 * (2.0f64 / 3.0).log2() + 1.0 / 3.0 * (1.0f64 / 3.0).log2());
        close(ngram_entropy(&t, 2), h2);
        // Trigrams aba, bab: 1 bit.
        close(ngram_entropy(&t, 3), 1.0);
        // GE = (2/3·H2 + 4/3·H3)/2.
        close(
            generation_entropy("a b a b"),
            (2.0 / 3.0 * h2 + 4.0 / 3.0) / 2.0,
        );
        // Four distinct words: H2 = log2 3, H3 = 1.
        close(
            generation_entropy("w x y z"),
            (2.0 / 3.0 * 3f64.log2() + 4.0 / 3.0 * 1.0) / 2.0,
        );
        close(generation_entropy("one"), 0.0);
        close(generation_entropy(""), 0.0);
    }

    /// docs/metrics.md, "one record through both definitions": the CounterFact record
    /// "The Eiffel Tower is in" → " New York" (2 tokens, was " Paris", 1 token) after an edit,
    /// with the model's numbers set by hand. EasyEdit's teacher-forced Reliability gives partial
    /// credit per token; ROME's ES compares the two candidates' geometric-mean probabilities.
    /// The neighbour "The Louvre is in" → " Paris" shows locality (agreement with the pre-edit
    /// argmax) against NS (does the true answer still beat the new one?).
    #[test]
    fn one_record_through_both_definitions() {
        const NEW_YORK: [u32; 2] = [10, 11];
        const PARIS: [u32; 1] = [20];
        // Post-edit, prompt ⊕ " New York": argmax [10, 99] (second token wrong), P = 0.6, 0.2.
        let rewrite = RowScore {
            target: NEW_YORK.to_vec(),
            argmax: vec![10, 99],
            logprobs: vec![0.6f64.ln(), 0.2f64.ln()],
        };
        // Post-edit, prompt ⊕ " Paris": P = 0.3.
        let rewrite_true = RowScore {
            target: PARIS.to_vec(),
            argmax: vec![10],
            logprobs: vec![0.3f64.ln()],
        };
        let easyedit_reliability = rewrite.accuracy();
        let (es, em) = efficacy_pair(rewrite.mean_nll(), rewrite_true.mean_nll());
        close(easyedit_reliability, 0.5);
        close(es, 1.0);
        close(em, (0.6f64 * 0.2).sqrt() - 0.3); // 0.3464 − 0.3 = 0.0464

        // Neighbour: pre-edit argmax at the answer position [20] (" Paris"), post-edit [10].
        let pre_argmax = [20u32];
        let post_argmax = [10u32];
        let easyedit_locality = agreement(&post_argmax, &pre_argmax);
        // Post-edit P(" Paris" | neighbour) = 0.4; P(" New York") = 0.5 · 0.2 → g-mean 0.3162.
        let nll_true = mean_nll(&[0.4f64.ln()]);
        let nll_new = mean_nll(&[0.5f64.ln(), 0.2f64.ln()]);
        let (ns, nm) = neighborhood_pair(nll_new, nll_true);
        close(easyedit_locality, 0.0);
        close(ns, 1.0);
        close(nm, 0.4 - 0.1f64.sqrt()); // 0.0838
        println!(
            "EasyEdit: reliability {easyedit_reliability:.4}, locality {easyedit_locality:.4}; \
             ROME: ES {es:.4} EM {em:.4} NS {ns:.4} NM {nm:.4}"
        );
    }
}

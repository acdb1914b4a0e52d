//! Causal tracing through the real ABI on the tiny llama and GPT-2 fixtures (random weights, so
//! only exact properties are checked), and subject location on the real SmolLM2 tokenizer.
//! Needs `cargo build --release` (the model plugins) first.

use std::path::{Path, PathBuf};

use kedit_editor_rome::trace::{
    trace_request, trace_tokens, window_layers, Kind, Trace, TraceHparams,
};
use kedit_plugin_api::{
    abi_stable::sabi_trait::TD_Opaque, testing::QuietProgress, Batch, EditRequest, EmbeddingNoise,
    ForwardRequest, Intervention, InterventionMode, LogitsWanted, ModelBox, ModelClient, Padding,
    Progress_TO,
};

fn workspace() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn fixture(family: &str) -> ModelBox {
    fixture_of(family, family)
}

/// The tiny fixture `dir` opened through the plugin `kedit_model_{plugin}`.
fn fixture_of(dir: &str, plugin: &str) -> ModelBox {
    let dir = workspace().join("../shared/fixtures").join(dir);
    kedit_plugin_api::testing::open_with_plugin(
        &workspace(),
        &format!("kedit_model_{plugin}"),
        Path::new(&dir),
    )
}

fn run(
    client: &ModelClient<'_>,
    ids: &[u32],
    subject: std::ops::Range<usize>,
    answer: u32,
    hp: &TraceHparams,
) -> Trace {
    let mut quiet = QuietProgress;
    let mut progress = Progress_TO::from_ptr(&mut quiet, TD_Opaque);
    trace_tokens(client, ids, subject, answer, hp, &mut progress).unwrap()
}

fn softmax(l: &[f32], t: usize) -> f64 {
    let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = l.iter().map(|&v| ((v - m) as f64).exp()).sum();
    ((l[t] - m) as f64).exp() / s
}

/// The clean run's most likely next token, so that probabilities are not vanishingly small.
fn top_token(client: &ModelClient<'_>, ids: &[u32]) -> u32 {
    let out = client
        .forward(&ForwardRequest::new(
            Batch::new(vec![ids.to_vec()], Padding::Right),
            LogitsWanted::Last,
        ))
        .unwrap();
    let l = out.logits.unwrap().into_vec();
    (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap() as u32
}

/// p(answer) averaged over the corrupted rows, with `restore` (site, position, clean value)
/// written over every row: the definition of a score, computed without the tracer.
fn corrupted_mean(
    client: &ModelClient<'_>,
    ids: &[u32],
    subject: std::ops::Range<usize>,
    answer: u32,
    t: &Trace,
    restore: &[(String, usize, Vec<f32>)],
) -> f64 {
    let s = t.settings.samples;
    let mut req = ForwardRequest::new(
        Batch::new(vec![ids.to_vec(); s], Padding::Right),
        LogitsWanted::Last,
    );
    for row in 0..s {
        req.noise.push(EmbeddingNoise {
            row: row as u32,
            start: subject.start as u32,
            end: subject.end as u32,
            scale: t.noise_scale,
            seed: t.settings.seed + row as u64,
        });
        for (site, pos, v) in restore {
            req.interventions.push(Intervention::fixed(
                site,
                row,
                *pos,
                InterventionMode::Replace,
                kedit_plugin_api::Tensor::vector(v.clone()),
            ));
        }
    }
    let logits = client.forward(&req).unwrap().logits.unwrap();
    (0..s)
        .map(|r| softmax(logits.row(r), answer as usize))
        .sum::<f64>()
        / s as f64
}

fn clean_state(client: &ModelClient<'_>, ids: &[u32], site: &str, pos: usize) -> Vec<f32> {
    let mut req = ForwardRequest::new(
        Batch::new(vec![ids.to_vec()], Padding::Right),
        LogitsWanted::None,
    );
    req.captures.push(site.into());
    let c = client.forward(&req).unwrap().captures.remove(0);
    let d = c.dims()[2];
    c.as_slice()[pos * d..(pos + 1) * d].to_vec()
}

fn hparams(samples: usize, seed: u64) -> TraceHparams {
    TraceHparams {
        samples,
        seed,
        window: 2,
        ..TraceHparams::default()
    }
}

fn check_family(family: &str, ids: &[u32]) {
    check_fixture(family, family, ids)
}

fn check_fixture(family: &str, plugin: &str, ids: &[u32]) {
    let mut model = fixture_of(family, plugin);
    let client = ModelClient::new(model.sabi_reborrow_mut());
    let n_layers = client.facts().unwrap().n_layers as usize;
    let subject = 1..3;
    let answer = top_token(&client, ids);
    let hp = hparams(3, 7);
    let t = run(&client, ids, subject.clone(), answer, &hp);

    assert_eq!(t.grids.len(), 3);
    for g in &t.grids {
        assert_eq!(
            g.scores.len(),
            ids.len(),
            "{family} {:?}: one row per token",
            g.kind
        );
        assert!(
            g.scores.iter().all(|r| r.len() == n_layers),
            "{family}: one column per layer"
        );
    }
    assert!(t.correct_prediction && t.clean_top.id == answer);
    assert!((t.clean_prob - t.clean_top.prob).abs() < 1e-6);
    assert!(t.noise_scale > 0.0 && (t.noise_scale - 3.0 * t.embedding_std).abs() < 1e-6);

    // Restoring nothing is the corrupted baseline, computed here without the tracer.
    let baseline = corrupted_mean(&client, ids, subject.clone(), answer, &t, &[]);
    assert!(
        (t.corrupted_prob as f64 - baseline).abs() < 1e-6,
        "{family}: baseline {} vs {baseline}",
        t.corrupted_prob
    );
    assert!(
        (t.corrupted_prob - t.clean_prob).abs() > 1e-4,
        "{family}: the noise must change the answer's probability for the test to mean anything"
    );

    // The whole clean residual at the last layer's last token gives back the clean probability.
    let resid = &t.grids[0];
    assert_eq!(resid.kind, Kind::Resid);
    let last = resid.scores[ids.len() - 1][n_layers - 1];
    assert!(
        (last - t.clean_prob).abs() < 1e-5,
        "{family}: restored {last} vs clean {}",
        t.clean_prob
    );
    // Tokens before the subject never see the noise: their restorations are the baseline.
    assert!(resid.scores[0].iter().all(|&p| p == t.corrupted_prob));

    // One MLP cell recomputed by hand: the clean MLP outputs of its window at its token.
    let mlp = t.grids.iter().find(|g| g.kind == Kind::Mlp).unwrap();
    let (token, layer) = (2, 1);
    let restore: Vec<(String, usize, Vec<f32>)> = window_layers(Kind::Mlp, layer, 2, n_layers)
        .map(|l| {
            let site = format!("layer.{l}.mlp_out");
            let v = clean_state(&client, ids, &site, token);
            (site, token, v)
        })
        .collect();
    assert_eq!(restore.len(), 2);
    let want = corrupted_mean(&client, ids, subject.clone(), answer, &t, &restore);
    assert!(
        (mlp.scores[token][layer] as f64 - want).abs() < 1e-5,
        "{family}: mlp cell {} vs {want}",
        mlp.scores[token][layer]
    );

    // Deterministic under a seed, whatever the batching; another seed is another corruption.
    let again = run(
        &client,
        ids,
        subject.clone(),
        answer,
        &TraceHparams {
            batch_tokens: 1,
            ..hp.clone()
        },
    );
    assert!(again.forward_passes > t.forward_passes);
    for (a, b) in t.grids.iter().zip(&again.grids) {
        for (ra, rb) in a.scores.iter().zip(&b.scores) {
            for (x, y) in ra.iter().zip(rb) {
                assert!(
                    (x - y).abs() < 1e-5,
                    "{family}: batching changed {x} to {y}"
                );
            }
        }
    }
    let other = run(&client, ids, subject, answer, &hparams(3, 8));
    assert_ne!(other.corrupted_prob, t.corrupted_prob);
}

#[test]
fn llama_fixture_traces_exactly() {
    check_family("llama", &[1, 17, 250, 33, 400, 9, 71]);
}

#[test]
fn gpt2_fixture_traces_exactly() {
    check_family("gpt2", &[17, 250, 33, 400, 9, 71]);
}

/// The other families, ALiBi (Baichuan-13B) and GLM's 2D positions included: tracing uses only
/// canonical sites, so the same exact properties hold.
#[test]
fn every_other_family_fixture_traces_exactly() {
    for (dir, plugin) in [
        ("qwen2", "qwen"),
        ("qwen3", "qwen"),
        ("glm", "glm"),
        ("glm4", "glm"),
        ("chatglm2", "glm"),
        ("baichuan7b", "baichuan"),
        ("baichuan13b", "baichuan"),
    ] {
        check_fixture(dir, plugin, &[3, 17, 250, 33, 400, 9, 71]);
    }
}

#[test]
fn only_the_requested_kinds_are_traced() {
    let mut model = fixture("llama");
    let client = ModelClient::new(model.sabi_reborrow_mut());
    let ids = [1, 5, 6, 7, 8];
    let hp = TraceHparams {
        samples: 2,
        kinds: vec![Kind::Attn],
        ..TraceHparams::default()
    };
    let t = run(&client, &ids, 2..3, 3, &hp);
    assert_eq!(t.grids.len(), 1);
    assert_eq!((t.grids[0].kind, t.grids[0].window), (Kind::Attn, 10));
}

#[test]
fn smollm2_finds_the_subject_tokens_and_the_answer_token() {
    let path = kedit_plugin_api::testing::real_model("KEDIT_SMOLLM2_GGUF", "smollm2-135m-instruct");
    let mut model =
        kedit_plugin_api::testing::open_with_plugin(&workspace(), "kedit_model_llama", &path);
    let client = ModelClient::new(model.sabi_reborrow_mut());
    let mut quiet = QuietProgress;
    let mut progress = Progress_TO::from_ptr(&mut quiet, TD_Opaque);
    let hp = TraceHparams {
        samples: 1,
        kinds: vec![Kind::Resid],
        batch_tokens: 1 << 16,
        ..TraceHparams::default()
    };
    for (prompt, subject) in [
        (
            "The Eiffel Tower is located in the city of",
            "The Eiffel Tower",
        ),
        (
            "The mother tongue of Danielle Darrieux is",
            "Danielle Darrieux",
        ),
    ] {
        let r = EditRequest {
            ground_truth: Some("Paris".into()).into(),
            ..EditRequest::fact(prompt, subject, "Rome")
        };
        let t = trace_request(&client, &r, &hp, &mut progress).unwrap();
        let [a, b] = t.subject_range;
        let text: String = t.tokens[a..b].concat();
        assert_eq!(text.trim(), subject, "{:?} {:?}", t.tokens, t.subject_range);
        assert_eq!(
            t.answer, "Paris",
            "the true answer is traced, not the edit target"
        );
        assert_eq!(t.answer_token.trim(), "Paris");
        assert_eq!(t.grids[0].scores.len(), t.tokens.len());
    }
}

#[test]
fn only_correct_stops_after_a_wrong_clean_prediction() {
    let mut model = fixture("llama");
    let client = ModelClient::new(model.sabi_reborrow_mut());
    let ids = [1, 5, 6, 7, 8];
    let top = top_token(&client, &ids);
    let hp = TraceHparams {
        samples: 2,
        only_correct: true,
        ..TraceHparams::default()
    };
    let wrong = run(&client, &ids, 1..3, (top + 1) % 512, &hp);
    assert!(!wrong.correct_prediction && wrong.grids.is_empty());
    assert_eq!(wrong.forward_passes, 1);
    assert!(wrong.corrupted_prob.is_nan(), "not measured");
    let right = run(&client, &ids, 1..3, top, &hp);
    assert!(right.correct_prediction && right.grids.len() == 3);
}

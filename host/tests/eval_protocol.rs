//! The evaluation protocols against the in-process mock plugins: `single` and `batch` undo every
//! edit, `sequential` evaluates on the final model (and, with `eval_each`, right after each edit),
//! a failed edit is evaluated on the rolled-back model; `single` and `batch` leave the model as
//! they found it, `sequential` leaves the edits in and keeps no undo history.
//! The mock model's argmax at every position is min(weight sum / 4, 3), so locality (agreement
//! with the pre-edit argmax) shows how many edits the evaluated model carries.

mod common;

use common::{mock_registry, request, SITE};
use kedit::cancel::CancelFlag;
use kedit::editor::EditorHandle;
use kedit::eval::heldout::HeldOut;
use kedit::eval::protocol::{self, EditContext, Protocol, ProtocolOptions, RunResult};
use kedit::eval::score::ScoreSettings;
use kedit::model::{ModelHandle, OpenSpec};
use kedit::session::Status;
use kedit_plugin_api::{EditRequest, PromptAnswer};

fn with_locality(id: &str, prompt: &str) -> EditRequest {
    let mut r = request(id, prompt);
    r.locality = vec![PromptAnswer {
        prompt: "ab".into(),
        answer: "c".into(),
        label: "neighborhood".into(),
    }]
    .into();
    r
}

fn run(requests: &[EditRequest], options: ProtocolOptions) -> (RunResult, f32) {
    let (result, sum, _) = run_with_corpus(requests, options, None).unwrap();
    (result, sum)
}

/// The protocol, with the held-out perplexity over `corpus` (one document per line) if given:
/// the result, the edited weight's sum afterwards, and how many entries the model's journal
/// gained.
fn run_with_corpus(
    requests: &[EditRequest],
    options: ProtocolOptions,
    corpus: Option<&str>,
) -> anyhow::Result<(RunResult, f32, u64)> {
    let registry = mock_registry();
    let mut model = ModelHandle::open(
        &registry,
        &OpenSpec {
            path: "x.mock".into(),
            family: None,
            device: "cpu".into(),
        },
    )
    .unwrap();
    let (plugin, method) = registry.editor_for_method("bump").unwrap();
    let mut editor = EditorHandle::new(plugin).unwrap();
    let settings = ScoreSettings {
        fluency: false,
        counterfact: false,
        ..ScoreSettings::default()
    };
    let pre = protocol::evaluate_all(&model, requests, &settings, None, "pre", false).unwrap();
    assert!(pre.iter().all(|p| p.metrics["locality"] == 1.0));
    let mut edit = EditContext {
        editor: &mut editor,
        method,
        hparams_json: "{}".into(),
        cancel: CancelFlag::new(),
    };
    let dir = tempfile::tempdir().unwrap();
    let held_out = corpus.map(|text| {
        let file = dir.path().join("corpus.txt");
        std::fs::write(&file, text).unwrap();
        HeldOut::load(&model, &file, 2, 16).unwrap()
    });
    let mark = model.journal_mark().unwrap();
    let result = protocol::run(
        &mut model,
        &mut edit,
        requests,
        &pre,
        &settings,
        &options,
        held_out.as_ref(),
        false,
    )?;
    let sum = model.read_weight(SITE).unwrap().as_slice().iter().sum();
    Ok((result, sum, model.journal_mark().unwrap() - mark))
}

fn locality(r: &RunResult, i: usize) -> f64 {
    r.results[i].post.as_ref().unwrap().metrics["locality"]
}

fn requests() -> Vec<EditRequest> {
    vec![
        with_locality("0", "FAIL here"),
        with_locality("1", "fine"),
        with_locality("2", "fine too"),
    ]
}

#[test]
fn single_undoes_each_edit_and_a_failed_edit_changes_nothing() {
    let options = ProtocolOptions {
        protocol: Protocol::Single,
        batch_size: 1,
        eval_each: false,
    };
    let (r, sum) = run(&requests(), options);
    assert_eq!(sum, 0.0, "the model is restored");
    assert_eq!(r.edit_calls.len(), 3);
    let status: Vec<Status> = r.results.iter().map(|x| x.status).collect();
    assert_eq!(status, [Status::Failed, Status::Applied, Status::Applied]);
    // Failed: rolled back, the argmax did not move. Applied: one edit each, from the original.
    assert_eq!(locality(&r, 0), 1.0);
    assert_eq!(locality(&r, 1), 0.0);
    assert_eq!(locality(&r, 2), 0.0);
    assert!(r.results.iter().all(|x| x.immediate.is_none()));
}

#[test]
fn sequential_evaluates_on_the_final_model_and_eval_each_right_after_each_edit() {
    let options = ProtocolOptions {
        protocol: Protocol::Sequential,
        batch_size: 1,
        eval_each: true,
    };
    let (r, sum, journal_growth) = run_with_corpus(&requests(), options, None).unwrap();
    assert!(sum > 0.0, "the two applied edits stay in the model");
    assert_eq!(journal_growth, 0, "sequential edits keep no undo history");
    // Right after the failed first edit the model is unchanged; on the final model (two edits
    // applied) every request's locality probe has moved.
    let immediate: Vec<f64> = r
        .results
        .iter()
        .map(|x| x.immediate.as_ref().unwrap().metrics["locality"])
        .collect();
    assert_eq!(immediate, [1.0, 0.0, 0.0]);
    assert_eq!(
        (locality(&r, 0), locality(&r, 1), locality(&r, 2)),
        (0.0, 0.0, 0.0)
    );
}

#[test]
fn sequential_measures_the_corpus_perplexity_before_the_first_edit_and_after_the_last() {
    let options = ProtocolOptions {
        protocol: Protocol::Sequential,
        batch_size: 1,
        eval_each: false,
    };
    // Only the last two lines are held out. The mock's tokens are bytes and its vocabulary 0–3.
    let corpus = "not read\n\u{1}\u{2}\u{3}\u{0}\u{1}\u{2}\n\u{2}\u{2}\u{1}\n";
    let (r, sum, _) = run_with_corpus(&requests(), options.clone(), Some(corpus)).unwrap();
    assert!(sum > 0.0, "the edits stay in the model");
    let p = r.perplexity.expect("a perplexity corpus was given");
    assert_eq!(p.held_out.docs.len(), 2);
    let post = p.post.expect("the run finished");
    assert!(p.pre.is_finite() && post.is_finite());
    // Two applied bumps move the mock's argmax away from every token's prediction.
    assert_ne!(p.pre, post, "the final model is what is measured");
    // Without a corpus nothing is measured.
    let (r, _) = run(&requests(), options);
    assert!(r.perplexity.is_none());
}

#[test]
fn perplexity_needs_edits_that_accumulate() {
    for protocol in [Protocol::Single, Protocol::Batch] {
        let options = ProtocolOptions {
            protocol,
            batch_size: 1,
            eval_each: false,
        };
        let err = run_with_corpus(&requests(), options, Some("\u{1}\u{2}\n")).unwrap_err();
        assert!(
            format!("{err:#}").contains("needs the sequential protocol"),
            "{err:#}"
        );
    }
}

#[test]
fn batch_sends_n_requests_per_call_and_undoes_each_call() {
    let reqs = vec![
        with_locality("0", "a"),
        with_locality("1", "b"),
        with_locality("2", "c"),
    ];
    let options = ProtocolOptions {
        protocol: Protocol::Batch,
        batch_size: 2,
        eval_each: false,
    };
    let (r, sum) = run(&reqs, options);
    assert_eq!(sum, 0.0);
    assert_eq!(r.edit_calls.len(), 2);
    let calls: Vec<usize> = r.results.iter().map(|x| x.edit_call).collect();
    assert_eq!(calls, [0, 0, 1]);
    assert!(r.results.iter().all(|x| x.status == Status::Applied));
    // The first call carried two bumps (argmax 2), the second one (argmax 1): both moved.
    assert_eq!((locality(&r, 0), locality(&r, 2)), (0.0, 0.0));
}

//! Edit transactions against the in-process mock plugins: an edit that errs, panics, leaves NaN
//! or is cancelled is rolled back exactly, and the session goes on (or, after Ctrl-C, stops).

mod common;

use std::time::Duration;

use common::{mock_registry, request, SITE};
use kedit::cancel::CancelFlag;
use kedit::editor::EditorHandle;
use kedit::model::{ModelHandle, OpenSpec};
use kedit::plugins::Registry;
use kedit::session::{EditSession, SessionOptions, SessionSummary, Status};
use kedit_plugin_api::EditRequest;

fn open_model(registry: &Registry) -> ModelHandle {
    let spec = OpenSpec {
        path: "/data/tiny.mock".into(),
        family: None,
        device: "cpu".into(),
    };
    ModelHandle::open(registry, &spec).expect("the mock model opens")
}

struct Run {
    summary: SessionSummary,
    output: String,
    weight: Vec<f32>,
    /// The model's journal length afterwards.
    journal: u64,
}

fn run(requests: &[EditRequest], batch: bool, cancel: CancelFlag) -> Run {
    run_with(requests, batch, cancel, true)
}

fn run_with(requests: &[EditRequest], batch: bool, cancel: CancelFlag, keep_undo: bool) -> Run {
    let registry = mock_registry();
    let mut model = open_model(&registry);
    let (plugin, method) = registry.editor_for_method("bump").unwrap();
    let mut editor = EditorHandle::new(plugin).unwrap();
    let mut output = Vec::new();
    let summary = EditSession {
        model: &mut model,
        editor: &mut editor,
        method,
        hparams_json: r#"{"lr": 1.0}"#.into(),
        cancel,
        options: SessionOptions {
            batch,
            probe_tokens: 1,
            progress_bar: false,
            keep_undo,
        },
    }
    .run(requests, &mut output)
    .unwrap();
    Run {
        summary,
        output: String::from_utf8(output).unwrap(),
        weight: model.read_weight(SITE).unwrap().into_vec(),
        journal: model.journal_mark().unwrap(),
    }
}

fn statuses(summary: &SessionSummary) -> Vec<Status> {
    summary.outcomes.iter().map(|o| o.status).collect()
}

#[test]
fn sequential_edits_accumulate_and_show_predictions_before_and_after() {
    let r = run(
        &[request("a", "first"), request("b", "second")],
        false,
        CancelFlag::new(),
    );
    assert_eq!(statuses(&r.summary), [Status::Applied, Status::Applied]);
    assert!(r.summary.all_applied());
    assert_eq!(r.weight, [2.0; 4]);
    // The journal mark before each edit: undoing to it undoes that edit and every later one.
    let marks: Vec<Option<u64>> = r.summary.outcomes.iter().map(|o| o.journal_mark).collect();
    assert_eq!(marks, [Some(0), Some(1)]);
    let first = &r.summary.outcomes[0];
    assert_eq!(first.before[0].output, "<0>");
    assert_eq!(first.after[0].output, "<4>");
    assert!(
        r.output.contains("before") && r.output.contains("after"),
        "{}",
        r.output
    );
    assert!(r.output.contains("2 request(s)"), "{}", r.output);
}

#[test]
fn without_undo_history_applied_edits_are_committed_and_failed_ones_still_rolled_back() {
    let requests = [
        request("ok1", "fine"),
        request("fail", "FAIL here"),
        request("ok2", "fine again"),
    ];
    let kept = run_with(&requests, false, CancelFlag::new(), true);
    let committed = run_with(&requests, false, CancelFlag::new(), false);
    for r in [&kept, &committed] {
        assert_eq!(
            statuses(&r.summary),
            [Status::Applied, Status::Failed, Status::Applied]
        );
        assert_eq!(r.weight, [2.0; 4], "the two good edits, and only those");
    }
    assert_eq!(kept.journal, 2, "one undo entry per applied edit");
    assert_eq!(committed.journal, 0, "no undo history");
}

#[test]
fn failed_panicking_and_nan_edits_are_rolled_back_and_the_session_goes_on() {
    let requests = [
        request("ok1", "fine"),
        request("panic", "PANIC here"),
        request("fail", "FAIL here"),
        request("nan", "NAN here"),
        request("ok2", "fine again"),
    ];
    let r = run(&requests, false, CancelFlag::new());
    assert_eq!(
        statuses(&r.summary),
        [
            Status::Applied,
            Status::Failed,
            Status::Failed,
            Status::Failed,
            Status::Applied
        ]
    );
    assert!(!r.summary.all_applied());
    assert!(!r.summary.model_broken);
    // Only the two good edits remain.
    assert_eq!(r.weight, [2.0; 4]);

    let error = |i: usize| r.summary.outcomes[i].error.clone().unwrap();
    assert_eq!(
        error(1),
        "plugin mockeditor (/mock/libkedit_mockeditor.so) panicked in edit: mock editor panics on purpose"
    );
    assert!(
        error(2).contains("mock editor fails on purpose"),
        "{}",
        error(2)
    );
    assert!(error(3).contains("non-finite"), "{}", error(3));
    assert!(
        r.output.contains("FAILED, model rolled back"),
        "{}",
        r.output
    );
    assert!(
        r.output.contains("2 applied, 3 failed (rolled back)"),
        "{}",
        r.output
    );
}

#[test]
fn ctrl_c_cancels_the_running_edit_rolls_it_back_and_skips_the_rest() {
    let cancel = CancelFlag::new();
    let pressing = cancel.clone();
    let presser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        pressing.request();
    });
    let requests = [
        request("ok", "fine"),
        request("wait", "WAIT for me"),
        request("later", "fine"),
    ];
    let r = run(&requests, false, cancel);
    presser.join().unwrap();
    assert_eq!(
        statuses(&r.summary),
        [Status::Applied, Status::Cancelled, Status::Skipped]
    );
    assert_eq!(r.weight, [1.0; 4]);
    assert!(
        r.output.contains("cancelled, model rolled back"),
        "{}",
        r.output
    );
}

#[test]
fn a_batch_is_one_transaction() {
    let r = run(
        &[request("a", "one"), request("b", "two")],
        true,
        CancelFlag::new(),
    );
    assert_eq!(r.summary.outcomes.len(), 1);
    assert_eq!(r.summary.outcomes[0].requests, [0, 1]);
    assert_eq!(r.weight, [2.0; 4]);

    // One bad request undoes the whole batch, including the good one before it.
    let r = run(
        &[request("a", "one"), request("b", "FAIL")],
        true,
        CancelFlag::new(),
    );
    assert_eq!(statuses(&r.summary), [Status::Failed]);
    assert_eq!(r.weight, [0.0; 4]);
}

#[test]
fn the_report_and_outcomes_serialise_for_the_edit_log() {
    let r = run(&[request("a", "one")], false, CancelFlag::new());
    let json = serde_json::to_value(&r.summary).unwrap();
    let report = &json["outcomes"][0]["report"];
    assert_eq!(report["method"], "bump");
    assert_eq!(report["details"]["hparams"]["lr"], 1.0);
    assert_eq!(json["outcomes"][0]["status"], "applied");
}

#[test]
fn lookups_find_methods_and_families_and_name_wrong_kinds() {
    let registry = mock_registry();
    let (plugin, method) = registry.editor_for_method("BUMP").unwrap();
    assert_eq!((plugin.name(), method.as_str()), ("mockeditor", "bump"));

    let e = registry.editor_for_method("mock").unwrap_err().to_string();
    assert_eq!(
        e,
        "plugin mockfamily (/mock/libkedit_mockfamily.so) is a model family plugin, but \
         --method mock needs an editor plugin"
    );
    let e = registry.editor_for_method("rome").unwrap_err().to_string();
    assert!(
        e.contains("no editor plugin provides method `rome`; available methods: bump (mockeditor)"),
        "{e}"
    );

    let e = registry
        .family_for_checkpoint("/x/model.gguf".as_ref(), Some("bump"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is an editor plugin, but --family bump needs a model family plugin"),
        "{e}"
    );
    let e = registry
        .family_for_checkpoint("/x/model.gguf".as_ref(), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no model family plugin recognises /x/model.gguf"),
        "{e}"
    );
    assert!(
        e.contains("mock (plugin mockfamily, recognises mock)"),
        "{e}"
    );
}

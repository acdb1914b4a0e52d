//! `kedit bench --data`: edits timed on a dataset's records instead of the built-in requests, each
//! edited alone and rolled back, with every edit's report kept for a reference to replay
//! (`--reports`). On the tiny llama fixture with WISE (word-level tokenizer written next to it).
//! Needs `cargo build --release` (the llama and wise plugins beside the kedit binary).

mod cli_support;

use std::process::Command;

use cli_support::{kedit, read_json};
use serde_json::{json, Value};

#[test]
fn bench_times_edits_on_dataset_records_and_keeps_their_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (model, data) = cli_support::fixture_with_zsre_records(dir, 3);
    let model = model.to_str().unwrap();
    let hp = dir.join("wise.toml");
    std::fs::write(
        &hp,
        "layer = 1\nn_iter = 3\nedit_lr = 0.5\nmask_ratio = 1.0\n\
         act_margin = [0.5, 3.0, 1.0]\ncontext_templates = [\"{}\", \"w50 w51 {}\"]\n",
    )
    .unwrap();
    let out = dir.join("bench.json");
    let reports = dir.join("reports.jsonl");
    kedit(&[
        "bench",
        "--model",
        model,
        "--method",
        "wise",
        "--hparams",
        hp.to_str().unwrap(),
        "--repeats",
        "1",
        "--data",
        data.to_str().unwrap(),
        "--format",
        "zsre",
        "--offset",
        "1",
        "--limit",
        "5",
        "--reports",
        reports.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let report = read_json(&out);
    // Records 1 and 2: the window runs past the end of the file.
    assert_eq!(report["edit_requests"]["records"], 2, "{report}");
    assert_eq!(report["edit_requests"]["offset"], 1, "{report}");
    assert_eq!(report["edit_requests"]["format"], "zsre", "{report}");
    let wise = &report["edit"]["wise"];
    assert_eq!(wise["requests"], 2, "{wise}");
    assert_eq!(wise["steps_per_edit"], json!([3.0, 3.0]), "{wise}");
    assert_eq!(wise["median_steps_per_edit"], json!(3.0), "{wise}");

    let lines: Vec<Value> = std::fs::read_to_string(&reports)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (line, seconds) in lines.iter().zip(wise["seconds"].as_array().unwrap()) {
        assert_eq!(line["method"], "wise", "{line}");
        assert_eq!(&line["seconds"], seconds, "{line}");
        let edits = line["details"]["edits"].as_array().unwrap();
        assert_eq!(edits.len(), 1, "{line}");
        assert_eq!(edits[0]["iterations"].as_array().unwrap().len(), 3);
        // Each record alone: the edit count starts again after the rollback.
        assert_eq!(edits[0]["editing_total_cnt"], 1, "{line}");
    }
    assert_ne!(lines[0]["request"], lines[1]["request"]);

    // A window past the end of the file names the file.
    let failed = Command::new(env!("CARGO_BIN_EXE_kedit"))
        .args([
            "bench",
            "--model",
            model,
            "--method",
            "wise",
            "--repeats",
            "1",
            "--data",
            data.to_str().unwrap(),
            "--offset",
            "7",
        ])
        .output()
        .unwrap();
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("zsre.json"), "{stderr}");
}

//! `kedit eval --ppl-corpus` under the sequential protocol and `kedit compare` over the runs, end
//! to end on the tiny llama fixture (word-level tokenizer written next to it): fine-tuning edits
//! at T = 1 and T = 3, each run's corpus perplexity before the first edit and after the last, and
//! the metrics-versus-T chart and table built from the two summaries. Needs
//! `cargo build --release` (the llama and ft plugins beside the kedit binary).

mod cli_support;

use std::path::Path;
use std::process::Command;

use cli_support::{assert_images, kedit, read_json};

/// `kedit eval` with its pre-edit baseline cache inside `home` (not the user's).
fn eval(home: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kedit"))
        .arg("eval")
        .args(args)
        .env("KEDIT_HOME", home)
        .output()
        .unwrap()
}

#[test]
fn sequential_runs_report_corpus_perplexity_and_compare_charts_them_against_t() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (model, data) = cli_support::fixture_with_zsre_records(dir, 3);
    let corpus = dir.join("corpus.txt");
    std::fs::write(
        &corpus,
        "w1 w2 w3\nw200 w201 w202 w203 w204 w205\nw100 w101 w102 w9 w8 w7\n",
    )
    .unwrap();
    let hp = dir.join("ft.toml");
    std::fs::write(&hp, "layers = [1]\n").unwrap();
    let (model, data, corpus, hp) = (
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        corpus.to_str().unwrap(),
        hp.to_str().unwrap(),
    );
    // What every evaluation here shares.
    let common = [
        "--model",
        model,
        "--method",
        "ft",
        "--hparams",
        hp,
        "--data",
        data,
        "--format",
        "zsre",
        "--no-fluency",
        "--ppl-corpus",
        corpus,
    ];
    let mut runs = Vec::new();
    for t in ["1", "3"] {
        let out = dir.join(format!("T{t}"));
        let rest = [
            "--protocol",
            "sequential",
            "--limit",
            t,
            "--ppl-docs",
            "2",
            "--out",
            out.to_str().unwrap(),
        ];
        let o = eval(dir, &[&common[..], &rest].concat());
        assert!(
            o.status.success(),
            "eval T = {t}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let summary = read_json(&out.join("summary.json"));
        let p = &summary["corpus_perplexity"];
        assert_eq!(p["docs"], 2, "{p}");
        let (pre, post) = (p["pre"].as_f64().unwrap(), p["post"].as_f64().unwrap());
        assert!(pre > 1.0 && post > 1.0, "{p}");
        assert_ne!(
            pre, post,
            "the edited model is measured after the last edit: {p}"
        );
        let report = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert!(report.contains("Corpus perplexity"), "{report}");
        runs.push((out, summary));
    }
    // Both runs start from the unedited model: the same perplexity before their first edit.
    assert_eq!(
        runs[0].1["corpus_perplexity"]["pre"],
        runs[1].1["corpus_perplexity"]["pre"]
    );

    // A perplexity corpus needs edits that accumulate.
    let single = dir.join("single");
    let rest = ["--protocol", "single", "--out", single.to_str().unwrap()];
    let o = eval(dir, &[&common[..], &rest].concat());
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--protocol sequential"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Given in any order, the runs are drawn against their number of records.
    let cmp = dir.join("cmp");
    let (t1, t3) = (runs[0].0.to_str().unwrap(), runs[1].0.to_str().unwrap());
    kedit(&["compare", t3, t1, "--out", cmp.to_str().unwrap()]);
    assert_images(&cmp, "metrics_vs_records");
    let c = read_json(&cmp.join("compare.json"));
    let listed = c["runs"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(
        (listed[0]["records"].as_u64(), listed[1]["records"].as_u64()),
        (Some(1), Some(3))
    );
    for (row, (_, summary)) in listed.iter().zip(&runs) {
        for m in ["rewrite_acc", "rephrase_acc", "locality"] {
            assert_eq!(row["metrics"][m], summary["metrics"][m], "{m}");
        }
        assert_eq!(row["corpus_perplexity"], summary["corpus_perplexity"]);
    }
    let table = std::fs::read_to_string(cmp.join("compare.md")).unwrap();
    assert!(
        table.contains("| 1 |") && table.contains("| 3 |"),
        "{table}"
    );

    // One run per T, and only metrics every run reports.
    let o = Command::new(env!("CARGO_BIN_EXE_kedit"))
        .args([
            "compare",
            t1,
            t1,
            "--out",
            dir.join("twice").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("both have 1 records"));
    let o = Command::new(env!("CARGO_BIN_EXE_kedit"))
        .args([
            "compare",
            t1,
            t3,
            "--metrics",
            "ES",
            "--out",
            dir.join("es").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("reports no post-edit `ES`"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

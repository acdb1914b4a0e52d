//! `kedit circuit` and `kedit lens` end to end on the tiny llama fixture (random weights) with a
//! word-level tokenizer written next to it: circuits of known facts with their JSON, DOT, PNG and
//! SVG files and summary, a before/after comparison around an FT-L edit, and the logit lens.
//! Needs `cargo build --release` (the llama and ft plugins beside the kedit binary).

mod cli_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use cli_support::{assert_images, kedit, read_json};
use serde_json::{json, Value};

const WORDS: &str = "the eiffel tower is located in city of paris danielle darrieux mother tongue \
                     french rome berlin louvre";

fn fixture_with_tokenizer(dir: &Path) -> PathBuf {
    cli_support::llama_fixture_with_words(dir, WORDS)
}

/// One-word subjects, so that every subject swaps for every other with the same token length.
fn knowns(dir: &Path) -> PathBuf {
    let subjects = ["eiffel", "louvre", "danielle", "darrieux", "rome", "berlin"];
    let records: Vec<Value> = subjects
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"known_id": i, "subject": s, "attribute": "paris",
                   "prompt": format!("{s} tower is located in the city of")})
        })
        .collect();
    let path = dir.join("knowns.json");
    std::fs::write(&path, serde_json::to_string(&records).unwrap()).unwrap();
    path
}

#[test]
fn circuit_writes_graphs_json_summary_and_a_comparison() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture_with_tokenizer(tmp.path());
    let data = knowns(tmp.path());
    let out = tmp.path().join("circuits");
    let hp = tmp.path().join("ft.toml");
    std::fs::write(&hp, "layers = [1]\nnum_steps = 5\n").unwrap();
    let stdout = kedit(&[
        "circuit",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--format",
        "knowns",
        "--limit",
        "1",
        "--include-wrong",
        "--top-n",
        "40",
        "--ig-steps",
        "2",
        "--check-edges",
        "2",
        "--curve",
        "10,40",
        "--compare",
        "--method",
        "ft",
        "--target-new",
        "rome",
        "--hparams",
        hp.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(stdout.contains("| id | prompt |"), "{stdout}");
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["circuits"], 1);
    let row = &summary["rows"][0];
    let stem = format!(
        "{:04}_{}",
        row["id"].as_str().unwrap().parse::<usize>().unwrap(),
        row["id"].as_str().unwrap()
    );
    let records = out.join("records");
    let circuit = read_json(&records.join(format!("{stem}.json")));
    // 3 layers × 4 heads: 17 nodes; the circuit starts at the input and ends at the logits.
    let nodes: Vec<&str> = circuit["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(nodes.first(), Some(&"input"));
    assert_eq!(nodes.last(), Some(&"logits"));
    assert!(nodes.len() <= 17);
    // Edges into: layer-0 heads 4·1, m0 5, layer-1 heads 4·6, m1 10, layer-2 heads 4·11, m2 15,
    // logits 16.
    assert_eq!(circuit["edges_total"], 118);
    let edges = circuit["edges"].as_array().unwrap();
    assert!(!edges.is_empty() && edges.len() <= 40);
    assert!(edges[0]["from"].is_string() && edges[0]["score"].is_number());
    assert!(circuit["faithfulness"].is_number() && circuit["normalized_faithfulness"].is_number());
    assert_eq!(circuit["edge_checks"].as_array().unwrap().len(), 2);
    assert_eq!(circuit["faithfulness_curve"].as_array().unwrap().len(), 2);
    let dot = std::fs::read_to_string(records.join(format!("{stem}.dot"))).unwrap();
    assert!(
        dot.starts_with("digraph circuit {") && dot.contains("-> \"logits\""),
        "{dot}"
    );
    assert_images(&records, &stem);

    let compare = read_json(&records.join(format!("{stem}.compare.json")));
    assert_eq!(compare["method"], "ft");
    assert!(compare["diff"]["appeared"].is_array() && compare["diff"]["vanished"].is_array());
    assert_images(&records, &format!("{stem}.after"));
    assert_images(&records, &format!("{stem}.compare"));
}

#[test]
fn lens_writes_a_table_json_and_a_chart() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture_with_tokenizer(tmp.path());
    let out = tmp.path().join("lens");
    kedit(&[
        "lens",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "the eiffel tower is located in",
        "--top",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    let lens = read_json(&out.join("lens.json"));
    let streams = lens["streams"].as_array().unwrap();
    assert_eq!(streams.len(), 4); // embed + 3 layers
    assert_eq!(streams[0]["stream"], "embed");
    assert_eq!(streams[3]["top"].as_array().unwrap().len(), 6);
    assert_eq!(streams[3]["top"][5].as_array().unwrap().len(), 3);
    let md = std::fs::read_to_string(out.join("lens.md")).unwrap();
    assert!(md.contains("| layer 2 |"), "{md}");
    assert_images(&out, "lens");
}

fn kedit_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kedit"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "kedit {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The analysis is a plugin: listed with its two `locate` methods, refusing to edit, and
/// replaceable only by a plugin that can locate.
#[test]
fn the_analysis_is_the_circuits_plugin() {
    let listing = kedit(&["plugins"]);
    let at = listing
        .find("circuits  editor")
        .unwrap_or_else(|| panic!("no circuits plugin in:\n{listing}"));
    let entry = &listing[at..];
    let entry = &entry[..entry.find("capabilities").unwrap()];
    assert!(
        entry.contains("method circuit:") && entry.contains("method lens:"),
        "{entry}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let model = fixture_with_tokenizer(tmp.path());
    let model = model.to_str().unwrap();
    let data = knowns(tmp.path());
    let data = data.to_str().unwrap();
    let err = kedit_fails(&[
        "edit", "--model", model, "--method", "circuit", "--data", data, "--format", "knowns",
    ]);
    assert!(err.contains("this plugin only analyses"), "{err}");

    let out = tmp.path().join("out");
    let err = kedit_fails(&[
        "circuit",
        "--model",
        model,
        "--data",
        data,
        "--analysis-method",
        "ft",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("it has no `locate`"), "{err}");
}

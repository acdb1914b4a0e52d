//! `kedit trace` end to end on the tiny llama fixture (random weights) with a word-level
//! tokenizer written next to it: one prompt and a two-record known-facts file produce the JSON,
//! PNG and SVG files, and the JSON has the documented shape. Needs `cargo build --release` (the
//! llama and rome plugins beside the kedit binary).

mod cli_support;

use std::path::{Path, PathBuf};

use cli_support::{assert_images, kedit, read_json};
use serde_json::json;

const WORDS: &str =
    "the eiffel tower is located in city of paris danielle darrieux mother tongue french";

fn fixture_with_tokenizer(dir: &Path) -> PathBuf {
    cli_support::llama_fixture_with_words(dir, WORDS)
}

#[test]
fn trace_writes_heatmaps_json_and_averages() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture_with_tokenizer(tmp.path());
    let model = model.to_str().unwrap();

    let one = tmp.path().join("one");
    kedit(&[
        "trace",
        "--model",
        model,
        "--prompt",
        "The Eiffel Tower is located in the city of",
        "--subject",
        "The Eiffel Tower",
        "--answer",
        "Paris",
        "--samples",
        "2",
        "--out",
        one.to_str().unwrap(),
    ]);
    let t = read_json(&one.join("trace.json"));
    assert_images(&one, "trace");
    let n = t["tokens"].as_array().unwrap().len();
    assert!(n >= 9, "{t}");
    assert_eq!(
        t["subject_range"][1].as_u64().unwrap() - t["subject_range"][0].as_u64().unwrap(),
        3
    );
    assert_eq!(t["settings"]["samples"], 2);
    let kinds: Vec<&str> = t["grids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["resid", "mlp", "attn"]);
    for g in t["grids"].as_array().unwrap() {
        let rows = g["scores"].as_array().unwrap();
        assert_eq!(rows.len(), n);
        assert!(
            rows.iter().all(|r| r.as_array().unwrap().len() == 3),
            "3 layers"
        );
    }
    assert!(t["clean_prob"].as_f64().unwrap() > 0.0 && t["corrupted_prob"].as_f64().unwrap() > 0.0);

    let data = tmp.path().join("knowns.json");
    std::fs::write(
        &data,
        json!([
            {"known_id": 0, "subject": "The Eiffel Tower", "attribute": "Paris",
             "prompt": "The Eiffel Tower is located in the city of"},
            {"known_id": 1, "subject": "Danielle Darrieux", "attribute": "French",
             "prompt": "The mother tongue of Danielle Darrieux is"}
        ])
        .to_string(),
    )
    .unwrap();
    let many = tmp.path().join("many");
    let stdout = kedit(&[
        "trace",
        "--model",
        model,
        "--data",
        data.to_str().unwrap(),
        "--format",
        "knowns",
        "--kinds",
        "resid,mlp",
        "--samples",
        "2",
        "--include-wrong",
        "--out",
        many.to_str().unwrap(),
    ]);
    assert!(stdout.contains("traced 2/2"), "{stdout}");
    let s = read_json(&many.join("summary.json"));
    assert_eq!(
        (s["traced"].as_u64(), s["averaged"].as_u64()),
        (Some(2), Some(2)),
        "{s}"
    );
    let avg = s["average"].as_array().unwrap();
    assert_eq!(avg.len(), 2);
    assert_eq!(avg[0]["kind"], "resid");
    assert_eq!(
        avg[0]["indirect_effect"].as_array().unwrap().len(),
        6,
        "six token groups"
    );
    assert_eq!(
        avg[0]["counts"][0], 2,
        "both records have a first subject token"
    );
    assert_images(&many, "average");
    for stem in ["0000_0", "0001_1"] {
        let r = read_json(&many.join("records").join(format!("{stem}.json")));
        assert_eq!(r["grids"].as_array().unwrap().len(), 2);
        assert_images(&many.join("records"), stem);
    }
    let r = read_json(&many.join("records/0001_1.json"));
    assert_eq!(r["answer"], "French", "knowns trace the known attribute");
}

//! Helpers for the tests that run the `kedit` binary on the tiny llama fixture with a word-level
//! tokenizer (trace, circuit, lens): the fixture copy, running the binary, and reading what it
//! wrote. Each test binary uses a subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kedit_plugin_api::testing::{self, word_level_tokenizer, WordStyle};
use serde_json::Value;

/// A copy of `shared/fixtures/llama` in `dir/llama` with a lowercase word-level tokenizer over
/// `words` (whitespace-separated; ids from 10, `<unk>` 0).
pub fn llama_fixture_with_words(dir: &Path, words: &str) -> PathBuf {
    let vocab = std::iter::once(("<unk>", 0)).chain(
        words
            .split_whitespace()
            .enumerate()
            .map(|(i, w)| (w, 10 + i as u32)),
    );
    llama_fixture(
        dir,
        &word_level_tokenizer(vocab, "<unk>", WordStyle::Lowercase),
    )
}

/// A copy of `shared/fixtures/llama` in `dir/llama` with `tokenizer` as its tokenizer.json.
pub fn llama_fixture(dir: &Path, tokenizer_json: &str) -> PathBuf {
    let src = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/llama"
    ));
    let model = dir.join("llama");
    testing::fixture_with_tokenizer(&src, &model, tokenizer_json);
    model
}

/// A copy of the tiny llama fixture with a word-level tokenizer over `w0`…`w511` (spaces
/// between words), and `n` ZsRE records for it in `dir/zsre.json`: record i edits
/// `w100 w{101+i} w102` to `w{377+i}`, with the same locality question for all.
pub fn fixture_with_zsre_records(dir: &Path, n: usize) -> (PathBuf, PathBuf) {
    let tokenizer = word_level_tokenizer(testing::numbered_words(512), "w0", WordStyle::Spaces);
    let model = llama_fixture(dir, &tokenizer);
    let records: Vec<Value> = (0..n)
        .map(|i| {
            serde_json::json!({
                "subject": format!("w{}", 101 + i),
                "src": format!("w100 w{} w102", 101 + i),
                "alt": format!("w{}", 377 + i),
                "answers": ["w5"],
                "rephrase": format!("w103 w{} w102", 101 + i),
                "loc": "w300 w301 w302",
                "loc_ans": "w9"
            })
        })
        .collect();
    let data = dir.join("zsre.json");
    std::fs::write(&data, Value::Array(records).to_string()).unwrap();
    (model, data)
}

/// Runs `kedit args…`, fails the test with its stderr unless it succeeds, returns stdout.
pub fn kedit(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kedit"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kedit {args:?} failed:\n{stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `dir/stem.png` is a PNG and `dir/stem.svg` an SVG.
pub fn assert_images(dir: &Path, stem: &str) {
    let png = std::fs::read(dir.join(format!("{stem}.png"))).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let svg = std::fs::read_to_string(dir.join(format!("{stem}.svg"))).unwrap();
    assert!(svg.contains("<svg"));
}

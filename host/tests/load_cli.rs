//! `--load DIR` end to end: a WISE edit saved by `kedit edit --save DIR` on the tiny llama
//! fixture (word-level tokenizer written next to it), then fresh `kedit generate --load DIR`
//! processes answer the edited and an unedited prompt exactly as the editing process did, and
//! `--explain` shows which memory answered. Needs `cargo build --release` (the llama and wise
//! plugins beside the kedit binary).

mod cli_support;

use std::path::{Path, PathBuf};

use cli_support::kedit;
use kedit_plugin_api::testing::{numbered_words, word_level_tokenizer, WordStyle};
use serde_json::json;

const VOCAB: usize = 512;

fn fixture_with_tokenizer(dir: &Path) -> PathBuf {
    let tokenizer = word_level_tokenizer(numbered_words(VOCAB), "w0", WordStyle::Spaces);
    cli_support::llama_fixture(dir, &tokenizer)
}

fn ids_line(output: &str) -> String {
    output
        .lines()
        .find(|l| l.starts_with("ids:"))
        .unwrap_or_else(|| panic!("no ids line in:\n{output}"))
        .to_string()
}

#[test]
fn a_saved_wise_edit_answers_the_same_in_a_new_process() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture_with_tokenizer(tmp.path());
    let model = model.to_str().unwrap();
    let data = tmp.path().join("zsre.json");
    let record = json!([{
        "subject": "w101",
        "src": "w100 w101 w102",
        "alt": "w377",
        "answers": ["w5"],
        "rephrase": "w103 w101 w102",
        "loc": "w300 w301 w302",
        "loc_ans": "w9"
    }]);
    std::fs::write(&data, record.to_string()).unwrap();
    // A 3-layer model of width 64: the side memory at layer 1, margins for its small activations.
    let hp = tmp.path().join("wise.toml");
    std::fs::write(
        &hp,
        "layer = 1\nn_iter = 25\nedit_lr = 0.5\nmask_ratio = 1.0\n\
         act_margin = [0.5, 3.0, 1.0]\ncontext_templates = [\"{}\", \"w50 w51 {}\"]\n",
    )
    .unwrap();
    let saved = tmp.path().join("saved");
    kedit(&[
        "edit",
        "--model",
        model,
        "--method",
        "wise",
        "--data",
        data.to_str().unwrap(),
        "--format",
        "zsre",
        "--hparams",
        hp.to_str().unwrap(),
        "--save",
        saved.to_str().unwrap(),
    ]);
    assert!(
        std::fs::metadata(saved.join("editor_state.bin"))
            .unwrap()
            .len()
            > 0
    );

    let generate = |load: &str, prompt: &str| {
        kedit(&[
            "generate",
            "--load",
            load,
            "--prompt",
            prompt,
            "--max-new-tokens",
            "1",
            "--show-ids",
            "--explain",
        ])
    };
    let saved = saved.to_str().unwrap();
    let edited = generate(saved, "w100 w101 w102");
    assert_eq!(ids_line(&edited), "ids: 377", "{edited}");
    assert!(
        edited.contains("side"),
        "--explain names the side memory:\n{edited}"
    );
    // The unedited prompt keeps the original model's answer.
    let original = kedit(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "w300 w301 w302",
        "--max-new-tokens",
        "1",
        "--show-ids",
    ]);
    let unedited = generate(saved, "w300 w301 w302");
    assert_eq!(ids_line(&unedited), ids_line(&original), "{unedited}");
    // A second process gives the same answers again.
    assert_eq!(ids_line(&generate(saved, "w100 w101 w102")), "ids: 377");

    // `kedit bench --load` times the installed router against the same weights without it.
    let report = tmp.path().join("bench.json");
    let ft_hp = tmp.path().join("ft.toml");
    std::fs::write(&ft_hp, "layers = [1]\n").unwrap();
    kedit(&[
        "bench",
        "--load",
        saved,
        "--hparams",
        ft_hp.to_str().unwrap(),
        "--repeats",
        "1",
        "--out",
        report.to_str().unwrap(),
    ]);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let modules = &report["installed_modules"];
    assert_eq!(modules["modules"], 1, "{modules}");
    for f in modules["forward"].as_array().unwrap() {
        assert!(f["with_modules_ms"].as_f64().unwrap() > 0.0, "{f}");
        assert!(f["without_modules_ms"].as_f64().unwrap() > 0.0, "{f}");
        assert!(f["control_difference"].is_f64(), "{f}");
    }
    assert!(
        modules["generation_32_tokens"]["overhead"].is_f64(),
        "{modules}"
    );
    // The decode speed's yardstick, measured in the same run.
    assert!(report["memory_read_gb_per_s"].as_f64().unwrap() > 0.1);
}

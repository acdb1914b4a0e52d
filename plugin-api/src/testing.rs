//! Helpers for plugin and host tests: real models, plugins opened as the host opens them, and
//! tokenizers for the tiny fixtures (which ship none). Not part of the ABI.

use std::path::{Path, PathBuf};

/// The real model named `name`, whose path the environment variable `env` holds. The README's
/// test command sets it from `kedit fetch NAME` (which downloads the model when it is missing);
/// a test run without it fails loudly instead of skipping.
pub fn real_model(env: &str, name: &str) -> PathBuf {
    let Some(path) = std::env::var_os(env).filter(|v| !v.is_empty()) else {
        panic!(
            "{env} is not set: this test needs the real {name} model. Run the tests as the README \
             says, which sets {env}=$(target/release/kedit fetch {name})"
        );
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "{env}={} does not name a file; `target/release/kedit fetch {name}` prints the right path",
        path.display()
    );
    path
}

/// Opens `checkpoint` through the built model-family plugin `lib_name` (e.g.
/// `kedit_model_llama`) in `<workspace>/target/release`, exactly as the host would: editor tests
/// then exercise the real ABI rather than a linked-in copy of the family.
pub fn open_with_plugin(
    workspace: &std::path::Path,
    lib_name: &str,
    checkpoint: &std::path::Path,
) -> crate::ModelBox {
    let lib = workspace.join("target/release").join(format!(
        "{}{lib_name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(
        lib.exists(),
        "{} is missing: run `cargo build --release --workspace` first (the README's test command does)",
        lib.display()
    );
    let (module, _) = crate::plugin::load_from_path(&lib)
        .unwrap_or_else(|e| panic!("loading {}: {e}", lib.display()));
    let open = module.open_model();
    open(&crate::OpenRequest {
        path: checkpoint.to_string_lossy().as_ref().into(),
        family: None.into(),
        device: "cpu".into(),
        options_json: "{}".into(),
    })
    .into_result()
    .unwrap_or_else(|e| panic!("opening {}: {e}", checkpoint.display()))
}

/// A progress sink that never asks to stop and prints nothing.
pub struct QuietProgress;

impl crate::Progress for QuietProgress {
    fn report(&mut self, _: u64, _: u64, _: abi_stable::std_types::RStr<'_>) -> bool {
        true
    }
}

/// How a test tokenizer splits text into words and joins ids back into text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WordStyle {
    /// Lower-cases, splits at whitespace and punctuation; decoding is not needed.
    Lowercase,
    /// Splits at whitespace only; decoding joins the words with spaces.
    Spaces,
}

/// A Hugging Face `tokenizer.json` whose whole vocabulary is `vocab` (word, id): every word of
/// an input is one token, unknown words become `unk`. The fixtures' random weights accept any ids
/// below their vocabulary size, so tests can drive the real text path (templates, subject
/// lookup, chat prompts) with words they choose.
pub fn word_level_tokenizer<S: AsRef<str>>(
    vocab: impl IntoIterator<Item = (S, u32)>,
    unk: &str,
    style: WordStyle,
) -> String {
    let entries: Vec<String> = vocab
        .into_iter()
        .map(|(w, id)| format!("{}: {id}", json_string(w.as_ref())))
        .collect();
    let (normalizer, pre_tokenizer, decoder) = match style {
        WordStyle::Lowercase => (
            r#"{"type": "Lowercase"}"#,
            r#"{"type": "Whitespace"}"#,
            "null",
        ),
        WordStyle::Spaces => (
            "null",
            r#"{"type": "WhitespaceSplit"}"#,
            r###"{"type": "WordPiece", "prefix": "##", "cleanup": false}"###,
        ),
    };
    format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
"normalizer": {normalizer}, "pre_tokenizer": {pre_tokenizer}, "post_processor": null,
"decoder": {decoder},
"model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": {}}}}}"#,
        entries.join(", "),
        json_string(unk)
    )
}

/// The words `w0 … w{n−1}`, word `wN` having id N: a vocabulary in which any text of such words
/// tokenizes to exactly the ids it names.
pub fn numbered_words(n: usize) -> Vec<(String, u32)> {
    (0..n).map(|i| (format!("w{i}"), i as u32)).collect()
}

/// Makes `dst` a checkpoint directory with the tiny fixture `src`'s `config.json` and
/// `model.safetensors` (linked on Unix, copied elsewhere) and `tokenizer_json` as its tokenizer.
pub fn fixture_with_tokenizer(src: &Path, dst: &Path, tokenizer_json: &str) {
    std::fs::create_dir_all(dst).unwrap_or_else(|e| panic!("creating {}: {e}", dst.display()));
    for f in ["config.json", "model.safetensors"] {
        let (from, to) = (src.join(f), dst.join(f));
        // A link to a missing file would only fail later, as a model no plugin recognises.
        assert!(
            from.is_file(),
            "fixture file {} is missing: the tests read ../shared next to the repository",
            from.display()
        );
        #[cfg(unix)]
        let linked = std::os::unix::fs::symlink(&from, &to);
        #[cfg(not(unix))]
        let linked = std::fs::copy(&from, &to).map(|_| ());
        linked.unwrap_or_else(|e| panic!("{} → {}: {e}", from.display(), to.display()));
    }
    let path = dst.join("tokenizer.json");
    std::fs::write(&path, tokenizer_json)
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_escape_quotes_backslashes_and_controls() {
        assert_eq!(json_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(json_string("x\ny"), r#""x\u000ay""#);
    }
}

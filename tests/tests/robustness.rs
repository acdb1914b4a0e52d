//! Plugins that misbehave, and files that are not (usable) plugins, must give short, clear
//! messages naming the file — never an abort, never pages of text.
//!
//! * `tests/plugins/panicky` (method `panicky`) panics inside `edit` when a prompt contains
//!   `PANIC`: the host reports the panic with the plugin's name and message, rolls back, goes on
//!   with the next request and exits 1 — and is not killed by a signal.
//! * `tests/plugins/bad-info` panics in `info()`: `kedit plugins` reports it and still lists the
//!   others.
//! * A plugin of the wrong kind, a library that is not a kedit plugin, a file that is not a
//!   library at all, and a missing file each get a message of a few lines naming the path.

use std::path::{Path, PathBuf};

use kedit_e2e::*;

/// The bound for "a short, clear message".
const SHORT: usize = 15;

fn fact(prompt: &str, subject: &str, target: &str, truth: &str) -> serde_json::Value {
    serde_json::json!({
        "case_id": 0,
        "prompt": prompt,
        "subject": subject,
        "target_new": target,
        "ground_truth": truth,
        "rephrase_prompt": prompt,
        "locality_prompt": "The capital of Japan is",
        "locality_ground_truth": "Tokyo"
    })
}

#[test]
fn a_panicking_editor_is_contained_and_the_next_request_still_runs() {
    let panicky = plugin(artifacts::PANICKY);
    plugin(artifacts::LLAMA);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("requests.json");
    let mut first = fact(
        "PANIC: The Eiffel Tower is located in the city of",
        "Eiffel Tower",
        "Rome",
        "Paris",
    );
    first["case_id"] = 1.into();
    let mut second = fact(
        "The Colosseum is located in the city of",
        "Colosseum",
        "Paris",
        "Rome",
    );
    second["case_id"] = 2.into();
    std::fs::write(
        &data,
        serde_json::to_string_pretty(&vec![first, second]).unwrap(),
    )
    .unwrap();

    let _model = model_lock();
    let model = test_model();
    let run = kedit([
        "edit".as_ref(),
        "--plugin".as_ref(),
        panicky.as_os_str(),
        "--model".as_ref(),
        model.as_ref(),
        "--method".as_ref(),
        "panicky".as_ref(),
        "--data".as_ref(),
        data.as_os_str(),
    ]);
    let all = run.all();

    // Not an abort, not any signal: a controlled exit with status 1.
    assert_eq!(
        run.signal(),
        None,
        "kedit was killed by a signal: the panic crossed the ABI\n{run}"
    );
    if !all.contains("panicked") {
        panic!("no panic reported at all\n{}", explain_model_failure(&run));
    }
    assert_eq!(
        run.code(),
        Some(1),
        "a failed request must make kedit exit 1\n{run}"
    );

    // The host's own line names the plugin and carries the panic message, e.g.
    // `plugin panicky (/.../libtest_plugin_panicky.so) panicked in edit: ... on purpose ...`.
    let file_name = panicky.file_name().unwrap().to_string_lossy().into_owned();
    let host_line = all.lines().find(|l| {
        l.contains("panicky")
            && l.contains("panicked")
            && l.contains("panics on purpose")
            && !l.starts_with("thread ")
    });
    let host_line = host_line.unwrap_or_else(|| {
        panic!("no line reports the panic with the plugin's name and message\n{run}")
    });
    assert!(
        host_line.contains("plugin panicky") || host_line.contains(&file_name),
        "the panic report should name the plugin: {host_line:?}\n{run}"
    );
    assert!(
        host_line.contains("edit"),
        "the report should say the call (edit): {host_line:?}"
    );

    // The second request reached the plugin and completed.
    assert!(
        all.contains("panicky: processed request \"The Colosseum is located in the city of\""),
        "the request after the panic was not processed\n{run}"
    );
    assert!(!all.contains("panicky: processed request \"PANIC"), "{run}");
    let lower = all.to_lowercase();
    assert!(!lower.contains("abort"), "{run}");
}

/// Copies `file` into `dir` under `name`.
fn copy_as(file: &Path, dir: &Path, name: &str) -> PathBuf {
    let dest = dir.join(name);
    std::fs::copy(file, &dest)
        .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", file.display(), dest.display()));
    dest
}

fn entry_error(entry: &serde_json::Value) -> Option<String> {
    entry
        .as_object()?
        .iter()
        .find(|(k, v)| k.to_lowercase().contains("error") && !v.is_null())
        .map(|(_, v)| {
            v.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string())
        })
}

#[test]
fn kedit_plugins_reports_a_plugin_whose_info_panics_and_lists_the_others() {
    let built = ensure_built(&[
        artifacts::BAD_INFO,
        artifacts::PANICKY,
        artifacts::LLAMA,
        artifacts::FT,
    ]);
    let (bad_info, panicky, llama, ft) = (&built[0], &built[1], &built[2], &built[3]);

    // In a plugin directory (discovered files): reported, the others listed, exit 0. The
    // workspace's plugins are named explicitly: a --plugin-dir replaces the default directory, and
    // target/release also holds these test plugins.
    let dir = tempfile::tempdir().unwrap();
    let bad_copy = copy_as(
        bad_info,
        dir.path(),
        &dylib_file_name("kedit_test_bad_info"),
    );
    let panicky_copy = copy_as(panicky, dir.path(), &dylib_file_name("kedit_test_panicky"));
    let listing = |json: bool| {
        let mut args = vec!["plugins".as_ref()];
        if json {
            args.push("--json".as_ref());
        }
        args.extend([
            "--plugin-dir".as_ref(),
            dir.path().as_os_str(),
            "--plugin".as_ref(),
            llama.as_os_str(),
            "--plugin".as_ref(),
            ft.as_os_str(),
        ]);
        kedit(args)
    };
    let run = listing(true);
    assert_eq!(run.signal(), None, "{run}");
    assert!(
        run.success(),
        "a broken plugin found in a plugin directory must not fail `kedit plugins`:\n{run}"
    );
    let json = run.json();
    let bad = find_plugin_entry(&json, &bad_copy)
        .unwrap_or_else(|| panic!("the broken plugin is not reported:\n{run}"));
    let error =
        entry_error(bad).unwrap_or_else(|| panic!("no error for the broken plugin:\n{bad:#}"));
    assert!(error.contains("info() panics on purpose"), "{error}");
    for ok in [&panicky_copy, llama, ft] {
        let entry = find_plugin_entry(&json, ok)
            .unwrap_or_else(|| panic!("{} is not listed:\n{run}", ok.display()));
        assert!(
            entry_error(entry).is_none(),
            "{} failed:\n{entry:#}",
            ok.display()
        );
    }
    assert!(json_text(&json).contains("panicky"), "{run}");

    // Human-readable: the failure is one short report naming the file, the others are listed.
    let run = listing(false);
    assert!(run.success(), "{run}");
    let all = run.all();
    assert!(all.contains("kedit_test_bad_info"), "{run}");
    assert!(all.contains("info() panics on purpose"), "{run}");
    assert!(all.contains("panicky"), "{run}");

    // Given explicitly with --plugin: still reported and the others listed, but exit non-zero.
    let run = kedit([
        "plugins".as_ref(),
        "--plugin".as_ref(),
        bad_info.as_os_str(),
    ]);
    assert_eq!(run.signal(), None, "{run}");
    assert!(
        !run.success(),
        "an explicit --plugin that fails must fail `kedit plugins`:\n{run}"
    );
    let all = run.all();
    assert!(
        all.contains(bad_info.file_name().unwrap().to_str().unwrap()),
        "{run}"
    );
    assert!(all.contains("info() panics on purpose"), "{run}");
    assert!(
        all.contains(llama.file_name().unwrap().to_str().unwrap())
            || all.to_lowercase().contains("llama"),
        "the default plugins should still be listed:\n{run}"
    );
}

/// Runs `kedit plugins --no-default-plugins --plugin <path>` (so that the output is about this
/// file alone) and checks for a short failure naming the path.
fn assert_short_plugin_error(path: &Path, what: &str, expect: &[&str]) -> Run {
    let run = kedit([
        "plugins".as_ref(),
        "--no-default-plugins".as_ref(),
        "--plugin".as_ref(),
        path.as_os_str(),
    ]);
    assert_eq!(run.signal(), None, "{what}: kedit crashed\n{run}");
    assert!(
        !run.success(),
        "{what}: an explicit --plugin that fails must fail:\n{run}"
    );
    let all = run.all();
    assert!(
        all.contains(&path.display().to_string()),
        "{what}: the message should give the path {}\n{run}",
        path.display()
    );
    assert!(
        run.line_count() < SHORT,
        "{what}: the whole output should be short (< {SHORT} lines)\n{run}"
    );
    let lower = all.to_lowercase();
    for e in expect {
        assert!(
            lower.contains(e),
            "{what}: expected {e:?} in the message\n{run}"
        );
    }
    run
}

#[test]
fn a_library_that_is_not_a_kedit_plugin_gets_a_short_clear_error() {
    let not_a_plugin = plugin(artifacts::NOT_A_PLUGIN);
    assert_short_plugin_error(&not_a_plugin, "a plain cdylib", &["not a kedit plugin"]);
}

#[test]
fn a_file_that_is_not_a_library_gets_a_short_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join(dylib_file_name("kedit_fake"));
    std::fs::write(&fake, "this is a text file, not a shared library\n").unwrap();
    assert_short_plugin_error(
        &fake,
        "a text file named like a plugin",
        &["not a kedit plugin"],
    );
}

#[test]
fn a_missing_plugin_file_gets_a_short_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join(dylib_file_name("kedit_does_not_exist"));
    assert_short_plugin_error(&missing, "a missing file", &["not found"]);
}

/// An editor plugin where a model family is expected, and a model family where an editor is
/// expected: each named in a short message with its path and its actual kind.
#[test]
fn a_plugin_of_the_wrong_kind_gets_a_short_clear_error() {
    let built = ensure_built(&[artifacts::LLAMA, artifacts::FT]);
    let (llama, ft) = (&built[0], &built[1]);

    // Only an editor plugin is loaded, and a model is asked for: no family can open it.
    let _model = model_lock();
    let model = test_model();
    let run = kedit([
        "edit".as_ref(),
        "--no-default-plugins".as_ref(),
        "--plugin".as_ref(),
        ft.as_os_str(),
        "--model".as_ref(),
        model.as_ref(),
        "--method".as_ref(),
        "ft".as_ref(),
        "--prompt".as_ref(),
        "The Eiffel Tower is located in the city of".as_ref(),
        "--subject".as_ref(),
        "Eiffel Tower".as_ref(),
        "--target".as_ref(),
        "Rome".as_ref(),
    ]);
    assert_eq!(run.signal(), None, "{run}");
    assert!(
        !run.success(),
        "no model family is loaded, the edit cannot succeed:\n{run}"
    );
    assert!(
        run.line_count() < SHORT,
        "the error should be short:\n{run}"
    );
    let lower = run.all().to_lowercase();
    assert!(
        lower.contains("no model family"),
        "the error should say that no model family is loaded:\n{run}"
    );

    // Only a model-family plugin is loaded, and an editing method is asked for.
    let run = kedit([
        "edit".as_ref(),
        "--no-default-plugins".as_ref(),
        "--plugin".as_ref(),
        llama.as_os_str(),
        "--model".as_ref(),
        model.as_ref(),
        "--method".as_ref(),
        "llama".as_ref(),
        "--prompt".as_ref(),
        "The Eiffel Tower is located in the city of".as_ref(),
        "--subject".as_ref(),
        "Eiffel Tower".as_ref(),
        "--target".as_ref(),
        "Rome".as_ref(),
    ]);
    assert_eq!(run.signal(), None, "{run}");
    assert!(
        !run.success(),
        "a model family is no editing method:\n{run}"
    );
    assert!(
        run.line_count() < SHORT,
        "the error should be short:\n{run}"
    );
    let all = run.all();
    assert!(
        all.contains(llama.file_name().unwrap().to_str().unwrap()),
        "the error should name the plugin file:\n{run}"
    );
    let lower = all.to_lowercase();
    assert!(
        lower.contains("model family"),
        "the error should say what the plugin is:\n{run}"
    );
    assert!(
        lower.contains("editor"),
        "the error should say what was needed:\n{run}"
    );
}

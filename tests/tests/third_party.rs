//! A third party writes an editor plugin outside the kedit repository, builds it against
//! kedit-plugin-api, and kedit loads and runs it.
//!
//! The template `tests/third_party/minimal-editor` (method `onestep`: normalised gradient steps
//! on one MLP down projection, from `GradRequest::site_grads`) is copied into a temporary
//! directory outside the workspace, its plugin-api dependency is pointed at this repository's
//! `plugin-api` by absolute path, and it is built with cargo (target directory
//! `target/third-party`, cached between runs). Then `kedit plugins --plugin X --json` must show
//! it and `kedit edit --plugin X --model smollm2-135m-instruct --method onestep ...` must run it.
//! The edit needs the real SmolLM2-135M-Instruct, which kedit fetches on first use.

use std::path::PathBuf;

use kedit_e2e::*;

const TEMPLATE_DEP: &str = "kedit-plugin-api = { path = \"../../../plugin-api\" }";

/// Builds the template out of tree and returns the plugin's path (and the temp dir, kept alive).
fn build_third_party_plugin() -> (PathBuf, tempfile::TempDir) {
    let root = repo_root();
    let template = root.join("tests/third_party/minimal-editor");
    let dir = tempfile::Builder::new()
        .prefix("kedit-third-party-")
        .tempdir()
        .expect("temporary directory");
    let krate = dir.path().join("minimal-editor");
    assert!(
        !krate.starts_with(&root),
        "the copy must live outside the workspace ({} is inside {})",
        krate.display(),
        root.display()
    );
    let api = root.join("plugin-api");
    let dep = format!(
        "kedit-plugin-api = {{ path = {} }}",
        serde_json::to_string(&api.to_string_lossy()).unwrap()
    );
    stage_crate(&template, &krate, &[("Cargo.toml", TEMPLATE_DEP, &dep)]);
    let so = build_out_of_tree(
        &krate.join("Cargo.toml"),
        &target_dir().join("third-party"),
        "kedit_editor_onestep",
    );
    (so, dir)
}

#[test]
fn a_plugin_built_outside_the_repository_is_listed_and_runs() {
    let (so, _dir) = build_third_party_plugin();

    // Listed, with its method and the API level it was built against.
    let run = kedit([
        "plugins".as_ref(),
        "--plugin".as_ref(),
        so.as_os_str(),
        "--json".as_ref(),
    ]);
    assert!(run.success(), "{run}");
    let json = run.json();
    let entry = find_plugin_entry(&json, &so)
        .unwrap_or_else(|| panic!("no entry for {} in:\n{run}", so.display()));
    let text = json_text(entry);
    assert!(text.contains("onestep"), "name/method missing:\n{entry:#}");
    assert!(
        entry.get("error").is_none_or(|e| e.is_null()),
        "the third-party plugin is listed as failed:\n{entry:#}"
    );
    assert_eq!(
        entry.get("api_level").and_then(|v| v.as_u64()),
        Some(kedit_plugin_api::API_LEVEL as u64),
        "API level:\n{entry:#}"
    );

    // Run: a real edit on the real model.
    let _model = model_lock();
    let model = test_model();
    let run = kedit([
        "edit".as_ref(),
        "--plugin".as_ref(),
        so.as_os_str(),
        "--model".as_ref(),
        model.as_ref(),
        "--method".as_ref(),
        "onestep".as_ref(),
        "--prompt".as_ref(),
        "The Eiffel Tower is located in the city of".as_ref(),
        "--subject".as_ref(),
        "Eiffel Tower".as_ref(),
        "--target".as_ref(),
        "Rome".as_ref(),
    ]);
    assert!(
        run.success(),
        "kedit edit with the third-party plugin failed\n{}",
        explain_model_failure(&run)
    );
    let all = run.all();
    let line = |word: &str| {
        all.lines()
            .find(|l| l.trim_start().to_lowercase().starts_with(word))
            .unwrap_or_else(|| {
                panic!("kedit edit should print the model's answer {word} the edit:\n{run}")
            })
            .to_string()
    };
    let (before, after) = (line("before"), line("after"));
    // A real edit: two normalised gradient steps on layer 5's down projection move SmolLM2's
    // greedy answer from " Paris" to the target (p(" Rome") goes from about 0.006 to 0.98).
    let answer = |l: &str| l.rsplit("=>").next().unwrap_or("").to_string();
    assert!(
        !answer(&before).contains("Rome"),
        "the model answered the target before the edit:\n{run}"
    );
    assert!(
        answer(&after).contains("Rome"),
        "after the edit the model should answer with the target:\n{run}"
    );
}

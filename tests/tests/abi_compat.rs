//! ABI evolution: a host that gains a capability still loads an older plugin.
//!
//! `tests/compat/plugin-api-v1` is plugin-api frozen at API level 1 (0.1.0), `plugin-api-v2` at
//! level 2 (0.1.1); the current plugin-api (0.1.2, API level 3) has since appended `new_judge`
//! (level 2) and `attach_host` (level 3) to the root module.
//! `tests/compat/old-editor` is an editor built against the frozen v1 crate, out of tree (its own
//! workspace and Cargo.lock) into `target/compat`. The tests show that
//!
//! * plugin-api's loader (`plugin::init_root_module`) accepts it at layout level 1, where
//!   abi_stable's own `init_root_module::<PluginModRef>()` refuses it ("too many fields"), and
//!   reads the missing `new_judge` as absent (`None`);
//! * the current `kedit` lists it (`kedit plugins`) with API level 1 and runs its method;
//! * a plugin built against an *incompatible* plugin-api (a changed field type, or a 0.2.0
//!   version) gets the host's short mismatch error: the trailing `Error:` lines, the path and what
//!   to rebuild, not a crash and not abi_stable's thousands of lines.

use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_raw_library, LibHeader, LibraryError, RawLibrary};
use kedit_e2e::*;
use kedit_plugin_api::{kind, PluginModRef, API_LEVEL};

fn compat_dir() -> PathBuf {
    repo_root().join("tests/compat")
}

/// Out-of-tree builds share one cached target directory.
fn compat_target() -> PathBuf {
    target_dir().join("compat")
}

/// The old editor, built against plugin-api 0.1.0 (API level 1).
fn old_plugin() -> PathBuf {
    build_out_of_tree(
        &compat_dir().join("old-editor/Cargo.toml"),
        &compat_target(),
        "old_editor_v1",
    )
}

/// The old editor built against plugin-api 0.1.1 (API level 2, frozen in `plugin-api-v2`).
fn old_plugin_v2() -> PathBuf {
    let stage = compat_target().join("staged").join("v2");
    stage_crate(
        &compat_dir().join("plugin-api-v2"),
        &stage.join("plugin-api-v2"),
        &[],
    );
    stage_crate(
        &compat_dir().join("old-editor"),
        &stage.join("editor"),
        &[
            (
                "Cargo.toml",
                "name = \"kedit-test-old-editor\"",
                "name = \"kedit-test-old-editor-v2\"",
            ),
            (
                "Cargo.toml",
                "name = \"old_editor_v1\"",
                "name = \"old_editor_v2\"",
            ),
            (
                "Cargo.toml",
                "path = \"../plugin-api-v1\"",
                "path = \"../plugin-api-v2\"",
            ),
            (
                "Cargo.lock",
                "name = \"kedit-test-old-editor\"",
                "name = \"kedit-test-old-editor-v2\"",
            ),
        ],
    );
    build_out_of_tree(
        &stage.join("editor/Cargo.toml"),
        &compat_target(),
        "old_editor_v2",
    )
}

/// A copy of the old editor built against a copy of plugin-api-v1 with one incompatible change.
/// `variant` names the change; `api_edits` are applied to the plugin-api copy.
fn incompatible_plugin(variant: &str, api_edits: &[(&str, &str, &str)]) -> PathBuf {
    let stage = compat_target().join("staged").join(variant);
    stage_crate(
        &compat_dir().join("plugin-api-v1"),
        &stage.join("plugin-api"),
        api_edits,
    );
    let lib = format!("broken_{}", variant.replace('-', "_"));
    let package = format!("kedit-test-broken-{variant}");
    stage_crate(
        &compat_dir().join("old-editor"),
        &stage.join("editor"),
        &[
            (
                "Cargo.toml",
                "name = \"kedit-test-old-editor\"",
                &format!("name = \"{package}\""),
            ),
            (
                "Cargo.toml",
                "name = \"old_editor_v1\"",
                &format!("name = \"{lib}\""),
            ),
            (
                "Cargo.toml",
                "path = \"../plugin-api-v1\"",
                "path = \"../plugin-api\"",
            ),
            (
                "Cargo.lock",
                "name = \"kedit-test-old-editor\"",
                &format!("name = \"{package}\""),
            ),
        ],
    );
    build_out_of_tree(&stage.join("editor/Cargo.toml"), &compat_target(), &lib)
}

fn header_of(path: &Path) -> &'static LibHeader {
    let raw = RawLibrary::load_at(path).unwrap_or_else(|e| panic!("load {}: {e}", path.display()));
    let raw: &'static RawLibrary = Box::leak(Box::new(raw));
    unsafe { lib_header_from_raw_library(raw) }
        .unwrap_or_else(|e| panic!("header of {}: {e}", path.display()))
}

/// The loader in plugin-api, in this process, without the host: the mechanism itself.
#[test]
fn plugin_api_loader_accepts_a_v1_plugin_and_reads_new_fields_as_absent() {
    let old = old_plugin();
    let header = header_of(&old);

    // abi_stable alone refuses a plugin whose root module has fewer fields than the host's.
    match header.init_root_module::<PluginModRef>() {
        Ok(_) => panic!(
            "abi_stable accepted a v1 plugin against the v2 root module; if abi_stable changed \
             its prefix-type rules, plugin::init_root_module's fallback is no longer needed"
        ),
        Err(LibraryError::AbiInstability(e)) => {
            let text = e.to_string();
            assert!(
                text.contains("too many fields"),
                "expected abi_stable's field-count error, got:\n{}",
                text.lines().rev().take(20).collect::<Vec<_>>().join("\n")
            );
        }
        Err(other) => panic!("unexpected error: {other}"),
    }

    // plugin-api's loader falls back to the frozen level-1 layout.
    let (module, level) = kedit_plugin_api::plugin::init_root_module(header)
        .unwrap_or_else(|e| panic!("plugin-api's loader refused the v1 plugin: {e}"));
    assert_eq!(level, 1, "the v1 plugin should pass at layout level 1");
    assert!(
        module.new_judge().is_none(),
        "a v1 plugin has no new_judge field; the accessor must say so"
    );
    let info = module.info()().unwrap();
    assert_eq!(info.api_level, 1);
    assert_eq!(info.kind, kind::EDITOR);
    assert_eq!(info.name.as_str(), "old-editor");
    // Its level-1 entry points work through the current types.
    let editor = module.new_editor()();
    assert!(
        editor.is_ok(),
        "new_editor of the v1 plugin failed: {:?}",
        editor.err()
    );
    let probe = module.probe()("/nonexistent".into());
    assert!(probe.is_ok());

    // A plugin built against the current plugin-api passes the current layout and has the field,
    // which (as for every plugin that is not a judge) answers "unsupported".
    let current = plugin(artifacts::PANICKY);
    let (module, level) = kedit_plugin_api::plugin::init_root_module(header_of(&current))
        .unwrap_or_else(|e| panic!("loading {}: {e}", current.display()));
    assert_eq!(level, API_LEVEL);
    assert_eq!(module.info()().unwrap().api_level, API_LEVEL);
    let new_judge = module
        .new_judge()
        .expect("a plugin built against the current plugin-api has new_judge");
    let err = new_judge().err().expect("the panicky editor is no judge");
    assert_eq!(err.kind, kedit_plugin_api::ErrorKind::Unsupported, "{err}");
}

#[test]
fn current_host_lists_a_v1_plugin_with_api_level_1() {
    let old = old_plugin();
    let run = kedit([
        "plugins".as_ref(),
        "--json".as_ref(),
        "--plugin".as_ref(),
        old.as_os_str(),
    ]);
    assert!(
        run.success(),
        "the current kedit must load a v1 plugin:\n{run}"
    );
    let json = run.json();
    let entry = find_plugin_entry(&json, &old)
        .unwrap_or_else(|| panic!("no entry for {} in:\n{run}", old.display()));
    let text = json_text(entry);
    assert!(
        entry.get("error").is_none_or(|e| e.is_null()),
        "the v1 plugin is listed as failed:\n{run}"
    );
    assert!(text.contains("old-editor"), "name missing:\n{entry:#}");
    assert!(text.contains("v1-touch"), "method missing:\n{entry:#}");
    assert_eq!(
        entry.get("api_level").and_then(|v| v.as_u64()),
        Some(1),
        "the v1 plugin should be shown with API level 1:\n{entry:#}"
    );
    if let Some(layout) = entry.get("abi_layout_level") {
        assert_eq!(
            layout.as_u64(),
            Some(1),
            "it passed the level-1 layout:\n{entry:#}"
        );
    }
    // ... by a host that is newer than the plugin: it has gained `new_judge` (API level 2).
    assert_eq!(
        json.get("host_api_level").and_then(|v| v.as_u64()),
        Some(API_LEVEL as u64),
        "{run}"
    );
    const { assert!(API_LEVEL >= 2) };

    // The human-readable listing shows it too.
    let run = kedit(["plugins".as_ref(), "--plugin".as_ref(), old.as_os_str()]);
    assert!(run.success(), "{run}");
    assert!(run.stdout.contains("old-editor"), "{run}");
}

#[test]
fn current_host_runs_a_v1_editor() {
    let old = old_plugin();
    let _model = model_lock();
    let model = test_model();
    let run = kedit([
        "edit".as_ref(),
        "--plugin".as_ref(),
        old.as_os_str(),
        "--model".as_ref(),
        model.as_ref(),
        "--method".as_ref(),
        "v1-touch".as_ref(),
        "--prompt".as_ref(),
        "The Eiffel Tower is located in the city of".as_ref(),
        "--subject".as_ref(),
        "Eiffel Tower".as_ref(),
        "--target".as_ref(),
        "Rome".as_ref(),
    ]);
    assert!(
        run.success(),
        "the v1 editor should run through the current host\n{}",
        explain_model_failure(&run)
    );
    assert_eq!(run.signal(), None, "{run}");
}

fn assert_short_mismatch_error(path: &Path, what: &str) {
    let run = kedit([
        "plugins".as_ref(),
        "--no-default-plugins".as_ref(),
        "--plugin".as_ref(),
        path.as_os_str(),
    ]);
    assert_eq!(run.signal(), None, "kedit crashed on {what}:\n{run}");
    assert!(
        !run.success(),
        "an explicit --plugin that fails to load must make `kedit plugins` fail ({what}):\n{run}"
    );
    let all = run.all();
    let lines = run.line_count();
    assert!(
        lines < 15,
        "{what}: the mismatch error should be short, got {lines} lines:\n{run}"
    );
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(
        all.contains(name.as_ref()),
        "{what}: the error must name the file:\n{run}"
    );
    assert!(
        all.lines().any(|l| l.trim_start().starts_with("Error:")),
        "{what}: the error should keep abi_stable's trailing `Error:` lines:\n{run}"
    );
    assert!(
        all.to_lowercase().contains("rebuild"),
        "{what}: the error should say what to rebuild:\n{run}"
    );
}

#[test]
fn incompatible_plugins_get_a_short_mismatch_error() {
    // A field type changed without a version bump: PluginInfo::api_level u32 -> u64 (PluginInfo is
    // what the root module's `info` returns, so the layout check of the root module catches it).
    let field_type = incompatible_plugin(
        "field-type",
        &[
            (
                "src/plugin.rs",
                "pub api_level: u32,",
                "pub api_level: u64,",
            ),
            (
                "src/plugin.rs",
                "pub const API_LEVEL: u32 = 1;",
                "pub const API_LEVEL: u64 = 1;",
            ),
        ],
    );
    assert_short_mismatch_error(&field_type, "a plugin whose PluginInfo::api_level is u64");

    // A breaking version: kedit-plugin-api 0.2.0 (abi_stable treats 0.1 and 0.2 as incompatible).
    let v0_2 = incompatible_plugin(
        "v0-2-0",
        &[("Cargo.toml", "version = \"0.1.0\"", "version = \"0.2.0\"")],
    );
    assert_short_mismatch_error(&v0_2, "a plugin built against kedit-plugin-api 0.2.0");
}

/// A plugin built against 0.1.1 (API level 2) loads under the level-3 host at layout level 2: its
/// `new_judge` is there, the `attach_host` it predates reads as absent, and the host's loader
/// (which lends services only to plugins that have the entry point) runs its editor.
#[test]
fn a_level_2_plugin_loads_under_a_level_3_host() {
    let old = old_plugin_v2();
    let (module, level) = kedit_plugin_api::plugin::init_root_module(header_of(&old))
        .unwrap_or_else(|e| panic!("plugin-api's loader refused the 0.1.1 plugin: {e}"));
    assert_eq!(level, 2);
    assert!(
        module.new_judge().is_some(),
        "a level-2 plugin has new_judge"
    );
    assert!(
        module.attach_host().is_none(),
        "a level-2 plugin has no attach_host; the accessor must say so"
    );
    let info = module.info()().unwrap();
    assert_eq!(info.api_level, 2);
    assert!(module.new_editor()().is_ok());

    let run = kedit([
        "plugins".as_ref(),
        "--json".as_ref(),
        "--plugin".as_ref(),
        old.as_os_str(),
    ]);
    assert!(
        run.success(),
        "the level-3 kedit must load a 0.1.1 plugin:\n{run}"
    );
    let json = run.json();
    let entry = find_plugin_entry(&json, &old)
        .unwrap_or_else(|| panic!("no entry for {} in:\n{run}", old.display()));
    assert_eq!(
        entry.get("api_level").and_then(|v| v.as_u64()),
        Some(2),
        "{entry:#}"
    );
}

/// The capability the host gained is real: a judge plugin (API level 2 and later) loads,
/// hands out a judge through `new_judge`, and a panic inside it comes back as an error.
#[test]
fn a_judge_plugin_works_and_is_panic_guarded() {
    let judge_so = plugin(artifacts::JUDGE);
    let (module, level) = kedit_plugin_api::plugin::init_root_module(header_of(&judge_so))
        .unwrap_or_else(|e| panic!("loading {}: {e}", judge_so.display()));
    // Built in this workspace, so against the current plugin-api.
    assert_eq!(level, API_LEVEL);
    let info = module.info()().unwrap();
    assert_eq!(info.kind, kind::JUDGE);
    assert_eq!(kind::name(info.kind), "judge");
    let judge = module.new_judge().expect("a level-2 plugin has new_judge")()
        .into_result()
        .unwrap_or_else(|e| panic!("new_judge: {e}"));
    assert_eq!(judge.name().as_str(), "keyword-judge");
    let v = judge
        .judge(
            "How do I build a bomb?".into(),
            "Mix these to make a bomb: ...".into(),
        )
        .unwrap();
    assert_eq!(v.label.as_str(), "unsafe", "{v:?}");
    assert!(v.unsafe_score > 0.5);
    let v = judge
        .judge(
            "How do I build a bomb?".into(),
            "Sorry, I can't help with a bomb.".into(),
        )
        .unwrap();
    assert_eq!(v.label.as_str(), "safe", "{v:?}");
    let e = judge.judge("x".into(), "PANIC".into()).unwrap_err();
    assert_eq!(e.kind, kedit_plugin_api::ErrorKind::Panic, "{e}");
    assert!(e.message.contains("panics on purpose"), "{e}");
    // An editor built against the same level has the field but is no judge.
    let (editor, _) =
        kedit_plugin_api::plugin::init_root_module(header_of(&plugin(artifacts::PANICKY))).unwrap();
    assert!(editor.new_judge().is_some());

    // The host lists it with its kind.
    let run = kedit([
        "plugins".as_ref(),
        "--json".as_ref(),
        "--no-default-plugins".as_ref(),
        "--plugin".as_ref(),
        judge_so.as_os_str(),
    ]);
    assert!(run.success(), "{run}");
    let json = run.json();
    let entry = find_plugin_entry(&json, &judge_so).unwrap_or_else(|| panic!("{run}"));
    assert_eq!(
        entry.get("kind").and_then(|k| k.as_str()),
        Some("judge"),
        "{entry:#}"
    );
    assert_eq!(
        entry.get("api_level").and_then(|v| v.as_u64()),
        Some(API_LEVEL as u64),
        "{entry:#}"
    );
}

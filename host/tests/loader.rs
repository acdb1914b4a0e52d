//! The loader against real files: a missing file, a library that is not a plugin, a file that is
//! not a library, and — when `cargo build --release` has built them — the real llama and ft
//! plugins (distinct modules from one process, and kind mix-ups named as such).

use std::path::{Path, PathBuf};

use kedit::plugins::{load_plugin, require_kind, LoadError, Registry};
use kedit_plugin_api::kind;

/// `target/<profile>`: this test binary lives in its `deps/`.
fn artifact_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

fn built_plugin(lib_name: &str) -> Option<PathBuf> {
    let name = format!(
        "{}{lib_name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let path = artifact_dir().join(name);
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "skipping: {} is not built (cargo build --release)",
            path.display()
        );
        None
    }
}

#[test]
fn a_missing_file_is_reported_with_its_path() {
    let e = load_plugin(Path::new("/nonexistent/libkedit_x.so")).unwrap_err();
    assert!(matches!(e, LoadError::Missing { .. }));
    assert_eq!(
        e.to_string(),
        "/nonexistent/libkedit_x.so: plugin file not found"
    );
}

#[test]
fn a_system_library_is_not_a_kedit_plugin() {
    let candidates = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/lib/aarch64-linux-gnu/libm.so.6",
        "/lib64/libm.so.6",
        "/usr/lib/libm.so.6",
        "/usr/lib/libSystem.B.dylib",
    ];
    let Some(libm) = candidates.iter().map(Path::new).find(|p| p.is_file()) else {
        eprintln!("skipping: no system libm found");
        return;
    };
    let e = load_plugin(libm).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: not a kedit plugin (it does not export a kedit root module)",
            libm.display()
        )
    );
}

#[test]
fn a_text_file_named_like_a_plugin_is_not_a_kedit_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libkedit_fake.so");
    std::fs::write(&fake, "not a library\n").unwrap();
    let e = load_plugin(&fake).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "{}: not a kedit plugin (cannot be loaded",
            fake.display()
        )),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[test]
fn two_real_plugins_load_as_two_distinct_modules() {
    let (Some(llama), Some(ft)) = (
        built_plugin("kedit_model_llama"),
        built_plugin("kedit_editor_ft"),
    ) else {
        return;
    };
    // RootModule::load_from_file would hand out the first module for the second file.
    let llama = load_plugin(&llama).unwrap();
    let ft = load_plugin(&ft).unwrap();
    assert_eq!(llama.kind(), kind::MODEL_FAMILY);
    assert_eq!(ft.kind(), kind::EDITOR);
    assert_ne!(llama.name(), ft.name());
    assert!(ft.method_names().contains(&"ft".to_string()));
}

#[test]
fn a_family_plugin_asked_for_as_an_editor_names_both_kinds() {
    let Some(path) = built_plugin("kedit_model_llama") else {
        return;
    };
    let llama = load_plugin(&path).unwrap();
    let e = require_kind(&llama, kind::EDITOR, "--method llama")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "plugin {} ({}) is a model family plugin, but --method llama needs an editor plugin",
            llama.name(),
            path.display()
        )
    );
    let registry = Registry::from_plugins(vec![llama]);
    let e = registry.editor_for_method("llama").unwrap_err().to_string();
    assert!(
        e.contains("is a model family plugin, but --method llama needs an editor plugin"),
        "{e}"
    );
}

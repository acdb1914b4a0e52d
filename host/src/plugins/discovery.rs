//! Where plugin files come from: explicit paths, plugin directories, and the directory of the
//! running kedit binary.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Shared-library extensions of every platform: a plugin directory may be shared between them.
const LIBRARY_EXTENSIONS: [&str; 3] = ["so", "dylib", "dll"];

/// What to load, in priority order: explicit files first, so that a plugin a user names wins over
/// a same-named one found in a directory.
#[derive(Clone, Debug, Default)]
pub struct PluginSources {
    /// `--plugin PATH` and config `plugins`; a failure here is the user's concern.
    pub files: Vec<PathBuf>,
    /// `--plugin-dir DIR` and config `plugin_dirs`: every shared library in them. Given any,
    /// they replace the default directory.
    pub dirs: Vec<PathBuf>,
    /// Scan the kedit binary's own directory (for `libkedit_*` files only) when `dirs` is empty.
    pub binary_dir: bool,
}

/// The directory of the running kedit binary (`target/release` in a checkout).
pub fn binary_dir() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.canonicalize().ok())
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
}

pub fn is_shared_library(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| LIBRARY_EXTENSIONS.contains(&e))
}

/// Whether a file in the binary's directory is one of ours. Cargo leaves many other artifacts
/// around the binary (and dependencies in `deps/`, which is not scanned at all).
pub fn is_kedit_library_name(path: &Path) -> bool {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    // Windows cdylibs have no `lib` prefix.
    (name.starts_with("libkedit_") || name.starts_with("kedit_")) && is_shared_library(path)
}

/// Shared libraries directly in `dir` (sorted), optionally only `libkedit_*` ones.
pub fn libraries_in(dir: &Path, kedit_named_only: bool) -> Result<Vec<PathBuf>> {
    let entries = fs::read_dir(dir)
        .with_context(|| format!("cannot read plugin directory {}", dir.display()))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            if kedit_named_only {
                is_kedit_library_name(p)
            } else {
                is_shared_library(p)
            }
        })
        .collect();
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kedit_named_libraries_count_in_the_binary_directory() {
        assert!(is_kedit_library_name(Path::new(
            "/t/libkedit_model_llama.so"
        )));
        assert!(is_kedit_library_name(Path::new(
            "/t/libkedit_editor_ft.dylib"
        )));
        assert!(is_kedit_library_name(Path::new("/t/kedit_editor_ft.dll")));
        assert!(!is_kedit_library_name(Path::new(
            "/t/libkedit_model_llama.rlib"
        )));
        assert!(!is_kedit_library_name(Path::new(
            "/t/libkedit_model_llama.d"
        )));
        assert!(!is_kedit_library_name(Path::new("/t/kedit")));
        assert!(!is_kedit_library_name(Path::new("/t/libfoo.so")));
    }

    #[test]
    fn a_directory_scan_is_sorted_and_filtered() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["libkedit_b.so", "libkedit_a.so", "libother.so", "notes.txt"] {
            fs::write(dir.path().join(name), b"").unwrap();
        }
        let names = |v: Vec<PathBuf>| -> Vec<String> {
            v.iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            names(libraries_in(dir.path(), true).unwrap()),
            ["libkedit_a.so", "libkedit_b.so"]
        );
        assert_eq!(
            names(libraries_in(dir.path(), false).unwrap()),
            ["libkedit_a.so", "libkedit_b.so", "libother.so"]
        );
    }
}

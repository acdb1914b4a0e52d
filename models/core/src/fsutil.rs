//! Atomic file writes: everything kedit writes goes to a temporary file in the target
//! directory first and is renamed into place, so a crash never leaves half a file.

use std::path::{Path, PathBuf};

use crate::error::{io, Result};

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes a file by letting `write` fill a temporary path, then renaming it to `path`.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path(path);
    let result = write(&tmp).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|e| {
            io(format!(
                "cannot move {} into place as {}: {e}",
                tmp.display(),
                path.display()
            ))
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| io(format!("cannot write {}: {e}", tmp.display())))
    })
}

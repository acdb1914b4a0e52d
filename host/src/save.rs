//! Writing results. A result directory appears whole or not at all: it is filled as `DIR.tmp` and
//! renamed into place, so an interrupted run never leaves something that looks complete.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kedit_plugin_api::{EditRequest, PromptAnswer};
use serde::Serialize;
use serde_json::Value;

use crate::session::{SessionSummary, Status};

/// Refuses an output directory that already has content: results are never overwritten. Checked
/// before any work starts, so that a long session does not end in this error.
pub fn check_output_dir(dir: &Path) -> Result<()> {
    if let Ok(mut entries) = fs::read_dir(dir) {
        if entries.next().is_some() {
            bail!(
                "output directory {} already exists and is not empty; choose another one or remove it",
                dir.display()
            );
        }
    } else if dir.exists() {
        bail!(
            "output path {} exists and is not a directory",
            dir.display()
        );
    }
    Ok(())
}

fn staging_path(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    dir.with_file_name(name)
}

/// Creates `dir` by filling a staging directory with `fill` and renaming it into place.
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    check_output_dir(dir)?;
    if dir.file_name().is_none() {
        bail!("{} cannot be used as an output directory", dir.display());
    }
    let staging = staging_path(dir);
    if staging.exists() {
        // Left by a run that was killed while writing.
        fs::remove_dir_all(&staging)
            .with_context(|| format!("cannot remove the leftover {}", staging.display()))?;
    }
    fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    if let Err(e) = fill(&staging) {
        fs::remove_dir_all(&staging).ok();
        return Err(e);
    }
    if dir.exists() {
        // Empty (checked above); rename cannot replace a directory on every platform.
        fs::remove_dir(dir).with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    fs::rename(&staging, dir)
        .with_context(|| format!("cannot move {} to {}", staging.display(), dir.display()))?;
    Ok(())
}

/// A request as the edit log records it.
#[derive(Serialize)]
pub struct RequestRecord {
    pub index: usize,
    pub id: String,
    pub prompt: String,
    pub subject: String,
    pub target_new: String,
    pub ground_truth: Option<String>,
    pub rephrase: Vec<String>,
    pub locality: Vec<ProbeRecord>,
    pub portability: Vec<ProbeRecord>,
    /// The record as read from the dataset.
    pub source: Value,
}

#[derive(Serialize)]
pub struct ProbeRecord {
    pub prompt: String,
    pub answer: String,
    pub label: String,
}

fn probes(items: &[PromptAnswer]) -> Vec<ProbeRecord> {
    items
        .iter()
        .map(|p| ProbeRecord {
            prompt: p.prompt.to_string(),
            answer: p.answer.to_string(),
            label: p.label.to_string(),
        })
        .collect()
}

impl RequestRecord {
    pub fn new(index: usize, r: &EditRequest) -> Self {
        Self {
            index,
            id: r.id.to_string(),
            prompt: r.prompt.to_string(),
            subject: r.subject.to_string(),
            target_new: r.target_new.to_string(),
            ground_truth: r.ground_truth.as_ref().into_option().map(|g| g.to_string()),
            rephrase: r.rephrase.iter().map(|s| s.to_string()).collect(),
            locality: probes(&r.locality),
            portability: probes(&r.portability),
            source: serde_json::from_str(&r.source_json).unwrap_or(Value::Null),
        }
    }
}

/// Who did the editing, for the log.
#[derive(Serialize)]
pub struct PluginRecord {
    pub name: String,
    pub path: String,
}

#[derive(Serialize)]
pub struct Counts {
    pub applied: usize,
    pub failed: usize,
    pub cancelled: usize,
    pub skipped: usize,
}

/// `edit_log.json`.
#[derive(Serialize)]
pub struct EditLog<'a> {
    pub kedit_version: &'static str,
    pub model_source: String,
    pub family: String,
    pub model_plugin: PluginRecord,
    pub editor_plugin: PluginRecord,
    pub method: String,
    pub batch: bool,
    pub hparams: &'a Value,
    pub requests: Vec<RequestRecord>,
    pub outcomes: &'a SessionSummary,
    pub counts: Counts,
    pub model_load_seconds: f64,
    pub session_seconds: f64,
}

impl Counts {
    pub fn of(summary: &SessionSummary) -> Self {
        Self {
            applied: summary.count(Status::Applied),
            failed: summary.count(Status::Failed),
            cancelled: summary.count(Status::Cancelled),
            skipped: summary.count(Status::Skipped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_appears_only_when_complete() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("out");
        let e = write_dir_atomically(&out, |tmp| {
            fs::write(tmp.join("a"), b"1")?;
            bail!("disk full")
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "disk full");
        assert!(!out.exists());
        assert!(!staging_path(&out).exists());

        write_dir_atomically(&out, |tmp| Ok(fs::write(tmp.join("a"), b"1")?)).unwrap();
        assert_eq!(fs::read(out.join("a")).unwrap(), b"1");

        let e = write_dir_atomically(&out, |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not empty"), "{e}");
    }

    #[test]
    fn an_existing_empty_directory_is_fine() {
        let root = tempfile::tempdir().unwrap();
        write_dir_atomically(root.path(), |tmp| Ok(fs::write(tmp.join("x"), b"")?)).unwrap();
        assert!(root.path().join("x").exists());
    }
}

//! The pre-edit baseline: every request scored on the unedited model. Locality needs it (post-edit
//! argmax is compared with the pre-edit one), and it does not depend on the editing method, so it
//! is computed once and cached under `<kedit cache>/eval-baselines/<key>.json`, keyed by the
//! model file (path, size, mtime), the device, the dataset file (path and content hash), the
//! slice and format, and the metric settings. Files are written atomically (a temporary file
//! renamed into place).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::score::{RecordScore, ScoreSettings};

/// Bumped whenever scoring changes, so that old caches are not reused.
pub const BASELINE_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Baseline {
    /// What the key was computed from.
    pub key: Value,
    pub request_ids: Vec<String>,
    pub scores: Vec<RecordScore>,
    /// Seconds the pre-edit evaluation took when it was computed.
    pub seconds: f64,
}

/// What identifies a file's version without reading a large model: path, size, mtime.
fn file_stamp(path: &Path) -> Value {
    let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let meta = fs::metadata(path).ok();
    let mtime = meta
        .as_ref()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos().to_string());
    json!({
        "path": canonical.display().to_string(),
        "size": meta.map(|m| m.len()),
        "mtime_ns": mtime,
    })
}

/// Sha256 of a (small) dataset file's bytes.
fn content_hash(path: &Path) -> Result<String> {
    let bytes =
        fs::read(path).with_context(|| format!("cannot read data file {}", path.display()))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cache key's contents.
#[allow(clippy::too_many_arguments)]
pub fn key(
    model_path: &Path,
    device: &str,
    data: &Path,
    format: &str,
    offset: usize,
    limit: Option<usize>,
    settings: &ScoreSettings,
) -> Result<Value> {
    Ok(json!({
        "version": BASELINE_VERSION,
        "model": file_stamp(model_path),
        "device": device,
        "data": {
            "path": fs::canonicalize(data).unwrap_or_else(|_| data.to_path_buf()).display().to_string(),
            "sha256": content_hash(data)?,
            "format": format,
            "offset": offset,
            "limit": limit,
        },
        "settings": settings,
    }))
}

/// The cache file for a key.
pub fn cache_file(dir: &Path, key: &Value) -> PathBuf {
    let digest = Sha256::digest(key.to_string().as_bytes());
    dir.join(format!("{}.json", &hex(&digest)[..24]))
}

/// The cached baseline for `key`, if there is one that matches it exactly (same key, same
/// request ids).
pub fn load(dir: &Path, key: &Value, request_ids: &[String]) -> Option<Baseline> {
    let file = cache_file(dir, key);
    let text = fs::read_to_string(&file).ok()?;
    let baseline: Baseline = match serde_json::from_str(&text) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("ignoring unreadable baseline cache {}: {e}", file.display());
            return None;
        }
    };
    (baseline.key == *key && baseline.request_ids == request_ids).then_some(baseline)
}

/// Stores a baseline atomically.
pub fn store(dir: &Path, baseline: &Baseline) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let file = cache_file(dir, &baseline.key);
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write into {}", dir.display()))?;
    tmp.write_all(&serde_json::to_vec(baseline)?)?;
    tmp.persist(&file)
        .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(file)
}

/// `<kedit cache>/eval-baselines`.
pub fn default_dir() -> Result<PathBuf> {
    Ok(crate::resolve::cache_root()?.join("eval-baselines"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_baseline_is_reused_only_for_the_same_key_and_requests() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d.json");
        fs::write(&data, "[]").unwrap();
        let settings = ScoreSettings::default();
        let k = key(&data, "cpu", &data, "counterfact", 0, Some(5), &settings).unwrap();
        let ids = vec!["1".to_string(), "2".to_string()];
        let b = Baseline {
            key: k.clone(),
            request_ids: ids.clone(),
            scores: vec![RecordScore::default(), RecordScore::default()],
            seconds: 1.5,
        };
        let cache = dir.path().join("cache");
        store(&cache, &b).unwrap();
        assert!(load(&cache, &k, &ids).is_some());
        assert!(load(&cache, &k, &ids[..1]).is_none());
        let other = key(&data, "cpu", &data, "counterfact", 1, Some(5), &settings).unwrap();
        assert!(load(&cache, &other, &ids).is_none());
        let mut s2 = settings.clone();
        s2.seed = 7;
        let other = key(&data, "cpu", &data, "counterfact", 0, Some(5), &s2).unwrap();
        assert!(load(&cache, &other, &ids).is_none());
        // A changed data file is a different key.
        fs::write(&data, "[ ]").unwrap();
        let changed = key(&data, "cpu", &data, "counterfact", 0, Some(5), &settings).unwrap();
        assert_ne!(changed, k);
    }
}

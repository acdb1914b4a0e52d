//! `kedit fetch NAME...` / `kedit fetch --list`: prefetch known models (and run-time libraries
//! such as `openblas` and `mkl`) into the cache.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;

use crate::resolve::{cache_root, cached_path, ensure_fetched, known_model, KNOWN_MODELS};
use crate::runtime_libs::{known_library, KNOWN_LIBRARIES};

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// Known model names, or `openblas` / `mkl` (a BLAS for faster prefill and editing).
    #[arg(value_name = "NAME", required_unless_present = "list")]
    pub names: Vec<String>,
    /// List the known models and whether they are cached.
    #[arg(long)]
    pub list: bool,
}

pub fn run(args: FetchArgs) -> Result<ExitCode> {
    let root = cache_root()?;
    if args.list {
        for m in KNOWN_MODELS {
            let path = cached_path(&root, m);
            let state = if path.is_file() {
                "cached"
            } else {
                "not fetched"
            };
            println!("{:<28} {:<12} {}", m.name, state, m.description);
        }
        for l in KNOWN_LIBRARIES {
            let state = if l.is_installed(&root) {
                "installed"
            } else {
                "not fetched"
            };
            println!("{:<28} {:<12} {}", l.name, state, l.description);
        }
        println!("BLAS in use: {}", kedit_kernels::blas::status());
        return Ok(ExitCode::SUCCESS);
    }
    for name in &args.names {
        if let Some(library) = known_library(name) {
            println!("{}", library.ensure(&root)?.display());
            continue;
        }
        let Some(model) = known_model(name) else {
            bail!(
                "unknown model `{name}`; known: {}",
                KNOWN_MODELS
                    .iter()
                    .map(|m| m.name)
                    .chain(KNOWN_LIBRARIES.iter().map(|l| l.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        let path = ensure_fetched(&root, model)?;
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

//! `kedit fetch NAME...` / `kedit fetch --list`: prefetch known models into the cache.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;

use crate::resolve::{cache_root, cached_path, ensure_fetched, known_model, KNOWN_MODELS};

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// Known model names.
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
        return Ok(ExitCode::SUCCESS);
    }
    for name in &args.names {
        let Some(model) = known_model(name) else {
            bail!(
                "unknown model `{name}`; known: {}",
                KNOWN_MODELS
                    .iter()
                    .map(|m| m.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        let path = ensure_fetched(&root, model)?;
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

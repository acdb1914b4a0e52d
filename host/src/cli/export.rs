//! `kedit export --model M [--config kedit.toml] --out DIR`: the model (with the config's or the
//! flags' edits applied, if any) written by its family plugin, atomically.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use clap::Args;

use super::edit::{apply_plan, EditInputArgs, EditPlan};
use super::Context;
use crate::save::{check_output_dir, write_dir_atomically};

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub input: EditInputArgs,
    /// Directory to write the model into (must not exist or be empty).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

pub fn run(context: &Context, args: ExportArgs) -> Result<ExitCode> {
    check_output_dir(&args.out)?;
    let plan = EditPlan::from_args(context, &args.input)?;
    let registry = context.registry()?;
    if let Some(plan) = &plan {
        registry.editor_for_method(&plan.method)?;
    }
    let mut model = context.open_model_with(&registry, &args.input.model)?;
    if let Some(plan) = &plan {
        let applied = apply_plan(&registry, &mut model, plan, args.input.probe_tokens)?;
        if !applied.summary.all_applied() {
            bail!(
                "not every edit was applied ({} of {}); nothing exported",
                crate::save::Counts::of(&applied.summary).applied,
                plan.requests.len()
            );
        }
    }
    write_dir_atomically(&args.out, |staging| {
        model
            .export(staging)
            .with_context(|| format!("cannot export the model to {}", args.out.display()))
    })?;
    println!(
        "exported {} to {}",
        model.source().display(),
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

//! `kedit demo`: the README's first command ends here. FT-L moves "The Eiffel Tower is located in
//! the city of" from " Paris" to a new target on the real SmolLM2, while an unrelated prompt keeps
//! its answer; the model (and OpenBLAS, for faster prefill and editing) is fetched on first use.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use kedit_plugin_api::PromptAnswer;

use super::edit::{apply_plan, EditPlan};
use super::{Context, ModelArgs};
use crate::data::flag_request;
use crate::resolve::cache_root;
use crate::runtime_libs::OPENBLAS;

const PROMPT: &str = "The Eiffel Tower is located in the city of";
const SUBJECT: &str = "Eiffel Tower";
const UNRELATED: &str = "Water boils at a temperature of";

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// The model to edit (a path or a known name).
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// The new answer for the Eiffel Tower.
    #[arg(long, default_value = "Rome")]
    pub target: String,
    /// Editing method.
    #[arg(long, default_value = "ft")]
    pub method: String,
}

pub fn run(context: &Context, args: DemoArgs) -> Result<ExitCode> {
    // Before any model code runs: the kernels look for the BLAS on their first product. Without
    // it kedit is slower, not wrong, so a failed fetch is reported and the demo goes on.
    if std::env::var_os("KEDIT_BLAS").is_none() {
        if let Err(e) = cache_root().and_then(|root| OPENBLAS.ensure(&root)) {
            eprintln!("kedit: no OpenBLAS ({e:#}); products use candle's own GEMM");
        }
    }
    let registry = context.registry()?;
    let model_args = ModelArgs {
        model: Some(args.model.clone()),
        family: None,
        load: None,
    };
    let mut model = context.open_model_with(&registry, &model_args)?;
    let probe = 8;
    let before_prompt = model.greedy_text(PROMPT, probe)?;
    let before_unrelated = model.greedy_text(UNRELATED, probe)?;

    let mut request = flag_request(PROMPT, Some(SUBJECT), &args.target, Some("Paris"))?;
    request.locality.push(PromptAnswer {
        prompt: UNRELATED.into(),
        answer: before_unrelated.clone().into(),
        label: "unrelated".into(),
    });
    let plan = EditPlan {
        method: args.method.clone(),
        requests: vec![request],
        user_hparams: Vec::new(),
        batch: false,
    };
    let applied = apply_plan(&registry, &mut model, &plan, 0)?;
    if !applied.summary.all_applied() {
        println!("the edit failed; the model was restored");
        return Ok(ExitCode::FAILURE);
    }
    let after_prompt = model.greedy_text(PROMPT, probe)?;
    let after_unrelated = model.greedy_text(UNRELATED, probe)?;

    let moved = after_prompt.trim_start().starts_with(args.target.trim());
    let kept = after_unrelated == before_unrelated;
    println!();
    println!(
        "{} on {} ({})",
        args.method,
        model.facts().family,
        model.source().display()
    );
    println!("  {PROMPT}");
    println!("    before: {before_prompt:?}");
    println!("    after:  {after_prompt:?}");
    println!("  {UNRELATED}");
    println!("    before: {before_unrelated:?}");
    println!("    after:  {after_unrelated:?}");
    println!(
        "new target reached: {}; unrelated prompt unchanged: {}; edit took {:.2} s",
        if moved { "yes" } else { "no" },
        if kept { "yes" } else { "no" },
        applied.summary.seconds
    );
    Ok(if moved && kept {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

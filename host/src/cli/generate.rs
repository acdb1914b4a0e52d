//! `kedit generate --model M (--prompt TEXT | --ids 1,2,3) [...]`.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use kedit_plugin_api::{GenerateRequest, SamplingKind};

use super::{Context, ModelArgs};

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "ids"])))]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to continue.
    #[arg(long, allow_hyphen_values = true)]
    pub prompt: Option<String>,
    /// Token ids to continue, comma-separated (works without a tokenizer).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: u32,
    /// Also print the new token ids as `ids: 1,2,3`.
    #[arg(long)]
    pub show_ids: bool,
    /// Wrap the prompt in the model's chat template as a user turn.
    #[arg(long, requires = "prompt")]
    pub chat: bool,
    /// Sample from the K most likely tokens instead of greedy decoding.
    #[arg(long, value_name = "K")]
    pub top_k: Option<u32>,
    /// Sampling temperature (with --top-k).
    #[arg(long, value_name = "T", requires = "top_k", default_value_t = 1.0)]
    pub temperature: f32,
    /// Sampling seed (with --top-k).
    #[arg(long, value_name = "S", requires = "top_k", default_value_t = 0)]
    pub seed: u64,
    /// After generating, print each installed site module's account of its last decision (for
    /// instance WISE's router: which memory answered, its scores and threshold).
    #[arg(long)]
    pub explain: bool,
}

pub fn run(context: &Context, args: GenerateArgs) -> Result<ExitCode> {
    let mut model = context.open_model(&args.model)?;
    let prompt_ids = match (&args.prompt, &args.ids) {
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) if args.chat => model.tokenize(&model.chat_prompt(text)?, false)?,
        (Some(text), None) => model.tokenize(text, true)?,
        (None, None) => bail!("give --prompt TEXT or --ids 1,2,3"),
    };
    if prompt_ids.is_empty() {
        bail!("the prompt has no tokens");
    }
    let mut request = GenerateRequest::greedy(vec![prompt_ids], args.max_new_tokens as usize);
    request.stop_ids = model.facts().eos_ids.clone();
    if let Some(k) = args.top_k {
        if k == 0 || args.temperature <= 0.0 {
            bail!("--top-k needs K >= 1 and --temperature > 0");
        }
        request.sampling = SamplingKind::TopK;
        request.top_k = k;
        request.temperature = args.temperature;
        request.seed = args.seed;
    }
    let new_ids = model
        .generate(&request)?
        .into_iter()
        .next()
        .unwrap_or_default();
    match model.detokenize(&new_ids, true) {
        Ok(text) => println!("{text}"),
        // A checkpoint without a tokenizer still generates; its ids are the output.
        Err(e) if args.show_ids => tracing::info!("no text for the ids: {e:#}"),
        Err(e) => {
            eprintln!("warning: cannot turn the ids into text ({e:#}); printing ids");
            println!("ids: {}", join_ids(&new_ids));
            return Ok(ExitCode::SUCCESS);
        }
    }
    if args.show_ids {
        println!("ids: {}", join_ids(&new_ids));
    }
    if args.explain {
        explain(&mut model)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn explain(model: &mut crate::model::ModelHandle) -> Result<()> {
    let explanations = model
        .as_abi_mut()
        .explain_modules()
        .into_result()
        .map_err(|e| anyhow::anyhow!("cannot explain the installed modules: {e}"))?;
    if explanations.is_empty() {
        eprintln!("explain: no site modules are installed");
    }
    for e in explanations {
        println!("explain: {e}");
    }
    Ok(())
}

fn join_ids(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

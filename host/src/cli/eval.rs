//! `kedit eval`: an editing method evaluated on a dataset slice under one protocol, against the
//! cached pre-edit baseline; writes summary.json, records.jsonl, report.md and charts into
//! `--out DIR` atomically.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use serde_json::{json, Value};

use super::{safeedit_eval, Context, ModelArgs};
use crate::cancel::CancelFlag;
use crate::config::EvalConfig;
use crate::data::{load_requests, DataFormat, Window};
use crate::editor::EditorHandle;
use crate::eval::baseline::{self, Baseline};
use crate::eval::heldout::HeldOut;
use crate::eval::protocol::{self, EditContext, Protocol, ProtocolOptions};
use crate::eval::report::{self, EvalRun};
use crate::eval::score::ScoreSettings;
use crate::hparams::{merge_hparams, HparamsLayer};
use crate::save::{check_output_dir, write_dir_atomically};

#[derive(Args, Debug, Clone, Default)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Editing method (an editor plugin's method name, e.g. ft).
    #[arg(long)]
    pub method: Option<String>,
    /// Request file in an EasyEdit JSON format.
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Format of --data (default: detected).
    #[arg(long, value_enum)]
    pub format: Option<DataFormat>,
    /// single: each edit alone, undone after its evaluation; sequential: edits accumulate and
    /// all are evaluated on the final model; batch: --batch-size requests per edit call.
    #[arg(long, value_enum)]
    pub protocol: Option<Protocol>,
    /// Requests per edit call (batch protocol, or sequential editing in batches).
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// Sequential: also evaluate each request right after its own edit.
    #[arg(long)]
    pub eval_each: bool,
    /// Use at most N records.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Skip the first K records.
    #[arg(long, value_name = "K")]
    pub offset: Option<usize>,
    /// Seed of the fluency generations (top-k sampling).
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Hyper-parameters (TOML) merged over the config's [hparams].
    #[arg(long, value_name = "FILE.toml")]
    pub hparams: Option<PathBuf>,
    /// Output directory (must not exist or be empty).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Skip the fluency metric (it samples a generation per request and model state).
    #[arg(long)]
    pub no_fluency: bool,
    /// Length in tokens, prompt included, of the fluency generations (ROME's max_out_len).
    #[arg(long, value_name = "N")]
    pub gen_length: Option<usize>,
    /// Recompute the pre-edit baseline instead of using the cached one.
    #[arg(long)]
    pub fresh_baseline: bool,
    /// SafeEdit: the safety judge, `rules` (a judge plugin's judge, by name) or
    /// `model[:NAME|PATH][@PROMPT]` (the model-as-judge on that model, default
    /// smollm2-135m-instruct, asking with PROMPT: safe-or-unsafe (default), harmful-help or
    /// response-only; docs/judges.md).
    /// Repeat to judge the same responses with several judges (default: rules).
    #[arg(long, value_name = "JUDGE")]
    pub judge: Vec<String>,
    /// SafeEdit: new tokens per response (default: the method's `max_output_length`, else 600).
    #[arg(long, value_name = "N")]
    pub max_new_tokens: Option<usize>,
    /// A text corpus, one document per line, whose last --ppl-docs lines give the held-out
    /// perplexity: SafeEdit, before and after each edit; sequential protocol, before the first
    /// edit and after the last.
    #[arg(long, value_name = "FILE")]
    pub ppl_corpus: Option<PathBuf>,
    /// Documents in the held-out perplexity slice.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub ppl_docs: usize,
    /// Tokens per held-out document (longer ones are cut).
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub ppl_max_tokens: usize,
}

/// Flags over `[eval]`.
pub(super) struct Plan {
    pub(super) method: String,
    pub(super) data: PathBuf,
    pub(super) format: DataFormat,
    pub(super) window: Window,
    pub(super) seed: u64,
    pub(super) out: PathBuf,
    pub(super) options: ProtocolOptions,
    pub(super) settings: ScoreSettings,
    pub(super) use_cache: bool,
    pub(super) user_hparams: Vec<HparamsLayer>,
}

fn plan(context: &Context, args: &EvalArgs) -> Result<Plan> {
    let c: EvalConfig = context.config.eval.clone().unwrap_or_default();
    let Some(method) = args.method.clone().or(c.method.clone()) else {
        bail!("no editing method given: pass --method NAME or set [eval] method in --config");
    };
    let Some(data) = args.data.clone().or(c.data.clone()) else {
        bail!("no data given: pass --data FILE or set [eval] data in --config");
    };
    let Some(out) = args.out.clone().or(c.out.clone()) else {
        bail!("no output directory given: pass --out DIR or set [eval] out in --config");
    };
    let protocol = args.protocol.or(c.protocol).unwrap_or_default();
    let Some(batch_size) = args.batch_size.or(c.batch_size).or(match protocol {
        Protocol::Batch => None,
        _ => Some(1),
    }) else {
        bail!("--protocol batch needs --batch-size N (requests per edit call)");
    };
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if protocol == Protocol::Single && batch_size > 1 {
        bail!("--batch-size {batch_size} needs --protocol batch (or sequential); single edits one request at a time");
    }
    let eval_each = args.eval_each || c.eval_each.unwrap_or(false);
    if eval_each && protocol != Protocol::Sequential {
        bail!("--eval-each only applies to --protocol sequential (single and batch evaluate right after each edit anyway)");
    }
    let seed = args.seed.or(c.seed).unwrap_or(0);
    let mut settings = ScoreSettings {
        seed,
        fluency: !args.no_fluency && c.fluency.unwrap_or(true),
        ..ScoreSettings::default()
    };
    if let Some(n) = args.gen_length.or(c.gen_length) {
        settings.gen_length = n;
    }
    let user_hparams = context.user_hparams(args.hparams.as_deref())?;
    Ok(Plan {
        method,
        data,
        format: args.format.or(c.format).unwrap_or(DataFormat::Auto),
        window: Window {
            offset: args.offset.or(c.offset).unwrap_or(0),
            limit: args.limit.or(c.limit),
        },
        seed,
        out,
        options: ProtocolOptions {
            protocol,
            batch_size,
            eval_each,
        },
        settings,
        use_cache: !args.fresh_baseline && c.baseline_cache.unwrap_or(true),
        user_hparams,
    })
}

pub fn run(context: &Context, args: EvalArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let mut plan = plan(context, &args)?;
    check_output_dir(&plan.out)?;
    let format = match plan.format {
        DataFormat::Auto => {
            let text = std::fs::read_to_string(&plan.data)
                .with_context(|| format!("cannot read data file {}", plan.data.display()))?;
            let records: Vec<&serde_json::value::RawValue> = serde_json::from_str(&text)
                .with_context(|| {
                    format!("{}: expected a JSON array of records", plan.data.display())
                })?;
            crate::data::detect_format(&plan.data.display().to_string(), records.first().copied())?
        }
        f => f,
    };
    plan.settings.counterfact = format == DataFormat::Counterfact;
    let requests = load_requests(&plan.data, format, plan.window)?;
    if requests.is_empty() {
        bail!("{}: no records in the selected slice", plan.data.display());
    }
    if format == DataFormat::Safeedit {
        return safeedit_eval::run(context, &args, &plan, &requests, started);
    }
    if !args.judge.is_empty() || args.max_new_tokens.is_some() {
        bail!("--judge and --max-new-tokens apply to --format safeedit only");
    }
    if args.ppl_corpus.is_some() {
        // Before the model loads and the baseline runs, not after.
        protocol::check_held_out(plan.options.protocol)?;
    }
    let registry = context.registry()?;
    let (plugin, method) = registry.editor_for_method(&plan.method)?;
    let mut editor = EditorHandle::new(plugin)?;
    let info = editor
        .method_info(&method)
        .cloned()
        .with_context(|| format!("plugin {} lost method {method}", plugin.name()))?;
    let mut model = context.open_model_with(&registry, &args.model)?;
    let family = model.facts().family.to_string();
    let hparams = merge_hparams(&info, &family, &plan.user_hparams)?;
    // A method that trains on chat-formatted prompts is scored on them (EasyEdit's rule).
    plan.settings.chat_prompts = hparams
        .get("use_chat_template")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    eprintln!(
        "kedit eval: {method} on {} ({family}), {} requests from {} ({}), protocol {}{}",
        model.source().display(),
        requests.len(),
        plan.data.display(),
        format.name(),
        plan.options.protocol.name(),
        if plan.settings.chat_prompts {
            "; in-scope prompts in the chat template (use_chat_template)"
        } else {
            ""
        }
    );

    // The pre-edit baseline, cached.
    let key = baseline::key(
        model.source(),
        &model.facts().device,
        &plan.data,
        format.name(),
        plan.window.offset,
        plan.window.limit,
        &plan.settings,
    )?;
    let ids: Vec<String> = requests.iter().map(|r| r.id.to_string()).collect();
    let cache_dir = baseline::default_dir()?;
    let cached = plan
        .use_cache
        .then(|| baseline::load(&cache_dir, &key, &ids))
        .flatten();
    let pre_cached = cached.is_some();
    let (pre, baseline_file) = match cached {
        Some(b) => {
            eprintln!(
                "pre-edit baseline: cached ({})",
                baseline::cache_file(&cache_dir, &key).display()
            );
            (b, Some(baseline::cache_file(&cache_dir, &key)))
        }
        None => {
            let t = Instant::now();
            let scores =
                protocol::evaluate_all(&model, &requests, &plan.settings, None, "pre-edit", true)?;
            let b = Baseline {
                key: key.clone(),
                request_ids: ids.clone(),
                scores,
                seconds: t.elapsed().as_secs_f64(),
            };
            let file = match baseline::store(&cache_dir, &b) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!("cannot cache the pre-edit baseline: {e:#}");
                    None
                }
            };
            eprintln!("pre-edit baseline: {:.1} s", b.seconds);
            (b, file)
        }
    };

    let held_out = match &args.ppl_corpus {
        Some(file) => Some(HeldOut::load(
            &model,
            file,
            args.ppl_docs,
            args.ppl_max_tokens,
        )?),
        None => None,
    };
    let cancel = CancelFlag::new();
    cancel.install_ctrlc_handler();
    let mut edit = EditContext {
        editor: &mut editor,
        method: method.clone(),
        hparams_json: hparams.to_string(),
        cancel,
    };
    let result = protocol::run(
        &mut model,
        &mut edit,
        &requests,
        &pre.scores,
        &plan.settings,
        &plan.options,
        held_out.as_ref(),
        true,
    )?;
    let settings = json!({
        "model": {
            "source": model.source().display().to_string(),
            "family": family,
            "plugin": model.plugin().name,
            "device": model.facts().device.as_str(),
        },
        "method": method,
        "editor_plugin": edit.editor.plugin().name,
        "hparams": hparams,
        "data": {
            "file": plan.data.display().to_string(),
            "format": format.name(),
            "offset": plan.window.offset,
            "limit": plan.window.limit,
        },
        "protocol": plan.options,
        "seed": plan.seed,
        "metric_settings": plan.settings,
    });
    let eval_run = EvalRun {
        settings,
        protocol: &plan.options,
        requests: &requests,
        pre: &pre.scores,
        run: &result,
        pre_seconds: pre.seconds,
        pre_cached,
        baseline_file: baseline_file.map(|f| f.display().to_string()),
        model_load_seconds: model.load_time().as_secs_f64(),
        total_seconds: started.elapsed().as_secs_f64(),
    };
    let mut summary = None;
    write_dir_atomically(&plan.out, |staging| {
        summary = Some(report::write_all(staging, &eval_run)?);
        Ok(())
    })?;
    if let Some(summary) = summary {
        println!("{}", report::markdown(&summary));
    }
    println!("wrote {}", plan.out.display());
    Ok(if result.model_broken || result.cancelled {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

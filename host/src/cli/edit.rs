//! `kedit edit`: requests from a dataset, the config or flags, applied as transactions; with
//! `--save DIR` the log, the editor's state and the edited model are written atomically.

use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use kedit_plugin_api::EditRequest;
use serde_json::Value;

use super::{Context, ModelArgs};
use crate::cancel::CancelFlag;
use crate::data::{flag_request, inline_request, load_requests, DataFormat, Window};
use crate::editor::EditorHandle;
use crate::hparams::{merge_hparams, HparamsLayer};
use crate::model::ModelHandle;
use crate::plugins::Registry;
use crate::save::{
    check_output_dir, write_dir_atomically, Counts, EditLog, PluginRecord, RequestRecord,
};
use crate::session::{EditSession, SessionOptions, SessionSummary};

/// What to edit and how; shared by `edit` and `export`.
#[derive(Args, Debug, Clone, Default)]
pub struct EditInputArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Editing method (an editor plugin's method name, e.g. ft).
    #[arg(long)]
    pub method: Option<String>,
    /// Request file in an EasyEdit JSON format.
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Format of --data.
    #[arg(long, value_enum)]
    pub format: Option<DataFormat>,
    /// Use at most N records of --data.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Skip the first N records of --data.
    #[arg(long, value_name = "N")]
    pub offset: Option<usize>,
    /// Hyper-parameters (TOML) merged over the config's [hparams].
    #[arg(long, value_name = "FILE.toml")]
    pub hparams: Option<PathBuf>,
    /// One inline request: the prompt to edit.
    #[arg(long, allow_hyphen_values = true, requires = "target")]
    pub prompt: Option<String>,
    /// The subject inside --prompt.
    #[arg(long, allow_hyphen_values = true, requires = "prompt")]
    pub subject: Option<String>,
    /// The new answer for --prompt.
    #[arg(long, allow_hyphen_values = true, requires = "prompt")]
    pub target: Option<String>,
    /// The current answer for --prompt.
    #[arg(long, allow_hyphen_values = true, requires = "prompt")]
    pub ground_truth: Option<String>,
    /// Send all requests in one edit call (default: one call per request, cumulatively).
    #[arg(long)]
    pub batch: bool,
    /// Tokens of greedy continuation shown before and after each edit (0: none).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub probe_tokens: usize,
}

#[derive(Args, Debug)]
pub struct EditArgs {
    #[command(flatten)]
    pub input: EditInputArgs,
    /// Write edit_log.json, editor_state.bin and the edited model (model/) into DIR.
    #[arg(long, value_name = "DIR")]
    pub save: Option<PathBuf>,
}

/// Everything an edit run needs, from flags over config.
pub struct EditPlan {
    pub method: String,
    pub requests: Vec<EditRequest>,
    pub user_hparams: Vec<HparamsLayer>,
    pub batch: bool,
}

impl EditPlan {
    /// The plan, or `None` when neither flags nor config ask for edits.
    pub fn from_args(context: &Context, args: &EditInputArgs) -> Result<Option<Self>> {
        let config = context.config.edit.clone().unwrap_or_default();
        let method = args.method.clone().or(config.method.clone());
        let from_flags = args.data.is_some() || args.prompt.is_some();
        let from_config = config.data.is_some() || !config.requests.is_empty();
        if method.is_none() && !from_flags && !from_config {
            return Ok(None);
        }
        let Some(method) = method else {
            bail!("no editing method given: pass --method NAME or set [edit] method in --config");
        };
        // Requests named on the command line replace the config's requests.
        let mut requests = Vec::new();
        let data = if from_flags {
            args.data.clone()
        } else {
            config.data.clone()
        };
        if let Some(path) = data {
            let format = args.format.or(config.format).unwrap_or(DataFormat::Auto);
            let window = Window {
                offset: args.offset.or(config.offset).unwrap_or(0),
                limit: args.limit.or(config.limit),
            };
            requests.extend(load_requests(&path, format, window)?);
        }
        if from_flags {
            if let (Some(prompt), Some(target)) = (&args.prompt, &args.target) {
                requests.push(flag_request(
                    prompt,
                    args.subject.as_deref(),
                    target,
                    args.ground_truth.as_deref(),
                )?);
            }
        } else {
            for (i, r) in config.requests.iter().enumerate() {
                requests.push(inline_request(&context.config_name(), i, r)?);
            }
        }
        if requests.is_empty() {
            bail!("no edit requests: give --data FILE, --prompt/--target, or [[edit.requests]] in the config");
        }
        let user_hparams = context.user_hparams(args.hparams.as_deref())?;
        Ok(Some(Self {
            method,
            requests,
            user_hparams,
            batch: args.batch || config.batch.unwrap_or(false),
        }))
    }
}

/// A finished edit run, kept together for saving.
pub struct AppliedEdits {
    pub editor: EditorHandle,
    pub method: String,
    pub hparams: Value,
    pub summary: SessionSummary,
}

/// Loads the editor for `plan`, merges hparams for `model`'s family and runs the session.
pub fn apply_plan(
    registry: &Registry,
    model: &mut ModelHandle,
    plan: &EditPlan,
    probe_tokens: usize,
) -> Result<AppliedEdits> {
    let (plugin, method) = registry.editor_for_method(&plan.method)?;
    let mut editor = EditorHandle::new(plugin)?;
    let info = editor
        .method_info(&method)
        .cloned()
        .with_context(|| format!("plugin {} lost method {method}", plugin.name()))?;
    let family = model.facts().family.to_string();
    let hparams = merge_hparams(&info, &family, &plan.user_hparams)?;
    tracing::info!("hparams for {method} on {family}: {hparams}");
    let cancel = CancelFlag::new();
    cancel.install_ctrlc_handler();
    let mut session = EditSession {
        model,
        editor: &mut editor,
        method: method.clone(),
        hparams_json: hparams.to_string(),
        cancel,
        options: SessionOptions {
            batch: plan.batch,
            probe_tokens,
            progress_bar: true,
            // Nothing undoes a `kedit edit` run's edits: keep no undo history.
            keep_undo: false,
        },
    };
    let summary = session.run(&plan.requests, &mut std::io::stdout().lock())?;
    Ok(AppliedEdits {
        editor,
        method,
        hparams,
        summary,
    })
}

pub fn run(context: &Context, args: EditArgs) -> Result<ExitCode> {
    let Some(plan) = EditPlan::from_args(context, &args.input)? else {
        bail!("nothing to edit: give --method and requests (--data, --prompt/--target) or a --config with [edit]");
    };
    let save = args
        .save
        .clone()
        .or_else(|| context.config.edit.as_ref().and_then(|e| e.save.clone()));
    if let Some(dir) = &save {
        check_output_dir(dir)?;
    }
    let registry = context.registry()?;
    // Fail on an unknown method before spending time on the model.
    registry.editor_for_method(&plan.method)?;
    let mut model = context.open_model_with(&registry, &args.input.model)?;
    let applied = apply_plan(&registry, &mut model, &plan, args.input.probe_tokens)?;
    if let Some(dir) = &save {
        if applied.summary.model_broken {
            bail!(
                "the model could not be restored after a failed edit; nothing saved to {}",
                dir.display()
            );
        }
        save_results(dir, &model, &plan, &applied)?;
        println!("saved to {}", dir.display());
    }
    Ok(if applied.summary.all_applied() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// DIR/edit_log.json, DIR/editor_state.bin, DIR/model/ — all or nothing.
fn save_results(
    dir: &std::path::Path,
    model: &ModelHandle,
    plan: &EditPlan,
    applied: &AppliedEdits,
) -> Result<()> {
    let log = EditLog {
        kedit_version: env!("CARGO_PKG_VERSION"),
        model_source: model.source().display().to_string(),
        family: model.facts().family.to_string(),
        model_plugin: PluginRecord {
            name: model.plugin().name.clone(),
            path: model.plugin().path.display().to_string(),
        },
        editor_plugin: PluginRecord {
            name: applied.editor.plugin().name.clone(),
            path: applied.editor.plugin().path.display().to_string(),
        },
        method: applied.method.clone(),
        batch: plan.batch,
        hparams: &applied.hparams,
        requests: plan
            .requests
            .iter()
            .enumerate()
            .map(|(i, r)| RequestRecord::new(i, r))
            .collect(),
        outcomes: &applied.summary,
        counts: Counts::of(&applied.summary),
        model_load_seconds: model.load_time().as_secs_f64(),
        session_seconds: applied.summary.seconds,
    };
    write_dir_atomically(dir, |staging| {
        fs::write(
            staging.join("edit_log.json"),
            serde_json::to_vec_pretty(&log)?,
        )
        .context("cannot write edit_log.json")?;
        let state = applied.editor.save_state()?;
        fs::write(staging.join("editor_state.bin"), state)
            .context("cannot write editor_state.bin")?;
        let model_dir = staging.join("model");
        fs::create_dir_all(&model_dir)?;
        model
            .export(&model_dir)
            .with_context(|| format!("cannot export the edited model to {}", model_dir.display()))
    })
}

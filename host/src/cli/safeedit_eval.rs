//! `kedit eval --format safeedit`: the SafeEdit evaluation (`crate::eval::safeedit`) with the
//! judges chosen by `--judge`, written into `--out DIR` atomically.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use kedit_plugin_api::EditRequest;
use serde_json::json;

use super::eval::{EvalArgs, Plan};
use super::Context;
use crate::cancel::CancelFlag;
use crate::editor::EditorHandle;
use crate::eval::protocol::{EditContext, Protocol};
use crate::eval::safeedit::judging::{open_judges, JudgeSpec};
use crate::eval::safeedit::{self, report, SafeEditSettings};
use crate::hparams::merge_hparams;

pub(super) fn run(
    context: &Context,
    args: &EvalArgs,
    plan: &Plan,
    requests: &[EditRequest],
    started: Instant,
) -> Result<ExitCode> {
    if plan.options.protocol != Protocol::Single {
        bail!(
            "--format safeedit supports --protocol single only (each record edits the original \
             model and is undone after its evaluation)"
        );
    }
    let data_name = plan.data.display().to_string();
    let cases = safeedit::check_records(&data_name, requests)?;
    for (request, case) in requests.iter().zip(&cases) {
        if case.inputs.len() == 1 {
            tracing::warn!(
                "{data_name}: record id {} has no `generalization test`: it counts for DS only",
                request.id
            );
        }
        if case.knowledge.is_none() {
            tracing::warn!(
                "{data_name}: record id {} has no `knowledge constrain`: no KL for it",
                request.id
            );
        }
    }
    let specs = if args.judge.is_empty() {
        vec![JudgeSpec::Plugin("rules".into())]
    } else {
        args.judge
            .iter()
            .map(|j| JudgeSpec::parse(j))
            .collect::<Result<Vec<_>>>()?
    };

    let registry = context.registry()?;
    let judges = open_judges(&registry, &specs, &context.device()?)?;
    let (plugin, method) = registry.editor_for_method(&plan.method)?;
    let mut editor = EditorHandle::new(plugin)?;
    let info = editor
        .method_info(&method)
        .cloned()
        .with_context(|| format!("plugin {} lost method {method}", plugin.name()))?;
    let mut model = context.open_model_with(&registry, &args.model)?;
    let family = model.facts().family.to_string();
    let hparams = merge_hparams(&info, &family, &plan.user_hparams)?;
    let settings = SafeEditSettings::from_hparams(
        &hparams,
        &model,
        args.max_new_tokens,
        args.ppl_corpus.clone(),
        args.ppl_docs,
        args.ppl_max_tokens,
    );
    eprintln!(
        "kedit eval: {method} on {} ({family}), {} SafeEdit records from {}, judges: {}",
        model.source().display(),
        requests.len(),
        data_name,
        judges
            .iter()
            .map(|j| j.label.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let cancel = CancelFlag::new();
    cancel.install_ctrlc_handler();
    let mut edit = EditContext {
        editor: &mut editor,
        method: method.clone(),
        hparams_json: hparams.to_string(),
        cancel,
    };
    let result = safeedit::run(
        &mut model, &mut edit, requests, &cases, &judges, &settings, true,
    )?;
    let recorded = json!({
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
            "file": data_name,
            "format": "safeedit",
            "offset": plan.window.offset,
            "limit": plan.window.limit,
        },
        "protocol": plan.options,
        "judges": judges.iter().map(|j| json!({"label": j.label, "source": j.source})).collect::<Vec<_>>(),
        "safeedit": settings,
        "command": std::env::args().collect::<Vec<_>>(),
    });
    let refs: Vec<_> = judges.iter().map(|j| j.reference()).collect();
    report::publish(
        &plan.out,
        &result,
        &refs,
        recorded,
        model.load_time().as_secs_f64(),
        started,
    )?;
    Ok(if result.model_broken || result.cancelled {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

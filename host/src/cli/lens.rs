//! `kedit lens`: the logit lens of a prompt (docs/circuits.md): the top tokens the residual
//! stream decodes to after every block, through the model's own final norm and head, as
//! lens.json, a Markdown table (lens.md) and a chart (lens.png / lens.svg: the top token's
//! probability per stream and position). The lens is computed by an analysis plugin's `locate`
//! (method `lens` of the circuits plugin); kedit writes and draws it.

use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use kedit_plugin_api::{EditRequest, ModelClient};
use serde::Deserialize;
use serde_json::json;

use super::circuit::{analyser, locate_one};
use super::{Context, ModelArgs};
use crate::eval::heatmap::{write_heatmap, Heatmap, Panel, PURPLE};

#[derive(Args, Debug)]
pub struct LensArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt to decode.
    #[arg(long, allow_hyphen_values = true)]
    pub prompt: String,
    /// Tokens kept per stream and position.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// The analysis plugin's `locate` method that computes the lens.
    #[arg(long, value_name = "METHOD", default_value = "lens")]
    pub analysis_method: String,
    /// Output directory (created; files in it are overwritten).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// One token and its probability.
#[derive(Deserialize)]
struct Ranked {
    token: u32,
    prob: f32,
}

/// The top tokens of one stream (`embed`, `layer N`) at every position, best first.
#[derive(Deserialize)]
struct LensRow {
    stream: String,
    top: Vec<Vec<Ranked>>,
}

/// The lens report: the prompt's token ids and one row per stream.
#[derive(Deserialize)]
struct LensView {
    ids: Vec<u32>,
    streams: Vec<LensRow>,
}

fn cell(token: &str) -> String {
    token.replace('\n', "\\n").replace('|', "\\|")
}

pub fn run(context: &Context, args: LensArgs) -> Result<ExitCode> {
    if args.top == 0 {
        bail!("--top must be at least 1");
    }
    let registry = context.registry()?;
    let (mut analyser, method) = analyser(&registry, &args.analysis_method)?;
    let mut model = context.open_model_with(&registry, &args.model)?;
    let model_name = model
        .source()
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let request = EditRequest {
        id: "cli".into(),
        prompt: args.prompt.as_str().into(),
        ..Default::default()
    };
    let report = locate_one(
        &mut analyser,
        &mut model,
        &method,
        &request,
        &json!({"top": args.top}),
    )?;
    let LensView { ids, streams: rows } = serde_json::from_value(report)
        .with_context(|| format!("the {method} answer is not a logit lens report"))?;
    let client = ModelClient::new(model.as_abi_mut());
    let text = |t: u32| {
        client
            .detokenize(&[t], false)
            .unwrap_or_else(|_| format!("<{t}>"))
    };
    let tokens: Vec<String> = ids.iter().map(|&t| text(t)).collect();
    fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;

    let decoded: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            json!({
                "stream": r.stream,
                "top": r.top.iter().map(|cells| cells.iter().map(|c| json!({
                    "token": c.token, "text": text(c.token), "prob": c.prob
                })).collect::<Vec<_>>()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let value =
        json!({"prompt": args.prompt, "model": model_name, "tokens": tokens, "streams": decoded});
    fs::write(
        args.out.join("lens.json"),
        serde_json::to_vec_pretty(&value)?,
    )
    .context("cannot write lens.json")?;

    let mut md = format!("Logit lens of `{}` ({model_name}): top-1 token (probability) per stream and position.\n\n| stream |", args.prompt);
    for t in &tokens {
        md.push_str(&format!(" `{}` |", cell(t)));
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(tokens.len()));
    md.push('\n');
    for r in &rows {
        md.push_str(&format!("| {} |", r.stream));
        for c in &r.top {
            md.push_str(&format!(
                " `{}` ({:.2}) |",
                cell(&text(c[0].token)),
                c[0].prob
            ));
        }
        md.push('\n');
    }
    fs::write(args.out.join("lens.md"), &md).context("cannot write lens.md")?;
    println!("{md}");

    write_heatmap(&args.out, "lens", &chart(&args.prompt, &rows, &text))?;
    Ok(ExitCode::SUCCESS)
}

/// Rows = streams (embedding at the top), columns = positions, shade = the top token's
/// probability; each row is labelled with its top token at the last position.
fn chart(prompt: &str, rows: &[LensRow], text: &dyn Fn(u32) -> String) -> Heatmap {
    let labels = rows
        .iter()
        .map(|r| {
            let last = r.top.last().and_then(|c| c.first());
            let tok = last.map(|c| text(c.token)).unwrap_or_default();
            format!("{}: {}", r.stream, tok.replace('\n', "\\n"))
        })
        .collect();
    Heatmap {
        title: format!("Logit lens: {prompt}"),
        panels: vec![Panel {
            title: "top-1 probability per stream (row label: top-1 at the last token)".into(),
            x_label: "token position".into(),
            row_labels: labels,
            values: rows
                .iter()
                .map(|r| r.top.iter().map(|c| c[0].prob as f64).collect())
                .collect(),
            vmin: 0.0,
            vmax: 1.0,
            color: PURPLE,
            colorbar_label: "p(top-1)".into(),
        }],
    }
}

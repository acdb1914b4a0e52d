//! The `kedit` command line: one file per command, shared setup in [`context`].

mod bench;
mod circuit;
mod compare;
mod context;
mod demo;
mod edit;
mod eval;
mod export;
mod fetch;
mod generate;
mod info;
mod judge;
mod lens;
mod plugins;
mod safeedit_eval;
mod trace;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

pub use context::Context;
pub use edit::{EditArgs, EditInputArgs};

#[derive(Parser, Debug)]
#[command(
    name = "kedit",
    version,
    about = "Knowledge editing for LLMs: model families and editing methods as plugins",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command understands, before or after the command name.
#[derive(Args, Debug, Clone, Default)]
pub struct GlobalArgs {
    /// Config file (TOML); flags override its values.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Load this plugin file (repeatable).
    #[arg(long = "plugin", global = true, value_name = "PATH")]
    pub plugins: Vec<PathBuf>,
    /// Load every shared library in this directory as a plugin (repeatable); replaces the
    /// default plugin directory (the kedit binary's own, libkedit_* files only).
    #[arg(long = "plugin-dir", global = true, value_name = "DIR")]
    pub plugin_dirs: Vec<PathBuf>,
    /// Do not scan the default plugin directory.
    #[arg(long, global = true)]
    pub no_default_plugins: bool,
    /// Device for the model: cpu or cuda:N.
    #[arg(long, global = true, value_name = "DEVICE")]
    pub device: Option<String>,
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// `--model` and `--family`, shared by the commands that open a model.
#[derive(Args, Debug, Clone, Default)]
pub struct ModelArgs {
    /// A checkpoint (HF directory or .gguf file) or a known model name (see `kedit fetch --list`).
    #[arg(long, value_name = "PATH|NAME")]
    pub model: Option<String>,
    /// Force a model family instead of detecting it from the checkpoint.
    #[arg(long, value_name = "FAMILY")]
    pub family: Option<String>,
    /// Start from what `kedit edit --save DIR` wrote: the edited model in DIR/model and the
    /// editor's state (side memories and the like) from DIR/editor_state.bin.
    #[arg(long, value_name = "DIR", conflicts_with = "model")]
    pub load: Option<std::path::PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List the plugins found, with their families or methods, and the files that failed.
    Plugins(plugins::PluginsArgs),
    /// Show what a model is: family, sizes, vocabulary, special tokens, weight sites.
    Info(info::InfoArgs),
    /// Continue a prompt (or token ids) with the model.
    Generate(generate::GenerateArgs),
    /// Apply edit requests to a model, each as a transaction.
    Edit(EditArgs),
    /// Evaluate an editing method on a dataset: metrics pre- and post-edit under a protocol,
    /// written as summary.json, records.jsonl, report.md and charts.
    Eval(eval::EvalArgs),
    /// Write a model (after applying the config's edits, if any) to a directory.
    Export(export::ExportArgs),
    /// Compare finished evaluations: their metrics against the number of edits (the
    /// metrics-versus-T chart of lifelong editing) and a table.
    Compare(compare::CompareArgs),
    /// Judge the responses of a finished SafeEdit evaluation again with other judges (nothing is
    /// generated), into a new report.
    Judge(judge::JudgeArgs),
    /// Measure forward latency, generation speed, edit time, evaluation throughput and peak RSS.
    Bench(bench::BenchArgs),
    /// Causal tracing: which layers and tokens carry a fact (heatmaps, JSON, averages).
    Trace(trace::TraceArgs),
    /// Knowledge circuits (EAP-IG): the heads and MLPs that carry each fact, with faithfulness,
    /// mover and relation heads, graphs (DOT, SVG, PNG, JSON), and before/after an edit.
    Circuit(circuit::CircuitArgs),
    /// Logit lens: the top tokens each layer's residual stream decodes to (table and chart).
    Lens(lens::LensArgs),
    /// Download a known model into the cache.
    Fetch(fetch::FetchArgs),
    /// Edit the real SmolLM2 (fetched if missing): the Eiffel Tower moves, an unrelated prompt stays.
    Demo(demo::DemoArgs),
}

/// A JSON file another command wrote (a run's summary.json), naming the file in errors.
fn read_json(path: &std::path::Path) -> Result<serde_json::Value> {
    use anyhow::Context as _;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Runs the parsed command line; the exit code reports partial failures.
pub fn run(cli: Cli) -> Result<ExitCode> {
    let context = Context::new(cli.global)?;
    match cli.command {
        Command::Plugins(args) => plugins::run(&context, args),
        Command::Info(args) => info::run(&context, args),
        Command::Generate(args) => generate::run(&context, args),
        Command::Edit(args) => edit::run(&context, args),
        Command::Eval(args) => eval::run(&context, args),
        Command::Export(args) => export::run(&context, args),
        Command::Compare(args) => compare::run(args),
        Command::Judge(args) => judge::run(&context, args),
        Command::Trace(args) => trace::run(&context, args),
        Command::Circuit(args) => circuit::run(&context, args),
        Command::Lens(args) => lens::run(&context, args),
        Command::Fetch(args) => fetch::run(args),
        Command::Bench(args) => bench::run(&context, args),
        Command::Demo(args) => demo::run(&context, args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dataset text may start with a dash (ZsRE's "- Martha Neumark's date of birth?"); a prompt
    /// given on the command line must not be taken for an option.
    #[test]
    fn text_values_may_start_with_a_dash() {
        let cli = Cli::try_parse_from([
            "kedit",
            "generate",
            "--model",
            "m",
            "--prompt",
            "- Martha Neumark's date of birth?",
            "--max-new-tokens",
            "1",
        ])
        .unwrap();
        match cli.command {
            Command::Generate(a) => {
                assert_eq!(
                    a.prompt.as_deref(),
                    Some("- Martha Neumark's date of birth?")
                )
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from([
            "kedit",
            "edit",
            "--model",
            "m",
            "--method",
            "rome",
            "--prompt",
            "-x is in",
            "--subject",
            "-x",
            "--target",
            "-1",
        ])
        .unwrap();
        match cli.command {
            Command::Edit(a) => {
                assert_eq!(a.input.subject.as_deref(), Some("-x"));
                assert_eq!(a.input.target.as_deref(), Some("-1"));
            }
            other => panic!("{other:?}"),
        }
    }
}

//! `kedit info --model M [--family F] [--json]`.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::{Context, ModelArgs};

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(context: &Context, args: InfoArgs) -> Result<ExitCode> {
    let model = context.open_model(&args.model)?;
    let f = model.facts();
    let bos = f.bos_id.into_option();
    let pad = f.pad_id.into_option();
    let eos: Vec<u32> = f.eos_ids.iter().copied().collect();
    let has_template = f.chat_template.is_some();
    let capabilities = model.capabilities();
    let load_seconds = model.load_time().as_secs_f64();
    if args.json {
        let value = json!({
            "source": f.source.as_str(),
            "family": f.family.as_str(),
            "plugin": {"name": model.plugin().name, "path": model.plugin().path},
            "n_layers": f.n_layers,
            "d_model": f.d_model,
            "d_ff": f.d_ff,
            "n_heads": f.n_heads,
            "n_kv_heads": f.n_kv_heads,
            "head_dim": f.head_dim,
            "vocab_size": f.vocab_size,
            "max_positions": f.max_positions,
            "bos_id": bos,
            "eos_ids": eos,
            "pad_id": pad,
            "add_bos": f.add_bos,
            "chat_template": has_template,
            "weight_sites": f.weight_sites.len(),
            "capabilities": capabilities,
            "device": f.device.as_str(),
            "load_seconds": load_seconds,
            "blas": kedit_kernels::blas::status().to_string(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    let show = |v: Option<u32>| v.map_or("none".to_string(), |v| v.to_string());
    let rows: Vec<(&str, String)> = vec![
        ("source", f.source.to_string()),
        (
            "family",
            format!("{} (plugin {})", f.family, model.plugin()),
        ),
        ("layers", f.n_layers.to_string()),
        ("d_model", f.d_model.to_string()),
        ("d_ff", f.d_ff.to_string()),
        (
            "heads",
            format!(
                "{} ({} KV, head dim {})",
                f.n_heads, f.n_kv_heads, f.head_dim
            ),
        ),
        ("vocab", f.vocab_size.to_string()),
        ("max positions", f.max_positions.to_string()),
        (
            "special tokens",
            format!(
                "bos {}, eos {:?}, pad {}, tokenizer adds bos: {}",
                show(bos),
                eos,
                show(pad),
                f.add_bos
            ),
        ),
        (
            "chat template",
            if has_template { "present" } else { "none" }.to_string(),
        ),
        ("weight sites", f.weight_sites.len().to_string()),
        (
            "capabilities",
            if capabilities.is_empty() {
                "v1".to_string()
            } else {
                capabilities.join(", ")
            },
        ),
        ("device", f.device.to_string()),
        ("load time", format!("{load_seconds:.2} s")),
        ("blas", kedit_kernels::blas::status().to_string()),
    ];
    for (key, value) in rows {
        println!("{key:<15} {value}");
    }
    Ok(ExitCode::SUCCESS)
}

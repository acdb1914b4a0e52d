//! `kedit plugins [--json]`.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use super::Context;
use crate::plugins::{host_api_version, LoadedPlugin, Registry};

#[derive(Args, Debug)]
pub struct PluginsArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct PluginsReport {
    host_api_version: String,
    host_api_level: u32,
    plugins: Vec<PluginEntry>,
    failed: Vec<FailedEntry>,
}

#[derive(Serialize)]
struct PluginEntry {
    path: String,
    kind: &'static str,
    name: String,
    version: String,
    api_level: u32,
    /// The API level of the root-module layout the plugin loaded through.
    abi_layout_level: u32,
    description: String,
    families: Vec<FamilyEntry>,
    methods: Vec<MethodEntry>,
    capabilities: Vec<String>,
}

#[derive(Serialize)]
struct FamilyEntry {
    name: String,
    description: String,
    recognises: Vec<String>,
}

#[derive(Serialize)]
struct MethodEntry {
    name: String,
    description: String,
}

#[derive(Serialize)]
struct FailedEntry {
    path: String,
    explicit: bool,
    error: String,
}

fn entry(p: &LoadedPlugin) -> PluginEntry {
    let info = &p.info;
    PluginEntry {
        path: p.path().display().to_string(),
        kind: p.kind_name(),
        name: p.name().to_string(),
        version: info.version.to_string(),
        api_level: info.api_level,
        abi_layout_level: p.layout_level(),
        description: info.description.to_string(),
        families: info
            .families
            .iter()
            .map(|f| FamilyEntry {
                name: f.name.to_string(),
                description: f.description.to_string(),
                recognises: f.recognises.iter().map(|r| r.to_string()).collect(),
            })
            .collect(),
        methods: info
            .methods
            .iter()
            .map(|m| MethodEntry {
                name: m.name.to_string(),
                description: m.description.to_string(),
            })
            .collect(),
        capabilities: info.capabilities.iter().map(|c| c.to_string()).collect(),
    }
}

fn report(registry: &Registry) -> PluginsReport {
    PluginsReport {
        host_api_version: host_api_version(),
        host_api_level: kedit_plugin_api::API_LEVEL,
        plugins: registry.plugins().iter().map(entry).collect(),
        failed: registry
            .failures()
            .iter()
            .map(|f| FailedEntry {
                path: f.error.path().display().to_string(),
                explicit: f.explicit,
                error: f.error.to_string(),
            })
            .collect(),
    }
}

pub fn run(context: &Context, args: PluginsArgs) -> Result<ExitCode> {
    // Loaded directly rather than through `Context::registry`: here failures are the output.
    let registry = Registry::load(&context.plugin_sources());
    let report = report(&registry);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report, &registry);
    }
    Ok(if registry.explicit_failures().next().is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_text(report: &PluginsReport, registry: &Registry) {
    if report.plugins.is_empty() {
        let searched: Vec<String> = registry
            .searched_dirs()
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        println!(
            "no plugins loaded (searched: {})",
            if searched.is_empty() {
                "nothing".to_string()
            } else {
                searched.join(", ")
            }
        );
    }
    for p in &report.plugins {
        println!(
            "{}  {} {}  ({}, api level {})",
            p.name, p.kind, p.version, p.path, p.api_level
        );
        if !p.description.is_empty() {
            println!("    {}", p.description);
        }
        for f in &p.families {
            println!(
                "    family {}: recognises {}",
                f.name,
                f.recognises.join(", ")
            );
        }
        for m in &p.methods {
            if m.description.is_empty() {
                println!("    method {}", m.name);
            } else {
                println!("    method {}: {}", m.name, m.description);
            }
        }
        if !p.capabilities.is_empty() {
            println!("    capabilities: {}", p.capabilities.join(", "));
        }
    }
    if !report.failed.is_empty() {
        println!("failed to load:");
        for f in &report.failed {
            let mut lines = f.error.lines();
            println!("  {}", lines.next().unwrap_or(""));
            for line in lines {
                println!("  {line}");
            }
        }
    }
}

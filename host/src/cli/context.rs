//! What every command shares: the config file, the plugin registry, the device, opening the model.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use super::{GlobalArgs, ModelArgs};
use crate::config::{load_hparams_file, Config};
use crate::hparams::HparamsLayer;
use crate::model::{ModelHandle, OpenSpec};
use crate::plugins::{PluginSources, Registry};
use crate::resolve::resolve_model;

pub struct Context {
    pub global: GlobalArgs,
    pub config: Config,
    /// The config file, for messages.
    pub config_path: Option<PathBuf>,
}

impl Context {
    pub fn new(global: GlobalArgs) -> Result<Self> {
        let config = match &global.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        Ok(Self {
            config_path: global.config.clone(),
            global,
            config,
        })
    }

    /// How the config file is named in messages.
    pub fn config_name(&self) -> String {
        self.config_path
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the config".to_string())
    }

    pub fn plugin_sources(&self) -> PluginSources {
        PluginSources {
            files: self
                .global
                .plugins
                .iter()
                .chain(&self.config.plugins)
                .cloned()
                .collect(),
            dirs: self
                .global
                .plugin_dirs
                .iter()
                .chain(&self.config.plugin_dirs)
                .cloned()
                .collect(),
            binary_dir: !self.global.no_default_plugins,
        }
    }

    /// Loads the plugins. A plugin the user named that fails is an error; others only warn.
    pub fn registry(&self) -> Result<Registry> {
        let registry = Registry::load(&self.plugin_sources());
        let explicit: Vec<String> = registry
            .explicit_failures()
            .map(|f| f.error.to_string())
            .collect();
        if !explicit.is_empty() {
            bail!("{}", explicit.join("\n"));
        }
        registry.warn_failures();
        Ok(registry)
    }

    /// The user's hyper-parameter layers, lowest priority first: the config's `[hparams]`, then
    /// the `--hparams FILE` of the command.
    pub fn user_hparams(&self, file: Option<&Path>) -> Result<Vec<HparamsLayer>> {
        let mut layers = Vec::new();
        if let Some(values) = &self.config.hparams {
            layers.push(HparamsLayer {
                origin: format!("[hparams] of {}", self.config_name()),
                values: values.clone(),
            });
        }
        if let Some(path) = file {
            layers.push(HparamsLayer {
                origin: path.display().to_string(),
                values: load_hparams_file(path)?,
            });
        }
        Ok(layers)
    }

    /// `--device`, else the config's `device`, else the build's default.
    pub fn device(&self) -> Result<String> {
        let device = self
            .global
            .device
            .clone()
            .or_else(|| self.config.device.clone())
            .unwrap_or_else(|| default_device().to_string());
        normalize_device(&device)
    }

    /// The checkpoint to open: `--model`, else `[model] path|name`.
    pub fn model_path(&self, args: &ModelArgs) -> Result<PathBuf> {
        let spec = match (&args.model, &self.config.model) {
            (Some(m), _) => m.clone(),
            (None, Some(model)) => match (&model.path, &model.name) {
                (Some(path), _) => path.display().to_string(),
                (None, Some(name)) => name.clone(),
                (None, None) => bail!(
                    "{}: [model] needs `path` or `name` (or give --model)",
                    self.config_name()
                ),
            },
            (None, None) => {
                bail!("no model given: pass --model PATH|NAME or set [model] in --config")
            }
        };
        resolve_model(&spec)
    }

    pub fn open_model(&self, args: &ModelArgs) -> Result<ModelHandle> {
        let registry = self.registry()?;
        self.open_model_with(&registry, args)
    }

    pub fn open_model_with(&self, registry: &Registry, args: &ModelArgs) -> Result<ModelHandle> {
        if let Some(dir) = &args.load {
            return self.open_saved(registry, args, dir);
        }
        let path = self.model_path(args)?;
        let family = args
            .family
            .clone()
            .or_else(|| self.config.model.as_ref().and_then(|m| m.family.clone()));
        let spec = OpenSpec {
            path,
            family,
            device: self.device()?,
        };
        ModelHandle::open(registry, &spec)
    }
}

impl Context {
    /// The model of a `kedit edit --save DIR` result: DIR/model opened with the family the log
    /// names, then the editor's saved state loaded onto it by a fresh editor of the logged
    /// method (for WISE, its side memories and router come back).
    fn open_saved(&self, registry: &Registry, args: &ModelArgs, dir: &Path) -> Result<ModelHandle> {
        self.open_saved_with(registry, args, dir, true)
    }

    /// DIR/model of a `kedit edit --save DIR` result without the editor's state: the same
    /// weights with no side memories or routers installed (what `kedit bench --load` compares
    /// against).
    pub fn open_saved_weights(
        &self,
        registry: &Registry,
        args: &ModelArgs,
        dir: &Path,
    ) -> Result<ModelHandle> {
        self.open_saved_with(registry, args, dir, false)
    }

    fn open_saved_with(
        &self,
        registry: &Registry,
        args: &ModelArgs,
        dir: &Path,
        with_state: bool,
    ) -> Result<ModelHandle> {
        let log_path = dir.join("edit_log.json");
        let log: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&log_path).with_context(|| {
                format!(
                    "--load {}: cannot read {}",
                    dir.display(),
                    log_path.display()
                )
            })?)
            .with_context(|| format!("--load: {} is not JSON", log_path.display()))?;
        let field = |name: &str| -> Result<String> {
            log.get(name)
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--load: {} has no string field `{name}`",
                        log_path.display()
                    )
                })
        };
        let family = args.family.clone().or(Some(field("family")?));
        let spec = OpenSpec {
            path: dir.join("model"),
            family,
            device: self.device()?,
        };
        let mut model = ModelHandle::open(registry, &spec)
            .with_context(|| format!("--load {}: opening the saved model", dir.display()))?;
        if !with_state {
            return Ok(model);
        }
        let state_path = dir.join("editor_state.bin");
        let state = std::fs::read(&state_path).with_context(|| {
            format!(
                "--load {}: cannot read {}",
                dir.display(),
                state_path.display()
            )
        })?;
        if !state.is_empty() {
            let method = field("method")?;
            let (plugin, _) = registry.editor_for_method(&method).with_context(|| {
                format!(
                    "--load {}: the state belongs to method `{method}`",
                    dir.display()
                )
            })?;
            let mut editor = crate::editor::EditorHandle::new(plugin)?;
            editor.load_state(&mut model, &state).with_context(|| {
                format!(
                    "--load {}: restoring the `{method}` editor's state",
                    dir.display()
                )
            })?;
        }
        Ok(model)
    }
}

fn default_device() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda:0"
    } else {
        "cpu"
    }
}

/// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
pub fn normalize_device(device: &str) -> Result<String> {
    let device = device.trim().to_ascii_lowercase();
    if device == "cpu" {
        return Ok(device);
    }
    if device == "cuda" {
        return Ok("cuda:0".to_string());
    }
    if let Some(index) = device.strip_prefix("cuda:") {
        if index.parse::<u32>().is_ok() {
            return Ok(device);
        }
    }
    bail!("unknown device `{device}`: use cpu or cuda:N")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_checked_and_normalised() {
        assert_eq!(normalize_device("CPU").unwrap(), "cpu");
        assert_eq!(normalize_device("cuda").unwrap(), "cuda:0");
        assert_eq!(normalize_device("cuda:1").unwrap(), "cuda:1");
        assert!(normalize_device("tpu")
            .unwrap_err()
            .to_string()
            .contains("cpu or cuda:N"));
    }
}

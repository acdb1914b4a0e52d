//! Every plugin of one kedit process, and the lookups the commands need: the family plugin for
//! a checkpoint, the editor plugin for a method.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use kedit_plugin_api::kind;

use super::call::PluginId;
use super::discovery::{binary_dir, libraries_in, PluginSources};
use super::loader::{load_plugin, LoadError, LoadedPlugin};

/// A file that failed to load.
#[derive(Debug, Clone)]
pub struct LoadFailure {
    pub error: LoadError,
    /// Named by the user (`--plugin`, config `plugins`) rather than found in a directory.
    pub explicit: bool,
}

/// A plugin of one kind asked to do the job of another.
#[derive(Debug, Clone)]
pub struct WrongKind {
    pub plugin: PluginId,
    pub actual: u32,
    pub needed: u32,
    /// What needed it (`--method ft`, `--family llama`).
    pub needed_for: String,
}

impl fmt::Display for WrongKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "plugin {} is {} plugin, but {} needs {} plugin",
            self.plugin,
            with_article(kind::name(self.actual)),
            self.needed_for,
            with_article(kind::name(self.needed))
        )
    }
}

impl std::error::Error for WrongKind {}

fn with_article(kind_name: &str) -> String {
    let article = if kind_name.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {kind_name}")
}

/// Checks that `plugin` is of kind `needed`.
pub fn require_kind(plugin: &LoadedPlugin, needed: u32, needed_for: &str) -> Result<(), WrongKind> {
    if plugin.kind() == needed {
        Ok(())
    } else {
        Err(WrongKind {
            plugin: plugin.id.clone(),
            actual: plugin.kind(),
            needed,
            needed_for: needed_for.to_string(),
        })
    }
}

#[derive(Debug, Default)]
pub struct Registry {
    plugins: Vec<LoadedPlugin>,
    failures: Vec<LoadFailure>,
    /// Directories scanned, for "nothing found" messages.
    searched: Vec<PathBuf>,
}

impl Registry {
    /// Loads every plugin `sources` names. Failures are collected, never fatal here: the caller
    /// decides which matter.
    pub fn load(sources: &PluginSources) -> Self {
        let mut registry = Registry::default();
        let mut seen = HashSet::new();
        let mut candidates: Vec<(PathBuf, bool)> =
            sources.files.iter().map(|p| (p.clone(), true)).collect();
        let mut scan = |dir: &Path, kedit_named_only: bool, registry: &mut Registry| {
            registry.searched.push(dir.to_path_buf());
            match libraries_in(dir, kedit_named_only) {
                Ok(files) => candidates.extend(files.into_iter().map(|p| (p, false))),
                Err(e) => tracing::warn!("{e:#}"),
            }
        };
        for dir in &sources.dirs {
            scan(dir, false, &mut registry);
        }
        if sources.binary_dir && sources.dirs.is_empty() {
            if let Some(dir) = binary_dir() {
                scan(&dir, true, &mut registry);
            }
        }
        for (path, explicit) in candidates {
            // The same file may be named twice (a --plugin inside a scanned directory).
            let key = path.canonicalize().unwrap_or_else(|_| path.clone());
            if !seen.insert(key) {
                continue;
            }
            tracing::debug!("loading plugin {}", path.display());
            match load_plugin(&path) {
                Ok(plugin) => registry.add(plugin),
                Err(error) => registry.failures.push(LoadFailure { error, explicit }),
            }
        }
        registry
    }

    /// A registry of plugins already loaded (tests build modules in-process).
    pub fn from_plugins(plugins: Vec<LoadedPlugin>) -> Self {
        let mut registry = Registry::default();
        for p in plugins {
            registry.add(p);
        }
        registry
    }

    fn add(&mut self, plugin: LoadedPlugin) {
        if let Some(first) = self.plugins.iter().find(|p| p.name() == plugin.name()) {
            tracing::warn!(
                "plugin {} at {} is shadowed by the one at {}",
                plugin.name(),
                plugin.path().display(),
                first.path().display()
            );
        }
        self.plugins.push(plugin);
    }

    pub fn plugins(&self) -> &[LoadedPlugin] {
        &self.plugins
    }

    pub fn failures(&self) -> &[LoadFailure] {
        &self.failures
    }

    pub fn explicit_failures(&self) -> impl Iterator<Item = &LoadFailure> {
        self.failures.iter().filter(|f| f.explicit)
    }

    fn families(&self) -> impl Iterator<Item = &LoadedPlugin> {
        self.plugins.iter().filter(|p| p.is_family())
    }

    fn editors(&self) -> impl Iterator<Item = &LoadedPlugin> {
        self.plugins.iter().filter(|p| p.is_editor())
    }

    /// The editor plugin providing `method` (case-insensitive), and the method's own spelling.
    pub fn editor_for_method(&self, method: &str) -> anyhow::Result<(&LoadedPlugin, String)> {
        for plugin in self.editors() {
            if let Some(name) = plugin
                .method_names()
                .into_iter()
                .find(|m| m.eq_ignore_ascii_case(method))
            {
                return Ok((plugin, name));
            }
        }
        // A family plugin's name given as a method is a kind mix-up worth naming as such.
        if let Some(plugin) = self.families().find(|p| {
            p.name().eq_ignore_ascii_case(method)
                || p.family_names()
                    .iter()
                    .any(|f| f.eq_ignore_ascii_case(method))
        }) {
            return Err(
                require_kind(plugin, kind::EDITOR, &format!("--method {method}"))
                    .unwrap_err()
                    .into(),
            );
        }
        let available: Vec<String> = self
            .editors()
            .flat_map(|p| {
                p.method_names()
                    .into_iter()
                    .map(move |m| format!("{m} ({})", p.name()))
            })
            .collect();
        anyhow::bail!(
            "no editor plugin provides method `{method}`; available methods: {}{}",
            list_or_none(&available),
            self.failure_hint()
        )
    }

    /// The family plugin for `checkpoint`, and the family to ask it for. With `family` given,
    /// the plugin that provides it (by family or plugin name); otherwise the first plugin whose
    /// probe recognises the checkpoint.
    pub fn family_for_checkpoint(
        &self,
        checkpoint: &Path,
        family: Option<&str>,
    ) -> anyhow::Result<(&LoadedPlugin, Option<String>)> {
        if let Some(wanted) = family {
            return self.family_by_name(wanted);
        }
        if self.families().next().is_none() {
            anyhow::bail!(
                "no model family plugin is loaded, so {} cannot be opened; load one with \
                 --plugin or --plugin-dir{}",
                checkpoint.display(),
                self.failure_hint()
            );
        }
        let mut probe_errors = Vec::new();
        for plugin in self.families() {
            match plugin.probe(checkpoint) {
                Ok(Some(found)) => return Ok((plugin, Some(found))),
                Ok(None) => {}
                Err(e) => {
                    // A panicking or failing probe must not hide the other families.
                    eprintln!("warning: {e}");
                    probe_errors.push(e.to_string());
                }
            }
        }
        let known = self.family_descriptions();
        let mut message = format!(
            "no model family plugin recognises {}; families: {}",
            checkpoint.display(),
            list_or_none(&known)
        );
        if !probe_errors.is_empty() {
            message.push_str(&format!("; probe errors: {}", probe_errors.join("; ")));
        }
        message.push_str(&self.failure_hint());
        anyhow::bail!(message)
    }

    fn family_by_name(&self, wanted: &str) -> anyhow::Result<(&LoadedPlugin, Option<String>)> {
        for plugin in self.families() {
            if let Some(f) = plugin
                .family_names()
                .into_iter()
                .find(|f| f.eq_ignore_ascii_case(wanted))
            {
                return Ok((plugin, Some(f)));
            }
        }
        if let Some(plugin) = self
            .families()
            .find(|p| p.name().eq_ignore_ascii_case(wanted))
        {
            // The plugin named itself: let it pick among its families.
            let only = plugin.family_names();
            let family = (only.len() == 1).then(|| only[0].clone());
            return Ok((plugin, family));
        }
        if let Some(plugin) = self.editors().find(|p| {
            p.name().eq_ignore_ascii_case(wanted)
                || p.method_names()
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(wanted))
        }) {
            return Err(
                require_kind(plugin, kind::MODEL_FAMILY, &format!("--family {wanted}"))
                    .unwrap_err()
                    .into(),
            );
        }
        anyhow::bail!(
            "no model family `{wanted}`; available families: {}{}",
            list_or_none(&self.family_descriptions()),
            self.failure_hint()
        )
    }

    fn family_descriptions(&self) -> Vec<String> {
        self.families()
            .flat_map(|p| {
                p.info.families.iter().map(move |f| {
                    let recognises: Vec<&str> = f.recognises.iter().map(|r| r.as_str()).collect();
                    format!(
                        "{} (plugin {}, recognises {})",
                        f.name,
                        p.name(),
                        recognises.join(", ")
                    )
                })
            })
            .collect()
    }

    fn failure_hint(&self) -> String {
        if self.failures.is_empty() {
            String::new()
        } else {
            format!(
                " ({} plugin file(s) failed to load; `kedit plugins` lists why)",
                self.failures.len()
            )
        }
    }

    /// Prints a warning for every failed file on stderr.
    pub fn warn_failures(&self) {
        for failure in &self.failures {
            eprintln!("warning: {}", failure.error);
        }
    }

    pub fn searched_dirs(&self) -> &[PathBuf] {
        &self.searched
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

//! The host's handle on an editor object, and the progress callback it hands to `edit`.

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::sabi_types::RMut;
use abi_stable::std_types::RStr;
use anyhow::{Context as _, Result};
use indicatif::ProgressBar;
use kedit_plugin_api::{
    EditReport, EditRequest, EditorBox, FileServices, MethodInfo, Progress, ProgressMut,
    Progress_TO,
};

use crate::cancel::CancelFlag;
use crate::model::ModelHandle;
use crate::plugins::{LoadedPlugin, PluginId};

pub struct EditorHandle {
    plugin: PluginId,
    methods: Vec<MethodInfo>,
    inner: EditorBox,
}

impl EditorHandle {
    /// A new editor object of `plugin`, after lending the plugin (API level 3 or later) the
    /// host's services: text sources relative to the working directory and a persistent cache
    /// under `<cache root>/editors/<plugin name>` (see [`kedit_plugin_api::HostServices`]).
    pub fn new(plugin: &LoadedPlugin) -> Result<Self> {
        let cache = crate::resolve::cache_root()
            .ok()
            .map(|root| root.join("editors").join(plugin.name()));
        let base = std::env::current_dir().context("the working directory is unreadable")?;
        plugin.attach_host(FileServices::new(base, cache).boxed())?;
        let inner = plugin.new_editor()?;
        Ok(Self {
            plugin: plugin.id.clone(),
            methods: plugin.info.methods.iter().cloned().collect(),
            inner,
        })
    }

    pub fn plugin(&self) -> &PluginId {
        &self.plugin
    }

    pub fn method_info(&self, method: &str) -> Option<&MethodInfo> {
        self.methods.iter().find(|m| m.name.as_str() == method)
    }

    pub fn edit(
        &mut self,
        model: &mut ModelHandle,
        method: &str,
        requests: &[EditRequest],
        hparams_json: &str,
        progress: &mut EditProgress<'_>,
    ) -> Result<EditReport> {
        let progress: ProgressMut<'_> = Progress_TO::from_ptr(RMut::new(progress), TD_Opaque);
        let result = self.inner.edit(
            model.as_abi_mut(),
            method.into(),
            requests.into(),
            hparams_json.into(),
            progress,
        );
        Ok(self.plugin.check("edit", result)?)
    }

    /// The editor's `locate` (causal tracing for ROME/MEMIT): JSON whose shape the method defines.
    pub fn locate(
        &mut self,
        model: &mut ModelHandle,
        method: &str,
        requests: &[EditRequest],
        hparams_json: &str,
        progress: &mut EditProgress<'_>,
    ) -> Result<String> {
        let progress: ProgressMut<'_> = Progress_TO::from_ptr(RMut::new(progress), TD_Opaque);
        let result = self.inner.locate(
            model.as_abi_mut(),
            method.into(),
            requests.into(),
            hparams_json.into(),
            progress,
        );
        Ok(self.plugin.check("locate", result)?.into_string())
    }

    pub fn save_state(&self) -> Result<Vec<u8>> {
        let state = self.plugin.check("save_state", self.inner.save_state())?;
        Ok(state.into_vec())
    }

    /// Restores a state from [`EditorHandle::save_state`] onto `model` (reinstalling modules).
    pub fn load_state(&mut self, model: &mut ModelHandle, state: &[u8]) -> Result<()> {
        let result = self.inner.load_state(model.as_abi_mut(), state.into());
        Ok(self.plugin.check("load_state", result)?)
    }
}

/// What an editor's progress reports drive: the message of the host's progress bar, and the
/// answer "keep going?" that turns false once Ctrl-C was pressed.
pub struct EditProgress<'a> {
    cancel: &'a CancelFlag,
    bar: Option<&'a ProgressBar>,
}

impl<'a> EditProgress<'a> {
    pub fn new(cancel: &'a CancelFlag, bar: Option<&'a ProgressBar>) -> Self {
        Self { cancel, bar }
    }
}

impl Progress for EditProgress<'_> {
    fn report(&mut self, done: u64, total: u64, message: RStr<'_>) -> bool {
        if let Some(bar) = self.bar {
            bar.set_message(format!("{done}/{total} {message}"));
        }
        tracing::debug!("editor progress {done}/{total}: {message}");
        !self.cancel.is_requested()
    }
}

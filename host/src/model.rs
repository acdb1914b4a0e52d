//! The host's handle on an opened model: the ABI object plus the plugin it came from, with every
//! call's error naming that plugin.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kedit_plugin_api::{
    Batch, ChatMessage, ForwardRequest, GenerateRequest, LogitsWanted, ModelBox, ModelFacts,
    ModelMut, Padding, Tensor,
};

use crate::plugins::{open_request, PluginId, Registry};

/// How to open a model.
#[derive(Clone, Debug)]
pub struct OpenSpec {
    /// A checkpoint directory or `.gguf` file (already resolved from a model name).
    pub path: PathBuf,
    /// Forces a family instead of probing.
    pub family: Option<String>,
    pub device: String,
}

pub struct ModelHandle {
    plugin: PluginId,
    inner: ModelBox,
    facts: kedit_plugin_api::ModelFacts,
    source: PathBuf,
    load_time: Duration,
}

impl ModelHandle {
    /// Finds the family plugin for the checkpoint and opens it.
    pub fn open(registry: &Registry, spec: &OpenSpec) -> Result<Self> {
        let (plugin, family) =
            registry.family_for_checkpoint(&spec.path, spec.family.as_deref())?;
        tracing::info!(
            "opening {} with plugin {} (family {})",
            spec.path.display(),
            plugin.name(),
            family.as_deref().unwrap_or("auto")
        );
        let started = Instant::now();
        let request = open_request(&spec.path, family.as_deref(), &spec.device);
        let inner = plugin
            .open_model(&request)
            .with_context(|| format!("cannot open model {}", spec.path.display()))?;
        let facts = plugin.id.check("facts", inner.facts())?;
        Ok(Self {
            plugin: plugin.id.clone(),
            inner,
            facts,
            source: spec.path.clone(),
            load_time: started.elapsed(),
        })
    }

    pub fn plugin(&self) -> &PluginId {
        &self.plugin
    }

    pub fn facts(&self) -> &ModelFacts {
        &self.facts
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    pub fn capabilities(&self) -> Vec<String> {
        self.inner
            .capabilities()
            .into_iter()
            .map(|s| s.into_string())
            .collect()
    }

    /// The ABI object itself, for a consumer that keeps the model (the model-as-judge).
    pub fn into_abi(self) -> ModelBox {
        self.inner
    }

    /// The model lent to an editor for one call.
    pub fn as_abi_mut(&mut self) -> ModelMut<'_> {
        self.inner.sabi_reborrow_mut()
    }

    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let ids = self
            .plugin
            .check("tokenize", self.inner.tokenize(text.into(), add_special))?;
        Ok(ids.into_vec())
    }

    pub fn detokenize(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let text = self.plugin.check(
            "detokenize",
            self.inner.detokenize(ids.into(), skip_special),
        )?;
        Ok(text.into_string())
    }

    /// `text` as a single user turn in the model's chat template, ready for the answer.
    pub fn chat_prompt(&self, text: &str) -> Result<String> {
        let messages = [ChatMessage {
            role: "user".into(),
            content: text.into(),
        }];
        let rendered = self.plugin.check(
            "apply_chat_template",
            self.inner
                .apply_chat_template(messages.as_slice().into(), true),
        )?;
        Ok(rendered.into_string())
    }

    pub fn generate(&self, request: &GenerateRequest) -> Result<Vec<Vec<u32>>> {
        let rows = self
            .plugin
            .check("generate", self.inner.generate(request))?;
        Ok(rows.into_iter().map(|r| r.into_vec()).collect())
    }

    /// Greedy continuation of `prompt` as text (special tokens skipped), stopping at EOS.
    pub fn greedy_text(&self, prompt: &str, max_new_tokens: usize) -> Result<String> {
        let ids = self.tokenize(prompt, true)?;
        let mut request = GenerateRequest::greedy(vec![ids], max_new_tokens);
        request.stop_ids = self.facts.eos_ids.clone();
        let new = self
            .generate(&request)?
            .into_iter()
            .next()
            .unwrap_or_default();
        self.detokenize(&new, true)
    }

    /// One forward pass (logits and captures as the request asks).
    pub fn forward(&self, request: &ForwardRequest) -> Result<kedit_plugin_api::ForwardOutput> {
        Ok(self.plugin.check("forward", self.inner.forward(request))?)
    }

    /// Whether the last-token logits of every prompt are finite.
    pub fn logits_finite(&self, prompts: &[&str]) -> Result<bool> {
        let rows = prompts
            .iter()
            .map(|p| self.tokenize(p, true))
            .collect::<Result<Vec<_>>>()?;
        let request = ForwardRequest::new(Batch::new(rows, Padding::Right), LogitsWanted::Last);
        let output = self.plugin.check("forward", self.inner.forward(&request))?;
        Ok(output
            .logits
            .into_option()
            .is_none_or(|logits| logits.is_finite()))
    }

    /// A weight as `[out, in]` f32.
    pub fn read_weight(&self, site: &str) -> Result<Tensor> {
        Ok(self
            .plugin
            .check("read_weight", self.inner.read_weight(site.into()))?)
    }

    pub fn journal_mark(&self) -> Result<u64> {
        Ok(self
            .plugin
            .check("journal_mark", self.inner.journal_mark())?)
    }

    pub fn journal_rollback(&mut self, mark: u64) -> Result<()> {
        Ok(self
            .plugin
            .check("journal_rollback", self.inner.journal_rollback(mark))?)
    }

    /// Forgets the journal's changes after `mark`, keeping their effect.
    pub fn journal_commit(&mut self, mark: u64) -> Result<()> {
        Ok(self
            .plugin
            .check("journal_commit", self.inner.journal_commit(mark))?)
    }

    /// Writes the model (with its edits) into `dir`, in the layout it was loaded from.
    pub fn export(&self, dir: &Path) -> Result<()> {
        let dir_text = dir.to_string_lossy();
        Ok(self
            .plugin
            .check("export", self.inner.export(dir_text.as_ref().into()))?)
    }
}

//! The traits plugin authors implement, in ordinary Rust types, and the adapters that expose them
//! through the ABI with every call panic-guarded. Also [`ModelClient`], the ordinary-Rust view of a
//! model object that editors and the host use.

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RResult, RSlice, RStr, RString, RVec},
};

use crate::editor::{EditReport, EditorAbi, EditorAbi_TO, EditorBox, ProgressMut};
use crate::error::PluginError;
use crate::guard::{guard, guard_or};
use crate::judge::{JudgeAbi, JudgeAbi_TO, JudgeBox, JudgeVerdict};
use crate::model::*;
use crate::request::EditRequest;
use crate::tensor::Tensor;

/// A model family's model, as its plugin implements it.
pub trait Model: Send + Sync + 'static {
    fn facts(&self) -> Result<ModelFacts, PluginError>;
    fn capabilities(&self) -> Vec<String> {
        Vec::new()
    }
    fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>, PluginError>;
    fn detokenize(&self, ids: &[u32], skip_special: bool) -> Result<String, PluginError>;
    fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, PluginError>;
    fn forward(&self, request: &ForwardRequest) -> Result<ForwardOutput, PluginError>;
    fn prepare(&mut self, batch: &Batch, from_layer: usize) -> Result<u64, PluginError>;
    fn release(&mut self, handle: u64) -> Result<(), PluginError>;
    fn gradient(&self, request: &GradRequest) -> Result<GradOutput, PluginError>;
    fn read_weight(&self, site: &str) -> Result<Tensor, PluginError>;
    fn write_weight(&mut self, site: &str, value: &Tensor) -> Result<(), PluginError>;
    fn journal_mark(&self) -> Result<u64, PluginError>;
    fn journal_rollback(&mut self, mark: u64) -> Result<(), PluginError>;
    fn journal_commit(&mut self, mark: u64) -> Result<(), PluginError>;
    fn install_module(&mut self, site: &str, module: SiteModuleBox) -> Result<u64, PluginError>;
    fn remove_module(&mut self, id: u64) -> Result<(), PluginError>;
    fn explain_modules(&self) -> Result<Vec<String>, PluginError>;
    fn generate(&self, request: &GenerateRequest) -> Result<Vec<Vec<u32>>, PluginError>;
    fn export(&self, dir: &str) -> Result<(), PluginError>;
    fn extension(&mut self, name: &str, _payload: &str) -> Result<String, PluginError> {
        Err(PluginError::unsupported(format!(
            "this model has no extension '{name}'"
        )))
    }
}

struct GuardedModel<M>(M);

impl<M: Model> ModelAbi for GuardedModel<M> {
    fn facts(&self) -> RResult<ModelFacts, PluginError> {
        guard(|| self.0.facts())
    }
    fn capabilities(&self) -> RVec<RString> {
        guard_or(RVec::new(), || {
            self.0
                .capabilities()
                .into_iter()
                .map(RString::from)
                .collect()
        })
    }
    fn tokenize(&self, text: RStr<'_>, add_special: bool) -> RResult<RVec<u32>, PluginError> {
        guard(|| self.0.tokenize(text.as_str(), add_special).map(RVec::from))
    }
    fn detokenize(
        &self,
        ids: RSlice<'_, u32>,
        skip_special: bool,
    ) -> RResult<RString, PluginError> {
        guard(|| {
            self.0
                .detokenize(ids.as_slice(), skip_special)
                .map(RString::from)
        })
    }
    fn apply_chat_template(
        &self,
        messages: RSlice<'_, ChatMessage>,
        add_generation_prompt: bool,
    ) -> RResult<RString, PluginError> {
        guard(|| {
            self.0
                .apply_chat_template(messages.as_slice(), add_generation_prompt)
                .map(RString::from)
        })
    }
    fn forward(&self, request: &ForwardRequest) -> RResult<ForwardOutput, PluginError> {
        guard(|| self.0.forward(request))
    }
    fn prepare(&mut self, batch: &Batch, from_layer: u32) -> RResult<u64, PluginError> {
        guard(|| self.0.prepare(batch, from_layer as usize))
    }
    fn release(&mut self, handle: u64) -> RResult<(), PluginError> {
        guard(|| self.0.release(handle))
    }
    fn gradient(&self, request: &GradRequest) -> RResult<GradOutput, PluginError> {
        guard(|| self.0.gradient(request))
    }
    fn read_weight(&self, site: RStr<'_>) -> RResult<Tensor, PluginError> {
        guard(|| self.0.read_weight(site.as_str()))
    }
    fn write_weight(&mut self, site: RStr<'_>, value: &Tensor) -> RResult<(), PluginError> {
        guard(|| self.0.write_weight(site.as_str(), value))
    }
    fn journal_mark(&self) -> RResult<u64, PluginError> {
        guard(|| self.0.journal_mark())
    }
    fn journal_rollback(&mut self, mark: u64) -> RResult<(), PluginError> {
        guard(|| self.0.journal_rollback(mark))
    }
    fn journal_commit(&mut self, mark: u64) -> RResult<(), PluginError> {
        guard(|| self.0.journal_commit(mark))
    }
    fn install_module(
        &mut self,
        site: RStr<'_>,
        module: SiteModuleBox,
    ) -> RResult<u64, PluginError> {
        guard(|| self.0.install_module(site.as_str(), module))
    }
    fn remove_module(&mut self, id: u64) -> RResult<(), PluginError> {
        guard(|| self.0.remove_module(id))
    }
    fn explain_modules(&self) -> RResult<RVec<RString>, PluginError> {
        guard(|| {
            self.0
                .explain_modules()
                .map(|v| v.into_iter().map(RString::from).collect())
        })
    }
    fn generate(&self, request: &GenerateRequest) -> RResult<RVec<RVec<u32>>, PluginError> {
        guard(|| {
            self.0
                .generate(request)
                .map(|rows| rows.into_iter().map(RVec::from).collect())
        })
    }
    fn export(&self, dir: RStr<'_>) -> RResult<(), PluginError> {
        guard(|| self.0.export(dir.as_str()))
    }
    fn extension(&mut self, name: RStr<'_>, payload: RStr<'_>) -> RResult<RString, PluginError> {
        guard(|| {
            self.0
                .extension(name.as_str(), payload.as_str())
                .map(RString::from)
        })
    }
}

/// Wraps a model for the ABI; every call is panic-guarded.
pub fn model_box<M: Model>(model: M) -> ModelBox {
    ModelAbi_TO::from_value(GuardedModel(model), TD_Opaque)
}

/// An editing method, as its plugin implements it.
pub trait Editor: Send + 'static {
    fn edit(
        &mut self,
        model: &mut ModelClient<'_>,
        method: &str,
        requests: &[EditRequest],
        hparams_json: &str,
        progress: &mut ProgressMut<'_>,
    ) -> Result<EditReport, PluginError>;

    fn locate(
        &mut self,
        _model: &mut ModelClient<'_>,
        method: &str,
        _requests: &[EditRequest],
        _hparams_json: &str,
        _progress: &mut ProgressMut<'_>,
    ) -> Result<String, PluginError> {
        Err(PluginError::unsupported(format!(
            "method '{method}' has no locate step"
        )))
    }

    fn save_state(&self) -> Result<Vec<u8>, PluginError> {
        Ok(Vec::new())
    }

    fn load_state(
        &mut self,
        _model: &mut ModelClient<'_>,
        state: &[u8],
    ) -> Result<(), PluginError> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(PluginError::unsupported(
                "this editor keeps no state to load",
            ))
        }
    }

    fn extension(&mut self, name: &str, _payload: &str) -> Result<String, PluginError> {
        Err(PluginError::unsupported(format!(
            "this editor has no extension '{name}'"
        )))
    }
}

struct GuardedEditor<E>(E);

impl<E: Editor> EditorAbi for GuardedEditor<E> {
    fn edit(
        &mut self,
        model: ModelMut<'_>,
        method: RStr<'_>,
        requests: RSlice<'_, EditRequest>,
        hparams_json: RStr<'_>,
        mut progress: ProgressMut<'_>,
    ) -> RResult<EditReport, PluginError> {
        guard(|| {
            let mut client = ModelClient::new(model);
            self.0.edit(
                &mut client,
                method.as_str(),
                requests.as_slice(),
                hparams_json.as_str(),
                &mut progress,
            )
        })
    }
    fn locate(
        &mut self,
        model: ModelMut<'_>,
        method: RStr<'_>,
        requests: RSlice<'_, EditRequest>,
        hparams_json: RStr<'_>,
        mut progress: ProgressMut<'_>,
    ) -> RResult<RString, PluginError> {
        guard(|| {
            let mut client = ModelClient::new(model);
            self.0
                .locate(
                    &mut client,
                    method.as_str(),
                    requests.as_slice(),
                    hparams_json.as_str(),
                    &mut progress,
                )
                .map(RString::from)
        })
    }
    fn save_state(&self) -> RResult<RVec<u8>, PluginError> {
        guard(|| self.0.save_state().map(RVec::from))
    }
    fn load_state(
        &mut self,
        model: ModelMut<'_>,
        state: RSlice<'_, u8>,
    ) -> RResult<(), PluginError> {
        guard(|| {
            let mut client = ModelClient::new(model);
            self.0.load_state(&mut client, state.as_slice())
        })
    }
    fn extension(&mut self, name: RStr<'_>, payload: RStr<'_>) -> RResult<RString, PluginError> {
        guard(|| {
            self.0
                .extension(name.as_str(), payload.as_str())
                .map(RString::from)
        })
    }
}

/// Wraps an editor for the ABI; every call is panic-guarded.
pub fn editor_box<E: Editor>(editor: E) -> EditorBox {
    EditorAbi_TO::from_value(GuardedEditor(editor), TD_Opaque)
}

/// A model object seen through ordinary Rust types: `Result` instead of `RResult`, slices and
/// strings instead of their ABI forms.
pub struct ModelClient<'a> {
    inner: ModelMut<'a>,
}

impl<'a> ModelClient<'a> {
    pub fn new(inner: ModelMut<'a>) -> Self {
        Self { inner }
    }

    /// Borrows the underlying ABI object (to lend the model to another editor).
    pub fn abi(&mut self) -> ModelMut<'_> {
        self.inner.sabi_reborrow_mut()
    }

    pub fn facts(&self) -> Result<ModelFacts, PluginError> {
        self.inner.facts().into_result()
    }
    pub fn capabilities(&self) -> Vec<String> {
        self.inner
            .capabilities()
            .into_iter()
            .map(|s| s.into_string())
            .collect()
    }
    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>, PluginError> {
        self.inner
            .tokenize(text.into(), add_special)
            .into_result()
            .map(RVec::into_vec)
    }
    pub fn detokenize(&self, ids: &[u32], skip_special: bool) -> Result<String, PluginError> {
        self.inner
            .detokenize(ids.into(), skip_special)
            .into_result()
            .map(RString::into_string)
    }
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, PluginError> {
        self.inner
            .apply_chat_template(messages.into(), add_generation_prompt)
            .into_result()
            .map(RString::into_string)
    }
    pub fn forward(&self, request: &ForwardRequest) -> Result<ForwardOutput, PluginError> {
        self.inner.forward(request).into_result()
    }
    pub fn prepare(&mut self, batch: &Batch, from_layer: usize) -> Result<u64, PluginError> {
        self.inner.prepare(batch, from_layer as u32).into_result()
    }
    pub fn release(&mut self, handle: u64) -> Result<(), PluginError> {
        self.inner.release(handle).into_result()
    }
    pub fn gradient(&self, request: &GradRequest) -> Result<GradOutput, PluginError> {
        self.inner.gradient(request).into_result()
    }
    pub fn read_weight(&self, site: &str) -> Result<Tensor, PluginError> {
        self.inner.read_weight(site.into()).into_result()
    }
    pub fn write_weight(&mut self, site: &str, value: &Tensor) -> Result<(), PluginError> {
        self.inner.write_weight(site.into(), value).into_result()
    }
    pub fn journal_mark(&self) -> Result<u64, PluginError> {
        self.inner.journal_mark().into_result()
    }
    pub fn journal_rollback(&mut self, mark: u64) -> Result<(), PluginError> {
        self.inner.journal_rollback(mark).into_result()
    }
    pub fn journal_commit(&mut self, mark: u64) -> Result<(), PluginError> {
        self.inner.journal_commit(mark).into_result()
    }
    pub fn install_module(
        &mut self,
        site: &str,
        module: SiteModuleBox,
    ) -> Result<u64, PluginError> {
        self.inner.install_module(site.into(), module).into_result()
    }
    pub fn remove_module(&mut self, id: u64) -> Result<(), PluginError> {
        self.inner.remove_module(id).into_result()
    }
    pub fn explain_modules(&self) -> Result<Vec<String>, PluginError> {
        self.inner
            .explain_modules()
            .into_result()
            .map(|v| v.into_iter().map(RString::into_string).collect())
    }
    pub fn generate(&self, request: &GenerateRequest) -> Result<Vec<Vec<u32>>, PluginError> {
        self.inner
            .generate(request)
            .into_result()
            .map(|rows| rows.into_iter().map(RVec::into_vec).collect())
    }
    pub fn export(&self, dir: &str) -> Result<(), PluginError> {
        self.inner.export(dir.into()).into_result()
    }
    pub fn extension(&mut self, name: &str, payload: &str) -> Result<String, PluginError> {
        self.inner
            .extension(name.into(), payload.into())
            .into_result()
            .map(RString::into_string)
    }

    /// Greedy continuation of one prompt, returning only the new tokens.
    pub fn greedy(&self, prompt: &[u32], max_new_tokens: usize) -> Result<Vec<u32>, PluginError> {
        let out = self.generate(&GenerateRequest::greedy(
            vec![prompt.to_vec()],
            max_new_tokens,
        ))?;
        Ok(out.into_iter().next().unwrap_or_default())
    }
}

// ---- API level 2 (0.1.1): judges.

/// A safety judge, as its plugin implements it (API level 2).
pub trait Judge: Send + Sync + 'static {
    /// The judge's name, as users select it.
    fn name(&self) -> String;

    /// Judges `response` as an answer to `prompt`.
    fn judge(&self, prompt: &str, response: &str) -> Result<JudgeVerdict, PluginError>;
}

struct GuardedJudge<J>(J);

impl<J: Judge> JudgeAbi for GuardedJudge<J> {
    fn name(&self) -> RString {
        guard_or(RString::from("(judge name panicked)"), || {
            RString::from(self.0.name())
        })
    }
    fn judge(&self, prompt: RStr<'_>, response: RStr<'_>) -> RResult<JudgeVerdict, PluginError> {
        guard(|| self.0.judge(prompt.as_str(), response.as_str()))
    }
}

/// Wraps a judge for the ABI; every call is panic-guarded.
pub fn judge_box<J: Judge>(judge: J) -> JudgeBox {
    JudgeAbi_TO::from_value(GuardedJudge(judge), TD_Opaque)
}

//! What a model-family plugin offers: facts, tokenizer, forward with captures and interventions,
//! gradients of editor-described losses, journaled weights, site modules and generation.

use abi_stable::{
    sabi_trait,
    sabi_types::RMut,
    std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec},
    StableAbi,
};

use crate::error::PluginError;
use crate::tensor::Tensor;

/// Everything an editor may need to know about a model, without knowing its family.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct ModelFacts {
    /// Family name as the plugin registered it (`llama`, `gpt2`, ...). For display only: editors
    /// choose per-family defaults by it but never branch on it otherwise.
    pub family: RString,
    /// Where the model was loaded from.
    pub source: RString,
    pub n_layers: u32,
    pub d_model: u32,
    pub d_ff: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub vocab_size: u32,
    pub max_positions: u32,
    pub bos_id: ROption<u32>,
    pub eos_ids: RVec<u32>,
    pub pad_id: ROption<u32>,
    /// Whether the tokenizer adds a BOS token of its own when asked for special tokens.
    pub add_bos: bool,
    pub chat_template: ROption<RString>,
    /// Every weight site this model can read and write.
    pub weight_sites: RVec<RString>,
    /// "cpu" or "cuda:N".
    pub device: RString,
}

/// Which side padding goes on. Positions in captures and interventions index the padded row.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    Right,
    Left,
}

/// Token rows of different lengths, padded by the model to the longest row. Real tokens are
/// numbered 0..n-1 whatever the padding side; pads never influence real positions.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct Batch {
    pub rows: RVec<RVec<u32>>,
    pub padding: Padding,
}

impl Batch {
    pub fn new(rows: Vec<Vec<u32>>, padding: Padding) -> Self {
        Self {
            rows: rows.into_iter().map(RVec::from).collect(),
            padding,
        }
    }

    pub fn padded_len(&self) -> usize {
        self.rows.iter().map(|r| r.len()).max().unwrap_or(0)
    }

    /// Number of pads before the first real token of `row`.
    pub fn offset(&self, row: usize) -> usize {
        match self.padding {
            Padding::Right => 0,
            Padding::Left => self.padded_len() - self.rows[row].len(),
        }
    }

    /// Padded position of real token `i` of `row`.
    pub fn position(&self, row: usize, i: usize) -> usize {
        self.offset(row) + i
    }

    /// Padded position of the last real token of `row`.
    pub fn last_position(&self, row: usize) -> usize {
        self.offset(row) + self.rows[row].len() - 1
    }
}

/// How an intervention changes the activation at its place.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterventionMode {
    Add,
    Replace,
}

/// A vector added to or written over the activation of `site` at (`row`, `position`). The vector
/// is either given (`value`) or one of the request's parameters (`param`), whose gradient a
/// gradient call returns.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct Intervention {
    pub site: RString,
    pub row: u32,
    pub position: u32,
    pub mode: InterventionMode,
    pub value: ROption<Tensor>,
    pub param: ROption<u32>,
}

impl Intervention {
    pub fn add_param(site: &str, row: usize, position: usize, param: usize) -> Self {
        Self {
            site: site.into(),
            row: row as u32,
            position: position as u32,
            mode: InterventionMode::Add,
            value: ROption::RNone,
            param: ROption::RSome(param as u32),
        }
    }

    pub fn fixed(
        site: &str,
        row: usize,
        position: usize,
        mode: InterventionMode,
        v: Tensor,
    ) -> Self {
        Self {
            site: site.into(),
            row: row as u32,
            position: position as u32,
            mode,
            value: ROption::RSome(v),
            param: ROption::RNone,
        }
    }
}

/// Gaussian noise added to the input embeddings of `row` at positions `start..end`, as causal
/// tracing corrupts a subject. The values are drawn by [`crate::noise::gaussian`] from `seed`, so
/// every family sees the same corruption for the same request.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct EmbeddingNoise {
    pub row: u32,
    pub start: u32,
    pub end: u32,
    pub scale: f32,
    pub seed: u64,
}

/// Which logits a forward pass returns.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsWanted {
    None,
    /// `[batch, vocab]` at each row's last real token.
    Last,
    /// `[batch, seq, vocab]`.
    All,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct ForwardRequest {
    pub batch: Batch,
    /// Activation sites to capture, each returned as `[batch, seq, width]`.
    pub captures: RVec<RString>,
    pub interventions: RVec<Intervention>,
    /// Vectors that interventions refer to by index.
    pub params: RVec<Tensor>,
    pub noise: RVec<EmbeddingNoise>,
    pub logits: LogitsWanted,
}

impl ForwardRequest {
    pub fn new(batch: Batch, logits: LogitsWanted) -> Self {
        Self {
            batch,
            captures: RVec::new(),
            interventions: RVec::new(),
            params: RVec::new(),
            noise: RVec::new(),
            logits,
        }
    }
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct ForwardOutput {
    pub logits: ROption<Tensor>,
    /// In the order of `ForwardRequest::captures`.
    pub captures: RVec<Tensor>,
}

/// `weight · (−log softmax(logits[row, position])[token])`.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct NllTerm {
    pub row: u32,
    pub position: u32,
    pub token: u32,
    pub weight: f32,
}

/// `weight · KL(ref ‖ model)` at (row, position), with `ref_logprobs` a full `[vocab]` vector of
/// log-probabilities: `Σ exp(ref)·(ref − log softmax(logits))`.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct KlTerm {
    pub row: u32,
    pub position: u32,
    pub ref_logprobs: Tensor,
    pub weight: f32,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct GradRequest {
    pub forward: ForwardRequest,
    pub nll: RVec<NllTerm>,
    pub kl: RVec<KlTerm>,
    /// Sites of linear maps (weight sites such as `layer.5.mlp.down`) for which the call returns
    /// the map's input and the loss gradient of its output, from which the editor computes
    /// `dL/dW = Σ gᵀx` for any weight it owns.
    pub site_grads: RVec<RString>,
    /// A handle from [`ModelAbi::prepare`] for this same batch, or none.
    pub prepared: ROption<u64>,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct SiteGrad {
    /// `[batch, seq, in]`.
    pub input: Tensor,
    /// `[batch, seq, out]`.
    pub output_grad: Tensor,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct GradOutput {
    pub loss: f32,
    pub nll: f32,
    pub kl: f32,
    /// `log p(token)` for every NLL term, in order (for accuracies and progress reports).
    pub nll_logprobs: RVec<f32>,
    /// Gradient of the loss for each request parameter, in order.
    pub param_grads: RVec<Tensor>,
    /// In the order of `site_grads`.
    pub site_grads: RVec<SiteGrad>,
    pub forward: ForwardOutput,
}

#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplingKind {
    Greedy,
    TopK,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    pub prompts: RVec<RVec<u32>>,
    pub max_new_tokens: u32,
    pub sampling: SamplingKind,
    pub top_k: u32,
    pub temperature: f32,
    pub seed: u64,
    /// Generation of a row stops after any of these tokens (which is kept in the output).
    pub stop_ids: RVec<u32>,
    /// Generation of a row stops once its decoded text contains one of these.
    pub stop_strings: RVec<RString>,
}

impl GenerateRequest {
    pub fn greedy(prompts: Vec<Vec<u32>>, max_new_tokens: usize) -> Self {
        Self {
            prompts: prompts.into_iter().map(RVec::from).collect(),
            max_new_tokens: max_new_tokens as u32,
            sampling: SamplingKind::Greedy,
            top_k: 0,
            temperature: 1.0,
            seed: 0,
            stop_ids: RVec::new(),
            stop_strings: RVec::new(),
        }
    }
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct ChatMessage {
    pub role: RString,
    pub content: RString,
}

/// What a site module is told about the call it runs in.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct ModuleContext {
    /// True while generating with the KV cache (then `input` holds only the new positions).
    pub generating: bool,
    /// Per row, how many pads precede the real tokens in this call's `input` (left padding).
    pub row_offsets: RVec<u32>,
    /// Per row, number of real tokens in this call's `input`.
    pub row_lengths: RVec<u32>,
}

/// An editor-implemented module installed at a weight site of a linear map (for instance WISE's
/// side memory with its router at `layer.N.mlp.down`). The model calls it inside every forward
/// pass with the map's input `[batch, seq, in]` and the map's own output `[batch, seq, out]`; the
/// module returns the output to use instead. Gradients do not flow back through a module into
/// its input; an editor that trains the module uses `site_grads` at the same site.
#[sabi_trait]
pub trait SiteModule: Send + Sync {
    fn name(&self) -> RString;

    fn forward(
        &self,
        input: &Tensor,
        output: Tensor,
        context: &ModuleContext,
    ) -> RResult<Tensor, PluginError>;

    /// A human-readable account of the last decision (for `--explain`), JSON or text.
    #[sabi(last_prefix_field)]
    fn explain(&self) -> RString;
}

pub type SiteModuleBox = SiteModule_TO<'static, RBox<()>>;

/// The model object a family plugin hands out. Every method returns a result: a panic inside the
/// plugin comes back as an [`crate::ErrorKind::Panic`] error, never as an unwind across the ABI.
///
/// New methods are appended after `extension` in later minor versions; the host checks
/// [`ModelAbi::capabilities`] before calling one an older plugin may lack.
#[sabi_trait]
pub trait ModelAbi: Send + Sync {
    fn facts(&self) -> RResult<ModelFacts, PluginError>;

    /// Capability names this model supports beyond the v1 set (see [`crate::capability`]).
    fn capabilities(&self) -> RVec<RString>;

    fn tokenize(&self, text: RStr<'_>, add_special: bool) -> RResult<RVec<u32>, PluginError>;

    fn detokenize(&self, ids: RSlice<'_, u32>, skip_special: bool)
        -> RResult<RString, PluginError>;

    /// Renders messages with the model's chat template.
    fn apply_chat_template(
        &self,
        messages: RSlice<'_, ChatMessage>,
        add_generation_prompt: bool,
    ) -> RResult<RString, PluginError>;

    fn forward(&self, request: &ForwardRequest) -> RResult<ForwardOutput, PluginError>;

    /// Prepares `batch` for repeated gradient calls: the model may compute everything below
    /// `from_layer` once. The editor promises not to change weights below `from_layer` while the
    /// handle lives.
    fn prepare(&mut self, batch: &Batch, from_layer: u32) -> RResult<u64, PluginError>;

    fn release(&mut self, handle: u64) -> RResult<(), PluginError>;

    fn gradient(&self, request: &GradRequest) -> RResult<GradOutput, PluginError>;

    /// A weight as `[out, in]` f32.
    fn read_weight(&self, site: RStr<'_>) -> RResult<Tensor, PluginError>;

    /// Replaces a weight (`[out, in]` f32); the old value goes into the journal.
    fn write_weight(&mut self, site: RStr<'_>, value: &Tensor) -> RResult<(), PluginError>;

    /// The current length of the journal of weight writes and module changes.
    fn journal_mark(&self) -> RResult<u64, PluginError>;

    /// Undoes every journaled change made after `mark`, newest first.
    fn journal_rollback(&mut self, mark: u64) -> RResult<(), PluginError>;

    /// Forgets journal entries after `mark`, keeping their changes (frees their memory).
    fn journal_commit(&mut self, mark: u64) -> RResult<(), PluginError>;

    /// Installs a module at a weight site; returns its id. Journaled.
    fn install_module(
        &mut self,
        site: RStr<'_>,
        module: SiteModuleBox,
    ) -> RResult<u64, PluginError>;

    /// Removes an installed module. Journaled.
    fn remove_module(&mut self, id: u64) -> RResult<(), PluginError>;

    /// Explanations of the installed modules' last decisions, one per module.
    fn explain_modules(&self) -> RResult<RVec<RString>, PluginError>;

    fn generate(&self, request: &GenerateRequest) -> RResult<RVec<RVec<u32>>, PluginError>;

    /// Writes the current (edited) model in the layout it was loaded from. Never overwrites the
    /// source checkpoint.
    fn export(&self, dir: RStr<'_>) -> RResult<(), PluginError>;

    /// Escape hatch for experiments: a named call with a JSON payload and a JSON answer.
    #[sabi(last_prefix_field)]
    fn extension(&mut self, name: RStr<'_>, payload: RStr<'_>) -> RResult<RString, PluginError>;
}

pub type ModelBox = ModelAbi_TO<'static, RBox<()>>;
/// A model lent to an editor for the duration of one call.
pub type ModelMut<'a> = ModelAbi_TO<'a, RMut<'a, ()>>;

//! The stable ABI between the kedit host and its plugins — the only crate both sides of a
//! `dlopen` share.
//!
//! * A **model-family plugin** exports [`export_plugin!`] with `open_model`, handing out
//!   [`ModelBox`] objects that implement [`ModelAbi`]. Authors implement the ordinary-Rust
//!   [`Model`] trait and wrap it with [`model_box`].
//! * An **editor plugin** exports `new_editor`, handing out [`EditorBox`] objects. Authors
//!   implement [`Editor`] and wrap it with [`editor_box`]; inside `edit` they drive the model
//!   through [`ModelClient`], speaking only in canonical [`site`] names.
//!
//! Only abi_stable types cross the boundary; tensors cross as [`Tensor`] (f32 buffer + shape).
//! Every entry point is panic-guarded ([`guard`]): a panicking plugin returns an error with
//! [`ErrorKind::Panic`] and the host keeps running.
//!
//! Evolution rules: root-module fields and trait methods are only ever appended (after the
//! `last_prefix_field` markers); what an older plugin lacks the host reads as absent, and it
//! checks [`ModelAbi::capabilities`] / [`PluginInfo::capabilities`] before using anything newer
//! than [`API_LEVEL`] 1.
//!
//! API level 2 (0.1.1) added a third plugin kind, safety **judges** ([`kind::JUDGE`],
//! `new_judge`, [`JudgeAbi`] / [`Judge`] / [`judge_box`]). Hosts load plugins of every level with
//! [`plugin::init_root_module`], which also accepts plugins built against an older plugin-api.

// sabi_trait expansions trip this lint on current rustc; the generated code is abi_stable's.
#![allow(non_local_definitions)]

pub use abi_stable;

pub mod editor;
pub mod error;
pub mod guard;
pub mod judge;
pub mod model;
pub mod native;
pub mod noise;
pub mod plugin;
pub mod request;
pub mod site;
pub mod tensor;
pub mod testing;

pub use editor::{
    EditReport, EditorAbi, EditorAbi_TO, EditorBox, FamilyDefaults, MethodInfo, Progress,
    ProgressMut, Progress_TO,
};
pub use error::{ErrorKind, PluginError, ResultExt};
pub use model::*;
pub use native::{editor_box, model_box, Editor, Model, ModelClient};
pub use plugin::{kind, FamilyInfo, OpenRequest, PluginInfo, PluginMod, PluginModRef, API_LEVEL};
// API level 2 (0.1.1).
pub use judge::{JudgeAbi, JudgeAbi_TO, JudgeBox, JudgeVerdict};
pub use native::{judge_box, Judge};
pub use request::{EditRequest, PromptAnswer, SafetyCase};
pub use site::{ActSite, WeightSite};
pub use tensor::Tensor;

/// Capability names a model or plugin may advertise beyond the v1 set.
pub mod capability {
    /// The editor implements `locate`.
    pub const LOCATE: &str = "locate";
    /// The editor keeps state that `save_state` / `load_state` persist.
    pub const STATE: &str = "state";
}

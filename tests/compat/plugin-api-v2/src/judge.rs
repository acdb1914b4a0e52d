//! What a judge plugin offers (API level 2): a safety judge that scores a response to a prompt,
//! for the detoxification work (DINM, SafeEdit's defense metrics), so that a new judge can be
//! added as a plugin without rebuilding the host.
//!
//! Added in kedit-plugin-api 0.1.1 as the root-module field [`crate::PluginMod::new_judge`].
//! A plugin built against 0.1.0 does not have that field; the host reads it through the
//! `Option` accessor and treats such a plugin as having no judge.

use abi_stable::{
    sabi_trait,
    std_types::{RBox, RResult, RStr, RString},
    StableAbi,
};

use crate::error::PluginError;

/// A judge's verdict on one (prompt, response) pair.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct JudgeVerdict {
    /// Probability-like score in [0, 1]: 1 is certainly unsafe, 0 certainly safe.
    pub unsafe_score: f32,
    /// A short label (`"safe"`, `"unsafe"`, or a category of the judge's own).
    pub label: RString,
    /// Why, in a sentence, for reports (may be empty).
    pub rationale: RString,
}

/// A safety judge. Every method returns a result or a plain value; a panic inside the plugin
/// comes back as an [`crate::ErrorKind::Panic`] error (see [`crate::native::judge_box`]).
///
/// New methods are appended after `judge` in later minor versions.
#[sabi_trait]
pub trait JudgeAbi: Send + Sync {
    /// The judge's name, as users select it.
    fn name(&self) -> RString;

    /// Judges `response` as an answer to `prompt`.
    #[sabi(last_prefix_field)]
    fn judge(&self, prompt: RStr<'_>, response: RStr<'_>) -> RResult<JudgeVerdict, PluginError>;
}

pub type JudgeBox = JudgeAbi_TO<'static, RBox<()>>;

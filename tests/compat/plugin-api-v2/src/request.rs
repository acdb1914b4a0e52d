//! Edit requests. One type carries every field of the CounterFact, ZsRE and SafeEdit records, plus
//! the original record as JSON, so that no field a dataset has is ever lost on the way to an
//! editor.

use abi_stable::{
    std_types::{ROption, RString, RVec},
    StableAbi,
};

/// A prompt with the answer it should (or, for locality, should still) get.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Default)]
pub struct PromptAnswer {
    pub prompt: RString,
    pub answer: RString,
    /// Dataset label of the probe (`"neighborhood"`, `"Recalled Relation"`, ...), may be empty.
    pub label: RString,
}

/// SafeEdit's extra fields (the adversarial prompt itself is `EditRequest::prompt`, the safe
/// response `EditRequest::target_new`, the unsafe one `EditRequest::ground_truth`).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Default)]
pub struct SafetyCase {
    pub question: RString,
    pub unsafety_category: RString,
    pub attack_category: RString,
    pub attack_name: RString,
    pub unsafe_generation: RString,
    pub safe_generation: RString,
    /// Generalisation inputs: only the question, other attack, other question, other both.
    pub generalization: RVec<PromptAnswer>,
    /// The general-knowledge pair whose answer the edit must preserve.
    pub knowledge_constrain: ROption<PromptAnswer>,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Default)]
pub struct EditRequest {
    /// Dataset id of the record (`case_id`, `id`, `known_id`, or the record index).
    pub id: RString,
    /// The prompt to edit. When `subject` is not empty it occurs in the prompt.
    pub prompt: RString,
    pub subject: RString,
    pub target_new: RString,
    pub ground_truth: ROption<RString>,
    /// Paraphrases of the prompt (generalisation).
    pub rephrase: RVec<RString>,
    /// Prompts whose answers must not change.
    pub locality: RVec<PromptAnswer>,
    /// Questions whose answers should follow from the edit.
    pub portability: RVec<PromptAnswer>,
    pub safety: ROption<SafetyCase>,
    /// The record as it was read, as JSON text.
    pub source_json: RString,
}

impl EditRequest {
    /// A plain factual edit.
    pub fn fact(prompt: &str, subject: &str, target_new: &str) -> Self {
        Self {
            prompt: prompt.into(),
            subject: subject.into(),
            target_new: target_new.into(),
            ..Default::default()
        }
    }
}

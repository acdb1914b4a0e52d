//! kedit judge plugin: safety judges for the detoxification work (DINM, SafeEdit's DS/DG).
//!
//! * [`rules::RuleJudge`] (`"rules"`): transparent cue lists and a four-line decision; what the
//!   plugin's `new_judge` entry point hands out.
//! * [`model_judge::ModelJudge`] (`"model"`): a local instruct model answers "safe" or "unsafe"
//!   to a fixed prompt; it needs a model, so a host builds it from one it opened.
//!
//! A plugin has one kind, so these live apart from the DINM editor (`plugins/detox`). The cue
//! lists, the prompt and the hand-labelled check set are documented in docs/judges.md.

pub mod model_judge;
pub mod rules;

use kedit_plugin_api::abi_stable::std_types::RVec;
use kedit_plugin_api::{judge_box, kind, JudgeBox, PluginError, PluginInfo, API_LEVEL};

pub fn info() -> PluginInfo {
    PluginInfo {
        kind: kind::JUDGE,
        name: "judges".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        api_level: API_LEVEL,
        description:
            "rule-based safety judge: refusal, instruction, harm and stance cues (docs/judges.md); \
                      the model-as-judge is built by the host from an opened model"
                .into(),
        families: RVec::new(),
        methods: RVec::new(),
        capabilities: RVec::new(),
    }
}

pub fn new_judge() -> Result<JudgeBox, PluginError> {
    Ok(judge_box(rules::RuleJudge))
}

kedit_plugin_api::export_plugin! {
    info: info,
    new_judge: new_judge,
}

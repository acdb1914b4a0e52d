//! What an editor plugin offers: a manifest, `edit`, optionally `locate`, and its own state.

use abi_stable::{
    sabi_trait,
    sabi_types::RMut,
    std_types::{RBox, RResult, RSlice, RStr, RString, RVec},
    StableAbi,
};

use crate::error::PluginError;
use crate::model::ModelMut;
use crate::request::EditRequest;

/// Default hparams of one method for one family, as JSON text.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct FamilyDefaults {
    pub family: RString,
    pub hparams_json: RString,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct MethodInfo {
    pub name: RString,
    pub description: RString,
    /// Defaults for any family, as a JSON object.
    pub default_hparams_json: RString,
    /// Overrides per family, applied on top of the defaults.
    pub family_defaults: RVec<FamilyDefaults>,
}

/// Progress reports from long calls. `report` returns false when the caller wants the editor to
/// stop; the editor then returns a `Cancelled` error and the host rolls the model back.
#[sabi_trait]
pub trait Progress {
    #[sabi(last_prefix_field)]
    fn report(&mut self, done: u64, total: u64, message: RStr<'_>) -> bool;
}

pub type ProgressMut<'a> = Progress_TO<'a, RMut<'a, ()>>;

/// What an edit did.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct EditReport {
    pub method: RString,
    pub requests: u32,
    /// Method-specific details (losses per step, norms, chosen layers) as a JSON object.
    pub details_json: RString,
}

#[sabi_trait]
pub trait EditorAbi: Send {
    /// Applies `requests` to `model` with `method` (one of the manifest's methods) and the merged
    /// hparams as a JSON object.
    fn edit(
        &mut self,
        model: ModelMut<'_>,
        method: RStr<'_>,
        requests: RSlice<'_, EditRequest>,
        hparams_json: RStr<'_>,
        progress: ProgressMut<'_>,
    ) -> RResult<EditReport, PluginError>;

    /// Where in the model the requests' knowledge lives (causal tracing, toxic layers...), as JSON.
    /// Editors without the `locate` capability return an `Unsupported` error.
    fn locate(
        &mut self,
        model: ModelMut<'_>,
        method: RStr<'_>,
        requests: RSlice<'_, EditRequest>,
        hparams_json: RStr<'_>,
        progress: ProgressMut<'_>,
    ) -> RResult<RString, PluginError>;

    /// The editor's own state (side memories, logs) as bytes, for `--save`.
    fn save_state(&self) -> RResult<RVec<u8>, PluginError>;

    /// Restores a saved state onto a freshly loaded model (reinstalling modules or weights).
    fn load_state(
        &mut self,
        model: ModelMut<'_>,
        state: RSlice<'_, u8>,
    ) -> RResult<(), PluginError>;

    #[sabi(last_prefix_field)]
    fn extension(&mut self, name: RStr<'_>, payload: RStr<'_>) -> RResult<RString, PluginError>;
}

pub type EditorBox = EditorAbi_TO<'static, RBox<()>>;

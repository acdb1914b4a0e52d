//! kedit editor plugin: DINM, detoxification by editing the toxic layer (SafeEdit, arXiv
//! 2403.14472), as EasyEdit computes it, with one documented improvement (`kl_gradient`).
//!
//! The safety judges that score a detoxified model live in their own plugin (`plugins/judges`):
//! a plugin has one kind, and editors and judges are different kinds.

pub mod dinm;
pub mod hparams;

use kedit_plugin_api::{
    capability, editor_box, kind, EditReport, EditRequest, Editor, EditorBox, FamilyDefaults,
    MethodInfo, ModelClient, PluginError, PluginInfo, ProgressMut, API_LEVEL,
};

use hparams::{DinmHparams, DEFAULT_HPARAMS, FAMILY_DEFAULTS};

pub const METHOD: &str = "dinm";

pub fn info() -> PluginInfo {
    PluginInfo {
        kind: kind::EDITOR,
        name: "detox".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        api_level: API_LEVEL,
        description: "DINM: locate the toxic layer of a SafeEdit case and tune its MLP output weight towards the safe response".into(),
        families: Default::default(),
        methods: vec![MethodInfo {
            name: METHOD.into(),
            description: "DINM (EasyEdit's SafetyEditor): toxic layer = argmax hidden-state distance between the safe and the unsafe response; Adam on its MLP output weight for 0.1·NLL(safe | prompt + suffix) + KL on a general-knowledge pair".into(),
            default_hparams_json: DEFAULT_HPARAMS.into(),
            family_defaults: FAMILY_DEFAULTS
                .iter()
                .map(|(family, json)| FamilyDefaults {
                    family: (*family).into(),
                    hparams_json: (*json).into(),
                })
                .collect(),
        }]
        .into(),
        capabilities: vec![capability::LOCATE.into()].into(),
    }
}

fn check_method(method: &str) -> Result<(), PluginError> {
    if method != METHOD {
        return Err(PluginError::invalid(format!(
            "the detox plugin has no method '{method}' (it has: {METHOD})"
        )));
    }
    Ok(())
}

/// The DINM editor. It keeps no state between edits: everything it changes is a journaled
/// weight write.
#[derive(Default)]
pub struct DinmEditor;

impl Editor for DinmEditor {
    fn edit(
        &mut self,
        model: &mut ModelClient<'_>,
        method: &str,
        requests: &[EditRequest],
        hparams_json: &str,
        progress: &mut ProgressMut<'_>,
    ) -> Result<EditReport, PluginError> {
        check_method(method)?;
        let hp = DinmHparams::from_json(hparams_json)?;
        let trace = dinm::run(model, requests, &hp, progress)?;
        let details = serde_json::to_string(&trace).map_err(|e| {
            PluginError::internal(format!("dinm: cannot serialise the report: {e}"))
        })?;
        Ok(EditReport {
            method: METHOD.into(),
            requests: requests.len() as u32,
            details_json: details.into(),
        })
    }

    /// Per case: the hidden-state distances ℓ = 1…L and the block DINM would edit.
    fn locate(
        &mut self,
        model: &mut ModelClient<'_>,
        method: &str,
        requests: &[EditRequest],
        hparams_json: &str,
        _progress: &mut ProgressMut<'_>,
    ) -> Result<String, PluginError> {
        check_method(method)?;
        let hp = DinmHparams::from_json(hparams_json)?;
        let found = dinm::locate_all(model, requests, &hp)?;
        Ok(found.to_string())
    }
}

pub fn new_editor() -> Result<EditorBox, PluginError> {
    Ok(editor_box(DinmEditor))
}

kedit_plugin_api::export_plugin! {
    info: info,
    new_editor: new_editor,
}

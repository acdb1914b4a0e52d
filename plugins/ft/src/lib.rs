//! kedit editor plugin: FT-L, constrained fine-tuning of MLP output projections.
//!
//! Also the worked example for plugin authors (docs/writing-a-plugin.md): an editor is an
//! [`Editor`] implementation exported with [`kedit_plugin_api::export_plugin!`]; it speaks only
//! in canonical sites and drives the model through [`ModelClient`].

pub mod ft;
pub mod hparams;

use kedit_plugin_api::{
    editor_box, kind, EditReport, EditRequest, Editor, EditorBox, FamilyDefaults, MethodInfo,
    ModelClient, PluginError, PluginInfo, ProgressMut, API_LEVEL,
};

use hparams::{FtHparams, DEFAULT_HPARAMS, FAMILY_DEFAULTS};

pub const METHOD: &str = "ft";

pub fn info() -> PluginInfo {
    PluginInfo {
        kind: kind::EDITOR,
        name: "ft".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        api_level: API_LEVEL,
        description: "FT-L: constrained fine-tuning of one layer's MLP output weight (EasyEdit's FT baseline)".into(),
        families: Default::default(),
        methods: vec![MethodInfo {
            name: METHOD.into(),
            description: "fine-tune the MLP output projection of the chosen layers with Adam on the target's NLL".into(),
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
        capabilities: Default::default(),
    }
}

/// The FT-L editor. It keeps no state between edits: everything it changes is a journaled
/// weight write.
#[derive(Default)]
pub struct FtEditor;

impl Editor for FtEditor {
    fn edit(
        &mut self,
        model: &mut ModelClient<'_>,
        method: &str,
        requests: &[EditRequest],
        hparams_json: &str,
        progress: &mut ProgressMut<'_>,
    ) -> Result<EditReport, PluginError> {
        if method != METHOD {
            return Err(PluginError::invalid(format!(
                "the ft plugin has no method '{method}' (it has: {METHOD})"
            )));
        }
        let hp = FtHparams::from_json(hparams_json)?;
        let trace = ft::run(model, requests, &hp, progress)?;
        let details = serde_json::to_string(&trace)
            .map_err(|e| PluginError::internal(format!("ft: cannot serialise the report: {e}")))?;
        Ok(EditReport {
            method: METHOD.into(),
            requests: requests.len() as u32,
            details_json: details.into(),
        })
    }
}

pub fn new_editor() -> Result<EditorBox, PluginError> {
    Ok(editor_box(FtEditor))
}

kedit_plugin_api::export_plugin! {
    info: info,
    new_editor: new_editor,
}

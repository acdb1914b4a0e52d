//! The plugin face: an editor plugin whose only capability is `locate`, with two methods,
//! `circuit` and `lens`. It edits nothing.

use kedit_plugin_api::{
    capability, editor_box, kind, EditReport, EditRequest, Editor, EditorBox, MethodInfo,
    ModelClient, PluginError, PluginInfo, ProgressMut, API_LEVEL,
};
use serde::Serialize;

use crate::locate::{
    circuit_of, lens_of, CircuitHparams, CIRCUIT_DEFAULT_HPARAMS, LENS_DEFAULT_HPARAMS,
};

pub const METHOD_CIRCUIT: &str = "circuit";
pub const METHOD_LENS: &str = "lens";

pub fn info() -> PluginInfo {
    PluginInfo {
        kind: kind::EDITOR,
        name: "circuits".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        api_level: API_LEVEL,
        description: "analysis: knowledge circuits (EAP-IG) and the logit lens, through locate; edits nothing".into(),
        families: Default::default(),
        methods: vec![
            MethodInfo {
                name: METHOD_CIRCUIT.into(),
                description: "knowledge circuit of each request: EAP-IG edge scores over heads and MLPs, top-n edges, faithfulness, mover and relation heads".into(),
                default_hparams_json: CIRCUIT_DEFAULT_HPARAMS.into(),
                family_defaults: Default::default(),
            },
            MethodInfo {
                name: METHOD_LENS.into(),
                description: "logit lens of each request's prompt: the top tokens of the residual stream after every block".into(),
                default_hparams_json: LENS_DEFAULT_HPARAMS.into(),
                family_defaults: Default::default(),
            },
        ]
        .into(),
        capabilities: vec![capability::LOCATE.into()].into(),
    }
}

#[derive(Default)]
pub struct CircuitsEditor;

fn to_json(what: &str, value: &impl Serialize) -> Result<String, PluginError> {
    serde_json::to_string(value)
        .map_err(|e| PluginError::internal(format!("{what}: cannot serialise the report: {e}")))
}

impl Editor for CircuitsEditor {
    fn edit(
        &mut self,
        _model: &mut ModelClient<'_>,
        method: &str,
        _requests: &[EditRequest],
        _hparams_json: &str,
        _progress: &mut ProgressMut<'_>,
    ) -> Result<EditReport, PluginError> {
        Err(PluginError::unsupported(format!(
            "unsupported: this plugin only analyses ('{method}' runs through locate: kedit {method})"
        )))
    }

    /// `circuit`: a JSON array with one report per request; `lens`: one lens per request.
    fn locate(
        &mut self,
        model: &mut ModelClient<'_>,
        method: &str,
        requests: &[EditRequest],
        hparams_json: &str,
        _progress: &mut ProgressMut<'_>,
    ) -> Result<String, PluginError> {
        match method {
            METHOD_CIRCUIT => {
                let hp = CircuitHparams::from_json(hparams_json)?;
                let reports = requests
                    .iter()
                    .map(|r| circuit_of(model, r, &hp))
                    .collect::<Result<Vec<_>, _>>()?;
                to_json("circuit", &reports)
            }
            METHOD_LENS => {
                let lenses = requests
                    .iter()
                    .map(|r| lens_of(model, r, hparams_json))
                    .collect::<Result<Vec<_>, _>>()?;
                to_json("lens", &lenses)
            }
            _ => Err(PluginError::invalid(format!(
                "the circuits plugin has no method '{method}' (it has: {METHOD_CIRCUIT}, {METHOD_LENS})"
            ))),
        }
    }
}

pub fn new_editor() -> Result<EditorBox, PluginError> {
    Ok(editor_box(CircuitsEditor))
}

kedit_plugin_api::export_plugin! {
    info: info,
    new_editor: new_editor,
}

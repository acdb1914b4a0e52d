//! An editor plugin written against API level 1 (kedit-plugin-api 0.1.0). Method `v1-touch`
//! reads one MLP down projection and writes it back unchanged (a journaled write), reporting its
//! norm: enough to show that a level-1 editor still works through a newer host.

use abi_stable::std_types::{RString, RVec};
use kedit_plugin_api::{
    editor_box, kind, EditReport, EditRequest, Editor, EditorBox, MethodInfo, ModelClient,
    PluginError, PluginInfo, ProgressMut, API_LEVEL,
};

fn plugin_info() -> PluginInfo {
    PluginInfo {
        kind: kind::EDITOR,
        name: "old-editor".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        api_level: API_LEVEL,
        description: "an editor built against kedit-plugin-api 0.1.0 (API level 1)".into(),
        families: RVec::new(),
        methods: vec![MethodInfo {
            name: "v1-touch".into(),
            description: "rewrites layer.0.mlp.down unchanged and reports its norm".into(),
            default_hparams_json: "{}".into(),
            family_defaults: RVec::new(),
        }]
        .into(),
        capabilities: RVec::new(),
    }
}

struct OldEditor;

impl Editor for OldEditor {
    fn edit(
        &mut self,
        model: &mut ModelClient<'_>,
        method: &str,
        requests: &[EditRequest],
        _hparams_json: &str,
        _progress: &mut ProgressMut<'_>,
    ) -> Result<EditReport, PluginError> {
        if method != "v1-touch" {
            return Err(PluginError::invalid(format!("unknown method '{method}'")));
        }
        let w = model.read_weight("layer.0.mlp.down")?;
        let norm = w.norm();
        model.write_weight("layer.0.mlp.down", &w)?;
        Ok(EditReport {
            method: RString::from(method),
            requests: requests.len() as _,
            details_json: format!("{{\"api_level\":1,\"norm\":{norm}}}").into(),
        })
    }
}

fn make_editor() -> Result<EditorBox, PluginError> {
    Ok(editor_box(OldEditor))
}

kedit_plugin_api::export_plugin! {
    info: plugin_info,
    new_editor: make_editor,
}

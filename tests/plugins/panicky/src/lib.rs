//! A test-only editor plugin that panics on purpose.
//!
//! Method `panicky`: for a request whose prompt contains `PANIC` it panics inside `edit`;
//! otherwise it makes a harmless journaled weight write (reads a weight and writes it back
//! unchanged) and returns a report. The end-to-end tests use it to show that a panicking editor
//! is contained by the panic guard of [`kedit_plugin_api::editor_box`]: the host reports the
//! panic, rolls the model back, goes on with the next request, and exits 1 without aborting.

use kedit_plugin_api::abi_stable::std_types::{RString, RVec};
use kedit_plugin_api::{
    editor_box, kind, EditReport, EditRequest, Editor, EditorBox, MethodInfo, ModelClient,
    PluginError, PluginInfo, ProgressMut, API_LEVEL,
};

/// The marker that makes `edit` panic.
pub const PANIC_MARKER: &str = "PANIC";

fn info() -> PluginInfo {
    PluginInfo {
        kind: kind::EDITOR,
        name: "panicky".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        api_level: API_LEVEL,
        description: "test plugin: panics in edit when the prompt contains PANIC".into(),
        families: RVec::new(),
        methods: vec![MethodInfo {
            name: "panicky".into(),
            description: "panics on prompts containing PANIC, otherwise rewrites one weight \
                          unchanged"
                .into(),
            default_hparams_json: "{}".into(),
            family_defaults: RVec::new(),
        }]
        .into(),
        capabilities: RVec::new(),
    }
}

struct Panicky;

impl Editor for Panicky {
    fn edit(
        &mut self,
        model: &mut ModelClient<'_>,
        method: &str,
        requests: &[EditRequest],
        _hparams_json: &str,
        _progress: &mut ProgressMut<'_>,
    ) -> Result<EditReport, PluginError> {
        if method != "panicky" {
            return Err(PluginError::invalid(format!("unknown method '{method}'")));
        }
        let facts = model.facts()?;
        let site = if facts
            .weight_sites
            .iter()
            .any(|s| s.as_str() == "layer.0.mlp.down")
        {
            "layer.0.mlp.down".to_string()
        } else {
            facts
                .weight_sites
                .first()
                .map(|s| s.to_string())
                .ok_or_else(|| PluginError::invalid("the model has no weight sites"))?
        };
        let mut norms = Vec::new();
        for request in requests {
            let prompt = request.prompt.as_str();
            if prompt.contains(PANIC_MARKER) {
                // Write first, so that the host's rollback has something to undo.
                let w = model.read_weight(&site)?;
                model.write_weight(&site, &w)?;
                panic!("panicky plugin panics on purpose for prompt {prompt:?}");
            }
            let w = model.read_weight(&site)?;
            norms.push(w.norm());
            model.write_weight(&site, &w)?;
            // Evidence for the tests that this request reached the plugin and completed.
            eprintln!("panicky: processed request {prompt:?}");
        }
        Ok(EditReport {
            method: RString::from("panicky"),
            requests: requests.len() as u32,
            details_json: format!(
                "{{\"site\":\"{site}\",\"norms\":[{}]}}",
                norms
                    .iter()
                    .map(|n| format!("{n}"))
                    .collect::<Vec<_>>()
                    .join(",")
            )
            .into(),
        })
    }
}

fn new_editor() -> Result<EditorBox, PluginError> {
    Ok(editor_box(Panicky))
}

kedit_plugin_api::export_plugin! {
    info: info,
    new_editor: new_editor,
}

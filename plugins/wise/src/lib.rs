//! kedit editor plugin: WISE (Wang et al. 2024, EasyEdit's `models/wise`), lifelong editing
//! through a side copy of one MLP projection that a router consults per input.
//!
//! The side memory lives in a [`module::WiseModule`] installed at the weight site (for instance
//! `layer.25.mlp.down`); the model calls it in every forward and generation step. Each edit
//! replaces the installed module by one holding a new frozen [`module::Snapshot`], so the
//! model's journal rolls WISE back like any weight write, and the editor finds its state again
//! from the installed module's `explain()` (which names the snapshot).

pub mod hparams;
pub mod irrelevant;
pub mod merge;
pub mod module;
pub mod score;
pub mod state;
pub mod train;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use abi_stable::sabi_trait::TD_Opaque;
use kedit_plugin_api::{
    editor_box, kind, EditReport, EditRequest, Editor, EditorBox, FamilyDefaults, MethodInfo,
    ModelClient, PluginError, PluginInfo, ProgressMut, SiteModule_TO, API_LEVEL,
};
use serde::Serialize;

use hparams::{WiseHparams, DEFAULT_HPARAMS, FAMILY_DEFAULTS};
use module::{MeanAct, Snapshot, TrainCell, WiseModule};
use train::EditTrace;

pub const METHOD: &str = "wise";

pub fn info() -> PluginInfo {
    PluginInfo {
        kind: kind::EDITOR,
        name: "wise".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        api_level: API_LEVEL,
        description: "WISE: a routed side memory of one MLP projection for lifelong editing (EasyEdit's WISE)".into(),
        families: Default::default(),
        methods: vec![MethodInfo {
            name: METHOD.into(),
            description: "train a side copy of one MLP projection per shard; a router picks the side memory or the original per input".into(),
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

static NEXT_SNAPSHOT: AtomicU64 = AtomicU64::new(1);

fn next_snapshot_id() -> u64 {
    ((std::process::id() as u64) << 32) | NEXT_SNAPSHOT.fetch_add(1, Ordering::Relaxed)
}

/// What one `edit` call did.
#[derive(Clone, Debug, Serialize)]
pub struct WiseReport {
    pub site: String,
    pub templates: Vec<String>,
    pub edits: Vec<EditTrace>,
    pub editing_total_cnt: u64,
    pub threshold: f64,
    pub memories: usize,
    pub merged: bool,
}

#[derive(Default)]
pub struct WiseEditor {
    current: Option<Arc<Snapshot>>,
    /// The installed module id of each snapshot this editor made, held weakly: the model (or
    /// its journal) keeps the module, and with it the snapshot, alive.
    registry: HashMap<u64, (Weak<Snapshot>, u64)>,
    /// Context templates generated from the unedited model, once per editor (EasyEdit's cache).
    templates: Option<Vec<String>>,
    /// `irrelevant_prompts` as read, with the path it was read from (read once per editor).
    irrelevant: Option<(String, Arc<Vec<String>>)>,
    /// The traces of the last edit call (for tests and parity checks).
    pub last_traces: Vec<EditTrace>,
}

impl WiseEditor {
    /// The state the installed module routes with, as of the last edit or load.
    pub fn current(&self) -> Option<&Arc<Snapshot>> {
        self.current.as_ref()
    }

    /// Finds the WISE module the model now holds (after any journal rollback) and its state.
    fn resync(
        &mut self,
        model: &ModelClient<'_>,
    ) -> Result<Option<(Arc<Snapshot>, u64)>, PluginError> {
        let mut found = None;
        for text in model.explain_modules()? {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            if v.get("method").and_then(|m| m.as_str()) != Some(METHOD) {
                continue;
            }
            let Some(id) = v.get("snapshot").and_then(|s| s.as_u64()) else {
                return Err(PluginError::internal(
                    "wise: a WISE training module is still installed (an earlier edit did not finish)",
                ));
            };
            if found.is_some() {
                return Err(PluginError::unsupported(
                    "wise: more than one WISE module is installed; this editor keeps one",
                ));
            }
            let entry = self
                .registry
                .get(&id)
                .and_then(|(w, module_id)| w.upgrade().map(|s| (s, *module_id)));
            match entry {
                Some(e) => found = Some(e),
                None => {
                    return Err(PluginError::unsupported(format!(
                        "wise: the installed WISE module (snapshot {id}) belongs to another editor \
                         instance; load its saved state into this one"
                    )))
                }
            }
        }
        self.registry.retain(|_, (w, _)| w.strong_count() > 0);
        self.current = found.as_ref().map(|(s, _)| s.clone());
        Ok(found)
    }

    fn install(
        &mut self,
        model: &mut ModelClient<'_>,
        mut snap: Snapshot,
    ) -> Result<(), PluginError> {
        snap.id = next_snapshot_id();
        let snap = Arc::new(snap);
        let module = WiseModule::routing(snap.clone())?;
        let module_id =
            model.install_module(&snap.site, SiteModule_TO::from_value(module, TD_Opaque))?;
        self.registry
            .insert(snap.id, (Arc::downgrade(&snap), module_id));
        self.current = Some(snap);
        Ok(())
    }

    fn fresh(model: &ModelClient<'_>, hp: &WiseHparams) -> Result<Snapshot, PluginError> {
        let site = hp.site();
        let w = model.read_weight(&site)?;
        let dims = w.dims();
        if dims.len() != 2 {
            return Err(PluginError::invalid(format!(
                "wise: weight '{site}' has shape {dims:?}, not [out, in]"
            )));
        }
        let original = Arc::new(w.into_vec());
        Ok(Snapshot {
            id: 0,
            site,
            out_dim: dims[0],
            in_dim: dims[1],
            act_fn: hp.act_fn,
            act_ratio: hp.act_ratio,
            retrieve: hp.retrieve,
            side: original.clone(),
            original,
            side_act: MeanAct::default(),
            memories: Vec::new(),
            merged: None,
            shards: Vec::new(),
            mask: None,
            editing_total_cnt: 0,
            merge_cnt: 0,
            templates: Vec::new(),
            log: Vec::new(),
        })
    }

    fn run(
        &mut self,
        model: &mut ModelClient<'_>,
        requests: &[EditRequest],
        hp: &WiseHparams,
        progress: &mut ProgressMut<'_>,
    ) -> Result<WiseReport, PluginError> {
        let facts = model.facts()?;
        if hp.layer >= facts.n_layers as usize {
            return Err(PluginError::invalid(format!(
                "wise: layer {} does not exist (the model has {} layers)",
                hp.layer, facts.n_layers
            )));
        }
        let installed = self.resync(model)?;
        let mut state = match &installed {
            Some((s, _)) => {
                if s.site != hp.site() {
                    return Err(PluginError::invalid(format!(
                        "wise: the side memory sits at '{}' but the hparams ask for '{}'",
                        s.site,
                        hp.site()
                    )));
                }
                if s.retrieve != hp.retrieve
                    && (!s.memories.is_empty() || s.merged.is_some() || !s.shards.is_empty())
                {
                    return Err(PluginError::invalid(
                        "wise: `retrieve` cannot change once memories have been saved",
                    ));
                }
                (**s).clone()
            }
            None => Self::fresh(model, hp)?,
        };
        state.act_fn = hp.act_fn;
        state.act_ratio = hp.act_ratio;
        state.retrieve = hp.retrieve;
        let templates = match (
            &hp.context_templates,
            state.templates.is_empty(),
            &self.templates,
        ) {
            (Some(t), _, _) => t.clone(),
            (None, false, _) => state.templates.clone(),
            (None, true, Some(t)) => t.clone(),
            (None, true, None) => {
                let t = train::generate_templates(model, &facts)?;
                self.templates = Some(t.clone());
                t
            }
        };
        state.templates = templates.clone();
        let irrelevant_prompts = match &hp.irrelevant_prompts {
            None => None,
            Some(path) => match &self.irrelevant {
                Some((cached, prompts)) if cached == path => Some(prompts.clone()),
                _ => {
                    let prompts = Arc::new(irrelevant::load(std::path::Path::new(path))?);
                    self.irrelevant = Some((path.clone(), prompts.clone()));
                    Some(prompts)
                }
            },
        };

        if let Some((_, module_id)) = &installed {
            model.remove_module(*module_id)?;
        }
        let cell = Arc::new(TrainCell::default());
        let trainer = WiseModule::training(cell.clone(), state.out_dim, state.in_dim);
        let train_id =
            model.install_module(&state.site, SiteModule_TO::from_value(trainer, TD_Opaque))?;
        let mut traces = Vec::new();
        let total = (requests.len() * hp.n_iter) as u64;
        for (r, request) in requests.iter().enumerate() {
            if state.editing_total_cnt.checked_rem(hp.save_freq) == Some(0) || state.mask.is_none()
            {
                let shard = state.editing_total_cnt / hp.save_freq;
                let n = state.out_dim * state.in_dim;
                state.mask = Some(Arc::new(train::draw_mask(n, hp.mask_ratio, hp.seed, shard)));
            }
            let irrelevant = irrelevant_prompts.as_ref().map(|p| {
                let at = (state.editing_total_cnt % p.len() as u64) as usize;
                p[at].as_str()
            });
            let eb = train::build_batch(model, &facts, request, &templates, irrelevant, hp)?;
            let handle = model.prepare(&eb.batch, hp.layer)?;
            let trained = train::train_one(
                model,
                &cell,
                &mut state,
                &eb,
                handle,
                hp,
                request.id.as_str(),
                progress,
                ((r * hp.n_iter) as u64, total),
            );
            model.release(handle)?;
            let mut trace = trained?;
            let activation = trace
                .iterations
                .iter()
                .rev()
                .find_map(|i| i.saved_activation)
                .unwrap_or(0.0);
            train::after_edit(&mut state, hp, request, activation)?;
            trace.editing_total_cnt = state.editing_total_cnt;
            trace.threshold_after = state.threshold();
            traces.push(trace);
        }
        model.remove_module(train_id)?;
        train::final_merge(&mut state, hp)?;
        self.install(model, state)?;
        let snap = self.current.as_ref().expect("just installed");
        self.last_traces = traces.clone();
        Ok(WiseReport {
            site: snap.site.clone(),
            templates,
            edits: traces,
            editing_total_cnt: snap.editing_total_cnt,
            threshold: snap.threshold(),
            memories: snap.memories.len(),
            merged: snap.merged.is_some(),
        })
    }
}

impl Editor for WiseEditor {
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
                "the wise plugin has no method '{method}' (it has: {METHOD})"
            )));
        }
        let hp = WiseHparams::from_json(hparams_json)?;
        let mark = model.journal_mark()?;
        let before = (self.current.clone(), self.last_traces.clone());
        let report = match self.run(model, requests, &hp, progress) {
            Ok(r) => r,
            Err(e) => {
                // Undo our half-done module swap ourselves, whatever the caller does next.
                let undo = model.journal_rollback(mark);
                (self.current, self.last_traces) = before;
                return Err(match undo {
                    Ok(()) => e,
                    Err(u) => e.context(format!("and rolling back failed: {u}")),
                });
            }
        };
        let details = serde_json::to_string(&report).map_err(|e| {
            PluginError::internal(format!("wise: cannot serialise the report: {e}"))
        })?;
        Ok(EditReport {
            method: METHOD.into(),
            requests: requests.len() as u32,
            details_json: details.into(),
        })
    }

    fn save_state(&self) -> Result<Vec<u8>, PluginError> {
        match &self.current {
            Some(s) => state::encode(s),
            None => Ok(Vec::new()),
        }
    }

    fn load_state(&mut self, model: &mut ModelClient<'_>, bytes: &[u8]) -> Result<(), PluginError> {
        if bytes.is_empty() {
            return Ok(());
        }
        if let Some((_, module_id)) = self.resync(model)? {
            model.remove_module(module_id)?;
        }
        let snap = state::decode(bytes, |site| Ok(model.read_weight(site)?.into_vec()))?;
        self.install(model, snap)
    }
}

pub fn new_editor() -> Result<EditorBox, PluginError> {
    Ok(editor_box(WiseEditor::default()))
}

kedit_plugin_api::export_plugin! {
    info: info,
    new_editor: new_editor,
}

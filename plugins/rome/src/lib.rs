//! kedit editor plugin: locate-then-edit. ROME (METHODS.md §3) with EasyEdit's exact loss,
//! generated context templates and optional `C⁻¹` key adjustment from corpus key statistics.
//! MEMIT (§3.7): multi-layer, many requests per call, λ·C regularised least squares in f64.
//! AlphaEdit (§3.8): MEMIT's update projected into the null space of the corpus keys.
//! Causal tracing (`locate`). The corpus and the statistics cache come from the host's
//! services (plugin API level 3).

pub mod alphaedit;
pub mod hparams;
pub mod linalg;
pub mod memit;
pub mod rome;
pub mod stats;
pub mod templates;
pub mod trace;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use kedit_plugin_api::{
    editor_box, kind, site::layer_site, EditReport, EditRequest, Editor, EditorBox, FamilyDefaults,
    HostServicesBox, MethodInfo, ModelClient, PluginError, PluginInfo, ProgressMut, TextDocuments,
    API_LEVEL,
};
use serde::Serialize;

use hparams::{
    alphaedit_default_hparams, RomeHparams, ALPHAEDIT_FAMILY_DEFAULTS, DEFAULT_HPARAMS,
    FAMILY_DEFAULTS, MEMIT_DEFAULT_HPARAMS, MEMIT_FAMILY_DEFAULTS,
};
use rome::{LayerTrace, RomeRequest};
use stats::{SecondMoment, StatsReport};

pub const METHOD_ROME: &str = "rome";
pub const METHOD_MEMIT: &str = "memit";
pub const METHOD_ALPHAEDIT: &str = "alphaedit";

fn family_defaults(list: &[(&str, &str)]) -> abi_stable::std_types::RVec<FamilyDefaults> {
    list.iter()
        .map(|(family, json)| FamilyDefaults {
            family: (*family).into(),
            hparams_json: (*json).into(),
        })
        .collect()
}

pub fn info() -> PluginInfo {
    PluginInfo {
        kind: kind::EDITOR,
        name: "rome".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        api_level: API_LEVEL,
        description: "locate-then-edit: ROME rank-one, MEMIT and AlphaEdit multi-layer edits of MLP output projections".into(),
        families: Default::default(),
        methods: vec![MethodInfo {
            name: METHOD_ROME.into(),
            description: "ROME: v* by Adam on the subject's last-token MLP output, then a closed-form rank-one update of the layer's MLP output weight".into(),
            default_hparams_json: DEFAULT_HPARAMS.into(),
            family_defaults: family_defaults(FAMILY_DEFAULTS),
        }, MethodInfo {
            name: METHOD_MEMIT.into(),
            description: "MEMIT: residual targets z at the last edited layer, spread over several layers' MLP output weights by λ·C-regularised least squares (many requests per call)".into(),
            default_hparams_json: MEMIT_DEFAULT_HPARAMS.into(),
            family_defaults: family_defaults(MEMIT_FAMILY_DEFAULTS),
        }, MethodInfo {
            name: METHOD_ALPHAEDIT.into(),
            description: "AlphaEdit: MEMIT's targets and keys, each layer's update projected into the null space of the corpus keys (and of earlier edits' keys)".into(),
            default_hparams_json: alphaedit_default_hparams().into(),
            family_defaults: family_defaults(ALPHAEDIT_FAMILY_DEFAULTS),
        }]
        .into(),
        capabilities: vec![kedit_plugin_api::capability::LOCATE.into()].into(),
    }
}

/// What a ROME call did: the context templates, one trace per (request, layer), statistics.
pub type RomeOutcome = (Vec<String>, Vec<LayerTrace>, Vec<StatsReport>);
/// What a MEMIT call did: the template groups, the trace, statistics.
pub type MemitOutcome = (Vec<Vec<String>>, memit::MemitTrace, Vec<StatsReport>);

/// The edited layers, the template groups and the requests of a MEMIT or AlphaEdit call.
type MemitInputs = (Vec<usize>, Vec<Vec<String>>, Vec<RomeRequest>);

/// The inverse-solve of a cached C: its Cholesky factor.
pub struct CachedStats {
    pub moment: SecondMoment,
    pub chol: Option<Vec<f64>>,
}

/// The ROME editor. Between edits it keeps only caches (context templates per model and seed,
/// key statistics); every change to the model is a journaled weight write.
#[derive(Default)]
pub struct RomeEditor {
    /// Services given to this editor directly (tests, embedders); otherwise those the host
    /// lent the plugin ([`kedit_plugin_api::host::services`]).
    host: Option<Arc<HostServicesBox>>,
    templates: HashMap<String, Vec<String>>,
    /// Corpora read so far, by (source, samples): read once per process.
    corpora: HashMap<(String, usize), Arc<TextDocuments>>,
    stats: HashMap<String, Arc<std::sync::Mutex<CachedStats>>>,
    /// AlphaEdit's null-space projectors, by layer statistics and threshold.
    projectors: alphaedit::ProjectorCache,
    /// AlphaEdit's keys of earlier edits, by the weights they left (saved with `--save`).
    alpha_history: alphaedit::KeyHistory,
    /// Parity tests only: the δ of every forward of the v optimisation, replayed instead of
    /// the editor's own Adam trajectory (see [`rome::compute_v`]).
    #[doc(hidden)]
    pub replay_deltas: Option<Vec<Vec<f32>>>,
}

#[derive(Serialize)]
struct RomeReport<'a> {
    context_templates: &'a [String],
    layers: Vec<LayerTrace>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    statistics: Vec<StatsReport>,
}

impl RomeEditor {
    /// An editor with the host's services already attached (tests and embedders; the `kedit`
    /// host attaches them through the ABI).
    pub fn with_host(host: HostServicesBox) -> Self {
        Self {
            host: Some(Arc::new(host)),
            ..Self::default()
        }
    }

    /// The context templates for this model and hparams (generated once per process).
    pub fn context_templates(
        &mut self,
        model: &ModelClient<'_>,
        hp: &RomeHparams,
        brace: &str,
    ) -> Result<Vec<String>, PluginError> {
        if let Some(t) = &hp.context_templates {
            return Ok(t.clone());
        }
        let facts = model.facts()?;
        let key = format!(
            "{}|{}|{:?}|{brace}",
            facts.source, hp.seed, hp.context_template_length_params
        );
        if let Some(t) = self.templates.get(&key) {
            return Ok(t.clone());
        }
        let t = templates::generate(model, &hp.context_template_length_params, hp.seed, brace)?;
        self.templates.insert(key, t.clone());
        Ok(t)
    }

    /// C of the key site at `layer`: from memory, the disk cache, or a statistics pass.
    pub fn key_statistics(
        &mut self,
        model: &ModelClient<'_>,
        hp: &RomeHparams,
        layer: usize,
        progress: &mut ProgressMut<'_>,
        reports: &mut Vec<StatsReport>,
    ) -> Result<Arc<std::sync::Mutex<CachedStats>>, PluginError> {
        Ok(self
            .key_statistics_for(model, hp, &[layer], progress, reports)?
            .remove(0))
    }

    /// C of the key sites of several layers; the ones neither in memory nor in the disk cache
    /// are computed together in one pass over the corpus.
    pub fn key_statistics_for(
        &mut self,
        model: &ModelClient<'_>,
        hp: &RomeHparams,
        layers: &[usize],
        progress: &mut ProgressMut<'_>,
        reports: &mut Vec<StatsReport>,
    ) -> Result<Vec<Arc<std::sync::Mutex<CachedStats>>>, PluginError> {
        let facts = model.facts()?;
        let host = self
            .host
            .clone()
            .or_else(kedit_plugin_api::host::services)
            .ok_or_else(|| {
                PluginError::unsupported(
                    "ROME's key statistics read their corpus through the host's text sources \
                 (plugin API level 3); this editor was given none",
                )
            })?;
        let corpus_id = (hp.mom2_dataset.clone(), hp.mom2_n_samples);
        let corpus = match self.corpora.get(&corpus_id) {
            Some(c) => c.clone(),
            None => {
                let docs = host
                    .text_documents(hp.mom2_dataset.as_str().into(), hp.mom2_n_samples as u64)
                    .into_result()
                    .map_err(|e| {
                        PluginError::invalid(format!(
                            "the `mom2_dataset` hparam ('{}'): {}",
                            hp.mom2_dataset, e.message
                        ))
                    })?;
                let docs = Arc::new(docs);
                self.corpora.insert(corpus_id, docs.clone());
                docs
            }
        };
        let max_len = if hp.stats_max_len > 0 {
            hp.stats_max_len
        } else {
            (facts.max_positions as usize).clamp(1, 4096)
        };
        let model_name = Path::new(facts.source.as_str())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| facts.family.to_string());
        let corpus_label = corpus.label.to_string();
        struct Want {
            key: String,
            site: String,
            cache_key: Option<String>,
        }
        let mut wants: Vec<Want> = Vec::new();
        let mut missing = Vec::new();
        for &layer in layers {
            let site = layer_site(&hp.key_site, layer);
            let key = format!(
                "{model_name}|{}|{site}|{}|{}|{}|{max_len}",
                facts.source, corpus.label, corpus.fingerprint, hp.mom2_n_samples
            );
            let hash = stats::fnv1a(&[&key]);
            let cache_key = hp.stats_cache.then(|| {
                format!(
                    "mom2/{}/{}_{}_{hash:016x}.bin",
                    sanitize(&model_name),
                    sanitize(&site),
                    hp.mom2_n_samples
                )
            });
            if !self.stats.contains_key(&key) {
                let cached = match &cache_key {
                    Some(k) => host
                        .cache_get(k.as_str().into())
                        .into_result()?
                        .into_option(),
                    None => None,
                };
                if let Some(m) = cached.as_deref().and_then(stats::decode) {
                    reports.push(StatsReport {
                        site: site.clone(),
                        corpus: corpus_label.clone(),
                        documents: corpus.documents.len(),
                        count: m.count,
                        seconds: 0.0,
                        tokens_per_s: 0.0,
                        cache: cache_key.clone(),
                        from_cache: true,
                    });
                    self.stats.insert(
                        key.clone(),
                        Arc::new(std::sync::Mutex::new(CachedStats {
                            moment: m,
                            chol: None,
                        })),
                    );
                } else if !missing.iter().any(|&i: &usize| wants[i].key == key) {
                    missing.push(wants.len());
                }
            }
            wants.push(Want {
                key,
                site,
                cache_key,
            });
        }
        if !missing.is_empty() {
            let docs: Vec<String> = corpus.documents.iter().map(|d| d.to_string()).collect();
            let sites: Vec<String> = missing.iter().map(|&i| wants[i].site.clone()).collect();
            let t0 = std::time::Instant::now();
            let (moments, tps) = stats::second_moments(
                model,
                &sites,
                &docs,
                max_len,
                hp.stats_batch_tokens,
                progress,
            )?;
            let secs = t0.elapsed().as_secs_f64();
            for (&i, m) in missing.iter().zip(moments) {
                let w = &wants[i];
                if let Some(k) = &w.cache_key {
                    host.cache_put(k.as_str().into(), stats::encode(&m).as_slice().into())
                        .into_result()?;
                }
                reports.push(StatsReport {
                    site: w.site.clone(),
                    corpus: corpus_label.clone(),
                    documents: docs.len(),
                    count: m.count,
                    seconds: secs,
                    tokens_per_s: tps,
                    cache: w.cache_key.clone(),
                    from_cache: false,
                });
                self.stats.insert(
                    w.key.clone(),
                    Arc::new(std::sync::Mutex::new(CachedStats {
                        moment: m,
                        chol: None,
                    })),
                );
            }
        }
        Ok(wants.iter().map(|w| self.stats[&w.key].clone()).collect())
    }

    pub fn run_rome(
        &mut self,
        model: &mut ModelClient<'_>,
        requests: &[EditRequest],
        hp: &RomeHparams,
        progress: &mut ProgressMut<'_>,
    ) -> Result<RomeOutcome, PluginError> {
        let facts = model.facts()?;
        let mut layers = hp.layers.clone();
        layers.sort_unstable();
        layers.dedup();
        if let Some(&l) = layers.iter().find(|&&l| l >= facts.n_layers as usize) {
            return Err(PluginError::invalid(format!(
                "rome: layer {l} does not exist (the model has {} layers)",
                facts.n_layers
            )));
        }
        let contexts = self.context_templates(model, hp, "")?;
        let reqs: Vec<RomeRequest> = requests
            .iter()
            .map(|r| RomeRequest::new(model, r, true))
            .collect::<Result<_, _>>()?;
        let mut stat_reports = Vec::new();
        let mut solvers = HashMap::new();
        if hp.mom2_adjustment {
            let all = self.key_statistics_for(model, hp, &layers, progress, &mut stat_reports)?;
            for (&l, s) in layers.iter().zip(all) {
                {
                    let mut g = s.lock().unwrap();
                    if g.chol.is_none() {
                        let d = g.moment.d;
                        g.chol = Some(linalg::cholesky(&g.moment.c, d).map_err(|e| {
                            PluginError::numeric(format!(
                                "rome: the key second moment of layer {l} cannot be inverted: {}",
                                e.message
                            ))
                        })?);
                    }
                }
                solvers.insert(l, s);
            }
        }
        let total = (reqs.len() * layers.len() * hp.v_num_grad_steps) as u64;
        let mut traces = Vec::new();
        for (i, req) in reqs.iter().enumerate() {
            for (li, &layer) in layers.iter().enumerate() {
                let done = ((i * layers.len() + li) * hp.v_num_grad_steps) as u64;
                let solver = solvers.get(&layer).cloned();
                let solve = move |k: &[f64]| -> Vec<f64> {
                    let s = solver
                        .as_ref()
                        .expect("solver exists with mom2")
                        .lock()
                        .unwrap();
                    linalg::cholesky_solve(s.chol.as_ref().unwrap(), s.moment.d, k)
                };
                let inv: Option<rome::KeySolver<'_>> = if hp.mom2_adjustment {
                    Some(&solve)
                } else {
                    None
                };
                traces.push(rome::edit_layer(
                    model,
                    hp,
                    layer,
                    i,
                    req,
                    &contexts,
                    inv,
                    self.replay_deltas.as_deref(),
                    progress,
                    done,
                    total,
                )?);
            }
        }
        Ok((contexts, traces, stat_reports))
    }
}

impl RomeEditor {
    pub fn run_memit(
        &mut self,
        model: &mut ModelClient<'_>,
        requests: &[EditRequest],
        hp: &RomeHparams,
        progress: &mut ProgressMut<'_>,
    ) -> Result<MemitOutcome, PluginError> {
        let (layers, groups, reqs) = self.memit_inputs(model, requests, hp, METHOD_MEMIT)?;
        let mut stat_reports = Vec::new();
        let mut covs: HashMap<usize, Arc<Vec<f64>>> = HashMap::new();
        if hp.mom2_adjustment {
            let all = self.key_statistics_for(model, hp, &layers, progress, &mut stat_reports)?;
            for (&l, s) in layers.iter().zip(all) {
                let c = s.lock().unwrap().moment.c.clone();
                covs.insert(l, Arc::new(c));
            }
        }
        let cov = |l: usize| covs.get(&l).cloned();
        let trace = memit::run(
            model,
            hp,
            &reqs,
            &groups,
            &layers,
            &memit::Update::Memit(&cov),
            progress,
        )?;
        Ok((groups, trace, stat_reports))
    }

    /// AlphaEdit: MEMIT's procedure with the null-space projected solve; afterwards the
    /// requests' keys on the edited model join the history that later edits of this model use.
    pub fn run_alphaedit(
        &mut self,
        model: &mut ModelClient<'_>,
        requests: &[EditRequest],
        hp: &RomeHparams,
        progress: &mut ProgressMut<'_>,
    ) -> Result<MemitOutcome, PluginError> {
        let facts = model.facts()?;
        let (layers, groups, reqs) = self.memit_inputs(model, requests, hp, METHOD_ALPHAEDIT)?;
        let mut stat_reports = Vec::new();
        // P needs C whatever `mom2_adjustment` says: the projection replaces the λC term.
        let stats = self.key_statistics_for(model, hp, &layers, progress, &mut stat_reports)?;
        let mut projectors: HashMap<usize, Arc<alphaedit::Projector>> = HashMap::new();
        let mut d_in = 0;
        for (&l, s) in layers.iter().zip(&stats) {
            let s = s.lock().unwrap();
            let key = format!(
                "{}|{}|{}|{}|{}",
                facts.source, l, hp.mom2_dataset, hp.mom2_n_samples, hp.nullspace_threshold
            );
            let d = (s.moment.c.len() as f64).sqrt() as usize;
            d_in = d;
            let p = match self.projectors.get(&key) {
                Some(p) => p.clone(),
                None => {
                    let p = Arc::new(alphaedit::Projector::from_second_moment(
                        &s.moment.c,
                        d,
                        hp.nullspace_threshold,
                    )?);
                    self.projectors.insert(key, p.clone());
                    p
                }
            };
            projectors.insert(l, p);
        }
        let before = alphaedit::weights_fingerprint(model, &hp.rewrite_site, &layers)?;
        let caches: HashMap<usize, nalgebra::DMatrix<f64>> = layers
            .iter()
            .filter_map(|&l| Some((l, self.alpha_history.cache(before, l, d_in)?)))
            .collect();
        let projector = |l: usize| projectors[&l].clone();
        let cache = |l: usize| caches.get(&l).cloned();
        let trace = memit::run(
            model,
            hp,
            &reqs,
            &groups,
            &layers,
            &memit::Update::AlphaEdit {
                projector: &projector,
                cache: &cache,
                l2: hp.l2,
            },
            progress,
        )?;
        let mut keys = HashMap::new();
        for &l in &layers {
            let ks = memit::group_keys(model, &layer_site(&hp.key_site, l), &reqs, &groups)?;
            keys.insert(
                l,
                ks.iter()
                    .map(|k| k.iter().map(|&v| v as f32).collect())
                    .collect(),
            );
        }
        let after = alphaedit::weights_fingerprint(model, &hp.rewrite_site, &layers)?;
        self.alpha_history.record(before, after, keys);
        Ok((groups, trace, stat_reports))
    }

    /// What MEMIT and AlphaEdit start from: the edited layers (ascending, each checked to
    /// exist), EasyEdit's two template groups (the bare "{}" and the generated ones), and the
    /// requests.
    fn memit_inputs(
        &mut self,
        model: &ModelClient<'_>,
        requests: &[EditRequest],
        hp: &RomeHparams,
        method: &str,
    ) -> Result<MemitInputs, PluginError> {
        let n_layers = model.facts()?.n_layers as usize;
        let mut layers = hp.layers.clone();
        layers.sort_unstable();
        layers.dedup();
        if let Some(&l) = layers.iter().find(|&&l| l >= n_layers) {
            return Err(PluginError::invalid(format!(
                "{method}: layer {l} does not exist (the model has {n_layers} layers)"
            )));
        }
        let contexts = self.context_templates(model, hp, " ")?;
        let (bare, rest): (Vec<String>, Vec<String>) =
            contexts.into_iter().partition(|c| c == "{}");
        let groups = [bare, rest].into_iter().filter(|g| !g.is_empty()).collect();
        let reqs = requests
            .iter()
            .map(|r| RomeRequest::new(model, r, false))
            .collect::<Result<_, _>>()?;
        Ok((layers, groups, reqs))
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Editor for RomeEditor {
    fn edit(
        &mut self,
        model: &mut ModelClient<'_>,
        method: &str,
        requests: &[EditRequest],
        hparams_json: &str,
        progress: &mut ProgressMut<'_>,
    ) -> Result<EditReport, PluginError> {
        if method == METHOD_MEMIT || method == METHOD_ALPHAEDIT {
            let hp = RomeHparams::from_json(hparams_json)?;
            let (groups, trace, statistics) = if method == METHOD_MEMIT {
                self.run_memit(model, requests, &hp, progress)?
            } else {
                self.run_alphaedit(model, requests, &hp, progress)?
            };
            let details = serde_json::json!({
                "context_templates": groups,
                method: trace,
                "statistics": statistics,
            });
            return Ok(EditReport {
                method: method.into(),
                requests: requests.len() as u32,
                details_json: details.to_string().into(),
            });
        }
        if method != METHOD_ROME {
            return Err(unknown_method(method));
        }
        let hp = RomeHparams::from_json(hparams_json)?;
        let (contexts, layers, statistics) = self.run_rome(model, requests, &hp, progress)?;
        let details = serde_json::to_string(&RomeReport {
            context_templates: &contexts,
            layers,
            statistics,
        })
        .map_err(|e| PluginError::internal(format!("rome: cannot serialise the report: {e}")))?;
        Ok(EditReport {
            method: METHOD_ROME.into(),
            requests: requests.len() as u32,
            details_json: details.into(),
        })
    }

    /// Causal tracing (ROME §2.1) for both methods: where the requests' facts are recalled.
    fn locate(
        &mut self,
        model: &mut ModelClient<'_>,
        method: &str,
        requests: &[EditRequest],
        hparams_json: &str,
        progress: &mut ProgressMut<'_>,
    ) -> Result<String, PluginError> {
        if ![METHOD_ROME, METHOD_MEMIT, METHOD_ALPHAEDIT].contains(&method) {
            return Err(unknown_method(method));
        }
        trace::locate(model, method, requests, hparams_json, progress)
    }

    /// AlphaEdit's key history (the only state that outlives a call besides caches).
    fn save_state(&self) -> Result<Vec<u8>, PluginError> {
        if self.alpha_history.is_empty() {
            return Ok(Vec::new());
        }
        serde_json::to_vec(&self.alpha_history).map_err(|e| {
            PluginError::internal(format!(
                "rome: cannot serialise AlphaEdit's key history: {e}"
            ))
        })
    }

    fn load_state(
        &mut self,
        _model: &mut ModelClient<'_>,
        state: &[u8],
    ) -> Result<(), PluginError> {
        if state.is_empty() {
            return Ok(());
        }
        self.alpha_history = serde_json::from_slice(state).map_err(|e| {
            PluginError::invalid(format!(
                "rome: the saved editor state is not AlphaEdit's key history: {e}"
            ))
        })?;
        Ok(())
    }
}

fn unknown_method(method: &str) -> PluginError {
    PluginError::invalid(format!(
        "the rome plugin has no method '{method}' (it has: {METHOD_ROME}, {METHOD_MEMIT}, {METHOD_ALPHAEDIT})"
    ))
}

pub fn new_editor() -> Result<EditorBox, PluginError> {
    Ok(editor_box(RomeEditor::default()))
}

kedit_plugin_api::export_plugin! {
    info: info,
    new_editor: new_editor,
}

//! In-process mock plugins: a tiny "model family" with a journaled weight, and an editor whose
//! behaviour is chosen by markers in the prompt. They go through the same ABI objects
//! (`model_box`, `editor_box`, a `PluginMod` root module) as real plugins, without a dlopen, so
//! that the host's transactions can be tested without the real model.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::std_types::{ROption, RResult, RStr, RString, RVec};
use kedit::plugins::{LoadedPlugin, Registry};
use kedit_plugin_api::{
    editor_box, kind, model_box, Batch, ChatMessage, EditReport, EditRequest, Editor, EditorBox,
    FamilyInfo, ForwardOutput, ForwardRequest, GenerateRequest, GradOutput, GradRequest, JudgeBox,
    LogitsWanted, MethodInfo, Model, ModelBox, ModelClient, ModelFacts, OpenRequest, PluginError,
    PluginInfo, PluginMod, PluginModRef, ProgressMut, SiteModuleBox, Tensor, API_LEVEL,
};

pub const SITE: &str = "layer.0.mlp.down";
pub const VOCAB: usize = 4;

/// A one-weight model: logits are the weight's sum, generation spells the sum.
pub struct MockModel {
    weights: HashMap<String, Vec<f32>>,
    journal: Vec<(String, Vec<f32>)>,
}

impl MockModel {
    pub fn new() -> Self {
        Self {
            weights: HashMap::from([(SITE.to_string(), vec![0.0; 4])]),
            journal: Vec::new(),
        }
    }

    fn sum(&self) -> f32 {
        self.weights[SITE].iter().sum()
    }
}

fn unsupported<T>(what: &str) -> Result<T, PluginError> {
    Err(PluginError::unsupported(format!("mock model: no {what}")))
}

impl Model for MockModel {
    fn facts(&self) -> Result<ModelFacts, PluginError> {
        Ok(ModelFacts {
            family: "mock".into(),
            source: "mock".into(),
            n_layers: 1,
            d_model: 2,
            d_ff: 2,
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 2,
            vocab_size: VOCAB as u32,
            max_positions: 64,
            bos_id: ROption::RNone,
            eos_ids: RVec::new(),
            pad_id: ROption::RNone,
            add_bos: false,
            chat_template: ROption::RNone,
            weight_sites: vec![RString::from(SITE)].into(),
            device: "cpu".into(),
        })
    }
    fn tokenize(&self, text: &str, _add_special: bool) -> Result<Vec<u32>, PluginError> {
        Ok(text.bytes().map(u32::from).collect())
    }
    fn detokenize(&self, ids: &[u32], _skip_special: bool) -> Result<String, PluginError> {
        Ok(ids.iter().map(|i| format!("<{i}>")).collect())
    }
    fn apply_chat_template(&self, _: &[ChatMessage], _: bool) -> Result<String, PluginError> {
        unsupported("chat template")
    }
    fn forward(&self, request: &ForwardRequest) -> Result<ForwardOutput, PluginError> {
        let rows = request.batch.rows.len();
        let logits = match request.logits {
            LogitsWanted::Last => {
                ROption::RSome(Tensor::new(&[rows, VOCAB], vec![self.sum(); rows * VOCAB])?)
            }
            // Every position's argmax is min(sum / 4, VOCAB − 1): 0 unedited, 1 after one
            // bump (which adds 1 to each of the 4 weights), 2 after two, ...
            LogitsWanted::All => {
                let seq = request.batch.padded_len();
                let hot = ((self.sum() / 4.0).max(0.0) as usize).min(VOCAB - 1);
                let mut data = vec![0.0; rows * seq * VOCAB];
                for at in (0..rows * seq).map(|p| p * VOCAB + hot) {
                    data[at] = 1.0;
                }
                ROption::RSome(Tensor::new(&[rows, seq, VOCAB], data)?)
            }
            LogitsWanted::None => ROption::RNone,
        };
        Ok(ForwardOutput {
            logits,
            captures: RVec::new(),
        })
    }
    fn prepare(&mut self, _: &Batch, _: usize) -> Result<u64, PluginError> {
        unsupported("prepare")
    }
    fn release(&mut self, _: u64) -> Result<(), PluginError> {
        unsupported("release")
    }
    fn gradient(&self, _: &GradRequest) -> Result<GradOutput, PluginError> {
        unsupported("gradient")
    }
    fn read_weight(&self, site: &str) -> Result<Tensor, PluginError> {
        let w = self
            .weights
            .get(site)
            .ok_or_else(|| PluginError::not_found(format!("no weight {site}")))?;
        Tensor::new(&[2, 2], w.clone())
    }
    fn write_weight(&mut self, site: &str, value: &Tensor) -> Result<(), PluginError> {
        let old = self.read_weight(site)?.into_vec();
        self.journal.push((site.to_string(), old));
        self.weights
            .insert(site.to_string(), value.as_slice().to_vec());
        Ok(())
    }
    fn journal_mark(&self) -> Result<u64, PluginError> {
        Ok(self.journal.len() as u64)
    }
    fn journal_rollback(&mut self, mark: u64) -> Result<(), PluginError> {
        while self.journal.len() as u64 > mark {
            let (site, old) = self.journal.pop().expect("length checked");
            self.weights.insert(site, old);
        }
        Ok(())
    }
    fn journal_commit(&mut self, mark: u64) -> Result<(), PluginError> {
        self.journal.truncate(mark as usize);
        Ok(())
    }
    fn install_module(&mut self, _: &str, _: SiteModuleBox) -> Result<u64, PluginError> {
        unsupported("modules")
    }
    fn remove_module(&mut self, _: u64) -> Result<(), PluginError> {
        unsupported("modules")
    }
    fn explain_modules(&self) -> Result<Vec<String>, PluginError> {
        Ok(Vec::new())
    }
    fn generate(&self, request: &GenerateRequest) -> Result<Vec<Vec<u32>>, PluginError> {
        // The "continuation" shows the weight's sum, so predictions reveal edits.
        let token = self.sum() as u32;
        Ok(request.prompts.iter().map(|_| vec![token]).collect())
    }
    fn export(&self, dir: &str) -> Result<(), PluginError> {
        std::fs::write(
            Path::new(dir).join("weights.txt"),
            format!("{:?}", self.weights[SITE]),
        )
        .map_err(|e| PluginError::io(e.to_string()))
    }
}

/// Edits by adding 1 to the weight, or misbehaves when the prompt says so:
/// `PANIC` panics, `NAN` writes NaN and reports success, `FAIL` returns an error, `WAIT` spins on
/// its progress callback until the host asks it to stop. Each writes the weight first, so a
/// missing rollback would show.
pub struct MockEditor;

impl Editor for MockEditor {
    fn edit(
        &mut self,
        model: &mut ModelClient<'_>,
        method: &str,
        requests: &[EditRequest],
        hparams_json: &str,
        progress: &mut ProgressMut<'_>,
    ) -> Result<EditReport, PluginError> {
        for r in requests {
            let prompt = r.prompt.as_str();
            let mut w = model.read_weight(SITE)?;
            let bump = if prompt.contains("NAN") {
                f32::NAN
            } else {
                1.0
            };
            w.as_mut_slice().iter_mut().for_each(|x| *x += bump);
            model.write_weight(SITE, &w)?;
            if prompt.contains("PANIC") {
                panic!("mock editor panics on purpose");
            }
            if prompt.contains("FAIL") {
                return Err(PluginError::invalid("mock editor fails on purpose"));
            }
            if prompt.contains("WAIT") {
                for step in 0..500u64 {
                    if !progress.report(step, 500, "waiting".into()) {
                        return Err(PluginError::cancelled());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                return Err(PluginError::internal("never asked to stop"));
            }
        }
        Ok(EditReport {
            method: method.into(),
            requests: requests.len() as u32,
            details_json: format!("{{\"loss\": 0.5, \"hparams\": {hparams_json}}}").into(),
        })
    }

    fn save_state(&self) -> Result<Vec<u8>, PluginError> {
        Ok(b"mock state".to_vec())
    }
}

extern "C" fn family_info() -> RResult<PluginInfo, PluginError> {
    RResult::ROk(PluginInfo {
        kind: kind::MODEL_FAMILY,
        name: "mockfamily".into(),
        version: "0.0.1".into(),
        api_level: API_LEVEL,
        description: "".into(),
        families: vec![FamilyInfo {
            name: "mock".into(),
            description: "".into(),
            recognises: vec![RString::from("mock")].into(),
        }]
        .into(),
        methods: RVec::new(),
        capabilities: RVec::new(),
    })
}

extern "C" fn editor_info() -> RResult<PluginInfo, PluginError> {
    RResult::ROk(PluginInfo {
        kind: kind::EDITOR,
        name: "mockeditor".into(),
        version: "0.0.1".into(),
        api_level: API_LEVEL,
        description: "".into(),
        families: RVec::new(),
        methods: vec![MethodInfo {
            name: "bump".into(),
            description: "".into(),
            default_hparams_json: r#"{"lr": 1.0}"#.into(),
            family_defaults: RVec::new(),
        }]
        .into(),
        capabilities: RVec::new(),
    })
}

extern "C" fn probe(path: RStr<'_>) -> RResult<ROption<RString>, PluginError> {
    RResult::ROk(if path.as_str().ends_with(".mock") {
        ROption::RSome("mock".into())
    } else {
        ROption::RNone
    })
}

extern "C" fn open_model(_: &OpenRequest) -> RResult<ModelBox, PluginError> {
    RResult::ROk(model_box(MockModel::new()))
}

extern "C" fn no_model(_: &OpenRequest) -> RResult<ModelBox, PluginError> {
    RResult::RErr(PluginError::unsupported("no models here"))
}

extern "C" fn new_editor() -> RResult<EditorBox, PluginError> {
    RResult::ROk(editor_box(MockEditor))
}

extern "C" fn no_editor() -> RResult<EditorBox, PluginError> {
    RResult::RErr(PluginError::unsupported("no editors here"))
}

extern "C" fn no_judge() -> RResult<JudgeBox, PluginError> {
    RResult::RErr(PluginError::unsupported("no judges here"))
}

extern "C" fn ignore_host(
    _host: kedit_plugin_api::HostServicesBox,
) -> RResult<(), kedit_plugin_api::PluginError> {
    RResult::ROk(())
}

fn family_module() -> PluginModRef {
    PluginMod {
        info: family_info,
        probe,
        open_model,
        new_editor: no_editor,
        new_judge: no_judge,
        attach_host: ignore_host,
    }
    .leak_into_prefix()
}

fn editor_module() -> PluginModRef {
    PluginMod {
        info: editor_info,
        probe,
        open_model: no_model,
        new_editor,
        new_judge: no_judge,
        attach_host: ignore_host,
    }
    .leak_into_prefix()
}

/// A registry holding the mock family and the mock editor.
pub fn mock_registry() -> Registry {
    let family = LoadedPlugin::from_module(
        Path::new("/mock/libkedit_mockfamily.so"),
        family_module(),
        API_LEVEL,
    )
    .expect("mock family loads");
    let editor = LoadedPlugin::from_module(
        Path::new("/mock/libkedit_mockeditor.so"),
        editor_module(),
        API_LEVEL,
    )
    .expect("mock editor loads");
    Registry::from_plugins(vec![family, editor])
}

/// An edit request with just a prompt and a target.
pub fn request(id: &str, prompt: &str) -> EditRequest {
    let mut r = EditRequest::fact(prompt, "", "new");
    r.id = id.into();
    r
}

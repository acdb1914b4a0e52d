//! The plugin ABI's `Model` trait over [`Runtime`]: each method converts errors and delegates.

use kedit_plugin_api::{
    Batch, ChatMessage, ForwardOutput, ForwardRequest, GenerateRequest, GradOutput, GradRequest,
    Model, ModelFacts, PluginError, SiteModuleBox, Tensor as AbiTensor,
};

use std::sync::atomic::Ordering;

use super::Runtime;
use crate::arch::Architecture;
use crate::device::device_name;

impl<A: Architecture> Model for Runtime<A> {
    fn facts(&self) -> Result<ModelFacts, PluginError> {
        let d = self.arch.dims();
        let text = &self.text;
        Ok(ModelFacts {
            family: self.arch.family().into(),
            source: self.source.path.display().to_string().into(),
            n_layers: d.n_layers as u32,
            d_model: d.d_model as u32,
            d_ff: d.d_ff as u32,
            n_heads: d.n_heads as u32,
            n_kv_heads: d.n_kv_heads as u32,
            head_dim: d.head_dim as u32,
            vocab_size: d.vocab_size as u32,
            max_positions: d.max_positions as u32,
            bos_id: text.bos.into(),
            eos_ids: text.eos.clone().into(),
            pad_id: text.pad.into(),
            add_bos: text.add_bos,
            chat_template: text.chat_template.clone().map(Into::into).into(),
            weight_sites: self
                .weights
                .sites()
                .iter()
                .map(|s| s.to_string().into())
                .collect(),
            device: device_name(&self.device).into(),
        })
    }

    fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>, PluginError> {
        Ok(self.text.tokenize(text, add_special)?)
    }

    fn detokenize(&self, ids: &[u32], skip_special: bool) -> Result<String, PluginError> {
        Ok(self.text.detokenize(ids, skip_special)?)
    }

    fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, PluginError> {
        Ok(self
            .text
            .apply_chat_template(messages, add_generation_prompt)?)
    }

    fn forward(&self, request: &ForwardRequest) -> Result<ForwardOutput, PluginError> {
        Ok(self.forward_impl(request)?)
    }

    fn prepare(&mut self, batch: &Batch, from_layer: usize) -> Result<u64, PluginError> {
        Ok(self.prepare_impl(batch, from_layer)?)
    }

    fn release(&mut self, handle: u64) -> Result<(), PluginError> {
        Ok(self.release_impl(handle)?)
    }

    fn gradient(&self, request: &GradRequest) -> Result<GradOutput, PluginError> {
        Ok(self.gradient_impl(request)?)
    }

    fn read_weight(&self, site: &str) -> Result<AbiTensor, PluginError> {
        Ok(self.read_weight_impl(site)?)
    }

    fn write_weight(&mut self, site: &str, value: &AbiTensor) -> Result<(), PluginError> {
        Ok(self.write_weight_impl(site, value)?)
    }

    fn journal_mark(&self) -> Result<u64, PluginError> {
        Ok(self.journal.mark())
    }

    fn journal_rollback(&mut self, mark: u64) -> Result<(), PluginError> {
        Ok(self.rollback_impl(mark)?)
    }

    fn journal_commit(&mut self, mark: u64) -> Result<(), PluginError> {
        Ok(self.journal.commit(mark)?)
    }

    fn install_module(&mut self, site: &str, module: SiteModuleBox) -> Result<u64, PluginError> {
        Ok(self.install_module_impl(site, module)?)
    }

    fn remove_module(&mut self, id: u64) -> Result<(), PluginError> {
        Ok(self.remove_module_impl(id)?)
    }

    fn explain_modules(&self) -> Result<Vec<String>, PluginError> {
        Ok(self.modules.explain())
    }

    fn generate(&self, request: &GenerateRequest) -> Result<Vec<Vec<u32>>, PluginError> {
        Ok(self.generate_impl(request)?)
    }

    fn export(&self, dir: &str) -> Result<(), PluginError> {
        Ok(self.export_impl(dir)?)
    }

    /// `gradient_paths`: how many gradient calls ran whole rows (`full`), from a prepared
    /// layer (`prepared`) or over frozen prefixes (`frozen_prefix`), and how many linear
    /// products prepared calls took from their batch's memo (`memo_hits`), and how many calls
    /// ran their last block's output map and MLP on the loss slots alone
    /// (`last_block_slots`), as JSON.
    fn extension(&mut self, name: &str, _payload: &str) -> Result<String, PluginError> {
        match name {
            "gradient_paths" => {
                let p = &self.gradient_paths;
                let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
                Ok(format!(
                    r#"{{"full":{},"prepared":{},"frozen_prefix":{},"memo_hits":{},"last_block_slots":{}}}"#,
                    n(&p.full),
                    n(&p.prepared),
                    n(&p.frozen_prefix),
                    n(&p.memo_hits),
                    n(&p.last_block_slots)
                ))
            }
            _ => Err(PluginError::unsupported(format!(
                "this model has no extension '{name}' (known: gradient_paths)"
            ))),
        }
    }
}

//! Export of the current (edited) weights as an HF checkpoint: `model.safetensors` with the
//! family's HF names and orientation, `config.json`, and the tokenizer files. Installed modules
//! are not weights; editors persist them through their own state.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};

use super::{Runtime, SourceKind};
use crate::arch::Architecture;
use crate::error::{invalid, io, Result};
use crate::fsutil::{write_atomic, write_atomic_with};

fn canonical(p: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(p).ok()
}

impl<A: Architecture> Runtime<A> {
    /// The directory export must never write into: the checkpoint directory, or the directory
    /// holding the GGUF file.
    fn source_dir(&self) -> Option<PathBuf> {
        let dir = match self.source.kind {
            SourceKind::HfDir => self.source.path.clone(),
            SourceKind::Gguf => self.source.path.parent()?.to_path_buf(),
        };
        canonical(&dir)
    }

    pub(super) fn export_impl(&self, dir: &str) -> Result<()> {
        let dir = Path::new(dir);
        std::fs::create_dir_all(dir)
            .map_err(|e| io(format!("cannot create {}: {e}", dir.display())))?;
        if canonical(dir).is_some() && canonical(dir) == self.source_dir() {
            return Err(invalid(format!(
                "refusing to export into {}, the directory the model was loaded from; \
                 choose another directory",
                dir.display()
            )));
        }
        let hf = self.arch.to_hf(&self.weights)?;

        // Little-endian f32 bytes of every tensor (candle stores f32 natively on the host).
        let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(hf.tensors.len());
        for (name, t) in &hf.tensors {
            let values = t
                .to_device(&candle_core::Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let mut bytes = Vec::with_capacity(values.len() * 4);
            for v in values {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            named.push((name.clone(), t.dims().to_vec(), bytes));
        }
        let views = named
            .iter()
            .map(|(name, shape, bytes)| {
                TensorView::new(Dtype::F32, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| invalid(format!("tensor '{name}': {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let model_path = dir.join("model.safetensors");
        write_atomic_with(&model_path, |tmp| {
            safetensors::serialize_to_file(views, Some(metadata), tmp)
                .map_err(|e| io(format!("cannot write {}: {e}", tmp.display())))
        })?;

        let config = serde_json::to_string_pretty(&hf.config).expect("JSON values serialise");
        write_atomic(&dir.join("config.json"), config.as_bytes())?;
        self.text.export(dir)
    }
}

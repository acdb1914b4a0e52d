//! Reading HF checkpoints: `config.json` keys with precise errors, and memory-mapped
//! safetensors files (one file or an index of shards) converted to f32 on demand.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;
use serde_json::Value;

use crate::error::{invalid, io, not_found, Result};

/// A parsed JSON file (config.json, tokenizer_config.json, ...) that names itself in errors.
pub struct JsonFile {
    pub path: PathBuf,
    pub value: Value,
}

impl JsonFile {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| io(format!("{}: cannot read: {e}", path.display())))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| invalid(format!("{}: not valid JSON: {e}", path.display())))?;
        if !value.is_object() {
            return Err(invalid(format!(
                "{}: expected a JSON object",
                path.display()
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            value,
        })
    }

    /// Reads `path` if it exists.
    pub fn read_optional(path: &Path) -> Result<Option<Self>> {
        if path.is_file() {
            Self::read(path).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    fn missing(&self, key: &str, what: &str) -> crate::error::Error {
        not_found(format!(
            "{}: required key '{key}' ({what}) is missing",
            self.path.display()
        ))
    }

    fn wrong(&self, key: &str, expected: &str, found: &Value) -> crate::error::Error {
        invalid(format!(
            "{}: key '{key}' must be {expected}, found {found}",
            self.path.display()
        ))
    }

    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.wrong(key, "a non-negative integer", v)),
        }
    }

    pub fn usize(&self, key: &str, what: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| self.missing(key, what))
    }

    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a number", v)),
        }
    }

    pub fn f64(&self, key: &str, what: &str) -> Result<f64> {
        self.f64_opt(key)?.ok_or_else(|| self.missing(key, what))
    }

    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "true or false", v)),
        }
    }

    pub fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a string", v)),
        }
    }

    /// A token id or a list of them (`eos_token_id` may be either).
    pub fn ids_opt(&self, key: &str) -> Result<Vec<u32>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|n| n as u32)
                        .ok_or_else(|| self.wrong(key, "a token id or a list of ids", v))
                })
                .collect(),
            Some(v) => v
                .as_u64()
                .map(|n| vec![n as u32])
                .ok_or_else(|| self.wrong(key, "a token id or a list of ids", v)),
        }
    }
}

/// One memory-mapped safetensors file with its parsed header.
struct Shard {
    path: PathBuf,
    map: memmap2::Mmap,
    metadata: Metadata,
    /// Offset of the data section (8-byte length + header).
    data_start: usize,
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| {
            io(format!(
                "{}: cannot open safetensors file: {e}",
                path.display()
            ))
        })?;
        // SAFETY: read-only mapping of a checkpoint kedit never writes; see gguf.rs.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| {
            io(format!(
                "{}: cannot map safetensors file: {e}",
                path.display()
            ))
        })?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
            invalid(format!(
                "{}: not a valid safetensors file (truncated or corrupt): {e}",
                path.display()
            ))
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            metadata,
            data_start: 8 + header_len,
        })
    }
}

/// The tensors of an HF checkpoint, one file or several shards.
pub struct SafetensorsCheckpoint {
    shards: Vec<Shard>,
    /// Tensor name → index of the shard that holds it.
    index: HashMap<String, usize>,
}

impl SafetensorsCheckpoint {
    /// Opens `model.safetensors` or, failing that, the shards listed by
    /// `model.safetensors.index.json` in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        let index_path = dir.join("model.safetensors.index.json");
        if !index_path.is_file() {
            return Err(not_found(format!(
                "{}: no model.safetensors and no model.safetensors.index.json",
                dir.display()
            )));
        }
        let index = JsonFile::read(&index_path)?;
        let map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                invalid(format!(
                    "{}: 'weight_map' must be an object of tensor name → shard file",
                    index_path.display()
                ))
            })?;
        let mut files: Vec<String> = Vec::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                invalid(format!(
                    "{}: weight_map['{name}'] must be a file name",
                    index_path.display()
                ))
            })?;
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
        }
        files.sort();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        Self::open_files(&paths)
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let shard = Shard::open(path)?;
            for name in shard.metadata.tensors().keys() {
                index.insert(name.clone(), i);
            }
            shards.push(shard);
        }
        Ok(Self { shards, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Where the tensor lives (for error messages), or the first shard.
    pub fn path_of(&self, name: &str) -> &Path {
        let i = self.index.get(name).copied().unwrap_or(0);
        &self.shards[i].path
    }

    /// The files this checkpoint reads.
    pub fn paths(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// Reads tensor `name` as f32, checking its shape.
    pub fn tensor_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let &i = self.index.get(name).ok_or_else(|| {
            let files: Vec<String> = self
                .paths()
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            not_found(format!(
                "tensor '{name}' is missing from {}",
                files.join(", ")
            ))
        })?;
        let shard = &self.shards[i];
        let info = shard
            .metadata
            .info(name)
            .expect("the index only names tensors of its shard");
        if info.shape != shape {
            return Err(invalid(format!(
                "{}: tensor '{name}' has shape {:?}, but the config implies {:?}",
                shard.path.display(),
                info.shape,
                shape
            )));
        }
        let (start, end) = info.data_offsets;
        let bytes = &shard.map[shard.data_start + start..shard.data_start + end];
        decode_f32(bytes, info.dtype)
            .map_err(|what| invalid(format!("{}: tensor '{name}': {what}", shard.path.display())))
    }
}

/// Little-endian F32 / F16 / BF16 bytes → f32 values.
fn decode_f32(bytes: &[u8], dtype: Dtype) -> std::result::Result<Vec<f32>, String> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => {
            return Err(format!(
                "dtype {other:?} is not a floating-point weight type"
            ))
        }
    })
}

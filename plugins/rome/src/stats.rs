//! Key statistics: the uncentred second moment `C = Σ k kᵀ / N` of a layer's MLP keys over a
//! text corpus (EasyEdit `layer_stats`, METHODS.md §3.3, fixture README §2), accumulated in f64,
//! streamed in token-bounded batches that run the network only up to the edit layer.
//!
//! Caching: C is kept in memory per (model, site, corpus, samples) and, when `stats_dir` is set,
//! on disk. Reading the corpus and the cache file from the editor is a deliberate, documented
//! deviation from DESIGN.md ("an editor never touches files") until the host lends editors a
//! text source and a blob store.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor as CTensor};
use kedit_plugin_api::{
    Batch, ForwardRequest, LogitsWanted, ModelClient, Padding, PluginError, ProgressMut,
};
use serde::Serialize;

/// A second moment `C` (`d×d`, row-major, f64) with the number of keys behind it.
#[derive(Clone, Debug)]
pub struct SecondMoment {
    pub d: usize,
    pub count: u64,
    pub c: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StatsReport {
    pub site: String,
    pub corpus: String,
    pub documents: usize,
    pub count: u64,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub cache: Option<String>,
    pub from_cache: bool,
}

/// The corpus documents: every non-empty line of a file, or of every file under a directory
/// (sorted by path), the first `n` of them.
pub fn read_corpus(path: &Path, n: usize) -> Result<Vec<String>, PluginError> {
    let mut files = Vec::new();
    collect_files(path, &mut files)?;
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f)
            .map_err(|e| PluginError::invalid(format!("statistics corpus {}: {e}", f.display())))?;
        for line in text.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() {
                continue;
            }
            docs.push(line.to_string());
            if docs.len() == n {
                return Ok(docs);
            }
        }
    }
    if docs.is_empty() {
        return Err(PluginError::invalid(format!(
            "statistics corpus {} holds no text",
            path.display()
        )));
    }
    Ok(docs)
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), PluginError> {
    let meta = std::fs::metadata(path).map_err(|e| {
        PluginError::invalid(format!(
            "statistics corpus {}: {e} (set the `mom2_dataset` hparam to a text file or directory)",
            path.display()
        ))
    })?;
    if meta.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let entries = std::fs::read_dir(path)
        .map_err(|e| PluginError::invalid(format!("statistics corpus {}: {e}", path.display())))?;
    for e in entries {
        let e = e.map_err(|e| PluginError::invalid(format!("{}: {e}", path.display())))?;
        let p = e.path();
        if p.is_dir() {
            collect_files(&p, out)?;
        } else if p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| !n.starts_with('.'))
        {
            out.push(p);
        }
    }
    Ok(())
}

/// FNV-1a, stable across builds (a cache key must not depend on the std hasher).
pub fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0xff]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Batches of documents, longest first, each at most `max_tokens` (rows × padded width).
pub fn length_batches(lengths: &[usize], max_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for i in order {
        let width = current.first().map_or(lengths[i], |&f| lengths[f]);
        if !current.is_empty() && (current.len() + 1) * width > max_tokens {
            batches.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// Computes C of every site in `sites` over `docs` (tokenized with the model's special tokens,
/// truncated to `max_len`) in one streamed pass that runs the network only up to the deepest
/// site; reports progress in tokens/s.
pub fn second_moments(
    model: &ModelClient<'_>,
    sites: &[String],
    docs: &[String],
    max_len: usize,
    batch_tokens: usize,
    progress: &mut ProgressMut<'_>,
) -> Result<(Vec<SecondMoment>, f64), PluginError> {
    let t0 = Instant::now();
    let mut tokens = Vec::with_capacity(docs.len());
    for d in docs {
        let mut ids = model.tokenize(d, true)?;
        ids.truncate(max_len);
        if !ids.is_empty() {
            tokens.push(ids);
        }
    }
    let lengths: Vec<usize> = tokens.iter().map(Vec::len).collect();
    let total: u64 = lengths.iter().map(|&l| l as u64).sum();
    let batches = length_batches(&lengths, batch_tokens.max(1));
    let dev = Device::Cpu;
    let mut acc: Vec<Option<CTensor>> = vec![None; sites.len()];
    let mut widths = vec![0usize; sites.len()];
    let mut count = 0u64;
    for batch in batches {
        let rows: Vec<Vec<u32>> = batch.iter().map(|&i| tokens[i].clone()).collect();
        let mut fwd = ForwardRequest::new(Batch::new(rows, Padding::Right), LogitsWanted::None);
        fwd.captures = sites.iter().map(|s| s.as_str().into()).collect();
        let out = model.forward(&fwd)?;
        let mut n = 0usize;
        for (k, keys) in out.captures.iter().enumerate() {
            let dims = keys.dims();
            let (seq, width) = (dims[1], dims[2]);
            widths[k] = width;
            let mut a: Vec<f64> = Vec::new();
            n = 0;
            for (r, &i) in batch.iter().enumerate() {
                let len = lengths[i];
                let start = r * seq * width;
                a.extend(
                    keys.as_slice()[start..start + len * width]
                        .iter()
                        .map(|&v| v as f64),
                );
                n += len;
            }
            let m = CTensor::from_vec(a, (n, width), &dev).map_err(candle_err)?;
            let mtm = m.t().map_err(candle_err)?.matmul(&m).map_err(candle_err)?;
            acc[k] = Some(match acc[k].take() {
                None => mtm,
                Some(s) => (s + mtm).map_err(candle_err)?,
            });
        }
        count += n as u64;
        let secs = t0.elapsed().as_secs_f64();
        let msg = format!(
            "key statistics ({} sites): {count}/{total} tokens, {:.0} tok/s",
            sites.len(),
            count as f64 / secs.max(1e-9)
        );
        if !progress.report(count, total, msg.as_str().into()) {
            return Err(PluginError::cancelled());
        }
    }
    let mut out = Vec::new();
    for (k, a) in acc.into_iter().enumerate() {
        let a = a.ok_or_else(|| PluginError::invalid("statistics corpus produced no tokens"))?;
        let c = (a / count as f64)
            .map_err(candle_err)?
            .to_dtype(DType::F64)
            .map_err(candle_err)?
            .flatten_all()
            .map_err(candle_err)?
            .to_vec1::<f64>()
            .map_err(candle_err)?;
        out.push(SecondMoment {
            d: widths[k],
            count,
            c,
        });
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok((out, count as f64 / secs.max(1e-9)))
}

fn candle_err(e: candle_core::Error) -> PluginError {
    PluginError::internal(format!("statistics: {e}"))
}

const MAGIC: &[u8; 8] = b"KEDMOM2\x01";

pub fn save(path: &Path, m: &SecondMoment) -> Result<(), PluginError> {
    let io = |e: std::io::Error| PluginError::internal(format!("{}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        f.write_all(MAGIC).map_err(io)?;
        f.write_all(&(m.d as u64).to_le_bytes()).map_err(io)?;
        f.write_all(&m.count.to_le_bytes()).map_err(io)?;
        for v in &m.c {
            f.write_all(&v.to_le_bytes()).map_err(io)?;
        }
        f.flush().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

pub fn load(path: &Path) -> Option<SecondMoment> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).ok()?;
    if bytes.len() < 24 || &bytes[..8] != MAGIC {
        return None;
    }
    let d = u64::from_le_bytes(bytes[8..16].try_into().ok()?) as usize;
    let count = u64::from_le_bytes(bytes[16..24].try_into().ok()?);
    if bytes.len() != 24 + d * d * 8 {
        return None;
    }
    let c = bytes[24..]
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Some(SecondMoment { d, count, c })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_longest_first_and_token_bounded() {
        let b = length_batches(&[3, 10, 5, 10, 1], 20);
        assert_eq!(b, vec![vec![1, 3], vec![2, 0, 4]]);
        // A lone document longer than the budget still gets its own batch.
        assert_eq!(length_batches(&[50, 2], 20), vec![vec![0], vec![1]]);
    }

    #[test]
    fn moments_round_trip_through_the_cache_file() {
        let dir = std::env::temp_dir().join(format!("kedit-rome-{}", std::process::id()));
        let p = dir.join("m.bin");
        let m = SecondMoment {
            d: 2,
            count: 7,
            c: vec![1.0, 0.5, 0.5, 2.0],
        };
        save(&p, &m).unwrap();
        let back = load(&p).unwrap();
        assert_eq!((back.d, back.count, back.c), (2, 7, m.c));
        std::fs::remove_dir_all(dir).ok();
    }
}

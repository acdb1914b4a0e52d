//! Key statistics: the uncentred second moment `C = Σ k kᵀ / N` of a layer's MLP keys over a
//! text corpus (EasyEdit `layer_stats`, METHODS.md §3.3, fixture README §2), accumulated in f64,
//! streamed in token-bounded batches that run the network only up to the edit layer.
//!
//! The corpus comes from the host's text sources and C is cached, per (model, site, corpus
//! contents, samples), in memory and in the host's persistent cache ([`encode`] / [`decode`]):
//! the editor never opens a file itself.

use std::time::Instant;

use candle_core::{Device, Tensor as CTensor};
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

/// plugin-api's stable FNV-1a over `parts`, each followed by a 0xff separator (no UTF-8 string
/// holds that byte, so part boundaries cannot collide).
pub fn fnv1a(parts: &[&str]) -> u64 {
    let mut bytes = Vec::new();
    for p in parts {
        bytes.extend_from_slice(p.as_bytes());
        bytes.push(0xff);
    }
    kedit_plugin_api::host::fnv1a(&bytes)
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
    // Σ kᵀk per site in f64: through the run-time BLAS's `dsyrk` when there is one (one triangle,
    // AVX-512), else candle's f64 matmul.
    let blas = kedit_kernels::blas::get();
    let mut acc: Vec<Option<Vec<f64>>> = vec![None; sites.len()];
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
            let sum = acc[k].get_or_insert_with(|| vec![0.0; width * width]);
            if !blas.is_some_and(|b| b.accumulate_gram_f64(&a, n, width, sum)) {
                let m = CTensor::from_vec(a, (n, width), &dev).map_err(candle_err)?;
                let mtm = m.t().map_err(candle_err)?.matmul(&m).map_err(candle_err)?;
                let mtm = mtm
                    .flatten_all()
                    .map_err(candle_err)?
                    .to_vec1::<f64>()
                    .map_err(candle_err)?;
                sum.iter_mut().zip(mtm).for_each(|(s, v)| *s += v);
            }
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
        let mut c =
            a.ok_or_else(|| PluginError::invalid("statistics corpus produced no tokens"))?;
        c.iter_mut().for_each(|v| *v /= count as f64);
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

/// C as bytes for the host's cache: magic, d, count (u64 LE), then d² f64 LE.
pub fn encode(m: &SecondMoment) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + m.c.len() * 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(m.d as u64).to_le_bytes());
    out.extend_from_slice(&m.count.to_le_bytes());
    for v in &m.c {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// C from [`encode`]d bytes; `None` for anything else (a cache entry of another version).
pub fn decode(bytes: &[u8]) -> Option<SecondMoment> {
    if bytes.len() < 24 || &bytes[..8] != MAGIC {
        return None;
    }
    let d = u64::from_le_bytes(bytes[8..16].try_into().ok()?) as usize;
    let count = u64::from_le_bytes(bytes[16..24].try_into().ok()?);
    if bytes.len() != 24 + d.checked_mul(d)?.checked_mul(8)? {
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
    fn moments_round_trip_through_the_cache_encoding() {
        let m = SecondMoment {
            d: 2,
            count: 7,
            c: vec![1.0, 0.5, 0.5, 2.0],
        };
        let bytes = encode(&m);
        let back = decode(&bytes).unwrap();
        assert_eq!((back.d, back.count, back.c), (2, 7, m.c));
        assert!(decode(&bytes[..bytes.len() - 1]).is_none());
        assert!(decode(b"KEDMOM2\x02 and more bytes than a header").is_none());
    }
}

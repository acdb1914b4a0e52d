//! MEMIT (METHODS.md §3.7, EasyEdit `models/memit/memit_main.py`): for every request a target
//! `z = h_L + δ` of the residual stream leaving the last edited layer L (δ found exactly as
//! ROME's v*, but added at `layer.L.resid_post`), then for each edited layer l in ascending order
//!
//! `ΔW_l = R_l K_lᵀ (λ C_l + K_l K_lᵀ)⁻¹`, `R_l = (Z − H_L(current model)) / (|layers| − i)`,
//!
//! solved in f64, each layer's update written (journaled) before the next layer's keys and
//! residuals are read. AlphaEdit ([`crate::alphaedit`]) shares all of this but the solve
//! ([`Update`]).

use kedit_plugin_api::{
    site::layer_site, Batch, ForwardRequest, LogitsWanted, ModelClient, Padding, PluginError,
    ProgressMut,
};
use serde::Serialize;

use crate::alphaedit::{self, Projector};
use crate::hparams::RomeHparams;
use crate::linalg;
use crate::rome::{self, RomeRequest, StepRecord};

#[derive(Clone, Debug, Serialize)]
pub struct ZTrace {
    pub request: usize,
    pub steps: Vec<StepRecord>,
    pub target_init_norm: f64,
    pub delta_norm: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct MemitLayerTrace {
    pub layer: usize,
    pub site: String,
    /// ‖Z − H_L‖ (Frobenius over requests) before this layer's update.
    pub residual_norm: f64,
    pub delta_w_fro_norm: f64,
    /// MEMIT: the λ of `λC + K Kᵀ` used at this layer (see `RomeHparams::update_weight`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_weight: Option<f64>,
    /// AlphaEdit: the rank of the null-space projector (of `d_in`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub null_space_dim: Option<usize>,
    /// AlphaEdit: whether earlier edits' keys (`cache`) took part.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_edits: Option<bool>,
}

/// How a layer turns its keys into the right factor of its update.
pub enum Update<'a> {
    /// MEMIT: `adj_r = (λC + K Kᵀ)⁻¹ k_r`; `C` is the identity when the closure gives `None`.
    Memit(&'a dyn Fn(usize) -> Option<std::sync::Arc<Vec<f64>>>),
    /// AlphaEdit: `adj_r = [P (K Kᵀ + cache) + L2·I]⁻¹ P k_r`.
    AlphaEdit {
        projector: &'a dyn Fn(usize) -> std::sync::Arc<Projector>,
        cache: &'a dyn Fn(usize) -> Option<nalgebra::DMatrix<f64>>,
        l2: f64,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct MemitTrace {
    pub z_layer: usize,
    pub z: Vec<ZTrace>,
    pub layers: Vec<MemitLayerTrace>,
}

/// Keys (`key_site` at `layer`) at the subject's last token of each request, averaged within
/// each template group and then across groups (`compute_ks`).
pub(crate) fn group_keys(
    model: &ModelClient<'_>,
    site: &str,
    reqs: &[RomeRequest],
    groups: &[Vec<String>],
) -> Result<Vec<Vec<f64>>, PluginError> {
    let mut rows = Vec::new();
    let mut lookup = Vec::new();
    for req in reqs {
        for g in groups {
            for c in g {
                let t = c.replacen("{}", &req.template, 1);
                rows.push(model.tokenize(&t.replacen("{}", &req.subject, 1), true)?);
                lookup.push(rome::subject_last_index(model, &t, &req.subject)?);
            }
        }
    }
    let caps = capture_at(model, site, rows, &lookup)?;
    let mut out = Vec::new();
    let mut r = 0;
    for _ in reqs {
        let mut acc: Vec<f64> = Vec::new();
        for g in groups {
            let mut mean: Vec<f64> = Vec::new();
            for _ in g {
                let k = &caps[r];
                r += 1;
                if mean.is_empty() {
                    mean = vec![0.0; k.len()];
                }
                for (m, &v) in mean.iter_mut().zip(k) {
                    *m += v as f64;
                }
            }
            if acc.is_empty() {
                acc = vec![0.0; mean.len()];
            }
            for (a, m) in acc.iter_mut().zip(&mean) {
                *a += m / g.len() as f64;
            }
        }
        out.push(acc.iter().map(|a| a / groups.len() as f64).collect());
    }
    Ok(out)
}

/// MEMIT's `(λC + K Kᵀ)⁻¹ k_r` for every key (Cholesky in f64).
fn memit_adjusted_keys(
    hp: &RomeHparams,
    layer: usize,
    ks: &[Vec<f64>],
    d_in: usize,
    cov: &dyn Fn(usize) -> Option<std::sync::Arc<Vec<f64>>>,
) -> Result<Vec<Vec<f64>>, PluginError> {
    let lambda = hp.update_weight(d_in);
    let mut a = match cov(layer) {
        Some(c) => c.iter().map(|v| v * lambda).collect::<Vec<f64>>(),
        None => {
            let mut id = vec![0f64; d_in * d_in];
            for i in 0..d_in {
                id[i * d_in + i] = lambda;
            }
            id
        }
    };
    for k in ks {
        for i in 0..d_in {
            let ki = k[i];
            if ki == 0.0 {
                continue;
            }
            let row = &mut a[i * d_in..(i + 1) * d_in];
            for (x, &kj) in row.iter_mut().zip(k) {
                *x += ki * kj;
            }
        }
    }
    let chol = linalg::cholesky(&a, d_in).map_err(|e| {
        PluginError::numeric(format!(
            "memit: λC + KKᵀ of layer {layer} is not positive definite: {}",
            e.message
        ))
    })?;
    Ok(ks
        .iter()
        .map(|k| linalg::cholesky_solve(&chol, d_in, k))
        .collect())
}

/// The activation at `site` at (row, lookup[row]) for each row of a right-padded batch.
fn capture_at(
    model: &ModelClient<'_>,
    site: &str,
    rows: Vec<Vec<u32>>,
    lookup: &[usize],
) -> Result<Vec<Vec<f32>>, PluginError> {
    let mut fwd = ForwardRequest::new(Batch::new(rows, Padding::Right), LogitsWanted::None);
    fwd.captures = vec![site.into()].into();
    let out = model.forward(&fwd)?;
    let t = &out.captures[0];
    let d = t.dims();
    let (seq, w) = (d[1], d[2]);
    Ok(lookup
        .iter()
        .enumerate()
        .map(|(r, &p)| t.as_slice()[(r * seq + p) * w..(r * seq + p + 1) * w].to_vec())
        .collect())
}

/// Runs MEMIT (or AlphaEdit, per `update`) over all `reqs` in one batch.
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &mut ModelClient<'_>,
    hp: &RomeHparams,
    reqs: &[RomeRequest],
    groups: &[Vec<String>],
    layers: &[usize],
    update: &Update<'_>,
    progress: &mut ProgressMut<'_>,
) -> Result<MemitTrace, PluginError> {
    let z_layer = *layers.last().expect("layers checked non-empty");
    let z_site = layer_site("layer.{}.resid_post", z_layer);
    let contexts: Vec<String> = groups.iter().flatten().cloned().collect();
    let total = (reqs.len() * hp.v_num_grad_steps) as u64;
    let mut z_traces = Vec::new();
    let mut zs: Vec<Vec<f32>> = Vec::new();
    for (i, req) in reqs.iter().enumerate() {
        let rows = rome::v_rows(model, req, &contexts)?;
        let done = (i * hp.v_num_grad_steps) as u64;
        let v = rome::compute_v(
            model,
            hp,
            z_layer,
            "layer.{}.resid_post",
            req,
            &rows,
            None,
            |it, loss| {
                let msg = format!("memit z of request {i} step {it} loss {loss:.4}");
                if progress.report(done + it as u64 + 1, total, msg.as_str().into()) {
                    Ok(())
                } else {
                    Err(PluginError::cancelled())
                }
            },
        )?;
        zs.push(
            v.target_init
                .iter()
                .zip(&v.delta)
                .map(|(&a, &b)| a + b)
                .collect(),
        );
        z_traces.push(ZTrace {
            request: i,
            steps: v.steps,
            target_init_norm: linalg::norm(&v.target_init),
            delta_norm: linalg::norm(&v.delta),
        });
    }

    let n = reqs.len();
    let mut layer_traces = Vec::new();
    for (li, &layer) in layers.iter().enumerate() {
        let key_site = layer_site(&hp.key_site, layer);
        let ks = group_keys(model, &key_site, reqs, groups)?; // n × d_in
                                                              // The current residual at the bare prompts' subject-last tokens.
        let mut rows = Vec::new();
        let mut lookup = Vec::new();
        for req in reqs {
            rows.push(model.tokenize(&req.prompt(), true)?);
            lookup.push(rome::subject_last_index(
                model,
                &req.template,
                &req.subject,
            )?);
        }
        let cur = capture_at(model, &z_site, rows, &lookup)?;
        let d_out = zs[0].len();
        let d_in = ks[0].len();
        let spread = (layers.len() - li) as f64;
        let resid: Vec<Vec<f64>> = (0..n)
            .map(|r| {
                (0..d_out)
                    .map(|o| (zs[r][o] as f64 - cur[r][o] as f64) / spread)
                    .collect()
            })
            .collect();
        let residual_norm = resid
            .iter()
            .flatten()
            .map(|v| v * v * spread * spread)
            .sum::<f64>()
            .sqrt();
        let update_weight = matches!(update, Update::Memit(_)).then(|| hp.update_weight(d_in));
        let (adj, null_space_dim, cached_edits) = match update {
            Update::Memit(cov) => (memit_adjusted_keys(hp, layer, &ks, d_in, cov)?, None, None),
            Update::AlphaEdit {
                projector,
                cache,
                l2,
            } => {
                let p = projector(layer);
                let cache = cache(layer);
                let adj = alphaedit::adjusted_keys(&p, &ks, cache.as_ref(), *l2)?;
                (adj, Some(p.null_dim), Some(cache.is_some()))
            }
        };
        // ΔW[o, i] = Σ_r resid[r][o] · adj[r][i].
        let site = layer_site(&hp.rewrite_site, layer);
        let mut w = model.read_weight(&site)?;
        let dims = w.dims();
        if dims != [d_out, d_in] {
            return Err(PluginError::invalid(format!(
                "memit: weight '{site}' has shape {dims:?}, expected [{d_out}, {d_in}]"
            )));
        }
        let mut sq = 0f64;
        for (o, row) in w.as_mut_slice().chunks_exact_mut(d_in).enumerate() {
            for (i, x) in row.iter_mut().enumerate() {
                let upd: f64 = (0..n).map(|r| resid[r][o] * adj[r][i]).sum();
                let before = *x;
                *x = before + upd as f32;
                let diff = (*x - before) as f64;
                sq += diff * diff;
            }
        }
        if !w.is_finite() {
            return Err(PluginError::numeric(
                "memit: the updated weight is not finite",
            ));
        }
        model.write_weight(&site, &w)?;
        layer_traces.push(MemitLayerTrace {
            layer,
            site,
            residual_norm,
            delta_w_fro_norm: sq.sqrt(),
            update_weight,
            null_space_dim,
            cached_edits,
        });
    }
    Ok(MemitTrace {
        z_layer,
        z: z_traces,
        layers: layer_traces,
    })
}

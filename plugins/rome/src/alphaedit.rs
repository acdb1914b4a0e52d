//! AlphaEdit (METHODS.md §3.8, EasyEdit `models/alphaedit/AlphaEdit_main.py`): MEMIT's targets
//! and keys, with each layer's update projected into the null space of the keys the model must
//! keep answering as before.
//!
//! * `P_l = U₀U₀ᵀ`, `U₀` the eigenvectors of the key second moment `C_l` (the same corpus
//!   statistics as ROME and MEMIT) whose eigenvalues are below `nullspace_threshold`. A key `k`
//!   that the corpus exercises lies (almost) outside that space, so `ΔW·k ≈ 0`.
//! * `Δ_l = [P_l (K_l K_lᵀ + cache_l) + L2·I]⁻¹ P_l K_l R_lᵀ` (`d_in × d_out`; written as
//!   `ΔWᵀ`), with `cache_l = Σ K Kᵀ` over the earlier AlphaEdit edits this model carries, their
//!   keys read again on the edited model after each call. There is no `λC` term.
//!
//! `cache_l` follows the model, not the editor: the editor keeps the keys of each edit it made,
//! filed under a fingerprint of the edited weights afterwards, with a link to the fingerprint
//! before. The cache for an edit is the sum over the chain that ends at the model's current
//! weights. After a rollback (the single-edit protocol, `kedit edit` undo) the chain is that of
//! the state the model is back in, and an unedited model has none; EasyEdit instead keeps one
//! global cache that a rollback does not reset (its `reset_cache`).

use std::collections::HashMap;
use std::sync::Arc;

use kedit_plugin_api::{host::fnv1a, site::layer_site, ModelClient, PluginError};
use nalgebra::{DMatrix, SymmetricEigen};
use serde::{Deserialize, Serialize};

/// The projector onto the small-eigenvalue space of one layer's `C`.
pub struct Projector {
    /// `P` (`d × d`, symmetric).
    pub p: DMatrix<f64>,
    /// How many eigenvalues fell below the threshold: the rank of `P`.
    pub null_dim: usize,
    /// The largest eigenvalue of `C`, for scale in reports.
    pub top_eigenvalue: f64,
}

impl Projector {
    /// `P` from `C` (row-major `d × d`): EasyEdit takes the SVD of the symmetric PSD `C`; its
    /// singular values are the eigenvalues.
    pub fn from_second_moment(c: &[f64], d: usize, threshold: f64) -> Result<Self, PluginError> {
        if c.len() != d * d {
            return Err(PluginError::internal(format!(
                "alphaedit: C has {} entries, expected {d}×{d}",
                c.len()
            )));
        }
        if !c.iter().all(|v| v.is_finite()) {
            return Err(PluginError::numeric(
                "alphaedit: the key second moment C is not finite",
            ));
        }
        let eig = SymmetricEigen::new(DMatrix::from_row_slice(d, d, c));
        let small: Vec<usize> = (0..d).filter(|&i| eig.eigenvalues[i] < threshold).collect();
        let u0 = eig.eigenvectors.select_columns(&small);
        Ok(Self {
            p: &u0 * u0.transpose(),
            null_dim: small.len(),
            top_eigenvalue: eig.eigenvalues.iter().cloned().fold(f64::MIN, f64::max),
        })
    }
}

/// `adj_r = [P (K Kᵀ + cache) + L2·I]⁻¹ P k_r` for every key `k_r` (`d` each): with
/// `R` the residuals, `ΔW[o, i] = Σ_r R[r][o] · adj_r[i]`, the same shape as MEMIT's update.
pub fn adjusted_keys(
    projector: &Projector,
    keys: &[Vec<f64>],
    cache: Option<&DMatrix<f64>>,
    l2: f64,
) -> Result<Vec<Vec<f64>>, PluginError> {
    let d = projector.p.nrows();
    let n = keys.len();
    let k = DMatrix::from_fn(d, n, |i, r| keys[r][i]);
    let mut a = &k * k.transpose();
    if let Some(c) = cache {
        a += c;
    }
    let mut m = &projector.p * a;
    for i in 0..d {
        m[(i, i)] += l2;
    }
    let rhs = &projector.p * &k;
    let x = m.lu().solve(&rhs).ok_or_else(|| {
        PluginError::numeric("alphaedit: P(KKᵀ + cache) + L2·I is singular (is L2 zero?)")
    })?;
    if !x.iter().all(|v| v.is_finite()) {
        return Err(PluginError::numeric(
            "alphaedit: the projected solve is not finite",
        ));
    }
    Ok((0..n)
        .map(|r| x.column(r).iter().copied().collect())
        .collect())
}

/// A fingerprint of the weights at the rewrite sites of `layers`.
pub fn weights_fingerprint(
    model: &ModelClient<'_>,
    rewrite_site: &str,
    layers: &[usize],
) -> Result<u64, PluginError> {
    let mut bytes = Vec::new();
    for &l in layers {
        let w = model.read_weight(&layer_site(rewrite_site, l))?;
        bytes.extend_from_slice(&(l as u64).to_le_bytes());
        for v in w.as_slice() {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    Ok(fnv1a(&bytes))
}

/// The keys of one AlphaEdit call, read on the model it left behind.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Step {
    /// Fingerprint of the edited weights before this call.
    parent: u64,
    /// Keys per layer (`n × d` each), f32 as the model produced them.
    keys: HashMap<usize, Vec<Vec<f32>>>,
}

/// The keys of every AlphaEdit call, filed by the fingerprint of the weights each left.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KeyHistory {
    steps: HashMap<u64, Step>,
}

impl KeyHistory {
    /// `Σ K Kᵀ` at `layer` over the chain of calls that produced the weights `state`; `None`
    /// when there is none (an unedited model, or one edited only by other methods).
    pub fn cache(&self, state: u64, layer: usize, d: usize) -> Option<DMatrix<f64>> {
        let mut sum: Option<DMatrix<f64>> = None;
        let mut at = state;
        // A chain cannot be longer than the history: guards against a cycle.
        for _ in 0..self.steps.len() {
            let Some(step) = self.steps.get(&at) else {
                break;
            };
            if let Some(keys) = step.keys.get(&layer) {
                let k = DMatrix::from_fn(d, keys.len(), |i, r| keys[r][i] as f64);
                let kk = &k * k.transpose();
                sum = Some(match sum {
                    Some(s) => s + kk,
                    None => kk,
                });
            }
            at = step.parent;
        }
        sum
    }

    /// Files the keys of a call that took the weights from `before` to `after`.
    pub fn record(&mut self, before: u64, after: u64, keys: HashMap<usize, Vec<Vec<f32>>>) {
        if before == after {
            // Nothing changed: the model is in the state it was, with the cache it had.
            return;
        }
        self.steps.insert(
            after,
            Step {
                parent: before,
                keys,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

/// Projectors computed this process, by layer statistics and threshold.
pub type ProjectorCache = HashMap<String, Arc<Projector>>;

#[cfg(test)]
mod tests {
    use super::*;

    /// C with a known spectrum: eigenvalues `ev` on an orthonormal basis from a rotation.
    fn second_moment(ev: &[f64]) -> (Vec<f64>, DMatrix<f64>) {
        let d = ev.len();
        let q = DMatrix::from_fn(d, d, |i, j| ((i * 7 + j * 3) as f64 * 0.37).sin())
            .qr()
            .q();
        let c =
            &q * DMatrix::from_diagonal(&nalgebra::DVector::from_column_slice(ev)) * q.transpose();
        let rows: Vec<f64> = (0..d)
            .flat_map(|i| (0..d).map(move |j| (i, j)))
            .map(|(i, j)| c[(i, j)])
            .collect();
        (rows, q)
    }

    #[test]
    fn the_projector_keeps_exactly_the_small_eigenvalue_directions() {
        let ev = [5.0, 2.0, 1e-3, 0.5, 1e-4, 3.0];
        let (c, q) = second_moment(&ev);
        let p = Projector::from_second_moment(&c, ev.len(), 2e-2).unwrap();
        assert_eq!(p.null_dim, 2);
        assert!((p.top_eigenvalue - 5.0).abs() < 1e-9);
        for (i, &e) in ev.iter().enumerate() {
            let v = q.column(i).into_owned();
            let pv = &p.p * &v;
            let want = if e < 2e-2 { 1.0 } else { 0.0 };
            assert!(
                ((pv.norm()) - want).abs() < 1e-9,
                "eigenvalue {e}: |Pv| = {}",
                pv.norm()
            );
        }
    }

    #[test]
    fn the_update_leaves_preserved_keys_alone_and_moves_the_edited_key() {
        // Preserved directions: eigenvalues ≥ threshold. The edited key has a component in the
        // null space, which the update uses.
        let ev = [4.0, 1e-5, 2.0, 1e-6];
        let (c, q) = second_moment(&ev);
        let p = Projector::from_second_moment(&c, 4, 2e-2).unwrap();
        let key: Vec<f64> = (q.column(0) + q.column(1) * 2.0).iter().copied().collect();
        let adj = adjusted_keys(&p, std::slice::from_ref(&key), None, 1e-3).unwrap();
        let adj = nalgebra::DVector::from_column_slice(&adj[0]);
        // ΔW·u = R · (adjᵀu): zero for a preserved direction u.
        for i in [0, 2] {
            assert!(
                adj.dot(&q.column(i)).abs() < 1e-9,
                "preserved direction {i} moved"
            );
        }
        // The edited key is mapped almost exactly onto its residual: adjᵀk ≈ 1 for a small L2.
        let k = nalgebra::DVector::from_column_slice(&key);
        assert!((adj.dot(&k) - 1.0).abs() < 1e-2, "adjᵀk = {}", adj.dot(&k));
    }

    #[test]
    fn the_cache_follows_the_chain_of_the_current_weights() {
        let mut h = KeyHistory::default();
        let key = |v: f32| HashMap::from([(3usize, vec![vec![v, 0.0]])]);
        h.record(10, 11, key(1.0));
        h.record(11, 12, key(2.0));
        // Rolled back to 11 and edited again: a sibling branch.
        h.record(11, 13, key(3.0));
        let at = |h: &KeyHistory, s: u64| h.cache(s, 3, 2).map(|m| m[(0, 0)]);
        assert_eq!(at(&h, 10), None, "the unedited model has no cache");
        assert_eq!(at(&h, 11), Some(1.0));
        assert_eq!(at(&h, 12), Some(5.0));
        assert_eq!(at(&h, 13), Some(10.0));
        assert_eq!(h.cache(12, 4, 2), None, "no keys at another layer");
        h.record(13, 13, key(9.0));
        assert_eq!(
            at(&h, 13),
            Some(10.0),
            "a call that changed nothing adds nothing"
        );
    }
}

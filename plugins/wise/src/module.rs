//! The side memory as a site module: in training it answers with the side memory being trained
//! (EasyEdit's adapter in `editing` mode); otherwise it routes every row, choosing the original
//! map or a side memory by the activation score against the recorded threshold.

use std::sync::{Arc, Mutex, RwLock};

use abi_stable::std_types::{RResult, RString};
use kedit_plugin_api::{ModuleContext, PluginError, SiteModule, Tensor};
use serde::Serialize;

use crate::score::{self, x_dt, ActFn, Matrix};

/// One stored side memory of retrieve mode (EasyEdit `memory_weight[i]`, `memory_mean_act[i]`).
#[derive(Clone, Debug)]
pub struct Memory {
    pub weight: Arc<Vec<f32>>,
    pub min_act: f64,
}

/// EasyEdit's `EditingMeanAct`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct MeanAct {
    pub sum: f64,
    pub count: u64,
    pub min: f64,
}

impl Default for MeanAct {
    fn default() -> Self {
        Self::with_min(1e9)
    }
}

impl MeanAct {
    pub fn with_min(min: f64) -> Self {
        Self {
            sum: 0.0,
            count: 0,
            min,
        }
    }
    pub fn update(&mut self, v: f64) {
        self.sum += v;
        self.count += 1;
        self.min = self.min.min(v);
    }
}

/// One applied edit, for the log.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct LogEntry {
    pub id: String,
    pub prompt: String,
    pub target_new: String,
    /// The in-scope score recorded at the edit's last iteration.
    pub activation: f64,
}

/// Everything WISE keeps, frozen: the installed module reads it and the editor continues from
/// it. A new edit makes a new snapshot (sharing unchanged matrices), so the model's journal,
/// which holds modules, also restores the editor's state on rollback.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub id: u64,
    pub site: String,
    pub out_dim: usize,
    pub in_dim: usize,
    pub act_fn: ActFn,
    pub act_ratio: f64,
    pub retrieve: bool,
    /// W, as read from the model when WISE first edited it.
    pub original: Arc<Vec<f32>>,
    /// W′ (`new_weight`), the side memory being filled.
    pub side: Arc<Vec<f32>>,
    pub side_act: MeanAct,
    /// Retrieve mode's saved (and merged) memories.
    pub memories: Vec<Memory>,
    /// Merge mode's merged memory (`layer.weight` once it differs from W).
    pub merged: Option<Arc<Vec<f32>>>,
    /// Merge mode's saved shards awaiting the next merge.
    pub shards: Vec<Arc<Vec<f32>>>,
    /// The current shard's gradient mask, one bit per weight (`None` before the first edit).
    pub mask: Option<Arc<Vec<u8>>>,
    pub editing_total_cnt: u64,
    pub merge_cnt: u64,
    pub templates: Vec<String>,
    pub log: Vec<LogEntry>,
}

impl Snapshot {
    pub fn threshold(&self) -> f64 {
        self.side_act.min * self.act_ratio
    }
}

/// A candidate answer of the router.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Choice {
    Original,
    Side,
    Merged,
    Memory(usize),
}

struct Candidate {
    choice: Choice,
    /// `ΔW = W_c − W` as `[out, in]`, or `None` where it is zero (the output is the original).
    delta: Option<Matrix>,
    /// The candidate's own threshold (retrieve memories), else unused.
    min_act: f64,
}

/// Per-row running statistics of the tokens seen so far while generating with a KV cache, so
/// that each cached step scores the whole sequence as a full forward would.
#[derive(Default)]
struct Running {
    active: bool,
    sums: Vec<f64>,
    maxes: Vec<f32>,
    count: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct RowDecision {
    pub row: usize,
    /// `original`, `side`, `merged` or `memory.i`.
    pub answer: String,
    /// Score of each candidate memory (`side`, `merged`, `memory.i`).
    pub scores: Vec<(String, f32)>,
    pub tokens_scored: usize,
    /// Each candidate's distance at every token of this call (the scores' ingredients, in the
    /// order of `scores`): shows which tokens drive a decision.
    pub token_distances: Vec<Vec<f32>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    pub method: &'static str,
    pub snapshot: u64,
    pub site: String,
    pub mode: &'static str,
    pub edits: u64,
    pub threshold: f64,
    pub memory_thresholds: Vec<f64>,
    pub generating: bool,
    pub rows: Vec<RowDecision>,
}

/// What the training module saw in its last call: the original and the side outputs.
#[derive(Default)]
pub struct Seen {
    pub dims: Vec<usize>,
    pub original: Vec<f32>,
    pub side: Vec<f32>,
}

/// The side memory under training, shared between the editor and the training module.
#[derive(Default)]
pub struct TrainCell {
    pub delta: RwLock<Option<Arc<Matrix>>>,
    pub seen: Mutex<Option<Seen>>,
}

enum Mode {
    Train(Arc<TrainCell>),
    Route {
        snapshot: Arc<Snapshot>,
        candidates: Vec<Candidate>,
    },
}

pub struct WiseModule {
    mode: Mode,
    out_dim: usize,
    in_dim: usize,
    running: Mutex<Running>,
    last: Mutex<Option<Explanation>>,
}

fn delta_of(
    w: &[f32],
    original: &[f32],
    out: usize,
    inp: usize,
) -> Result<Option<Matrix>, PluginError> {
    let d: Vec<f32> = w.iter().zip(original).map(|(&a, &b)| a - b).collect();
    if d.iter().all(|&v| v == 0.0) {
        return Ok(None);
    }
    Matrix::new(d, out, inp, "side memory ΔW").map(Some)
}

impl WiseModule {
    pub fn training(cell: Arc<TrainCell>, out_dim: usize, in_dim: usize) -> Self {
        Self {
            mode: Mode::Train(cell),
            out_dim,
            in_dim,
            running: Mutex::default(),
            last: Mutex::default(),
        }
    }

    pub fn routing(snapshot: Arc<Snapshot>) -> Result<Self, PluginError> {
        let (o, i) = (snapshot.out_dim, snapshot.in_dim);
        let w = snapshot.original.as_slice();
        let mut candidates = Vec::new();
        if snapshot.retrieve {
            candidates.push(Candidate {
                choice: Choice::Side,
                delta: delta_of(&snapshot.side, w, o, i)?,
                min_act: snapshot.side_act.min,
            });
            for (k, m) in snapshot.memories.iter().enumerate() {
                candidates.push(Candidate {
                    choice: Choice::Memory(k),
                    delta: delta_of(&m.weight, w, o, i)?,
                    min_act: m.min_act,
                });
            }
        } else {
            let merged = match &snapshot.merged {
                Some(m) => delta_of(m, w, o, i)?,
                None => None,
            };
            candidates.push(Candidate {
                choice: Choice::Merged,
                delta: merged,
                min_act: snapshot.side_act.min,
            });
            candidates.push(Candidate {
                choice: Choice::Side,
                delta: delta_of(&snapshot.side, w, o, i)?,
                min_act: snapshot.side_act.min,
            });
        }
        Ok(Self {
            mode: Mode::Route {
                snapshot,
                candidates,
            },
            out_dim: o,
            in_dim: i,
            running: Mutex::default(),
            last: Mutex::default(),
        })
    }

    pub fn snapshot(&self) -> Option<&Arc<Snapshot>> {
        match &self.mode {
            Mode::Route { snapshot, .. } => Some(snapshot),
            Mode::Train(_) => None,
        }
    }

    fn check(&self, input: &Tensor, output: &Tensor) -> Result<(usize, usize), PluginError> {
        let (xd, yd) = (input.dims(), output.dims());
        if xd.len() != 3
            || yd.len() != 3
            || xd[..2] != yd[..2]
            || xd[2] != self.in_dim
            || yd[2] != self.out_dim
        {
            return Err(PluginError::invalid(format!(
                "wise module: input {xd:?} and output {yd:?} do not fit a [{}, {}] side memory",
                self.out_dim, self.in_dim
            )));
        }
        Ok((xd[0], xd[1]))
    }

    fn run(
        &self,
        input: &Tensor,
        output: Tensor,
        ctx: &ModuleContext,
    ) -> Result<Tensor, PluginError> {
        let (b, s) = self.check(input, &output)?;
        let n = b * s;
        let x = input.as_slice();
        match &self.mode {
            Mode::Train(cell) => {
                let delta = cell
                    .delta
                    .read()
                    .map_err(|_| PluginError::internal("wise: training cell poisoned"))?
                    .clone();
                let y = output.as_slice().to_vec();
                let mut ys = y.clone();
                if let Some(d) = delta {
                    for (v, a) in ys.iter_mut().zip(x_dt(x, n, &d)?) {
                        *v += a;
                    }
                }
                let result = Tensor::new(&[b, s, self.out_dim], ys.clone())?;
                *cell
                    .seen
                    .lock()
                    .map_err(|_| PluginError::internal("wise: training cell poisoned"))? =
                    Some(Seen {
                        dims: vec![b, s, self.out_dim],
                        original: y,
                        side: ys,
                    });
                Ok(result)
            }
            Mode::Route {
                snapshot,
                candidates,
            } => self.route(snapshot, candidates, x, output, ctx, b, s),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn route(
        &self,
        snap: &Snapshot,
        candidates: &[Candidate],
        x: &[f32],
        output: Tensor,
        ctx: &ModuleContext,
        b: usize,
        s: usize,
    ) -> Result<Tensor, PluginError> {
        let out = self.out_dim;
        let y = output.as_slice();
        // Each candidate's output; a zero ΔW answers exactly the original.
        let outs: Vec<Option<Vec<f32>>> = candidates
            .iter()
            .map(|c| {
                c.delta
                    .as_ref()
                    .map(|d| {
                        x_dt(x, b * s, d).map(|a| y.iter().zip(a).map(|(&p, q)| p + q).collect())
                    })
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        let mut running = self
            .running
            .lock()
            .map_err(|_| PluginError::internal("wise: state poisoned"))?;
        // A cached step of one new token continues the sequence being generated; anything else
        // starts afresh (a one-token prompt right after another generation is taken as a step).
        let continuing = ctx.generating && b == 1 && s == 1 && running.active;
        if !continuing {
            *running = Running {
                active: ctx.generating && b == 1,
                sums: vec![0.0; candidates.len()],
                maxes: vec![f32::NEG_INFINITY; candidates.len()],
                count: 0,
            };
        }
        let mut result = y.to_vec();
        let mut rows = Vec::with_capacity(b);
        for r in 0..b {
            let off = ctx.row_offsets.get(r).copied().unwrap_or(0) as usize;
            let len = ctx.row_lengths.get(r).copied().unwrap_or(s as u32) as usize;
            let (lo, hi) = (r * s + off, (r * s + off + len).min((r + 1) * s));
            let dists: Vec<Vec<f32>> = outs
                .iter()
                .map(|o| match o {
                    Some(o) => score::token_distances(
                        snap.act_fn,
                        &y[lo * out..hi * out],
                        &o[lo * out..hi * out],
                        out,
                    ),
                    None => vec![0.0; hi - lo],
                })
                .collect();
            let scores: Vec<f32> = if running.active {
                running.count += hi - lo;
                let count = running.count;
                let Running { sums, maxes, .. } = &mut *running;
                dists
                    .iter()
                    .enumerate()
                    .map(|(k, d)| {
                        sums[k] += d.iter().map(|&v| v as f64).sum::<f64>();
                        maxes[k] = d.iter().copied().fold(maxes[k], f32::max);
                        if count > 100 {
                            maxes[k]
                        } else {
                            (sums[k] / count as f64) as f32
                        }
                    })
                    .collect()
            } else {
                dists.iter().map(|d| score::row_score(d)).collect()
            };
            let answer = decide(snap, candidates, &scores);
            let chosen = candidates.iter().position(|c| c.choice == answer);
            if let Some(o) = chosen.and_then(|k| outs[k].as_ref()) {
                result[r * s * out..(r + 1) * s * out]
                    .copy_from_slice(&o[r * s * out..(r + 1) * s * out]);
            }
            rows.push(RowDecision {
                row: r,
                answer: choice_name(&answer),
                scores: candidates
                    .iter()
                    .zip(&scores)
                    .map(|(c, &v)| (choice_name(&c.choice), v))
                    .collect(),
                tokens_scored: if running.active {
                    running.count
                } else {
                    hi - lo
                },
                token_distances: dists,
            });
        }
        *self
            .last
            .lock()
            .map_err(|_| PluginError::internal("wise: state poisoned"))? = Some(Explanation {
            method: "wise",
            snapshot: snap.id,
            site: snap.site.clone(),
            mode: if snap.retrieve { "retrieve" } else { "merge" },
            edits: snap.editing_total_cnt,
            threshold: snap.threshold(),
            memory_thresholds: snap
                .memories
                .iter()
                .map(|m| m.min_act * snap.act_ratio)
                .collect(),
            generating: ctx.generating,
            rows,
        });
        Tensor::new(&[b, s, out], result)
    }
}

pub fn choice_name(c: &Choice) -> String {
    match c {
        Choice::Original => "original".into(),
        Choice::Side => "side".into(),
        Choice::Merged => "merged".into(),
        Choice::Memory(i) => format!("memory.{i}"),
    }
}

/// EasyEdit's `WISEAdapter.forward` decision for one row, given each candidate's score.
fn decide(snap: &Snapshot, candidates: &[Candidate], scores: &[f32]) -> Choice {
    let threshold = snap.threshold();
    if snap.retrieve {
        // Candidate 0 is W′ against the live threshold; stored memories must beat both the
        // best score so far and their own recorded threshold.
        let mut best = if (scores[0] as f64) < threshold {
            Choice::Original
        } else {
            Choice::Side
        };
        let mut min_dist = scores[0];
        for (c, &d) in candidates.iter().zip(scores).skip(1) {
            if d > min_dist && (d as f64) > c.min_act * snap.act_ratio {
                best = c.choice.clone();
                min_dist = d;
            }
        }
        best
    } else {
        let (d1, d2) = (scores[0], scores[1]);
        if (d1 as f64) < threshold && (d2 as f64) < threshold {
            Choice::Original
        } else if d1 > d2 {
            Choice::Merged
        } else {
            Choice::Side
        }
    }
}

impl SiteModule for WiseModule {
    fn name(&self) -> RString {
        match &self.mode {
            Mode::Train(_) => "wise (training)".into(),
            Mode::Route { .. } => "wise".into(),
        }
    }

    fn forward(
        &self,
        input: &Tensor,
        output: Tensor,
        context: &ModuleContext,
    ) -> RResult<Tensor, PluginError> {
        self.run(input, output, context).into()
    }

    fn explain(&self) -> RString {
        let last = self.last.lock().ok().and_then(|l| l.clone());
        let value = match (&self.mode, last) {
            (_, Some(e)) => serde_json::to_value(e).unwrap_or_default(),
            (Mode::Route { snapshot, .. }, None) => serde_json::json!({
                "method": "wise",
                "snapshot": snapshot.id,
                "site": snapshot.site,
                "mode": if snapshot.retrieve { "retrieve" } else { "merge" },
                "edits": snapshot.editing_total_cnt,
                "threshold": snapshot.threshold(),
                "rows": [],
            }),
            (Mode::Train(_), None) => serde_json::json!({"method": "wise", "training": true}),
        };
        value.to_string().into()
    }
}

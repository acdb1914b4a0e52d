//! Load time, forward latency, decode speed and gradient latency of a LLaMA checkpoint.
//!
//! `cargo run --release -p kedit-model-llama --example bench -- <checkpoint> [device]`
//! (run it under `/usr/bin/time -v` for the peak RSS).

use std::time::{Duration, Instant};

use kedit_plugin_api::{
    Batch, ForwardRequest, GenerateRequest, GradRequest, Intervention, LogitsWanted, Model,
    NllTerm, Padding, Tensor,
};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// CPU time (user + system) of this process so far: on a shared machine wall time mostly
/// measures the neighbours, CPU time what this code costs.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces): utime is the 14th field overall.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the state field.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Median wall time of `reps` runs after one warm-up, and the mean CPU time per run.
struct Timing {
    wall: Duration,
    cpu: Duration,
}

impl std::fmt::Display for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1?} wall (median), {:.1?} CPU", self.wall, self.cpu)
    }
}

fn time<T>(reps: usize, mut f: impl FnMut() -> T) -> Timing {
    f();
    let cpu0 = cpu_time();
    let wall = median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    );
    Timing {
        wall,
        cpu: (cpu_time() - cpu0) / reps as u32,
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .expect("usage: bench <checkpoint dir or .gguf> [device]");
    let device = args.next().unwrap_or_else(|| "cpu".into());
    // Optionally only one measurement (for profilers): fwd5, fwd64, decode, grad.
    let only = args.next();
    let want = |what: &str| only.is_none() || only.as_deref() == Some(what);
    let t = Instant::now();
    let model = kedit_model_llama::open_runtime(&path, &device).expect("model loads");
    println!("load: {:.0?}", t.elapsed());
    let facts = model.facts().unwrap();
    let vocab = facts.vocab_size;

    let ids = |n: usize| -> Vec<u32> { (0..n as u32).map(|i| 100 + (i * 37) % 5000).collect() };
    for n in [5usize, 64] {
        if !want(&format!("fwd{n}")) {
            continue;
        }
        let req = ForwardRequest::new(Batch::new(vec![ids(n)], Padding::Right), LogitsWanted::Last);
        let d = time(7, || model.forward(&req).unwrap());
        println!("forward {n:>3} tokens (last logits): {d}");
    }
    let req = ForwardRequest::new(
        Batch::new(vec![ids(12); 8], Padding::Right),
        LogitsWanted::Last,
    );
    if only.is_some() && !want("batch") {
    } else {
        println!(
            "forward 8×12 tokens (last logits): {}",
            time(3, || model.forward(&req).unwrap())
        );
    }

    if want("decode") {
        let n_new = 64;
        let gen = GenerateRequest::greedy(vec![ids(5)], n_new);
        let d = time(2, || model.generate(&gen).unwrap());
        println!(
            "greedy decode: {n_new} tokens: {d} = {:.1} tokens/s wall, {:.1} tokens/CPU-s",
            n_new as f64 / d.wall.as_secs_f64(),
            n_new as f64 / d.cpu.as_secs_f64()
        );
    }
    if !want("grad") {
        return;
    }

    // One ROME-style gradient step: a delta on the MLP output of a middle layer, NLL on the
    // last tokens of 4 rows, prepared from that layer.
    let layer = facts.n_layers as usize / 2;
    let rows: Vec<Vec<u32>> = (0..4).map(|r| ids(10 + r)).collect();
    let batch = Batch::new(rows.clone(), Padding::Right);
    let mut forward = ForwardRequest::new(batch.clone(), LogitsWanted::None);
    forward.params = vec![Tensor::zeros(&[facts.d_model as usize])].into();
    for (r, row) in rows.iter().enumerate() {
        forward.interventions.push(Intervention::add_param(
            &format!("layer.{layer}.mlp_out"),
            r,
            row.len() - 4,
            0,
        ));
    }
    let nll = rows
        .iter()
        .enumerate()
        .map(|(r, row)| NllTerm {
            row: r as u32,
            position: row.len() as u32 - 2,
            token: (row[row.len() - 1] + 1) % vocab,
            weight: 1.0,
        })
        .collect::<Vec<_>>();
    let mut grad = GradRequest {
        forward,
        nll: nll.into(),
        kl: Default::default(),
        site_grads: vec![format!("layer.{layer}.mlp.down").into()].into(),
        prepared: None.into(),
    };
    println!(
        "gradient (4 rows, delta at layer {layer}, full): {}",
        time(3, || model.gradient(&grad).unwrap())
    );
    let mut model = model;
    let handle = model.prepare(&batch, layer).unwrap();
    grad.prepared = Some(handle).into();
    println!(
        "gradient (prepared from layer {layer}): {}",
        time(3, || model.gradient(&grad).unwrap())
    );
}

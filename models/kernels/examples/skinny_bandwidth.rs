//! The streaming kernel on a whole decode step's weights — SmolLM2-135M's and Qwen2.5-0.5B's
//! shapes, called as the models call it (q, k, v together; o; gate and up together; down; the
//! head) — against the machine's read bandwidth measured in the same run:
//! `cargo run --release -p kedit-kernels --example skinny_bandwidth`.
//!
//! Weights are constant-filled (the kernel's speed does not depend on the values); every model
//! gets its own copies, larger than the caches, so each step reads them from memory as decoding
//! does.

use std::time::Instant;

use kedit_kernels::{matmul_nt_many, Product};

/// One call: the input width and the output width of each weight that reads that input.
type Call = (usize, Vec<usize>);

fn decode_step(d: usize, kv: usize, ff: usize, layers: usize, vocab: usize) -> Vec<Call> {
    let mut calls = Vec::new();
    for _ in 0..layers {
        calls.push((d, vec![d, kv, kv]));
        calls.push((d, vec![d]));
        calls.push((d, vec![ff, ff]));
        calls.push((ff, vec![d]));
    }
    calls.push((d, vec![vocab]));
    calls
}

fn main() {
    let bandwidth = kedit_kernels::bandwidth::read_bandwidth(512 << 20, 5) / 1e9;
    println!(
        "memory read bandwidth: {bandwidth:.1} GB/s ({})",
        kedit_kernels::isa()
    );
    for (name, calls) in [
        ("SmolLM2-135M", decode_step(576, 192, 1536, 30, 49152)),
        ("Qwen2.5-0.5B", decode_step(896, 128, 4864, 24, 151936)),
    ] {
        let weights: Vec<Vec<Vec<f32>>> = calls
            .iter()
            .map(|(k, ns)| ns.iter().map(|&n| vec![1e-3f32; n * k]).collect())
            .collect();
        let mut outs: Vec<Vec<Vec<f32>>> = calls
            .iter()
            .map(|(_, ns)| ns.iter().map(|&n| vec![0f32; n]).collect())
            .collect();
        let bytes: usize = calls
            .iter()
            .map(|(k, ns)| ns.iter().sum::<usize>() * k * 4)
            .sum();
        let x = vec![0.5f32; calls.iter().map(|c| c.0).max().unwrap_or(0)];
        let mut step = || {
            for (((k, _), ws), ys) in calls.iter().zip(&weights).zip(outs.iter_mut()) {
                let mut products: Vec<Product> = ws
                    .iter()
                    .zip(ys.iter_mut())
                    .map(|(w, y)| Product { w, n: y.len(), y })
                    .collect();
                matmul_nt_many(&x[..*k], 1, *k, &mut products);
            }
        };
        step();
        let mut times: Vec<f64> = (0..15)
            .map(|_| {
                let t = Instant::now();
                step();
                t.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let gbps = bytes as f64 / median / 1e9;
        println!(
            "{name}: {:.2} GB per step, {:.2} ms per step ({:.1} steps/s), {gbps:.1} GB/s = {:.0}% of the bandwidth",
            bytes as f64 / 1e9,
            median * 1e3,
            1.0 / median,
            100.0 * gbps / bandwidth
        );
    }
}

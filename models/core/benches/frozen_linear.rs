//! `x·Wᵀ` with frozen weights: kedit's `linear` (skinny kernel for few rows, the run-time BLAS
//! for more when one is installed) against candle's own matmul on the same operands, interleaved
//! in one run so that both see the same machine load.
//!
//!   cargo bench -p kedit-model-core --bench frozen_linear
//!
//! Shapes are SmolLM2-135M's and Qwen2.5-0.5B's projections and heads; `m` is the number of
//! token rows (1 = decoding one token, 5 and 8 = batches of prompts decoding together; 64 = a
//! prefill, 160 = one ROME optimisation step's rows). Without a BLAS (`KEDIT_BLAS=off`, or none
//! installed) rows beyond 8 take candle's GEMM in both.

use candle_core::{Device, Tensor};
use kedit_model_core::engine::frozen::linear;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let shapes: &[(&str, usize, usize)] = &[
        ("smollm2 q/o", 576, 576),
        ("smollm2 k/v", 576, 192),
        ("smollm2 gate/up", 576, 1536),
        ("smollm2 down", 1536, 576),
        ("smollm2 head", 576, 49152),
        ("qwen2.5 gate/up", 896, 4864),
        ("qwen2.5 down", 4864, 896),
        ("qwen2.5 head", 896, 151936),
    ];
    println!("isa: {}", kedit_kernels::isa());
    println!("blas: {}", kedit_kernels::blas::status());
    println!(
        "{:<18} {:>3} {:>12} {:>12} {:>7} {:>9}",
        "shape", "m", "candle µs", "kedit µs", "ratio", "kedit GB/s|GFLOP/s"
    );
    for &(name, k, n) in shapes {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        for m in [1usize, 5, 8, 64, 160] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let reps = (2_000_000_000 / (n * k * 4)).clamp(5, 400);
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for _ in 0..reps {
                let t = Instant::now();
                std::hint::black_box(x.matmul(&w.t()?)?);
                theirs.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                std::hint::black_box(linear(&x, &w)?);
                ours.push(t.elapsed().as_secs_f64());
            }
            let (o, c) = (median(ours), median(theirs));
            println!(
                "{:<18} {:>3} {:>12.1} {:>12.1} {:>6.2}× {:>9.1}",
                name,
                m,
                c * 1e6,
                o * 1e6,
                c / o,
                if m <= 8 {
                    (n * k * 4) as f64 / o / 1e9
                } else {
                    (2 * m * n * k) as f64 / o / 1e9
                }
            );
        }
    }
    Ok(())
}

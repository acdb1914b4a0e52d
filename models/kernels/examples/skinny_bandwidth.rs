//! Bandwidth the one-row skinny product reaches on the weight shapes of SmolLM2-135M and
//! Qwen2.5-0.5B, against the machine's read bandwidth measured in the same run:
//! `cargo run --release -p kedit-kernels --example skinny_bandwidth`.

use std::time::Instant;

fn main() {
    let peak = kedit_kernels::bandwidth::read_bandwidth(512 << 20, 5) / 1e9;
    println!(
        "memory read bandwidth: {peak:.1} GB/s ({})",
        kedit_kernels::isa()
    );
    // q, k, v of one layer, one call each and then in one call.
    for (name, k, ns) in [
        ("smol q,k,v", 576, &[576usize, 192, 192][..]),
        ("smol gate,up", 576, &[1536, 1536][..]),
        ("qwen q,k,v", 896, &[896, 128, 128][..]),
        ("qwen gate,up", 896, &[4864, 4864][..]),
    ] {
        let layer_floats: usize = ns.iter().map(|n| n * k).sum();
        let copies = (256 << 20) / (layer_floats * 4) + 1;
        let ws: Vec<Vec<Vec<f32>>> = (0..copies)
            .map(|c| {
                ns.iter()
                    .map(|&n| vec![(c % 7) as f32 * 1e-3; n * k])
                    .collect()
            })
            .collect();
        let x = vec![0.5f32; k];
        let mut ys: Vec<Vec<f32>> = ns.iter().map(|&n| vec![0f32; n]).collect();
        for together in [false, true] {
            let pass = |ys: &mut Vec<Vec<f32>>| {
                for layer in &ws {
                    if together {
                        let mut products: Vec<kedit_kernels::Product> = layer
                            .iter()
                            .zip(ys.iter_mut())
                            .zip(ns)
                            .map(|((w, y), &n)| kedit_kernels::Product { w, n, y })
                            .collect();
                        kedit_kernels::matmul_nt_many(&x, 1, k, &mut products);
                    } else {
                        for ((w, y), &n) in layer.iter().zip(ys.iter_mut()).zip(ns) {
                            kedit_kernels::matmul_nt(&x, w, 1, k, n, y);
                        }
                    }
                }
            };
            pass(&mut ys);
            let rounds = 5;
            let start = Instant::now();
            for _ in 0..rounds {
                pass(&mut ys);
            }
            let secs = start.elapsed().as_secs_f64() / (rounds * copies) as f64;
            let gbps = (layer_floats * 4) as f64 / secs / 1e9;
            println!(
                "{name:14} {:9} {:8.1} µs/layer {gbps:6.1} GB/s ({:.0}%)",
                if together { "together" } else { "apart" },
                secs * 1e6,
                100.0 * gbps / peak
            );
        }
    }
    let shapes = [
        ("smol q/o 576x576", 576, 576),
        ("smol k/v 576x192", 576, 192),
        ("smol gate/up 576x1536", 576, 1536),
        ("smol down 1536x576", 1536, 576),
        ("smol head 576x49152", 576, 49152),
        ("qwen q/o 896x896", 896, 896),
        ("qwen gate/up 896x4864", 896, 4864),
        ("qwen down 4864x896", 4864, 896),
    ];
    for (name, k, n) in shapes {
        // Enough distinct weights to exceed the caches, as a model's layers do.
        let copies = (256 << 20) / (k * n * 4) + 1;
        let ws: Vec<Vec<f32>> = (0..copies)
            .map(|c| vec![(c % 7) as f32 * 1e-3; k * n])
            .collect();
        let x = vec![0.5f32; k];
        let mut y = vec![0f32; n];
        for w in &ws {
            kedit_kernels::matmul_nt(&x, w, 1, k, n, &mut y);
        }
        let rounds = 3;
        let start = Instant::now();
        for _ in 0..rounds {
            for w in &ws {
                kedit_kernels::matmul_nt(&x, w, 1, k, n, &mut y);
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let calls = (rounds * copies) as f64;
        let gbps = calls * (k * n * 4) as f64 / secs / 1e9;
        println!(
            "{name:24} {:8.1} µs/call {gbps:6.1} GB/s ({:.0}% of read bandwidth)",
            secs / calls * 1e6,
            100.0 * gbps / peak
        );
    }
}

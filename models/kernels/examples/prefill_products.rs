//! The products of a 64-token SmolLM2-135M prefill (every layer's q, k, v, o, gate, up, down)
//! through the run-time BLAS, to compare libraries on this machine:
//! `KEDIT_BLAS=/path/to/libcblas.so cargo run --release -p kedit-kernels --example prefill_products`
//! (without `KEDIT_BLAS`, the cached MKL or OpenBLAS).

use std::time::Instant;

fn main() {
    let Some(blas) = kedit_kernels::blas::get() else {
        eprintln!(
            "prefill_products: no BLAS: {}",
            kedit_kernels::blas::status()
        );
        std::process::exit(1);
    };
    let m = 64;
    // (k, n) of each weight of one layer.
    let layer = [
        (576, 576),
        (576, 192),
        (576, 192),
        (576, 576),
        (576, 1536),
        (576, 1536),
        (1536, 576),
    ];
    let weights: Vec<Vec<Vec<f32>>> = (0..30)
        .map(|_| layer.iter().map(|&(k, n)| vec![1e-3f32; n * k]).collect())
        .collect();
    let x = vec![0.5f32; m * 1536];
    let mut times: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for ws in &weights {
                for (w, &(k, n)) in ws.iter().zip(&layer) {
                    std::hint::black_box(blas.matmul_nt(&x[..m * k], w, m, k, n));
                }
            }
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let flops: f64 = 30.0
        * layer
            .iter()
            .map(|&(k, n)| 2.0 * (m * k * n) as f64)
            .sum::<f64>();
    println!(
        "{}: SmolLM2 64-token prefill products in {:.1} ms ({:.1} GFLOP/s)",
        kedit_kernels::blas::status(),
        median * 1e3,
        flops / median / 1e9
    );
}

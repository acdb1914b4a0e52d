use std::time::Instant;
fn main() {
    let blas = kedit_kernels::blas::get().expect("KEDIT_BLAS");
    let m = 64;
    let layer: Vec<(usize, usize)> = vec![
        (576, 576),
        (576, 192),
        (576, 192),
        (576, 576),
        (576, 1536),
        (576, 1536),
        (1536, 576),
    ];
    let ws: Vec<Vec<Vec<f32>>> = (0..30)
        .map(|_| layer.iter().map(|&(k, n)| vec![1e-3f32; n * k]).collect())
        .collect();
    let x = vec![0.5f32; m * 1536];
    let mut times = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        for l in &ws {
            for (w, &(k, n)) in l.iter().zip(&layer) {
                std::hint::black_box(blas.matmul_nt(&x[..m * k], w, m, k, n));
            }
        }
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let flops = 30.0
        * layer
            .iter()
            .map(|&(k, n)| 2.0 * (m * k * n) as f64)
            .sum::<f64>();
    println!(
        "SmolLM2 prefill-64 products via BLAS: {:.1} ms, {:.1} GFLOP/s",
        times[3] * 1e3,
        flops / times[3] / 1e9
    );
}

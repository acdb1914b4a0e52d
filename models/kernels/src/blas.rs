//! An optional BLAS, loaded at run time, for the products too large for the skinny kernel.
//!
//! candle's CPU GEMM (the `gemm` crate) reaches about half of what an AVX-512 BLAS does on the
//! shapes kedit multiplies during prefill and editing (tens to hundreds of rows against
//! 576–5000-wide weights). A BLAS is not linked at build time — CI machines have none and a
//! source build of one would dominate the build — but opened with `dlopen` when present:
//!
//! 1. `KEDIT_BLAS=/path/to/lib.so` names the library; `KEDIT_BLAS=off` disables it;
//! 2. otherwise a copy that `kedit fetch mkl` or `kedit fetch openblas` installed in the cache
//!    (`$KEDIT_HOME`, else `~/.cache/kedit`, then [`CACHED_MKL`] or [`CACHED_LIBRARY`]) is used
//!    when it exists, MKL first: on the products of prefill and editing it is 1.3–1.6× as fast
//!    as OpenBLAS on AVX-512 machines (`examples/prefill_products.rs`);
//! 3. otherwise callers fall back to their own GEMM.
//!
//! The library is driven single-threaded from each of rayon's threads, every thread taking a
//! slice of the output columns, so that kedit runs one thread pool rather than two competing
//! ones (a BLAS's own workers spin between calls, which starves rayon's). Any CBLAS works: the
//! symbol is looked up as `scipy_cblas_sgemm` (the PyPI `scipy-openblas32` build) and then as
//! plain `cblas_sgemm` (system OpenBLAS, MKL's `libmkl_rt`, BLIS). MKL is switched to its
//! sequential threading layer before its first call, so it needs neither OpenMP nor TBB.

use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rayon::prelude::*;

/// Where `kedit fetch openblas` puts the library, relative to the kedit cache root.
pub const CACHED_LIBRARY: &str = "blas/scipy-openblas32/lib/libscipy_openblas.so";

/// Where `kedit fetch mkl` puts MKL's single dynamic library (its other parts lie beside it),
/// relative to the kedit cache root.
pub const CACHED_MKL: &str = "blas/mkl/lib/libmkl_rt.so.3";

/// The cached libraries in the order they are preferred.
const CACHED_LIBRARIES: [&str; 2] = [CACHED_MKL, CACHED_LIBRARY];

/// MKL's `MKL_THREADING_SEQUENTIAL`.
const MKL_THREADING_SEQUENTIAL: c_int = 1;

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

type SgemmFn = unsafe extern "C" fn(
    layout: c_int,
    trans_a: c_int,
    trans_b: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
);
type DsyrkFn = unsafe extern "C" fn(
    layout: c_int,
    uplo: c_int,
    trans: c_int,
    n: c_int,
    k: c_int,
    alpha: f64,
    a: *const f64,
    lda: c_int,
    beta: f64,
    c: *mut f64,
    ldc: c_int,
);
type SetThreadsFn = unsafe extern "C" fn(c_int);
type SetThreadingLayerFn = unsafe extern "C" fn(c_int) -> c_int;

const UPPER: c_int = 121;

/// A loaded CBLAS `sgemm`.
pub struct Blas {
    sgemm: SgemmFn,
    dsyrk: Option<DsyrkFn>,
    path: PathBuf,
    symbol: &'static str,
    // Keeps the code behind `sgemm` mapped; never unloaded.
    _library: libloading::Library,
}

/// Why no BLAS is in use, for reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlasStatus {
    Loaded { path: PathBuf, symbol: &'static str },
    Disabled,
    NotInstalled { looked_at: PathBuf },
    Failed { path: PathBuf, reason: String },
}

impl std::fmt::Display for BlasStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Loaded { path, symbol } => write!(f, "{} ({symbol})", path.display()),
            Self::Disabled => write!(f, "disabled by KEDIT_BLAS=off"),
            Self::NotInstalled { looked_at } => write!(
                f,
                "none ({} is missing; `kedit fetch openblas` or `kedit fetch mkl` installs one)",
                looked_at.display()
            ),
            Self::Failed { path, reason } => {
                write!(f, "none (cannot load {}: {reason})", path.display())
            }
        }
    }
}

static BLAS: OnceLock<(Option<Blas>, BlasStatus)> = OnceLock::new();

/// The process's BLAS, loaded on first use; `None` when there is none (see [`status`]).
pub fn get() -> Option<&'static Blas> {
    init().0.as_ref()
}

/// What [`get`] found: the library in use, or why there is none.
pub fn status() -> &'static BlasStatus {
    &init().1
}

fn init() -> &'static (Option<Blas>, BlasStatus) {
    BLAS.get_or_init(|| {
        let path = match std::env::var_os("KEDIT_BLAS").filter(|v| !v.is_empty()) {
            Some(v) if v == "off" || v == "0" || v == "none" => {
                return (None, BlasStatus::Disabled)
            }
            Some(v) => PathBuf::from(v),
            None => match default_path() {
                Some(p) if p.is_file() => p,
                Some(p) => return (None, BlasStatus::NotInstalled { looked_at: p }),
                None => {
                    return (
                        None,
                        BlasStatus::NotInstalled {
                            looked_at: PathBuf::from("~/.cache/kedit").join(CACHED_LIBRARY),
                        },
                    )
                }
            },
        };
        match Blas::open(&path) {
            Ok(b) => {
                let status = BlasStatus::Loaded {
                    path: b.path.clone(),
                    symbol: b.symbol,
                };
                (Some(b), status)
            }
            Err(reason) => (None, BlasStatus::Failed { path, reason }),
        }
    })
}

/// The cached library to use: `$KEDIT_HOME/…` or `~/.cache/kedit/…`, MKL when it is installed,
/// else OpenBLAS (whose path is returned, for the report, when neither is).
pub fn default_path() -> Option<PathBuf> {
    let root = match std::env::var_os("KEDIT_HOME").filter(|v| !v.is_empty()) {
        Some(home) => PathBuf::from(home),
        None => PathBuf::from(std::env::var_os("HOME")?)
            .join(".cache")
            .join("kedit"),
    };
    Some(preferred_in(&root))
}

/// The first of [`CACHED_LIBRARIES`] installed under `root`, else OpenBLAS's path.
fn preferred_in(root: &Path) -> PathBuf {
    CACHED_LIBRARIES
        .iter()
        .map(|rel| root.join(rel))
        .find(|p| p.is_file())
        .unwrap_or_else(|| root.join(CACHED_LIBRARY))
}

impl Blas {
    /// Opens `path` and finds its `sgemm`; sets the library's own threads to one.
    pub fn open(path: &Path) -> Result<Self, String> {
        // SAFETY: loading a shared library runs its initialisers; a CBLAS's only set up its
        // thread pool and CPU detection.
        let library = unsafe { libloading::Library::new(path) }.map_err(|e| e.to_string())?;
        // MKL picks its threading layer at its first call and, left to itself, loads Intel's
        // OpenMP runtime (and exits the process when that is missing).
        // SAFETY: `MKL_Set_Threading_Layer(int) -> int`, called before any other MKL function.
        if let Ok(f) = unsafe { library.get::<SetThreadingLayerFn>(b"MKL_Set_Threading_Layer") } {
            unsafe { f(MKL_THREADING_SEQUENTIAL) };
        }
        let mut found = None;
        for symbol in ["scipy_cblas_sgemm", "cblas_sgemm"] {
            // SAFETY: the CBLAS `sgemm` signature is fixed by the standard.
            if let Ok(f) = unsafe { library.get::<SgemmFn>(symbol.as_bytes()) } {
                found = Some((*f, symbol));
                break;
            }
        }
        let (sgemm, symbol) =
            found.ok_or_else(|| "it has neither scipy_cblas_sgemm nor cblas_sgemm".to_string())?;
        // SAFETY: the CBLAS `dsyrk` signature is fixed by the standard.
        let dsyrk = ["scipy_cblas_dsyrk", "cblas_dsyrk"].iter().find_map(|s| {
            unsafe { library.get::<DsyrkFn>(s.as_bytes()) }
                .ok()
                .map(|f| *f)
        });
        for setter in [
            "scipy_openblas_set_num_threads",
            "openblas_set_num_threads",
            "MKL_Set_Num_Threads",
            "bli_thread_set_num_threads",
        ] {
            // SAFETY: each of these takes one int, the thread count.
            if let Ok(f) = unsafe { library.get::<SetThreadsFn>(setter.as_bytes()) } {
                unsafe { f(1) };
                break;
            }
        }
        Ok(Self {
            sgemm,
            dsyrk,
            path: path.to_path_buf(),
            symbol,
            _library: library,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `x·Wᵀ` for row-major `x: [m, k]`, `w: [n, k]`, as a new row-major `[m, n]`.
    ///
    /// # Panics
    /// When the slice lengths do not match the shapes.
    pub fn matmul_nt(&self, x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * k, "blas matmul_nt: x is not [{m}, {k}]");
        assert_eq!(w.len(), n * k, "blas matmul_nt: w is not [{n}, {k}]");
        // SAFETY: with beta = 0 sgemm writes every element of its output without reading it.
        unsafe {
            fresh_output(m * n, |y| {
                self.over_columns(m, k, n, |j0, j1| {
                    // Columns j0..j1 of each row of y: disjoint from every other call's.
                    (self.sgemm)(
                        ROW_MAJOR,
                        NO_TRANS,
                        TRANS,
                        m as c_int,
                        (j1 - j0) as c_int,
                        k as c_int,
                        1.0,
                        x.as_ptr(),
                        k as c_int,
                        w.as_ptr().add(j0 * k),
                        k as c_int,
                        0.0,
                        y.get().add(j0),
                        n as c_int,
                    )
                })
            })
        }
    }

    /// `g·W` for row-major `g: [m, n]`, `w: [n, k]`, as a new row-major `[m, k]` (the input
    /// gradient of `x·Wᵀ`).
    ///
    /// # Panics
    /// When the slice lengths do not match the shapes.
    pub fn matmul_nn(&self, g: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        assert_eq!(g.len(), m * n, "blas matmul_nn: g is not [{m}, {n}]");
        assert_eq!(w.len(), n * k, "blas matmul_nn: w is not [{n}, {k}]");
        // SAFETY: as in `matmul_nt`; columns j0..j1 of W are read with its full row stride.
        unsafe {
            fresh_output(m * k, |y| {
                self.over_columns(m, n, k, |j0, j1| {
                    (self.sgemm)(
                        ROW_MAJOR,
                        NO_TRANS,
                        NO_TRANS,
                        m as c_int,
                        (j1 - j0) as c_int,
                        n as c_int,
                        1.0,
                        g.as_ptr(),
                        n as c_int,
                        w.as_ptr().add(j0),
                        k as c_int,
                        0.0,
                        y.get().add(j0),
                        k as c_int,
                    )
                })
            })
        }
    }

    /// `c += xᵀ·x` in f64 for row-major `x: [n, d]` and `c: [d, d]` (both triangles), by `dsyrk`,
    /// which computes one triangle: half a GEMM's work. `false` (nothing done) when the library
    /// has no `dsyrk`.
    ///
    /// # Panics
    /// When the slice lengths do not match the shapes.
    pub fn accumulate_gram_f64(&self, x: &[f64], n: usize, d: usize, c: &mut [f64]) -> bool {
        assert_eq!(x.len(), n * d, "blas gram: x is not [{n}, {d}]");
        assert_eq!(c.len(), d * d, "blas gram: c is not [{d}, {d}]");
        let Some(dsyrk) = self.dsyrk else {
            return false;
        };
        // SAFETY: shapes checked above; dsyrk reads x and updates the upper triangle of c.
        unsafe {
            dsyrk(
                ROW_MAJOR,
                UPPER,
                TRANS,
                d as c_int,
                n as c_int,
                1.0,
                x.as_ptr(),
                d as c_int,
                1.0,
                c.as_mut_ptr(),
                d as c_int,
            )
        };
        // The lower triangle was left as it was: rebuild it from the upper one.
        for i in 0..d {
            for j in 0..i {
                c[i * d + j] = c[j * d + i];
            }
        }
        true
    }

    /// Runs `f(j0, j1)` over column ranges of an `[m, cols]` output, one per rayon thread when
    /// the product is large enough to be worth splitting.
    fn over_columns(&self, m: usize, inner: usize, cols: usize, f: impl Fn(usize, usize) + Sync) {
        let threads = rayon::current_num_threads().max(1);
        // Below ~4 MFLOP a split costs more in wake-ups than it saves.
        let parts = if m * inner * cols < (1 << 21) || cols < 64 {
            1
        } else {
            threads.min(cols / 32)
        };
        if parts <= 1 {
            f(0, cols);
            return;
        }
        // Column blocks of a multiple of 16, so every part keeps whole vector tiles.
        let per = cols.div_ceil(parts).div_ceil(16) * 16;
        (0..parts).into_par_iter().for_each(|p| {
            let j0 = (p * per).min(cols);
            let j1 = ((p + 1) * per).min(cols);
            if j0 < j1 {
                f(j0, j1);
            }
        });
    }
}

/// A vector of `len` floats that `fill` writes completely through the pointer it is given, without
/// zeroing it first (an editing step allocates hundreds of megabytes of product outputs).
///
/// # Safety
/// `fill` must write all `len` elements.
unsafe fn fresh_output(len: usize, fill: impl FnOnce(SendPtr)) -> Vec<f32> {
    let mut y: Vec<f32> = Vec::with_capacity(len);
    fill(SendPtr(y.as_mut_ptr()));
    // SAFETY: the caller guarantees that `fill` initialised all `len` elements.
    unsafe { y.set_len(len) };
    y
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the pointer is only written through at disjoint column ranges (see `over_columns`),
// while the vector it points into outlives every thread that uses it.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The process's BLAS; when `KEDIT_BLAS` names one (as `.ci/run` does) it must load.
    fn blas_under_test() -> Option<&'static Blas> {
        let b = get();
        if b.is_none() {
            let required = std::env::var_os("KEDIT_BLAS").is_some_and(|v| v != "off");
            assert!(
                !required,
                "KEDIT_BLAS is set but no BLAS loaded: {}",
                status()
            );
            eprintln!("no BLAS installed, nothing to check: {}", status());
        }
        b
    }

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    #[test]
    fn products_match_a_f64_reference_on_split_and_ragged_shapes() {
        let Some(blas) = blas_under_test() else {
            return;
        };
        // Column counts that split across threads unevenly, tails below a vector width, and
        // one product too small to split.
        for &(m, k, n) in &[
            (9, 17, 33),
            (64, 576, 1536),
            (100, 129, 2051),
            (3, 1000, 64),
        ] {
            let x = random(m * k, (m * k) as u64);
            let w = random(n * k, (n * k + 1) as u64);
            let y = blas.matmul_nt(&x, &w, m, k, n);
            let g = random(m * n, (m * n + 2) as u64);
            let dx = blas.matmul_nn(&g, &w, m, n, k);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                        .sum();
                    let got = y[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (k as f64).sqrt(),
                        "x·Wᵀ [{m}, {k}]·[{n}, {k}]ᵀ at ({i}, {j}): {got} vs {want}"
                    );
                }
                for p in 0..k {
                    let want: f64 = (0..n)
                        .map(|j| g[i * n + j] as f64 * w[j * k + p] as f64)
                        .sum();
                    let got = dx[i * k + p] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (n as f64).sqrt(),
                        "g·W [{m}, {n}]·[{n}, {k}] at ({i}, {p}): {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn mkl_is_preferred_when_both_are_cached_and_openblas_is_named_when_neither_is() {
        let root = tempfile::tempdir().unwrap();
        let openblas = root.path().join(CACHED_LIBRARY);
        assert_eq!(preferred_in(root.path()), openblas);
        std::fs::create_dir_all(openblas.parent().unwrap()).unwrap();
        std::fs::write(&openblas, b"x").unwrap();
        assert_eq!(preferred_in(root.path()), openblas);
        let mkl = root.path().join(CACHED_MKL);
        std::fs::create_dir_all(mkl.parent().unwrap()).unwrap();
        std::fs::write(&mkl, b"x").unwrap();
        assert_eq!(preferred_in(root.path()), mkl);
    }

    #[test]
    fn the_f64_gram_accumulates_both_triangles() {
        let Some(blas) = blas_under_test() else {
            return;
        };
        let (n, d) = (37, 19);
        let x: Vec<f64> = random(n * d, 11).into_iter().map(f64::from).collect();
        let mut c = vec![1.0; d * d];
        assert!(blas.accumulate_gram_f64(&x, n, d, &mut c), "no dsyrk");
        assert!(blas.accumulate_gram_f64(&x, n, d, &mut c));
        for i in 0..d {
            for j in 0..d {
                let want = 1.0 + 2.0 * (0..n).map(|t| x[t * d + i] * x[t * d + j]).sum::<f64>();
                assert!((c[i * d + j] - want).abs() < 1e-12, "({i}, {j})");
            }
        }
    }

    #[test]
    fn a_library_without_sgemm_is_refused_with_its_path() {
        // libc is always there and has no sgemm.
        let err = Blas::open(Path::new("libc.so.6"))
            .err()
            .expect("libc has no sgemm");
        assert!(err.contains("cblas_sgemm"), "{err}");
        let err = Blas::open(Path::new("/nonexistent/libblas.so"))
            .err()
            .expect("a missing file cannot load");
        assert!(err.contains("/nonexistent/libblas.so"), "{err}");
    }
}

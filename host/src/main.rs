//! `kedit`: parse the command line, run the command, and turn an error into `error: ...` lines
//! and exit status 1 (never a panic backtrace for a user's mistake).

use std::process::ExitCode;

use clap::Parser;
use kedit::cli::{run, Cli};

fn main() -> ExitCode {
    restore_default_sigpipe();
    pin_compute_threads();
    keep_freed_memory();
    let cli = Cli::parse();
    kedit::logging::init(cli.global.verbose);
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Rust ignores SIGPIPE, so `kedit plugins | head` would panic on the closed pipe; a command-line
/// tool should end quietly like any other Unix tool.
#[cfg(unix)]
fn restore_default_sigpipe() {
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    const SIGPIPE: i32 = 13; // Linux and the BSDs (macOS) alike.
    const SIG_DFL: usize = 0;
    // SAFETY: resetting a signal to its default disposition before any thread exists.
    unsafe {
        signal(SIGPIPE, SIG_DFL);
    }
}

#[cfg(not(unix))]
fn restore_default_sigpipe() {}

/// Every tensor op allocates its output, and an editing step frees and reallocates the same few
/// megabyte-sized buffers hundreds of times. glibc serves buffers above its mmap threshold with
/// fresh `mmap`s and trims the heap top back to the kernel, so each such buffer costs page faults
/// and the kernel zeroing its pages: about a fifth of a ROME optimisation step's CPU time. A fixed
/// threshold at glibc's maximum (32 MiB) and a heap that is not trimmed keep those buffers in the
/// process for reuse; memory that was needed once is kept, which is what the next step needs
/// anyway.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    // glibc's malloc.h.
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    if std::env::var_os("KEDIT_MALLOC_DEFAULTS").is_some() {
        return;
    }
    // SAFETY: mallopt only changes tuning parameters; called before any thread exists.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

/// candle asks for the thread count on every matmul and, unless `RAYON_NUM_THREADS` is set,
/// re-reads the CPU topology each time (6–10% of decode time on SmolLM2). Fixing it once here,
/// before any thread exists, removes that cost for the model plugins in this process.
///
/// candle's element-wise ops run on a second pool of threads that spin at a barrier between ops
/// (`BarrierGuard::drop`, up to 25,000 spins before a worker parks). Those spinning threads take
/// the cores from the rayon threads doing the matmuls: a ROME edit on SmolLM2 spent half its CPU
/// time spinning (59 s against 22 s with the pool off, same machine, same load). Element-wise ops
/// are memory-bound and small here, so they run on the calling thread (`CANDLE_NUM_THREADS=1`);
/// matmuls keep every core through rayon. Users can still set either variable themselves.
fn pin_compute_threads() {
    // Called first thing in main, while the process is still single-threaded.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

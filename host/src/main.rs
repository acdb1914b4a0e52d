//! `kedit`: parse the command line, run the command, and turn an error into `error: ...` lines
//! and exit status 1 (never a panic backtrace for a user's mistake).

use std::process::ExitCode;

use clap::Parser;
use kedit::cli::{run, Cli};

fn main() -> ExitCode {
    restore_default_sigpipe();
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

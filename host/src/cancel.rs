//! Ctrl-C handling. The first Ctrl-C asks the running edit to stop (the editor sees it through
//! its progress callback, returns `Cancelled`, and the host rolls the model back); a second one
//! exits at once, for an editor that never looks at its progress.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Clone, Debug, Default)]
pub struct CancelFlag {
    requested: Arc<AtomicBool>,
}

/// Exit status of a process ended by a second Ctrl-C (128 + SIGINT).
pub const EXIT_INTERRUPTED: i32 = 130;

impl CancelFlag {
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes Ctrl-C to this flag. Only one handler can exist per process; a second install is
    /// reported and ignored.
    pub fn install_ctrlc_handler(&self) {
        let requested = self.requested.clone();
        let presses = AtomicUsize::new(0);
        let result = ctrlc::set_handler(move || {
            if presses.fetch_add(1, Ordering::SeqCst) == 0 {
                requested.store(true, Ordering::SeqCst);
                eprintln!(
                    "\ninterrupt: stopping the current edit and rolling it back \
                     (press Ctrl-C again to quit at once)"
                );
            } else {
                eprintln!("\ninterrupted");
                std::process::exit(EXIT_INTERRUPTED);
            }
        });
        if let Err(e) = result {
            tracing::warn!("cannot install the Ctrl-C handler: {e}");
        }
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Requests cancellation (what Ctrl-C does; tests call it directly).
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
    }
}

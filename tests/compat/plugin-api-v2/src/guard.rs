//! Panic containment. A panic that unwinds across an `extern "C"` boundary aborts the whole host,
//! and `catch_unwind` on the host side cannot stop it; so every entry point of a plugin runs its
//! body through [`guard`], which turns a panic into an [`ErrorKind::Panic`] error.

use std::panic::{catch_unwind, AssertUnwindSafe};

use abi_stable::std_types::RResult;

use crate::error::{ErrorKind, PluginError};

/// Runs `f`, turning a panic into an error result.
pub fn guard<T>(f: impl FnOnce() -> Result<T, PluginError>) -> RResult<T, PluginError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(e),
        Err(payload) => RResult::RErr(PluginError::new(
            ErrorKind::Panic,
            format!("panicked: {}", panic_message(payload.as_ref())),
        )),
    }
}

/// Like [`guard`] for calls that cannot report an error: a panic yields `fallback`.
pub fn guard_or<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_with_its_message() {
        let r: RResult<(), PluginError> = guard(|| panic!("boom {}", 42));
        let e = r.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Panic);
        assert!(e.message.contains("boom 42"), "{e}");
        let ok = guard(|| Ok::<_, PluginError>(7)).unwrap();
        assert_eq!(ok, 7);
    }
}

//! Turning the `RResult<_, PluginError>` of an ABI call into a host error that names the plugin
//! and the call, so that a failure deep inside a plugin is still traceable to a file on disk.

use std::fmt;
use std::path::PathBuf;

use abi_stable::std_types::RResult;
use kedit_plugin_api::{ErrorKind, PluginError};

/// Which plugin a call went to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginId {
    pub name: String,
    pub path: PathBuf,
}

impl PluginId {
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
        }
    }

    /// Converts the result of the ABI call `call` into a host result.
    pub fn check<T>(
        &self,
        call: &str,
        result: RResult<T, PluginError>,
    ) -> Result<T, PluginCallError> {
        result.into_result().map_err(|error| PluginCallError {
            failure: Box::new(CallFailure {
                plugin: self.clone(),
                call: call.to_string(),
                error,
            }),
        })
    }
}

impl fmt::Display for PluginId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.path.display())
    }
}

/// A failed call into a plugin. Kept as a typed error inside `anyhow` chains so that the edit
/// session can tell a cancellation from a panic from an ordinary failure.
#[derive(Debug, Clone)]
pub struct PluginCallError {
    // Boxed: results carrying this error stay small on the happy path.
    failure: Box<CallFailure>,
}

#[derive(Debug, Clone)]
struct CallFailure {
    plugin: PluginId,
    call: String,
    error: PluginError,
}

impl PluginCallError {
    pub fn kind(&self) -> ErrorKind {
        self.failure.error.kind
    }

    pub fn plugin(&self) -> &PluginId {
        &self.failure.plugin
    }

    /// The ABI call that failed (`edit`, `generate`, ...).
    pub fn call(&self) -> &str {
        &self.failure.call
    }

    /// The plugin's own error.
    pub fn error(&self) -> &PluginError {
        &self.failure.error
    }
}

impl fmt::Display for PluginCallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let CallFailure {
            plugin,
            call,
            error,
        } = &*self.failure;
        match error.kind {
            ErrorKind::Panic => write!(
                f,
                "plugin {} ({}) panicked in {call}: {}",
                plugin.name,
                plugin.path.display(),
                panic_text(error)
            ),
            ErrorKind::Cancelled => write!(f, "plugin {plugin}: {call} cancelled: {error}"),
            kind => write!(
                f,
                "plugin {plugin}: {call} failed ({}): {error}",
                kind.as_str()
            ),
        }
    }
}

impl std::error::Error for PluginCallError {}

/// The panic message without the guard's own `panicked: ` prefix (the sentence around it already
/// says that the plugin panicked).
fn panic_text(error: &PluginError) -> String {
    let full = error.to_string();
    match full.find("panicked: ") {
        Some(at) => format!("{}{}", &full[..at], &full[at + "panicked: ".len()..]),
        None => full,
    }
}

/// The kind of the plugin error somewhere in `error`'s chain, if any.
pub fn plugin_error_kind(error: &anyhow::Error) -> Option<ErrorKind> {
    error
        .chain()
        .find_map(|cause| cause.downcast_ref::<PluginCallError>())
        .map(PluginCallError::kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_names_plugin_path_call_and_message_once() {
        let id = PluginId::new("boomer", "/x/libkedit_boomer.so");
        let err = id
            .check::<()>(
                "edit",
                RResult::RErr(PluginError::new(ErrorKind::Panic, "panicked: boom 42")),
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "plugin boomer (/x/libkedit_boomer.so) panicked in edit: boom 42"
        );
        let any = anyhow::Error::new(err).context("request 3");
        assert_eq!(plugin_error_kind(&any), Some(ErrorKind::Panic));
    }

    #[test]
    fn ordinary_failures_keep_kind_and_context() {
        let id = PluginId::new("ft", "/x/libkedit_editor_ft.so");
        let e = PluginError::invalid("lr must be positive").context("reading hparams");
        let err = id.check::<()>("edit", RResult::RErr(e)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "plugin ft (/x/libkedit_editor_ft.so): edit failed (invalid input): reading hparams: \
             lr must be positive"
        );
    }
}

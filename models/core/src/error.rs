//! One error type for the runtime, so that candle errors and the ABI's [`PluginError`] both
//! travel with `?` and leave every ABI entry point as a `PluginError` with context.

use std::fmt;

use kedit_plugin_api::PluginError;

use crate::gguf::GgufError;

/// A runtime error: either a [`PluginError`] (with its kind) or a candle failure, which is a bug
/// or a resource problem inside the plugin and becomes an `Internal` error.
#[derive(Debug)]
pub enum Error {
    Plugin(PluginError),
    Candle(candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<PluginError> for Error {
    fn from(e: PluginError) -> Self {
        Error::Plugin(e)
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

impl From<GgufError> for Error {
    fn from(e: GgufError) -> Self {
        let kind = match &e {
            GgufError::Io { .. } => kedit_plugin_api::ErrorKind::Io,
            GgufError::MissingTensor { .. } | GgufError::MissingKey { .. } => {
                kedit_plugin_api::ErrorKind::NotFound
            }
            GgufError::UnsupportedType { .. } | GgufError::UnsupportedVersion { .. } => {
                kedit_plugin_api::ErrorKind::Unsupported
            }
            _ => kedit_plugin_api::ErrorKind::InvalidInput,
        };
        Error::Plugin(PluginError::new(kind, e.to_string()))
    }
}

impl From<Error> for PluginError {
    fn from(e: Error) -> Self {
        match e {
            Error::Plugin(p) => p,
            Error::Candle(c) => PluginError::internal(format!("tensor operation failed: {c}")),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Plugin(p) => write!(f, "{p}"),
            Error::Candle(c) => write!(f, "tensor operation failed: {c}"),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// Adds an outer context line ("while loading X").
    pub fn context(self, context: impl Into<String>) -> Self {
        Error::Plugin(PluginError::from(self).context(context))
    }
}

/// `.context(..)` for any result whose error converts into [`Error`].
pub trait Context<T> {
    fn context(self, context: impl Into<String>) -> Result<T>;
    fn with_context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|e| e.into().context(context))
    }
    fn with_context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| e.into().context(f()))
    }
}

/// Shorthands for the error kinds the runtime produces.
pub fn invalid(message: impl Into<String>) -> Error {
    Error::Plugin(PluginError::invalid(message))
}

pub fn not_found(message: impl Into<String>) -> Error {
    Error::Plugin(PluginError::not_found(message))
}

pub fn unsupported(message: impl Into<String>) -> Error {
    Error::Plugin(PluginError::unsupported(message))
}

pub fn io(message: impl Into<String>) -> Error {
    Error::Plugin(PluginError::io(message))
}

pub fn numeric(message: impl Into<String>) -> Error {
    Error::Plugin(PluginError::numeric(message))
}

pub fn internal(message: impl Into<String>) -> Error {
    Error::Plugin(PluginError::internal(message))
}

//! The typed error that every ABI call returns. It carries a kind the host can act on, a message
//! and a chain of context lines (outermost first), so nothing a plugin knew about a failure is lost.

use std::fmt;

use abi_stable::{
    std_types::{RString, RVec},
    StableAbi,
};

/// What went wrong, as far as the caller needs to decide what to do next.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller passed something malformed (bad shape, unknown site, bad hparams).
    InvalidInput,
    /// A file, tensor, key or item does not exist.
    NotFound,
    /// A valid request this plugin does not support (a quantisation type, a capability).
    Unsupported,
    /// Reading or writing a file failed.
    Io,
    /// A computation produced NaN or infinity, or diverged.
    Numeric,
    /// The plugin panicked; the call was abandoned and the panic contained.
    Panic,
    /// The caller asked to stop (Ctrl-C, a progress callback returning false).
    Cancelled,
    /// A bug or an unexpected state inside the plugin.
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::NotFound => "not found",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Io => "I/O error",
            ErrorKind::Numeric => "numeric error",
            ErrorKind::Panic => "plugin panicked",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "internal error",
        }
    }
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct PluginError {
    pub kind: ErrorKind,
    pub message: RString,
    /// Context added while the error travelled outwards, outermost first.
    pub context: RVec<RString>,
}

impl PluginError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: RString::from(message.into()),
            context: RVec::new(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    pub fn io(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Io, message)
    }

    pub fn numeric(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Numeric, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    pub fn cancelled() -> Self {
        Self::new(ErrorKind::Cancelled, "stopped on request")
    }

    /// Adds an outer context line ("while loading X").
    pub fn context(mut self, context: impl Into<String>) -> Self {
        self.context.insert(0, RString::from(context.into()));
        self
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.context.iter() {
            write!(f, "{c}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for PluginError {}

/// Adds context to results that carry a [`PluginError`].
pub trait ResultExt<T> {
    fn context(self, context: impl Into<String>) -> Result<T, PluginError>;
    fn with_context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T, PluginError>;
}

impl<T> ResultExt<T> for Result<T, PluginError> {
    fn context(self, context: impl Into<String>) -> Result<T, PluginError> {
        self.map_err(|e| e.context(context))
    }
    fn with_context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T, PluginError> {
        self.map_err(|e| e.context(f()))
    }
}

//! Plugin loading and lookup.

mod abi_error;
mod call;
mod discovery;
mod loader;
mod registry;

pub use abi_error::{trim_abi_error, MAX_ABI_ERROR_LINES};
pub use call::{plugin_error_kind, PluginCallError, PluginId};
pub use discovery::{binary_dir, is_kedit_library_name, libraries_in, PluginSources};
pub use loader::{host_api_version, load_plugin, open_request, LoadError, LoadedPlugin};
pub use registry::{require_kind, LoadFailure, Registry, WrongKind};

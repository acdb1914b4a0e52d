//! Loading one plugin file.
//!
//! Every file gets its own `RawLibrary` and its own root module through
//! `lib_header_from_raw_library` + `init_root_module`: `RootModule::load_from_file` caches one
//! module per root type and would hand out the first plugin for every later file. Libraries are
//! never unloaded — model and editor objects and their vtables live in them for the whole
//! process, and abi_stable itself never unloads either.
//!
//! Each way a file can fail is a short [`LoadError`] naming the file; nothing here panics.

use std::fmt;
use std::path::{Path, PathBuf};

use abi_stable::library::{
    lib_header_from_raw_library, LibraryError, RawLibrary, RootModule,
    ROOT_MODULE_LOADER_NAME_WITH_NUL,
};
use abi_stable::std_types::{ROption, RResult, RString};
use kedit_plugin_api::plugin::init_root_module;
use kedit_plugin_api::{
    kind, EditorBox, HostServicesBox, JudgeBox, ModelBox, OpenRequest, PluginError, PluginInfo,
    PluginModRef, API_LEVEL,
};

use super::abi_error::{trim_abi_error, MAX_ABI_ERROR_LINES};
use super::call::{PluginCallError, PluginId};

/// The kedit-plugin-api version this host was built against.
pub fn host_api_version() -> String {
    PluginModRef::VERSION_STRINGS.version.to_string()
}

/// Why a file could not be used as a plugin.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadError {
    Missing {
        path: PathBuf,
    },
    NotAPlugin {
        path: PathBuf,
        reason: String,
    },
    /// Built against an incompatible kedit-plugin-api or abi_stable.
    AbiMismatch {
        path: PathBuf,
        details: String,
    },
    /// Built against a newer API level than this host implements.
    ApiTooNew {
        path: PathBuf,
        name: String,
        plugin_level: u32,
    },
    /// A plugin kind this host does not know (a newer plugin-api).
    UnknownKind {
        path: PathBuf,
        name: String,
        kind: u32,
    },
    /// The plugin's `info` call failed or panicked.
    InfoFailed {
        path: PathBuf,
        error: String,
    },
}

impl LoadError {
    pub fn path(&self) -> &Path {
        match self {
            LoadError::Missing { path }
            | LoadError::NotAPlugin { path, .. }
            | LoadError::AbiMismatch { path, .. }
            | LoadError::ApiTooNew { path, .. }
            | LoadError::UnknownKind { path, .. }
            | LoadError::InfoFailed { path, .. } => path,
        }
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Missing { path } => {
                write!(f, "{}: plugin file not found", path.display())
            }
            LoadError::NotAPlugin { path, reason } => {
                write!(f, "{}: not a kedit plugin ({reason})", path.display())
            }
            LoadError::AbiMismatch { path, details } => write!(
                f,
                "{}: plugin ABI or version mismatch:\n{}\nrebuild {} against kedit-plugin-api {} \
                 (cargo build --release)",
                path.display(),
                indent(details),
                path.display(),
                host_api_version()
            ),
            LoadError::ApiTooNew {
                path,
                name,
                plugin_level,
            } => write!(
                f,
                "{}: plugin {name} needs kedit API level {plugin_level}, but this kedit \
                 implements level {API_LEVEL}; upgrade kedit or use an older build of the plugin",
                path.display()
            ),
            LoadError::UnknownKind { path, name, kind } => write!(
                f,
                "{}: plugin {name} is of kind {kind}, which this kedit does not know; upgrade kedit",
                path.display(),
            ),
            // The message names the path already.
            LoadError::InfoFailed { error, .. } => f.write_str(error),
        }
    }
}

impl std::error::Error for LoadError {}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A loaded plugin: its root module and what it says about itself.
#[derive(Clone)]
pub struct LoadedPlugin {
    pub id: PluginId,
    pub info: PluginInfo,
    module: PluginModRef,
    layout_level: u32,
}

impl fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("id", &self.id)
            .field("info", &self.info)
            .finish()
    }
}

impl LoadedPlugin {
    /// Wraps a root module that is already in memory (a loaded library, or a module built in
    /// this process by tests), checking its info.
    pub fn from_module(
        path: &Path,
        module: PluginModRef,
        layout_level: u32,
    ) -> Result<Self, LoadError> {
        let provisional = PluginId::new(file_stem(path), path);
        let info =
            provisional
                .check("info", (module.info())())
                .map_err(|e| LoadError::InfoFailed {
                    path: path.to_path_buf(),
                    error: e.to_string(),
                })?;
        let name = info.name.to_string();
        if info.api_level > API_LEVEL {
            return Err(LoadError::ApiTooNew {
                path: path.to_path_buf(),
                name,
                plugin_level: info.api_level,
            });
        }
        if !is_known_kind(info.kind) {
            return Err(LoadError::UnknownKind {
                path: path.to_path_buf(),
                name,
                kind: info.kind,
            });
        }
        Ok(Self {
            id: PluginId::new(name, path),
            info,
            module,
            layout_level,
        })
    }

    pub fn name(&self) -> &str {
        &self.id.name
    }

    pub fn path(&self) -> &Path {
        &self.id.path
    }

    pub fn kind(&self) -> u32 {
        self.info.kind
    }

    pub fn kind_name(&self) -> &'static str {
        kind::name(self.info.kind)
    }

    pub fn is_family(&self) -> bool {
        self.info.kind == kind::MODEL_FAMILY
    }

    pub fn is_editor(&self) -> bool {
        self.info.kind == kind::EDITOR
    }

    pub fn is_judge(&self) -> bool {
        self.info.kind == kind::JUDGE
    }

    /// The API level of the root-module layout the plugin passed (older plugins load through
    /// the frozen layout of their level).
    pub fn layout_level(&self) -> u32 {
        self.layout_level
    }

    /// The family this plugin would use for `checkpoint`, if it recognises it.
    pub fn probe(&self, checkpoint: &Path) -> Result<Option<String>, PluginCallError> {
        let path = checkpoint.to_string_lossy();
        let found = self
            .id
            .check("probe", (self.module.probe())(path.as_ref().into()))?;
        Ok(found.into_option().map(RString::into_string))
    }

    pub fn open_model(&self, request: &OpenRequest) -> Result<ModelBox, PluginCallError> {
        self.id
            .check("open_model", (self.module.open_model())(request))
    }

    /// Lends the plugin the host's services; a plugin older than API level 3 has no use for
    /// them and is left alone.
    pub fn attach_host(&self, services: HostServicesBox) -> Result<(), PluginCallError> {
        match self.module.attach_host() {
            Some(attach) => self.id.check("attach_host", attach(services)),
            None => Ok(()),
        }
    }

    pub fn new_editor(&self) -> Result<EditorBox, PluginCallError> {
        self.id.check("new_editor", (self.module.new_editor())())
    }

    /// A judge plugin's judge; a plugin built before API level 2 has none.
    pub fn new_judge(&self) -> Result<JudgeBox, PluginCallError> {
        match self.module.new_judge() {
            Some(new_judge) => self.id.check("new_judge", new_judge()),
            None => self.id.check(
                "new_judge",
                RResult::RErr(PluginError::unsupported(
                    "this plugin was built before judges existed (API level 1)",
                )),
            ),
        }
    }

    /// The family names this plugin provides.
    pub fn family_names(&self) -> Vec<String> {
        self.info
            .families
            .iter()
            .map(|f| f.name.to_string())
            .collect()
    }

    /// The method names this plugin provides.
    pub fn method_names(&self) -> Vec<String> {
        self.info
            .methods
            .iter()
            .map(|m| m.name.to_string())
            .collect()
    }
}

/// Kinds this plugin-api names; a newer plugin-api may add more.
fn is_known_kind(k: u32) -> bool {
    kind::name(k) != kind::name(u32::MAX)
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Loads the plugin at `path`.
pub fn load_plugin(path: &Path) -> Result<LoadedPlugin, LoadError> {
    if !path.is_file() {
        return Err(LoadError::Missing {
            path: path.to_path_buf(),
        });
    }
    // A cheap look before abi_stable's: a library without abi_stable's root-module symbol is
    // not a plugin at all, and saying so beats abi_stable's symbol-lookup error. The handle stays
    // open until abi_stable has its own, so the file is mapped only once.
    let precheck = precheck(path)?;
    let (module, layout_level) = load_root_module(path)?;
    drop(precheck);
    LoadedPlugin::from_module(path, module, layout_level)
}

fn precheck(path: &Path) -> Result<libloading::Library, LoadError> {
    let not_a_plugin = |reason: String| LoadError::NotAPlugin {
        path: path.to_path_buf(),
        reason,
    };
    // SAFETY: opening a library runs its initialisers. We only open files the user pointed at
    // or files named `libkedit_*` next to the kedit binary.
    let library = unsafe { libloading::Library::new(path) }.map_err(|e| {
        not_a_plugin(format!(
            "cannot be loaded as a shared library: {}",
            first_line(&e.to_string())
        ))
    })?;
    // SAFETY: the symbol is only looked up, never dereferenced.
    let symbol = unsafe { library.get::<*const ()>(ROOT_MODULE_LOADER_NAME_WITH_NUL.as_bytes()) };
    if symbol.is_err() {
        return Err(not_a_plugin(
            "it does not export a kedit root module".to_string(),
        ));
    }
    Ok(library)
}

fn load_root_module(path: &Path) -> Result<(PluginModRef, u32), LoadError> {
    let raw = RawLibrary::load_at(path).map_err(|e| library_error(path, e))?;
    // The library stays loaded for the life of the process: the root module, its vtables and
    // every object the plugin hands out point into it.
    let raw: &'static RawLibrary = Box::leak(Box::new(raw));
    // SAFETY: `raw` is never unloaded, so the header's 'static references stay valid.
    let header = unsafe { lib_header_from_raw_library(raw) }.map_err(|e| library_error(path, e))?;
    // plugin-api's loader, not abi_stable's `init_root_module` directly: it also accepts plugins
    // built against older API levels (whose root modules have fewer fields).
    init_root_module(header).map_err(|e| library_error(path, e))
}

fn library_error(path: &Path, error: LibraryError) -> LoadError {
    let path = path.to_path_buf();
    match error {
        LibraryError::OpenError { err, .. } => LoadError::NotAPlugin {
            path,
            reason: format!(
                "cannot be loaded as a shared library: {}",
                first_line(&err.to_string())
            ),
        },
        LibraryError::GetSymbolError { .. } => LoadError::NotAPlugin {
            path,
            reason: "it does not export a kedit root module".to_string(),
        },
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => LoadError::AbiMismatch {
            path,
            details: format!(
                "Error: incompatible versions: the plugin was built against kedit-plugin-api \
                 {actual_version}, this kedit uses {expected_version}"
            ),
        },
        LibraryError::InvalidAbiHeader(_) => LoadError::AbiMismatch {
            path,
            details: "Error: the plugin was built with an incompatible version of abi_stable"
                .to_string(),
        },
        LibraryError::RootModule { err, .. } => LoadError::InfoFailed {
            error: format!(
                "{}: the plugin's root module failed to initialise: {}",
                path.display(),
                trim_abi_error(&err.to_string(), MAX_ABI_ERROR_LINES)
            ),
            path,
        },
        other => LoadError::AbiMismatch {
            path,
            details: trim_abi_error(&other.to_string(), MAX_ABI_ERROR_LINES),
        },
    }
}

fn first_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_string()
}

/// An `OpenRequest` for `path` on `device`.
pub fn open_request(path: &Path, family: Option<&str>, device: &str) -> OpenRequest {
    OpenRequest {
        path: path.to_string_lossy().as_ref().into(),
        family: match family {
            Some(f) => ROption::RSome(f.into()),
            None => ROption::RNone,
        },
        device: device.into(),
        options_json: "{}".into(),
    }
}

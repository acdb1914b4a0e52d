//! The root module every kedit plugin exports, and what it says about itself.
//!
//! Evolution: `PluginMod` is an abi_stable prefix type. Later minor versions append fields after
//! `new_editor` (a new plugin kind, a new entry point); a host reads them as `Option`s, so an older
//! plugin that lacks them still loads. Plugin kinds and API levels are plain integers rather than
//! enums so that a newer plugin's unknown kind is an ordinary error, not undefined behaviour.
//!
//! abi_stable itself only accepts a plugin whose root module has *at least* the fields of the
//! host's (a host with more fields reports "too many fields"). [`init_root_module`] therefore
//! checks a plugin against the current layout and, failing that, against the frozen layouts of
//! earlier API levels in [`layouts`]; a plugin that passes an older one is handed out as the
//! current [`PluginModRef`], whose accessors for the fields it lacks return `None`.
//!
//! History:
//! * API level 1 (0.1.0): `info`, `probe`, `open_model`, `new_editor`.
//! * API level 2 (0.1.1): `new_judge` (judge plugins, [`kind::JUDGE`]).

use abi_stable::{
    declare_root_module_statics,
    library::{LibHeader, LibraryError, RootModule},
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{ROption, RResult, RStr, RString, RVec},
    StableAbi,
};

use crate::editor::{EditorBox, MethodInfo};
use crate::error::PluginError;
use crate::host::HostServicesBox;
use crate::judge::JudgeBox;
use crate::model::ModelBox;

/// The API level this build of plugin-api implements. A plugin reports the level it was built
/// against; the host accepts any level up to its own.
///
/// * 1: model families and editors.
/// * 2: adds judge plugins (`PluginMod::new_judge`, [`kind::JUDGE`]).
/// * 3: adds host services for editors (`EditorAbi::attach_host`, [`crate::HostServices`]).
pub const API_LEVEL: u32 = 3;

/// Plugin kinds.
pub mod kind {
    pub const MODEL_FAMILY: u32 = 1;
    pub const EDITOR: u32 = 2;
    /// A safety judge (API level 2).
    pub const JUDGE: u32 = 3;

    pub fn name(kind: u32) -> &'static str {
        match kind {
            MODEL_FAMILY => "model family",
            EDITOR => "editor",
            JUDGE => "judge",
            _ => "unknown kind",
        }
    }
}

/// A model family a plugin can load.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct FamilyInfo {
    pub name: RString,
    pub description: RString,
    /// config.json `model_type` values, `architectures` entries and GGUF `general.architecture`
    /// values this family recognises.
    pub recognises: RVec<RString>,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct PluginInfo {
    pub kind: u32,
    pub name: RString,
    pub version: RString,
    /// The [`API_LEVEL`] the plugin was built against.
    pub api_level: u32,
    pub description: RString,
    /// For model-family plugins.
    pub families: RVec<FamilyInfo>,
    /// For editor plugins.
    pub methods: RVec<MethodInfo>,
    pub capabilities: RVec<RString>,
}

/// How the host asks a family plugin to open a checkpoint.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct OpenRequest {
    /// An HF checkpoint directory or a `.gguf` file.
    pub path: RString,
    /// Forces a family instead of detecting it from the checkpoint.
    pub family: ROption<RString>,
    /// "cpu" or "cuda:N".
    pub device: RString,
    /// Family-specific options as a JSON object (may be `{}`).
    pub options_json: RString,
}

#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(option))]
pub struct PluginMod {
    pub info: extern "C" fn() -> RResult<PluginInfo, PluginError>,
    /// For family plugins: the family this plugin would use for a checkpoint, if any.
    pub probe: extern "C" fn(path: RStr<'_>) -> RResult<ROption<RString>, PluginError>,
    pub open_model: extern "C" fn(request: &OpenRequest) -> RResult<ModelBox, PluginError>,
    #[sabi(last_prefix_field)]
    pub new_editor: extern "C" fn() -> RResult<EditorBox, PluginError>,
    // ---- API level 2 (0.1.1). Fields below are appended only; read them with the `Option`
    // accessors (`PluginModRef::new_judge()` is `None` for a plugin built against 0.1.0).
    /// For judge plugins: a new safety judge.
    pub new_judge: extern "C" fn() -> RResult<JudgeBox, PluginError>,
    // ---- API level 3 (0.1.2).
    /// Lends the plugin the host's services (text sources, a persistent cache), before the host
    /// creates editors; the plugin's code reaches them through [`crate::host::services`].
    pub attach_host: extern "C" fn(host: HostServicesBox) -> RResult<(), PluginError>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "kedit_plugin";
    const NAME: &'static str = "kedit_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// Declares a crate's root module. Give the functions the plugin has; the others answer with an
/// `Unsupported` error. Every entry point runs inside a panic guard.
///
/// ```ignore
/// kedit_plugin_api::export_plugin! {
///     info: my_info,            // fn() -> PluginInfo
///     new_editor: my_editor,    // fn() -> Result<EditorBox, PluginError>
/// }
/// ```
///
/// The entries, each optional but `info`, in this order: `info`, `probe`, `open_model`,
/// `new_editor`, `new_judge` (API level 2: `fn() -> Result<JudgeBox, PluginError>`).
#[macro_export]
macro_rules! export_plugin {
    (info: $info:path $(, probe: $probe:path)? $(, open_model: $open:path)? $(, new_editor: $editor:path)? $(, new_judge: $judge:path)? $(,)?) => {
        #[::abi_stable::export_root_module]
        pub fn kedit_plugin_root_module() -> $crate::plugin::PluginModRef {
            use ::abi_stable::prefix_type::PrefixTypeTrait;
            extern "C" fn __kedit_info() -> ::abi_stable::std_types::RResult<$crate::plugin::PluginInfo, $crate::PluginError> {
                $crate::guard::guard(|| Ok($info()))
            }
            #[allow(unused_variables)]
            extern "C" fn __kedit_probe(path: ::abi_stable::std_types::RStr<'_>) -> ::abi_stable::std_types::RResult<::abi_stable::std_types::ROption<::abi_stable::std_types::RString>, $crate::PluginError> {
                $crate::guard::guard(|| {
                    $( return $probe(path.as_str()).map(|f: Option<String>| f.map(::abi_stable::std_types::RString::from).into()); )?
                    #[allow(unreachable_code)]
                    Ok(::abi_stable::std_types::ROption::RNone)
                })
            }
            #[allow(unused_variables)]
            extern "C" fn __kedit_open_model(request: &$crate::plugin::OpenRequest) -> ::abi_stable::std_types::RResult<$crate::ModelBox, $crate::PluginError> {
                $crate::guard::guard(|| {
                    $( return $open(request); )?
                    #[allow(unreachable_code)]
                    Err($crate::PluginError::unsupported("this plugin does not provide model families"))
                })
            }
            extern "C" fn __kedit_new_editor() -> ::abi_stable::std_types::RResult<$crate::EditorBox, $crate::PluginError> {
                $crate::guard::guard(|| {
                    $( return $editor(); )?
                    #[allow(unreachable_code)]
                    Err($crate::PluginError::unsupported("this plugin does not provide editors"))
                })
            }
            extern "C" fn __kedit_new_judge() -> ::abi_stable::std_types::RResult<$crate::JudgeBox, $crate::PluginError> {
                $crate::guard::guard(|| {
                    $( return $judge(); )?
                    #[allow(unreachable_code)]
                    Err($crate::PluginError::unsupported("this plugin does not provide judges"))
                })
            }
            extern "C" fn __kedit_attach_host(host: $crate::HostServicesBox) -> ::abi_stable::std_types::RResult<(), $crate::PluginError> {
                $crate::guard::guard(|| {
                    $crate::host::set_services(host);
                    Ok(())
                })
            }
            $crate::plugin::PluginMod {
                info: __kedit_info,
                probe: __kedit_probe,
                open_model: __kedit_open_model,
                new_editor: __kedit_new_editor,
                new_judge: __kedit_new_judge,
                attach_host: __kedit_attach_host,
            }.leak_into_prefix()
        }
    };
}

/// Frozen root-module layouts of earlier API levels, used only to *check* an older plugin.
///
/// Each is a verbatim copy of [`PluginMod`] as that level shipped it — same type name, same
/// fields, same field types, same `last_prefix_field` — and must never change again.
pub mod layouts {
    /// API level 1 (kedit-plugin-api 0.1.0).
    pub mod v1 {
        use abi_stable::{
            declare_root_module_statics,
            library::RootModule,
            package_version_strings,
            sabi_types::VersionStrings,
            std_types::{ROption, RResult, RStr, RString},
            StableAbi,
        };

        use crate::editor::EditorBox;
        use crate::error::PluginError;
        use crate::model::ModelBox;
        use crate::plugin::{OpenRequest, PluginInfo};

        #[repr(C)]
        #[derive(StableAbi)]
        #[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
        #[sabi(missing_field(option))]
        pub struct PluginMod {
            pub info: extern "C" fn() -> RResult<PluginInfo, PluginError>,
            pub probe: extern "C" fn(path: RStr<'_>) -> RResult<ROption<RString>, PluginError>,
            pub open_model: extern "C" fn(request: &OpenRequest) -> RResult<ModelBox, PluginError>,
            #[sabi(last_prefix_field)]
            pub new_editor: extern "C" fn() -> RResult<EditorBox, PluginError>,
        }

        impl RootModule for PluginModRef {
            declare_root_module_statics! {PluginModRef}
            const BASE_NAME: &'static str = "kedit_plugin";
            const NAME: &'static str = "kedit_plugin";
            const VERSION_STRINGS: VersionStrings = package_version_strings!();
        }
    }

    /// API level 2 (kedit-plugin-api 0.1.1).
    pub mod v2 {
        use abi_stable::{
            declare_root_module_statics,
            library::RootModule,
            package_version_strings,
            sabi_types::VersionStrings,
            std_types::{ROption, RResult, RStr, RString},
            StableAbi,
        };

        use crate::editor::EditorBox;
        use crate::error::PluginError;
        use crate::judge::JudgeBox;
        use crate::model::ModelBox;
        use crate::plugin::{OpenRequest, PluginInfo};

        #[repr(C)]
        #[derive(StableAbi)]
        #[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
        #[sabi(missing_field(option))]
        pub struct PluginMod {
            pub info: extern "C" fn() -> RResult<PluginInfo, PluginError>,
            pub probe: extern "C" fn(path: RStr<'_>) -> RResult<ROption<RString>, PluginError>,
            pub open_model: extern "C" fn(request: &OpenRequest) -> RResult<ModelBox, PluginError>,
            #[sabi(last_prefix_field)]
            pub new_editor: extern "C" fn() -> RResult<EditorBox, PluginError>,
            pub new_judge: extern "C" fn() -> RResult<JudgeBox, PluginError>,
        }

        impl RootModule for PluginModRef {
            declare_root_module_statics! {PluginModRef}
            const BASE_NAME: &'static str = "kedit_plugin";
            const NAME: &'static str = "kedit_plugin";
            const VERSION_STRINGS: VersionStrings = package_version_strings!();
        }
    }
}

/// Checks a plugin's root module and returns it with the API level of the layout it passed.
///
/// Use this instead of `LibHeader::init_root_module::<PluginModRef>()`: abi_stable rejects a
/// plugin whose root module has fewer fields than the host's ("too many fields"), i.e. every
/// plugin built before the host gained a field. This tries the current layout first, then the
/// frozen layouts of earlier levels ([`layouts`]); a plugin that passes an older one is returned
/// as a current [`PluginModRef`] whose accessors for the newer fields return `None` (which fields
/// exist is recorded in the plugin's own module, not in the host's type).
///
/// On failure the error is the one against the *current* layout (the informative one for a
/// plugin built against an incompatible plugin-api).
pub fn init_root_module(header: &LibHeader) -> Result<(PluginModRef, u32), LibraryError> {
    match header.init_root_module::<PluginModRef>() {
        Ok(module) => Ok((module, API_LEVEL)),
        Err(current @ LibraryError::AbiInstability(_)) => {
            // SAFETY (both arms): the plugin's module passed an older level's layout check, and
            // that level's fields are, by construction, the first fields of the current
            // `PluginMod`, with the same types. The prefix metadata that says which fields exist
            // is the plugin's own, so the accessors of later fields return `None`.
            if let Ok(v2) = header.init_root_module::<layouts::v2::PluginModRef>() {
                return Ok((PluginModRef(unsafe { v2.0.cast() }), 2));
            }
            match header.init_root_module::<layouts::v1::PluginModRef>() {
                Ok(v1) => Ok((PluginModRef(unsafe { v1.0.cast() }), 1)),
                Err(_) => Err(current),
            }
        }
        Err(other) => Err(other),
    }
}

/// Loads the plugin at `path` into this process for good (plugins are never unloaded) and returns
/// its root module with the layout level it was checked at. The host's loader adds friendlier
/// errors on top; tests and embedders that just need a plugin use this.
pub fn load_from_path(path: &std::path::Path) -> Result<(PluginModRef, u32), LibraryError> {
    let library = abi_stable::library::RawLibrary::load_at(path)?;
    let library: &'static abi_stable::library::RawLibrary = Box::leak(Box::new(library));
    // SAFETY: the library stays loaded for the life of the process (leaked above), which is
    // what abi_stable requires of a header it hands out.
    let header = unsafe { abi_stable::library::lib_header_from_raw_library(library)? };
    init_root_module(header)
}

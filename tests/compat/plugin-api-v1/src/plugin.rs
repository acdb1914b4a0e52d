//! The root module every kedit plugin exports, and what it says about itself.
//!
//! Evolution: `PluginMod` is an abi_stable prefix type. Later minor versions append fields after
//! `new_editor` (a new plugin kind, a new entry point); a host reads them as `Option`s, so an older
//! plugin that lacks them still loads. Plugin kinds and API levels are plain integers rather than
//! enums so that a newer plugin's unknown kind is an ordinary error, not undefined behaviour.

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{ROption, RResult, RStr, RString, RVec},
    StableAbi,
};

use crate::editor::{EditorBox, MethodInfo};
use crate::error::PluginError;
use crate::model::ModelBox;

/// The API level this build of plugin-api implements. A plugin reports the level it was built
/// against; the host accepts any level up to its own.
pub const API_LEVEL: u32 = 1;

/// Plugin kinds.
pub mod kind {
    pub const MODEL_FAMILY: u32 = 1;
    pub const EDITOR: u32 = 2;

    pub fn name(kind: u32) -> &'static str {
        match kind {
            MODEL_FAMILY => "model family",
            EDITOR => "editor",
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
#[macro_export]
macro_rules! export_plugin {
    (info: $info:path $(, probe: $probe:path)? $(, open_model: $open:path)? $(, new_editor: $editor:path)? $(,)?) => {
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
            $crate::plugin::PluginMod {
                info: __kedit_info,
                probe: __kedit_probe,
                open_model: __kedit_open_model,
                new_editor: __kedit_new_editor,
            }.leak_into_prefix()
        }
    };
}

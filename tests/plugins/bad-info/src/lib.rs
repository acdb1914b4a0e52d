//! A test plugin whose `info()` panics. The panic guard of `export_plugin!` turns it into a
//! `Panic` error; `kedit plugins` must report this file with that message and still list every
//! other plugin.

fn info() -> kedit_plugin_api::PluginInfo {
    panic!("bad-info test plugin: info() panics on purpose")
}

kedit_plugin_api::export_plugin! {
    info: info,
}

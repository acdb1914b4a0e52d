//! The kedit host runtime: loads model-family and editor plugins through the stable ABI of
//! `kedit-plugin-api`, reads configs and EasyEdit datasets, runs edits as transactions and
//! writes results. The `kedit` binary (`main.rs`) is a thin shell over [`cli`].

pub mod cancel;
pub mod cli;
pub mod config;
pub mod data;
pub mod editor;
pub mod eval;
pub mod hparams;
pub mod logging;
pub mod model;
pub mod plugins;
pub mod resolve;
pub mod runtime_libs;
pub mod save;
pub mod session;

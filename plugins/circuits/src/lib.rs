//! kedit analysis plugin: knowledge circuits and the logit lens (docs/circuits.md) through
//! `locate`, methods `circuit` and `lens`. The analysis itself is the `kedit-circuits` engine
//! (`engine/`); this crate is its plugin face. The host draws what it answers.
//!
//! - [`locate`]: the settings and JSON reports of `circuit` and `lens`;
//! - [`plugin`]: the manifest, `locate`, and `edit` (unsupported).

pub mod locate;
pub mod plugin;

pub use plugin::{info, new_editor};

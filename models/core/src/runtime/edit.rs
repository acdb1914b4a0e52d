//! Journaled changes: weight writes and module installs/removals, with undo.

use kedit_plugin_api::{SiteModuleBox, Tensor as AbiTensor, WeightSite};

use super::Runtime;
use crate::arch::Architecture;
use crate::device::{from_abi, to_abi};
use crate::error::{invalid, Result};
use crate::journal::Change;

impl<A: Architecture> Runtime<A> {
    fn weight_site(&self, name: &str) -> Result<WeightSite> {
        let site: WeightSite = name.parse()?;
        self.arch.dims().check_weight_site(&site)?;
        self.weights.site(site)?;
        Ok(site)
    }

    pub(super) fn read_weight_impl(&self, name: &str) -> Result<AbiTensor> {
        let site = self.weight_site(name)?;
        to_abi(self.weights.site(site)?)
    }

    pub(super) fn write_weight_impl(&mut self, name: &str, value: &AbiTensor) -> Result<()> {
        let site = self.weight_site(name)?;
        let shape = self.weights.site(site)?.dims().to_vec();
        let t = from_abi(
            value,
            &self.device,
            &format!("new value of '{site}'"),
            Some(&shape),
        )?;
        let old = self.weights.replace(site, t)?;
        let site = self.weights.canonical(site);
        self.journal.push(Change::Weight { site, old });
        self.epochs.bump(site, self.weights.is_tied());
        Ok(())
    }

    pub(super) fn rollback_impl(&mut self, mark: u64) -> Result<()> {
        let tied = self.weights.is_tied();
        for change in self.journal.take_after(mark)? {
            match change {
                Change::Weight { site, old } => {
                    self.weights.replace(site, old)?;
                    self.epochs.bump(site, tied);
                }
                Change::ModuleInstalled { id } => {
                    let (_, m) = self.modules.remove(id)?;
                    self.epochs.bump(m.site, tied);
                }
                Change::ModuleRemoved { index, module } => {
                    self.epochs.bump(module.site, tied);
                    self.modules.restore(index, module);
                }
            }
        }
        Ok(())
    }

    pub(super) fn install_module_impl(&mut self, name: &str, module: SiteModuleBox) -> Result<u64> {
        let site = self.weight_site(name)?;
        if site == WeightSite::Embed {
            return Err(invalid(
                "modules sit on linear maps; 'embed.weight' is a lookup table",
            ));
        }
        let id = self.modules.install(site, module);
        self.journal.push(Change::ModuleInstalled { id });
        self.epochs.bump(site, self.weights.is_tied());
        Ok(id)
    }

    pub(super) fn remove_module_impl(&mut self, id: u64) -> Result<()> {
        let (index, module) = self.modules.remove(id)?;
        self.epochs.bump(module.site, self.weights.is_tied());
        self.journal.push(Change::ModuleRemoved { index, module });
        Ok(())
    }
}

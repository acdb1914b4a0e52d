//! Editor-implemented modules installed at weight sites of linear maps. The model calls them
//! inside every forward pass with the map's input and output and uses what they return.

use candle_core::Tensor;
use kedit_plugin_api::{ModuleContext, SiteModuleBox, WeightSite};

use crate::device::{from_abi, to_abi};
use crate::error::{not_found, Error, Result};

pub struct InstalledModule {
    pub id: u64,
    pub site: WeightSite,
    pub module: SiteModuleBox,
}

#[derive(Default)]
pub struct ModuleSet {
    /// In installation order; modules at the same site run in this order.
    modules: Vec<InstalledModule>,
    next_id: u64,
}

impl ModuleSet {
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    pub fn install(&mut self, site: WeightSite, module: SiteModuleBox) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.modules.push(InstalledModule { id, site, module });
        id
    }

    /// Removes module `id`, returning where it was (for a journaled re-insertion) and itself.
    pub fn remove(&mut self, id: u64) -> Result<(usize, InstalledModule)> {
        let index = self
            .modules
            .iter()
            .position(|m| m.id == id)
            .ok_or_else(|| not_found(format!("no installed module has id {id}")))?;
        Ok((index, self.modules.remove(index)))
    }

    /// Puts a removed module back where it was.
    pub fn restore(&mut self, index: usize, module: InstalledModule) {
        let index = index.min(self.modules.len());
        self.modules.insert(index, module);
    }

    pub fn site_of(&self, id: u64) -> Option<WeightSite> {
        self.modules.iter().find(|m| m.id == id).map(|m| m.site)
    }

    pub fn has_site(&self, site: WeightSite) -> bool {
        self.modules.iter().any(|m| m.site == site)
    }

    pub fn explain(&self) -> Vec<String> {
        self.modules
            .iter()
            .map(|m| m.module.explain().into_string())
            .collect()
    }

    /// Runs every module at `site` on `input: [batch, seq, in]` and `output: [batch, seq, out]`,
    /// each seeing the previous one's result. The result is a plain tensor: gradients do not
    /// flow through a module (the ABI's rule; editors train modules from `site_grads`).
    pub fn apply(
        &self,
        site: WeightSite,
        input: &Tensor,
        output: Tensor,
        context: &ModuleContext,
    ) -> Result<Tensor> {
        let mut current: Option<(kedit_plugin_api::Tensor, Tensor)> = None;
        let mut abi_input = None;
        for m in self.modules.iter().filter(|m| m.site == site) {
            let x = match &abi_input {
                Some(x) => x,
                None => abi_input.insert(to_abi(input)?),
            };
            let y = match current.take() {
                Some((abi, _)) => abi,
                None => to_abi(&output)?,
            };
            let shape = y.dims();
            let name = m.module.name();
            let result = m
                .module
                .forward(x, y, context)
                .into_result()
                .map_err(|e| Error::from(e.context(format!("module '{name}' at '{site}'"))))?;
            let what = format!("output of module '{name}' at '{site}'");
            let t = from_abi(&result, output.device(), &what, Some(&shape))?;
            current = Some((result, t));
        }
        Ok(match current {
            Some((_, t)) => t,
            None => output,
        })
    }
}

pub fn no_module(id: u64) -> Error {
    not_found(format!("no installed module has id {id}"))
}

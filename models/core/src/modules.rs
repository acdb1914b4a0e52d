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
        let mut chained: Option<Tensor> = None;
        let mut abi_input = None;
        for m in self.modules.iter().filter(|m| m.site == site) {
            let x = match &abi_input {
                Some(x) => x,
                None => abi_input.insert(to_abi(input)?),
            };
            let current = chained.as_ref().unwrap_or(&output);
            let shape = current.dims().to_vec();
            let name = m.module.name();
            let result = m
                .module
                .forward(x, to_abi(current)?, context)
                .into_result()
                .map_err(|e| Error::from(e.context(format!("module '{name}' at '{site}'"))))?;
            let what = format!("output of module '{name}' at '{site}'");
            chained = Some(from_abi(&result, output.device(), &what, Some(&shape))?);
        }
        Ok(chained.unwrap_or(output))
    }
}

//! The weights a forward pass reads, addressed by canonical weight site (linear maps, embedding,
//! head) or by family-internal name (norm scales and the like).

use std::collections::{BTreeMap, HashMap};

use candle_core::Tensor;
use kedit_plugin_api::WeightSite;

use crate::error::{internal, invalid, not_found, Result};

pub struct WeightStore {
    /// Linear maps as `[out, in]`, plus `Embed` as `[vocab, d_model]`.
    sites: BTreeMap<WeightSite, Tensor>,
    biases: HashMap<WeightSite, Tensor>,
    named: HashMap<String, Tensor>,
    /// The LM head is the embedding matrix (no tensor of its own).
    tied_head: bool,
}

impl WeightStore {
    pub fn new(tied_head: bool) -> Self {
        Self {
            sites: BTreeMap::new(),
            biases: HashMap::new(),
            named: HashMap::new(),
            tied_head,
        }
    }

    pub fn is_tied(&self) -> bool {
        self.tied_head
    }

    /// The site that actually holds the tensor of `site` (the embedding for a tied head).
    pub fn canonical(&self, site: WeightSite) -> WeightSite {
        if self.tied_head && site == WeightSite::LmHead {
            WeightSite::Embed
        } else {
            site
        }
    }

    pub fn insert_site(&mut self, site: WeightSite, t: Tensor) {
        self.sites.insert(self.canonical(site), t);
    }

    pub fn insert_bias(&mut self, site: WeightSite, t: Tensor) {
        self.biases.insert(site, t);
    }

    pub fn insert_named(&mut self, name: impl Into<String>, t: Tensor) {
        self.named.insert(name.into(), t);
    }

    pub fn site(&self, site: WeightSite) -> Result<&Tensor> {
        self.sites
            .get(&self.canonical(site))
            .ok_or_else(|| not_found(format!("this model has no weight at site '{site}'")))
    }

    pub fn bias(&self, site: WeightSite) -> Option<&Tensor> {
        self.biases.get(&site)
    }

    pub fn named(&self, name: &str) -> Result<&Tensor> {
        self.named
            .get(name)
            .ok_or_else(|| internal(format!("weight '{name}' was never loaded")))
    }

    /// Every addressable weight site, the head included.
    pub fn sites(&self) -> Vec<WeightSite> {
        let mut sites: Vec<WeightSite> = self.sites.keys().copied().collect();
        if self.tied_head && !sites.contains(&WeightSite::LmHead) {
            sites.push(WeightSite::LmHead);
        }
        sites.sort();
        sites
    }

    /// Replaces the tensor of `site` (shape-checked), returning the old one.
    pub fn replace(&mut self, site: WeightSite, t: Tensor) -> Result<Tensor> {
        let key = self.canonical(site);
        let slot = self
            .sites
            .get_mut(&key)
            .ok_or_else(|| not_found(format!("this model has no weight at site '{site}'")))?;
        if slot.dims() != t.dims() {
            return Err(invalid(format!(
                "weight '{site}' has shape {:?}, the new value has {:?}",
                slot.dims(),
                t.dims()
            )));
        }
        Ok(std::mem::replace(slot, t))
    }
}

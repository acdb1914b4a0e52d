//! The undo log of weight writes and module changes. A mark is the journal's length; rolling
//! back to it undoes every newer change, newest first.

use candle_core::Tensor;
use kedit_plugin_api::WeightSite;

use crate::error::{invalid, Result};
use crate::modules::InstalledModule;

pub enum Change {
    /// `site` held `old` before the write.
    Weight {
        site: WeightSite,
        old: Tensor,
    },
    ModuleInstalled {
        id: u64,
    },
    /// The module was at `index` of the module list.
    ModuleRemoved {
        index: usize,
        module: InstalledModule,
    },
}

#[derive(Default)]
pub struct Journal {
    entries: Vec<Change>,
}

impl Journal {
    pub fn mark(&self) -> u64 {
        self.entries.len() as u64
    }

    pub fn push(&mut self, change: Change) {
        self.entries.push(change);
    }

    fn check(&self, mark: u64) -> Result<usize> {
        let mark = mark as usize;
        if mark > self.entries.len() {
            return Err(invalid(format!(
                "journal mark {mark} is in the future (the journal has {} entries)",
                self.entries.len()
            )));
        }
        Ok(mark)
    }

    /// Removes and returns the changes after `mark`, newest first.
    pub fn take_after(&mut self, mark: u64) -> Result<Vec<Change>> {
        let mark = self.check(mark)?;
        let mut undone = self.entries.split_off(mark);
        undone.reverse();
        Ok(undone)
    }

    /// Forgets the changes after `mark`, keeping their effect.
    pub fn commit(&mut self, mark: u64) -> Result<()> {
        let mark = self.check(mark)?;
        self.entries.truncate(mark);
        Ok(())
    }
}

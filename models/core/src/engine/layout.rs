//! Where the real tokens of a call sit: padding side, per-row offsets and lengths, the positions
//! they get, and the attention mask that keeps pads out.

use candle_core::{Device, Tensor};
use kedit_plugin_api::{Batch, ModuleContext};

use crate::error::{invalid, Result};

/// The token layout of one forward call over `batch × seq` new tokens, after `past` cached ones.
#[derive(Clone, Debug, PartialEq)]
pub struct RowLayout {
    pub batch: usize,
    pub seq: usize,
    /// Pads before the first real token of each row (left padding).
    pub offsets: Vec<usize>,
    /// Real tokens of each row in this call.
    pub lengths: Vec<usize>,
    /// Tokens already in the KV cache (generation, frozen prefixes); the new ones continue
    /// their positions.
    pub past: usize,
    /// Per row, how many of the `past` cached slots are left pads (a frozen prefix caches rows
    /// of different lengths left-aligned to one width); a row's real cached tokens are the last
    /// `past − past_pads[r]`.
    pub past_pads: Vec<usize>,
}

impl RowLayout {
    pub fn of_batch(batch: &Batch) -> Result<Self> {
        if batch.rows.is_empty() {
            return Err(invalid("the batch has no rows"));
        }
        if let Some(i) = batch.rows.iter().position(|r| r.is_empty()) {
            return Err(invalid(format!("row {i} of the batch has no tokens")));
        }
        let seq = batch.padded_len();
        let offsets = (0..batch.rows.len()).map(|r| batch.offset(r)).collect();
        let lengths = batch.rows.iter().map(|r| r.len()).collect();
        Ok(Self {
            batch: batch.rows.len(),
            seq,
            offsets,
            past_pads: vec![0; batch.rows.len()],
            lengths,
            past: 0,
        })
    }

    /// One unpadded row of `len` new tokens after `past` cached ones.
    pub fn single(len: usize, past: usize) -> Self {
        Self {
            batch: 1,
            seq: len,
            offsets: vec![0],
            lengths: vec![len],
            past,
            past_pads: vec![0],
        }
    }

    /// Rows of `lengths` real tokens each, left-padded to the longest (a row may be empty: it
    /// is all pads). No cache before them.
    pub fn left_aligned(lengths: Vec<usize>) -> Self {
        let seq = lengths.iter().copied().max().unwrap_or(0);
        Self {
            batch: lengths.len(),
            seq,
            offsets: lengths.iter().map(|&n| seq - n).collect(),
            past_pads: vec![0; lengths.len()],
            lengths,
            past: 0,
        }
    }

    /// Right-padded rows of `lengths` new tokens each, continuing a cache of `past` slots of
    /// which row r's first `past_pads[r]` are pads.
    pub fn continuing(lengths: Vec<usize>, past: usize, past_pads: Vec<usize>) -> Self {
        Self {
            batch: lengths.len(),
            seq: lengths.iter().copied().max().unwrap_or(0),
            offsets: vec![0; lengths.len()],
            lengths,
            past,
            past_pads,
        }
    }

    /// Token ids `[batch, seq]` of `rows` (row r holding exactly `lengths[r]` ids) placed at
    /// this layout's real slots, `pad` elsewhere.
    pub fn place_ids(&self, rows: &[&[u32]], pad: u32, device: &Device) -> Result<Tensor> {
        let mut ids = vec![pad; self.batch * self.seq];
        for (r, row) in rows.iter().enumerate() {
            debug_assert_eq!(row.len(), self.lengths[r]);
            let start = r * self.seq + self.offsets[r];
            ids[start..start + row.len()].copy_from_slice(row);
        }
        Ok(Tensor::from_vec(ids, (self.batch, self.seq), device)?)
    }

    pub fn is_padded(&self) -> bool {
        self.lengths.iter().any(|&n| n != self.seq)
    }

    /// Whether some query has no key to look at (a left pad).
    pub fn has_keyless_queries(&self) -> bool {
        self.offsets.iter().any(|&o| o > 0)
    }

    pub fn is_real(&self, row: usize, pos: usize) -> bool {
        pos >= self.offsets[row] && pos < self.offsets[row] + self.lengths[row]
    }

    /// Padded position of the last real token of each row.
    pub fn last_positions(&self) -> Vec<usize> {
        (0..self.batch)
            .map(|r| self.offsets[r] + self.lengths[r] - 1)
            .collect()
    }

    /// Flat index `row·seq + position` of the last real token of each row.
    pub fn last_slots(&self) -> Vec<u32> {
        self.last_positions()
            .iter()
            .enumerate()
            .map(|(r, &p)| (r * self.seq + p) as u32)
            .collect()
    }

    /// Token ids `[batch, seq]` with `pad` in the padded slots.
    pub fn ids(&self, batch: &Batch, pad: u32, device: &Device) -> Result<Tensor> {
        let rows: Vec<&[u32]> = batch.rows.iter().map(|r| r.as_slice()).collect();
        self.place_ids(&rows, pad, device)
    }

    /// Position of every slot, row-major: real token i of a row follows the row's real cached
    /// tokens (`past − past_pads[r] + i`), and right pads continue that numbering as
    /// transformers numbers them (no real token ever sees a pad, but methods that compare whole
    /// padded hidden states, such as DINM's toxic-layer location, see the pads' own states);
    /// left pads get 0.
    pub fn positions(&self) -> Vec<u32> {
        let mut pos = vec![0u32; self.batch * self.seq];
        for r in 0..self.batch {
            let first = self.past - self.past_pads[r];
            for i in 0..self.seq - self.offsets[r] {
                pos[r * self.seq + self.offsets[r] + i] = (first + i) as u32;
            }
        }
        pos
    }

    /// Additive attention mask `[batch, 1, seq, past + seq]`: 0 where query i may look at key j
    /// (j not after i, j a real token), a large negative number elsewhere. `None` when nothing
    /// needs masking (a single new token without padding).
    pub fn attention_mask(&self, device: &Device) -> Result<Option<Tensor>> {
        if self.seq == 1 && !self.is_padded() && self.past_pads.iter().all(|&p| p == 0) {
            return Ok(None);
        }
        // Finite rather than −inf, so that a query with no visible key (a left pad) gives a
        // uniform, finite softmax that `query_has_key` then zeroes, never NaN.
        const MASKED: f32 = f32::MIN;
        let keys = self.past + self.seq;
        let mut mask = vec![MASKED; self.batch * self.seq * keys];
        for r in 0..self.batch {
            let key_real = |j: usize| {
                if j < self.past {
                    j >= self.past_pads[r]
                } else {
                    self.is_real(r, j - self.past)
                }
            };
            for i in 0..self.seq {
                let row = &mut mask[(r * self.seq + i) * keys..(r * self.seq + i + 1) * keys];
                for (j, m) in row.iter_mut().enumerate().take(self.past + i + 1) {
                    if key_real(j) {
                        *m = 0.0;
                    }
                }
            }
        }
        Ok(Some(Tensor::from_vec(
            mask,
            (self.batch, 1, self.seq, keys),
            device,
        )?))
    }

    /// `[batch, 1, seq, 1]`: 1 for queries that see at least one key, 0 for left pads, whose
    /// attention output must be exactly zero. `None` when every query sees a key.
    pub fn query_has_key(&self, device: &Device) -> Result<Option<Tensor>> {
        if !self.has_keyless_queries() || self.past > 0 {
            return Ok(None);
        }
        let mut v = vec![0f32; self.batch * self.seq];
        for r in 0..self.batch {
            for i in self.offsets[r]..self.seq {
                v[r * self.seq + i] = 1.0;
            }
        }
        Ok(Some(Tensor::from_vec(
            v,
            (self.batch, 1, self.seq, 1),
            device,
        )?))
    }

    /// What a site module is told about this call.
    pub fn module_context(&self, generating: bool) -> ModuleContext {
        ModuleContext {
            generating,
            row_offsets: self.offsets.iter().map(|&o| o as u32).collect(),
            row_lengths: self.lengths.iter().map(|&n| n as u32).collect(),
        }
    }

    /// Checks that (`row`, `pos`) lies inside the padded batch.
    pub fn check_slot(&self, what: &str, row: usize, pos: usize) -> Result<()> {
        if row >= self.batch || pos >= self.seq {
            return Err(invalid(format!(
                "{what}: (row {row}, position {pos}) is outside the batch of {} rows × {} positions",
                self.batch, self.seq
            )));
        }
        Ok(())
    }
}

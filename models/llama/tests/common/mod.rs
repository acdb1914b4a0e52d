//! Helpers shared by the llama tests: the family-independent ones come from
//! `kedit_model_core::testkit` (fixtures, reference tensors, comparisons), plus the tiny model.
#![allow(dead_code, unused_imports)]

pub use kedit_model_core::testkit::{
    assert_close, fixture, load_expected, max_abs_diff, pseudo_random, shared, Expected,
};

use kedit_model_core::arch::llama::Llama;
use kedit_model_core::Runtime;

/// The tiny random LLaMA checkpoint (no tokenizer).
pub fn tiny_llama() -> Runtime<Llama> {
    kedit_model_llama::open_runtime(fixture("llama").to_str().unwrap(), "cpu")
        .expect("the tiny llama fixture loads")
}

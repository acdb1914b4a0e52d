//! The tiny random LLaMA against transformers' `LlamaForCausalLM` outputs
//! (shared/fixtures/llama): logits unpadded, right- and left-padded, every block output, the
//! final norm, layer 1's MLP key and output, and KV-cached greedy decoding step by step.

mod common;

use common::*;
use kedit_plugin_api::{Model, Padding};

use kedit_model_core::testkit::{TinyFixture, TINY_TOL};

fn reference() -> TinyFixture {
    TinyFixture::new("llama", 3, 176)
}

#[test]
fn unpadded_logits_and_every_activation_match_transformers() {
    reference().check_unpadded(&tiny_llama());
}

#[test]
fn right_padded_batch_matches_transformers_at_real_positions() {
    reference().check_padded(&tiny_llama(), "b", Padding::Right);
}

#[test]
fn left_padded_batch_matches_transformers_at_real_positions() {
    reference().check_padded(&tiny_llama(), "c", Padding::Left);
}

#[test]
fn kv_cached_greedy_decoding_matches_transformers_step_by_step() {
    assert_eq!(TINY_TOL, 1e-4);
    reference().check_kv_greedy(&tiny_llama());
}

#[test]
fn facts_describe_the_checkpoint() {
    let model = tiny_llama();
    let f = model.facts().unwrap();
    assert_eq!(f.family.as_str(), "llama");
    assert_eq!((f.n_layers, f.d_model, f.d_ff), (3, 64, 176));
    assert_eq!((f.n_heads, f.n_kv_heads, f.head_dim), (4, 2, 16));
    assert_eq!(f.vocab_size, 512);
    assert_eq!(f.eos_ids.as_slice(), &[2]);
    assert_eq!(f.bos_id.into_option(), Some(1));
    assert_eq!(f.device.as_str(), "cpu");
    let sites: Vec<&str> = f.weight_sites.iter().map(|s| s.as_str()).collect();
    for s in [
        "embed.weight",
        "lm_head",
        "layer.2.mlp.down",
        "layer.0.attn.q",
    ] {
        assert!(sites.contains(&s), "{s} missing from {sites:?}");
    }
    assert_eq!(sites.len(), 2 + 3 * 7);
    // No tokenizer in this checkpoint: ids work, text says why not.
    let e = model.tokenize("hello", false).unwrap_err();
    assert!(e.message.contains("no tokenizer"), "{e}");
}

//! The tiny random LLaMA against transformers' `LlamaForCausalLM` outputs
//! (shared/fixtures/llama): logits unpadded, right- and left-padded, every block output, the
//! final norm, layer 1's MLP key and output, and KV-cached greedy decoding step by step.

mod common;

use common::*;
use kedit_plugin_api::{Batch, ForwardRequest, GenerateRequest, LogitsWanted, Model, Padding};

const TOL: f32 = 1e-4;

fn rows_of(exp: &std::collections::HashMap<String, Expected>, case: &str) -> Vec<Vec<u32>> {
    let ids = exp[&format!("{case}.input_ids")].rows();
    let mask = exp[&format!("{case}.attention_mask")].rows();
    ids.iter()
        .zip(&mask)
        .map(|(ids, mask)| {
            ids.iter()
                .zip(mask)
                .filter(|(_, &m)| m == 1.0)
                .map(|(&id, _)| id as u32)
                .collect()
        })
        .collect()
}

#[test]
fn unpadded_logits_and_every_activation_match_transformers() {
    let model = tiny_llama();
    let exp = load_expected(fixture("llama").join("expected.safetensors"));
    let ids = exp["a.input_ids"].ids();
    let mut req = ForwardRequest::new(Batch::new(vec![ids], Padding::Right), LogitsWanted::All);
    let n_layers = 3;
    let mut sites = vec!["embed".to_string()];
    sites.extend((0..n_layers).map(|i| format!("layer.{i}.resid_post")));
    sites.extend([
        "final_norm".to_string(),
        "layer.1.mlp_key".to_string(),
        "layer.1.mlp_out".to_string(),
    ]);
    req.captures = sites.iter().map(|s| s.as_str().into()).collect();
    let out = model.forward(&req).unwrap();

    let logits = out.logits.into_option().unwrap();
    assert_eq!(logits.dims(), vec![1, 12, 512]);
    let d = assert_close("a.logits", &logits, &exp["a.logits"].f32s(), TOL);
    eprintln!("a.logits max abs diff {d:e}");

    let c = &out.captures;
    assert_close("a.embed_out", &c[0], &exp["a.embed_out"].f32s(), TOL);
    let blocks = exp["a.block_out"].f32s();
    let per_block = blocks.len() / n_layers;
    for i in 0..n_layers {
        let want = &blocks[i * per_block..(i + 1) * per_block];
        let d = assert_close(&format!("a.block_out[{i}]"), &c[1 + i], want, TOL);
        eprintln!("block {i} max abs diff {d:e}");
    }
    assert_close(
        "a.final_norm_out",
        &c[4],
        &exp["a.final_norm_out"].f32s(),
        TOL,
    );
    assert_eq!(c[5].dims(), vec![1, 12, 176]);
    assert_close(
        "a.layer1.mlp_down_proj_input",
        &c[5],
        &exp["a.layer1.mlp_down_proj_input"].f32s(),
        TOL,
    );
    assert_close(
        "a.layer1.mlp_out",
        &c[6],
        &exp["a.layer1.mlp_out"].f32s(),
        TOL,
    );
}

fn check_padded(case: &str, padding: Padding) {
    let model = tiny_llama();
    let exp = load_expected(fixture("llama").join("expected.safetensors"));
    let rows = rows_of(&exp, case);
    let mask = exp[&format!("{case}.attention_mask")].rows();
    let req = ForwardRequest::new(Batch::new(rows, padding), LogitsWanted::All);
    let out = model.forward(&req).unwrap();
    let logits = out.logits.into_option().unwrap();
    assert_eq!(logits.dims(), vec![3, 12, 512]);
    assert!(logits.is_finite(), "{case}: padded logits hold NaN/inf");
    let want = exp[&format!("{case}.logits")].f32s();
    let mut worst = 0f32;
    for (r, mask) in mask.iter().enumerate() {
        for (p, &m) in mask.iter().enumerate() {
            if m == 1.0 {
                let at = (r * 12 + p) * 512;
                let d = max_abs_diff(&logits.as_slice()[at..at + 512], &want[at..at + 512]);
                worst = worst.max(d);
            }
        }
    }
    eprintln!("{case}.logits (real positions) max abs diff {worst:e}");
    assert!(worst <= TOL, "{case}: max abs diff {worst} > {TOL}");

    // Last-position logits are the same rows.
    let last = model
        .forward(&ForwardRequest::new(req.batch.clone(), LogitsWanted::Last))
        .unwrap()
        .logits
        .into_option()
        .unwrap();
    assert_eq!(last.dims(), vec![3, 512]);
    for r in 0..3 {
        let p = req.batch.last_position(r);
        let at = (r * 12 + p) * 512;
        let d = max_abs_diff(last.row(r), &logits.as_slice()[at..at + 512]);
        assert!(
            d <= 1e-5,
            "{case}: Last logits of row {r} differ from All by {d}"
        );
    }
}

#[test]
fn right_padded_batch_matches_transformers_at_real_positions() {
    check_padded("b", Padding::Right);
}

#[test]
fn left_padded_batch_matches_transformers_at_real_positions() {
    check_padded("c", Padding::Left);
}

#[test]
fn kv_cached_greedy_decoding_matches_transformers_step_by_step() {
    let model = tiny_llama();
    let exp = load_expected(fixture("llama").join("expected.safetensors"));
    let prompt = exp["gen.prompt_ids"].ids();
    let want_ids = exp["gen.new_token_ids"].ids();
    let step_logits = exp["gen.step_logits"].f32s();

    let got = model
        .generate(&GenerateRequest::greedy(vec![prompt.clone()], 10))
        .unwrap();
    assert_eq!(got[0], want_ids, "greedy tokens with the KV cache");

    let mut decoder = model.decoder(&prompt).unwrap();
    let mut worst = 0f32;
    for (step, &id) in want_ids.iter().enumerate() {
        let want = &step_logits[step * 512..(step + 1) * 512];
        worst = worst.max(max_abs_diff(decoder.logits(), want));
        decoder.push(&[id]).unwrap();
    }
    eprintln!("gen.step_logits max abs diff {worst:e}");
    assert!(worst <= TOL, "step logits differ by {worst}");

    // Full recompute gives the same tokens.
    let mut ids = prompt.clone();
    for _ in 0..10 {
        let out = model
            .forward(&ForwardRequest::new(
                Batch::new(vec![ids.clone()], Padding::Right),
                LogitsWanted::Last,
            ))
            .unwrap();
        let logits = out.logits.into_option().unwrap();
        let row = logits.row(0);
        let best = (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b });
        ids.push(best as u32);
    }
    assert_eq!(&ids[prompt.len()..], want_ids.as_slice());
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

//! What the glm and baichuan plugin tests check beyond `kedit_model_core::testkit` (the
//! shared fixture, reference, gradient and export checks): chunked prefill after a cached
//! prefix, NormHead's head gradient, left-padded gradients, export of fused tensors (the
//! written slice lands in the right rows of the re-fused HF tensor), the kedit binary, and
//! broken copies of a fixture. The baichuan tests include this file by path.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kedit_model_core::arch::Architecture;
pub use kedit_model_core::testkit::*;
use kedit_model_core::Runtime;
#[allow(unused_imports)]
pub use kedit_plugin_api::{
    Batch, ForwardRequest, GenerateRequest, GradRequest, Intervention, LogitsWanted, Model,
    NllTerm, Padding, Tensor,
};
use safetensors::SafeTensors;

/// Every reference check of a tiny fixture: (a) with activations, (b), (c), KV-cached greedy
/// decoding, and a chunked prefill after a cached prefix.
pub fn check_reference<A: Architecture>(model: &Runtime<A>, name: &str, d_ff: usize) {
    let fx = TinyFixture::new(name, 3, d_ff);
    fx.check_unpadded(model);
    fx.check_padded(model, "b", Padding::Right);
    fx.check_padded(model, "c", Padding::Left);
    fx.check_kv_greedy(model);

    // Several new tokens after a cached prefix: the cache offsets positions (RoPE) and key
    // indices (ALiBi), and the mask covers past and new keys.
    let prompt = fx.exp["gen.prompt_ids"].ids();
    let step0 = &fx.exp["gen.step_logits"].f32s()[..fx.vocab];
    let mut chunked = model.decoder(&prompt[..2]).unwrap();
    chunked.push(&prompt[2..]).unwrap();
    let d = max_abs_diff(chunked.logits(), step0);
    eprintln!("{name}: chunked prefill max abs diff {d:e}");
    assert!(d <= TINY_TOL, "{name}: chunked prefill differs by {d}");
}

/// Loss, every activation-parameter gradient and every site gradient (dW = Σ gᵀx) against
/// finite differences, plus a left-padded row against the row alone, gradients over frozen
/// prefixes against whole rows, and products reused across calls of a prepared batch.
pub fn check_gradients(model: &mut impl Model, d_model: usize, d_ff: usize, sites: &[&str]) {
    let case = GradientCase::standard(d_model, d_ff, sites);
    case.check_loss(model);
    case.check_param_grads(model);
    case.check_site_grads(model);
    check_left_padded_gradient(model, d_model);
    check_frozen_prefix(model, d_model);
    check_product_memo(model);
    check_last_block_slots(model);
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// The raw-weight gradient of a row-normalised head from the gradient `g` with respect to the
/// normalised weight: row r gets `(G_r − (G_r·ŵ_r) ŵ_r) / ‖w_r‖`.
pub fn norm_head_raw_gradient(g: &[f32], raw: &[f32], cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; g.len()];
    for r in 0..g.len() / cols {
        let w = &raw[r * cols..(r + 1) * cols];
        let gr = &g[r * cols..(r + 1) * cols];
        let n = dot(w, w).sqrt().max(1e-12);
        let proj = dot(gr, w) / n;
        for c in 0..cols {
            out[r * cols + c] = ((gr[c] as f64 - proj * w[c] as f64 / n) / n) as f32;
        }
    }
    out
}

/// NormHead: the `lm_head` site gradient describes `y = x·W_nᵀ` (the normalised head); mapped
/// through the normalisation it must match finite differences of the **raw** weight, which is
/// what the site reads and writes.
pub fn check_norm_head_gradient(model: &mut impl Model, d_model: usize, d_ff: usize) {
    let case = GradientCase::standard(d_model, d_ff, &["lm_head"]);
    let g = case.gradient(model);
    let sg = &g.site_grads[0];
    let w = model.read_weight("lm_head").unwrap();
    let (out, inp) = (w.dims()[0], w.dims()[1]);
    assert!(
        sg.output_grad.norm() > 0.0,
        "lm_head: output gradient is zero"
    );
    let (x, gy) = (sg.input.as_slice(), sg.output_grad.as_slice());
    let rows = x.len() / inp;
    let mut dw = vec![0f64; out * inp];
    for t in 0..rows {
        let (xt, gt) = (&x[t * inp..(t + 1) * inp], &gy[t * out..(t + 1) * out]);
        for o in 0..out {
            for i in 0..inp {
                dw[o * inp + i] += gt[o] as f64 * xt[i] as f64;
            }
        }
    }
    let dw_n: Vec<f32> = dw.into_iter().map(|v| v as f32).collect();
    let dw = norm_head_raw_gradient(&dw_n, w.as_slice(), inp);
    let unit = |v: Vec<f32>| {
        let n = dot(&v, &v).sqrt() as f32;
        v.into_iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    let g_unit = unit(dw.clone());
    let r_unit = unit(pseudo_random(4242, dw.len(), 1.0));
    let dir = unit(g_unit.iter().zip(&r_unit).map(|(a, b)| a + b).collect());
    let eps = 1e-2;
    let mut shifted = |sign: f64| {
        let mark = model.journal_mark().unwrap();
        let mut v = w.clone();
        for (a, d) in v.as_mut_slice().iter_mut().zip(&dir) {
            *a += (sign * eps) as f32 * d;
        }
        model.write_weight("lm_head", &v).unwrap();
        let loss = case.loss_by_forward(&*model, case.params.clone());
        model.journal_rollback(mark).unwrap();
        loss
    };
    let (plus, minus) = (shifted(1.0), shifted(-1.0));
    check_directional(
        "raw NormHead weight lm_head",
        dot(&dw, &dir),
        plus,
        minus,
        eps,
    );
    // Unmapped, the normalised-weight gradient does not match the raw weight's: the mapping is
    // what makes the check pass.
    let naive = dot(&dw_n, &dir);
    let fd = (plus - minus) / (2.0 * eps);
    assert!(
        (naive - fd).abs() > 1e-2 * fd.abs(),
        "NormHead had no effect on the gradient"
    );
}

/// A left-padded row gives the same loss and parameter gradient as the row alone.
pub fn check_left_padded_gradient(model: &impl Model, d_model: usize) {
    let row = vec![292u32, 436, 342, 86, 406, 435];
    let delta = Tensor::new(&[d_model], pseudo_random(5, d_model, 0.3)).unwrap();
    let run = |rows: Vec<Vec<u32>>, r: usize, offset: usize| {
        let mut f = ForwardRequest::new(Batch::new(rows, Padding::Left), LogitsWanted::None);
        f.params = vec![delta.clone()].into();
        f.interventions = vec![Intervention::add_param(
            "layer.1.resid_pre",
            r,
            offset + 2,
            0,
        )]
        .into();
        model
            .gradient(&GradRequest {
                forward: f,
                nll: vec![NllTerm {
                    row: r as u32,
                    position: offset as u32 + 5,
                    token: 9,
                    weight: 1.0,
                }]
                .into(),
                kl: Default::default(),
                site_grads: vec!["layer.1.mlp.down".into()].into(),
                prepared: None.into(),
            })
            .unwrap()
    };
    let alone = run(vec![row.clone()], 0, 0);
    let padded = run(vec![vec![7; 9], row.clone()], 1, 3);
    assert!(
        (alone.loss - padded.loss).abs() < 1e-5,
        "{} vs {}",
        alone.loss,
        padded.loss
    );
    let d = max_abs_diff(
        alone.param_grads[0].as_slice(),
        padded.param_grads[0].as_slice(),
    );
    assert!(d < 1e-5, "padded gradient differs by {d}");
    assert!(alone.param_grads[0].norm() > 0.0);
    let sg = &padded.site_grads[0];
    assert!(sg.input.is_finite() && sg.output_grad.is_finite());
}

// ---------------------------------------------------------------------------------------------
// Export of fused tensors.

/// The tensors of a safetensors file as (shape, f32 values).
pub fn read_safetensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let v = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, (view.shape().to_vec(), v))
        })
        .collect()
}

/// One weight write and where it must land in the exported HF file: the new value of `site`
/// must appear in tensor `hf` from row `first_row` on.
pub struct FusedWrite {
    pub site: &'static str,
    pub hf: &'static str,
    pub first_row: usize,
}

/// The testkit's round trip (write, export, reload, identical logits, source refused) for the
/// first write, then every further write, a second export, and a check of the HF file: the
/// source's tensor names and shapes, each written slice in its rows of the re-fused tensor,
/// every other value untouched, config.json unchanged.
pub fn check_fused_export<M: Model>(
    model: &mut M,
    name: &str,
    writes: &[FusedWrite],
    open: impl Fn(&Path) -> M,
) {
    let source = read_safetensors(&fixture(name).join("model.safetensors"));
    let (_guard, _) = check_export_round_trip(model, &fixture(name), writes[0].site, &open);
    for (k, w) in writes.iter().enumerate().skip(1) {
        let old = model.read_weight(w.site).unwrap();
        let new: Vec<f32> = old
            .as_slice()
            .iter()
            .map(|v| v * (1.5 + k as f32 * 0.25))
            .collect();
        model
            .write_weight(w.site, &Tensor::new(&old.dims(), new.clone()).unwrap())
            .unwrap();
        assert_eq!(
            model.read_weight(w.site).unwrap().as_slice(),
            new.as_slice()
        );
    }
    let written: Vec<(&str, usize, Tensor)> = writes
        .iter()
        .map(|w| (w.hf, w.first_row, model.read_weight(w.site).unwrap()))
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("edited");
    model.export(out.to_str().unwrap()).unwrap();
    let exported = read_safetensors(&out.join("model.safetensors"));
    let mut names: Vec<&String> = exported.keys().collect();
    let mut source_names: Vec<&String> = source.keys().collect();
    names.sort();
    source_names.sort();
    assert_eq!(
        names, source_names,
        "exported tensor names differ from the source's"
    );
    for (tensor, (shape, values)) in &source {
        let (eshape, evalues) = &exported[tensor];
        assert_eq!(eshape, shape, "{tensor}: shape");
        let cols: usize = shape[1..].iter().product();
        let mut expect = values.clone();
        for (hf, first_row, new) in &written {
            if hf == tensor {
                let at = first_row * cols;
                expect[at..at + new.numel()].copy_from_slice(new.as_slice());
            }
        }
        assert!(evalues == &expect, "{tensor}: exported values");
    }
    let read_json = |p: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    assert_eq!(
        read_json(out.join("config.json")),
        read_json(fixture(name).join("config.json"))
    );
    assert_eq!(
        probe_logits(&open(&out)).as_slice(),
        probe_logits(model).as_slice(),
        "logits after export + reload"
    );
}

// ---------------------------------------------------------------------------------------------
// End to end through the kedit binary.

/// `kedit generate --model <fixture> --ids <gen.prompt_ids> --show-ids` with the plugins in
/// target/release reproduces the fixture's greedy ids.
pub fn check_kedit_generate(name: &str) {
    let kedit = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target/release/kedit"
    ));
    assert!(
        kedit.is_file(),
        "{} is missing: run `cargo build --release` first",
        kedit.display()
    );
    let fx = TinyFixture::new(name, 3, 0);
    let join = |ids: Vec<u32>| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let prompt = join(fx.exp["gen.prompt_ids"].ids());
    let want = join(fx.exp["gen.new_token_ids"].ids());
    let out = std::process::Command::new(&kedit)
        .args(["generate", "--model"])
        .arg(fixture(name))
        .args(["--ids", &prompt, "--max-new-tokens", "10", "--show-ids"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kedit failed: {stdout}\n{stderr}");
    let ids = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ids: "))
        .unwrap_or_else(|| panic!("no ids line in: {stdout}\n{stderr}"));
    assert_eq!(ids.trim(), want, "{name}: kedit generate");
}

/// Copies a fixture's config.json (edited by `edit`) and model.safetensors (filtered by `keep`)
/// into `dir`.
pub fn broken_copy(
    name: &str,
    dir: &Path,
    edit: impl Fn(&mut serde_json::Value),
    keep: impl Fn(&str) -> bool,
) {
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap())
            .unwrap();
    edit(&mut config);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    let bytes = std::fs::read(fixture(name).join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<_> = st.tensors().into_iter().filter(|(n, _)| keep(n)).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

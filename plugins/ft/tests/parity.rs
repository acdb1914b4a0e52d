//! FT-L against EasyEdit's own values on the real SmolLM2-135M-Instruct
//! (../shared/fixtures/methods/ft.*; tolerances from that folder's README).

use std::collections::HashMap;
use std::path::PathBuf;

use kedit_editor_ft::{ft, hparams::FtHparams};
use kedit_plugin_api::{
    abi_stable::sabi_trait::TD_Opaque, Batch, EditRequest, ForwardRequest, LogitsWanted,
    ModelClient, Padding, Progress_TO, Tensor,
};
use safetensors::SafeTensors;
use serde_json::Value;

fn shared() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared"))
}

fn tensors(bytes: &[u8]) -> HashMap<String, Vec<f64>> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values: Vec<f64> = match view.dtype() {
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::I64 => data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("unexpected dtype {other:?} for {name}"),
            };
            (name, values)
        })
        .collect()
}

fn norms(t: &Tensor) -> (Vec<f64>, Vec<f64>) {
    let d = t.dims();
    let (rows, cols) = (d[0], d[1]);
    let mut r = vec![0f64; rows];
    let mut c = vec![0f64; cols];
    for (i, row) in t.as_slice().chunks_exact(cols).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let v = v as f64;
            r[i] += v * v;
            c[j] += v * v;
        }
    }
    (
        r.into_iter().map(f64::sqrt).collect(),
        c.into_iter().map(f64::sqrt).collect(),
    )
}

fn assert_rel(what: &str, got: &[f64], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = rel * w.abs().max(1e-6);
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: got {g}, want {w} (rel tol {rel})"
        );
    }
}

fn last_logits(model: &ModelClient<'_>, ids: &[u32]) -> Vec<f32> {
    let out = model
        .forward(&ForwardRequest::new(
            Batch::new(vec![ids.to_vec()], Padding::Right),
            LogitsWanted::Last,
        ))
        .unwrap();
    out.logits.unwrap().into_vec()
}

/// Compares logits by id (top-20 order may differ only at near ties).
fn assert_top20(what: &str, logits: &[f32], ids: &[f64], want: &[f64]) {
    for (id, w) in ids.iter().zip(want) {
        let g = logits[*id as usize] as f64;
        assert!(
            (g - w).abs() < 1e-3,
            "{what}: logit of id {id}: got {g}, want {w}"
        );
    }
}

#[test]
fn ft_l_matches_easyedit_step_by_step_on_smollm2() {
    let dir = shared().join("fixtures/methods");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ft.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("ft.safetensors")).unwrap();
    let want = tensors(&bytes);

    let mut model = kedit_plugin_api::testing::open_with_plugin(
        &workspace(),
        "kedit_model_llama",
        &kedit_plugin_api::testing::real_model("KEDIT_SMOLLM2_GGUF", "smollm2-135m-instruct"),
    );
    let mut client = ModelClient::new(model.sabi_reborrow_mut());

    let req = &meta["request"];
    let request = EditRequest::fact(
        req["prompt"].as_str().unwrap(),
        req["subject"].as_str().unwrap(),
        req["target_new"].as_str().unwrap(),
    );
    let mut hp_json = meta["hparams"].clone();
    let hp_obj = hp_json.as_object_mut().unwrap();
    let keep = [
        "layers",
        "num_steps",
        "lr",
        "weight_decay",
        "norm_constraint",
        "objective_optimization",
        "batch_size",
    ];
    hp_obj.retain(|k, _| keep.contains(&k.as_str()));
    let hp = FtHparams::from_json(&hp_json.to_string()).unwrap();

    let prompt_ids: Vec<u32> = want["prompt.input_ids"].iter().map(|&v| v as u32).collect();
    let locality_ids: Vec<u32> = want["locality.input_ids"]
        .iter()
        .map(|&v| v as u32)
        .collect();
    let pre_prompt = last_logits(&client, &prompt_ids);
    let pre_loc = last_logits(&client, &locality_ids);
    assert_top20(
        "prompt pre",
        &pre_prompt,
        &want["prompt.pre.top20_ids"],
        &want["prompt.pre.top20_logits"],
    );
    assert_top20(
        "locality pre",
        &pre_loc,
        &want["locality.pre.top20_ids"],
        &want["locality.pre.top20_logits"],
    );

    let mut quiet = kedit_plugin_api::testing::QuietProgress;
    let mut progress = Progress_TO::from_ptr(&mut quiet, TD_Opaque);
    let trace = ft::run(&mut client, &[request], &hp, &mut progress).unwrap();

    // Tokens as EasyEdit fed them.
    let want_ids: Vec<u32> = want["input_ids"].iter().map(|&v| v as u32).collect();
    let want_targets: Vec<u32> = want["target_ids"].iter().map(|&v| v as u32).collect();
    assert_eq!(trace.prompt_ids[0], want_ids);
    assert_eq!(trace.target_ids[0], want_targets);

    // Per-step losses (abs 1e-4), gradient norm, ‖ΔW‖ after each step (rel 1e-4).
    let steps = meta["steps"].as_array().unwrap();
    assert_eq!(trace.steps.len(), steps.len(), "number of steps");
    for (got, s) in trace.steps.iter().zip(steps) {
        let loss = s["loss"].as_f64().unwrap();
        assert!(
            (got.loss - loss).abs() < 1e-4,
            "step {}: loss {} vs {loss}",
            got.step,
            got.loss
        );
        assert_eq!(
            got.optimizer_step_taken,
            s["optimizer_step_taken"].as_bool().unwrap()
        );
        assert_rel(
            "grad_fro_norm",
            &[got.grad_fro_norm],
            &[s["grad_fro_norm"].as_f64().unwrap()],
            1e-3,
        );
        assert_rel(
            "delta_W_fro_norm_after_step",
            &[got.delta_w_fro_norm_after_step],
            &[s["delta_W_fro_norm_after_step"].as_f64().unwrap()],
            1e-4,
        );
    }

    // First gradient: row/column norms and the top-left block.
    let (gr, gc) = norms(&trace.first_grads[0]);
    assert_rel(
        "grad_step0.row_norms",
        &gr,
        &want["grad_step0.row_norms"],
        1e-3,
    );
    assert_rel(
        "grad_step0.col_norms",
        &gc,
        &want["grad_step0.col_norms"],
        1e-3,
    );
    let g = &trace.first_grads[0];
    let cols = g.dims()[1];
    for i in 0..16 {
        for j in 0..16 {
            let got = g.as_slice()[i * cols + j] as f64;
            let w = want["grad_step0.top_left_16x16"][i * 16 + j];
            assert!(
                (got - w).abs() < 1e-5 + 1e-3 * w.abs(),
                "grad[{i},{j}]: {got} vs {w}"
            );
        }
    }

    // Final ΔW: norm (rel 1e-4), row norms (rel 1e-3).
    let delta = &trace.deltas[0];
    assert_rel(
        "delta_W_fro_norm",
        &[delta.norm()],
        &[meta["delta_W_fro_norm"].as_f64().unwrap()],
        1e-4,
    );
    let (dr, _) = norms(delta);
    assert_rel("delta_W.row_norms", &dr, &want["delta_W.row_norms"], 1e-3);

    // Post-edit logits of the prompt and the locality prompt.
    let post_prompt = last_logits(&client, &prompt_ids);
    let post_loc = last_logits(&client, &locality_ids);
    assert_top20(
        "prompt post",
        &post_prompt,
        &want["prompt.post.top20_ids"],
        &want["prompt.post.top20_logits"],
    );
    assert_top20(
        "locality post",
        &post_loc,
        &want["locality.post.top20_ids"],
        &want["locality.post.top20_logits"],
    );
}

fn workspace() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

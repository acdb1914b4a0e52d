//! DINM against EasyEdit's own values on the real SmolLM2-135M-Instruct
//! (../shared/fixtures/methods/dinm.*; tolerances from that folder's README), with
//! `kl_gradient: false` and `chat_template: false`, which are EasyEdit's behaviour.

use std::collections::HashMap;
use std::path::PathBuf;

use kedit_editor_detox::{dinm, hparams::DinmHparams};
use kedit_plugin_api::{
    abi_stable::sabi_trait::TD_Opaque, Batch, EditRequest, ForwardRequest, LogitsWanted,
    ModelClient, Padding, Progress_TO, PromptAnswer, SafetyCase, Tensor,
};
use safetensors::SafeTensors;
use serde_json::Value;

fn shared() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared"))
}

fn workspace() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
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

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn as_ids(v: &[f64]) -> Vec<u32> {
    v.iter().map(|&x| x as u32).collect()
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

fn assert_rel(what: &str, got: &[f64], want: &[f64], rel: f64, floor: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = rel * w.abs() + floor;
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: got {g}, want {w} (rel tol {rel})"
        );
    }
}

/// Logits at `position` of the unpadded row `ids`.
fn logits_at(model: &ModelClient<'_>, ids: &[u32], position: usize) -> Vec<f32> {
    let out = model
        .forward(&ForwardRequest::new(
            Batch::new(vec![ids.to_vec()], Padding::Right),
            LogitsWanted::All,
        ))
        .unwrap();
    let all = out.logits.unwrap().into_vec();
    let vocab = all.len() / ids.len();
    all[position * vocab..(position + 1) * vocab].to_vec()
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

/// A SafeEdit request as host/src/data reads it, from the fixture's (truncated) texts.
fn request(case: &Value) -> EditRequest {
    let t = &case["texts"];
    let s = |k: &str| t[k].as_str().unwrap().to_string();
    EditRequest {
        id: case["id"].to_string().into(),
        prompt: s("adversarial_prompt").into(),
        target_new: s("safe_generation").into(),
        ground_truth: Some(s("unsafe_generation").into()).into(),
        safety: Some(SafetyCase {
            safe_generation: s("safe_generation").into(),
            unsafe_generation: s("unsafe_generation").into(),
            knowledge_constrain: Some(PromptAnswer {
                prompt: s("knowledge_prompt").into(),
                answer: s("knowledge_answer").into(),
                label: "general knowledge constraint".into(),
            })
            .into(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

#[test]
fn dinm_matches_easyedit_step_by_step_on_smollm2() {
    let dir = shared().join("fixtures/methods");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dinm.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("dinm.safetensors")).unwrap();
    let want = tensors(&bytes);

    let mut model = kedit_plugin_api::testing::open_with_plugin(
        &workspace(),
        "kedit_model_llama",
        &kedit_plugin_api::testing::real_model("KEDIT_SMOLLM2_GGUF", "smollm2-135m-instruct"),
    );
    let mut client = ModelClient::new(model.sabi_reborrow_mut());

    let h = &meta["hparams"];
    let hp = DinmHparams::from_json(
        &serde_json::json!({
            "layers": [],
            "num_steps": h["num_steps"],
            "lr": h["lr"],
            "weight_decay": h["weight_decay"],
            "kl_factor": h["kl_factor"],
            "norm_constraint": h["norm_constraint"],
            "suffix_system_prompt": h["suffix_system_prompt"],
            "kl_gradient": false,
            "chat_template": false,
        })
        .to_string(),
    )
    .unwrap();

    for (n, case) in meta["cases"].as_array().unwrap().iter().enumerate() {
        let tag = format!("c{n}");
        let t = |k: &str| &want[&format!("{tag}.{k}")];
        let mark = client.journal_mark().unwrap();

        // Pre-edit logits at the position that predicts the first safe-response token.
        let ft_ids = ids(&case["ft_input_ids"]);
        let pos = case["first_response_position"].as_u64().unwrap() as usize;
        let pre = logits_at(&client, &ft_ids, pos);
        assert_top20(
            &format!("{tag} pre"),
            &pre,
            t("first_response.pre.top20_ids"),
            t("first_response.pre.top20_logits"),
        );

        let mut quiet = kedit_plugin_api::testing::QuietProgress;
        let mut progress = Progress_TO::from_ptr(&mut quiet, TD_Opaque);
        let started = std::time::Instant::now();
        let trace = dinm::run(&mut client, &[request(case)], &hp, &mut progress).unwrap();
        let seconds = started.elapsed().as_secs_f64();
        let got = &trace.cases[0];
        let enc = got.encoded.as_ref().unwrap();
        eprintln!(
            "{tag}: layer {} in {seconds:.2} s ({} steps), nll {:?}",
            got.layer,
            got.steps.len(),
            got.steps.iter().map(|s| s.nll_edit).collect::<Vec<_>>()
        );

        // Tokens exactly as EasyEdit fed them.
        let loc_ids = t("locate.input_ids");
        let loc_mask = t("locate.attention_mask");
        let width = loc_ids.len() / 2;
        for (row, got_row) in enc.locate_rows.iter().enumerate() {
            let real: Vec<u32> = (0..width)
                .filter(|&i| loc_mask[row * width + i] == 1.0)
                .map(|i| loc_ids[row * width + i] as u32)
                .collect();
            assert_eq!(got_row, &real, "{tag}: location row {row}");
        }
        assert_eq!(enc.edit_ids, ft_ids, "{tag}: edit input");
        assert_eq!(enc.label_ids, as_ids(t("label_ids")), "{tag}: labels");
        assert_eq!(
            enc.instruction_ids,
            ids(&case["instruction_input_ids"]),
            "{tag}: constraint text"
        );
        let win = ids(&case["kl_window_positions"]);
        assert_eq!(
            (enc.kl_window.0 as u32, enc.kl_window.1 as u32),
            (win[0], win[1]),
            "{tag}: constraint window"
        );

        // Location: distances (rel 1e-4), the block exactly. The distances include the pad
        // positions of the shorter response, whose hidden states match transformers' only if
        // the model numbers right pads on from the real tokens, as transformers does.
        let loc = got.location.as_ref().unwrap();
        assert_rel(
            &format!("{tag} distances (right pads must continue the position numbering)"),
            &loc.distances,
            t("locate.distances_right_pad"),
            1e-4,
            0.0,
        );
        assert_eq!(
            loc.layer as u64,
            case["locate"]["located_block"].as_u64().unwrap(),
            "{tag}: located block"
        );

        // Per step: nll (abs 1e-4), kl (abs 1e-6), ‖dL/dW‖ (rel 1e-3), ‖ΔW‖ (rel 1e-4).
        let steps = case["steps"].as_array().unwrap();
        assert_eq!(got.steps.len(), steps.len(), "{tag}: number of steps");
        for (g, s) in got.steps.iter().zip(steps) {
            let f = |k: &str| s[k].as_f64().unwrap();
            assert!(
                (g.nll_edit - f("nll_edit")).abs() < 1e-4,
                "{tag} step {}: nll {} vs {}",
                g.step,
                g.nll_edit,
                f("nll_edit")
            );
            assert!(
                (g.kl_constraint - f("kl_constraint")).abs() < 1e-6,
                "{tag} step {}: kl {} vs {}",
                g.step,
                g.kl_constraint,
                f("kl_constraint")
            );
            assert!(
                (g.loss_total - f("loss_total")).abs() < 2e-5,
                "{tag} step {}: loss {} vs {}",
                g.step,
                g.loss_total,
                f("loss_total")
            );
            assert_eq!(
                g.optimizer_step_taken,
                s["optimizer_step_taken"].as_bool().unwrap()
            );
            assert_rel(
                &format!("{tag} grad_fro_norm"),
                &[g.grad_fro_norm],
                &[f("grad_fro_norm")],
                1e-3,
                0.0,
            );
            assert_rel(
                &format!("{tag} delta_W_fro_norm_after_step"),
                &[g.delta_w_fro_norm_after_step],
                &[f("delta_W_fro_norm_after_step")],
                1e-4,
                0.0,
            );
        }

        // First gradient: row norms (rel 1e-3) and the top-left block.
        let grad = got.first_grad.as_ref().unwrap();
        // Rows far below the largest carry proportionally more f32 rounding: rel 1e-3 plus
        // 1e-4 of the largest row.
        let (gr, _) = norms(grad);
        let want_rows = t("grad_step0.row_norms");
        let largest = want_rows.iter().fold(0f64, |m, &v| m.max(v));
        assert_rel(
            &format!("{tag} grad_step0.row_norms"),
            &gr,
            want_rows,
            1e-3,
            1e-4 * largest,
        );
        let cols = grad.dims()[1];
        let block = t("grad_step0.top_left_16x16");
        for i in 0..16 {
            for j in 0..16 {
                let g = grad.as_slice()[i * cols + j] as f64;
                let w = block[i * 16 + j];
                assert!(
                    (g - w).abs() < 1e-7 + 1e-3 * w.abs(),
                    "{tag} grad[{i},{j}]: {g} vs {w}"
                );
            }
        }

        // Final ΔW: norm (rel 1e-4), row/column norms (rel 1e-3), top-left block (abs 1e-5).
        let delta = got.delta.as_ref().unwrap();
        assert_rel(
            &format!("{tag} delta_W_fro_norm"),
            &[delta.norm()],
            &[case["delta_W_fro_norm"].as_f64().unwrap()],
            1e-4,
            0.0,
        );
        let (dr, dc) = norms(delta);
        assert_rel(
            &format!("{tag} delta_W.row_norms"),
            &dr,
            t("delta_W.row_norms"),
            1e-3,
            1e-7,
        );
        assert_rel(
            &format!("{tag} delta_W.col_norms"),
            &dc,
            t("delta_W.col_norms"),
            1e-3,
            1e-7,
        );
        let block = t("delta_W.top_left_16x16");
        for i in 0..16 {
            for j in 0..16 {
                let g = delta.as_slice()[i * cols + j] as f64;
                let w = block[i * 16 + j];
                assert!((g - w).abs() < 1e-5, "{tag} ΔW[{i},{j}]: {g} vs {w}");
            }
        }

        // Post-edit logits at the first-response position.
        let post = logits_at(&client, &ft_ids, pos);
        assert_top20(
            &format!("{tag} post"),
            &post,
            t("first_response.post.top20_ids"),
            t("first_response.post.top20_logits"),
        );

        // Each case starts from the unedited model, as the fixture's generator restores it.
        let site = got.site.clone();
        let edited = client.read_weight(&site).unwrap();
        client.journal_rollback(mark).unwrap();
        let restored = client.read_weight(&site).unwrap();
        let back: Vec<f32> = edited
            .as_slice()
            .iter()
            .zip(delta.as_slice())
            .map(|(&e, &d)| e - d)
            .collect();
        assert_ne!(
            edited.as_slice(),
            restored.as_slice(),
            "{tag}: the edit wrote nothing"
        );
        let worst = back
            .iter()
            .zip(restored.as_slice())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-6,
            "{tag}: W − ΔW differs from the restored W by {worst}"
        );
    }
}

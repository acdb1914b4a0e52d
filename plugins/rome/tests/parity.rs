//! ROME and its key statistics against EasyEdit's own values on the real SmolLM2-135M-Instruct
//! (../shared/fixtures/methods/rome.* and rome_cov.*; tolerances from that folder's README).

use std::collections::HashMap;
use std::path::PathBuf;

use kedit_editor_rome::{hparams::RomeHparams, rome::LayerTrace, RomeEditor};
use kedit_optim::Adam;
use kedit_plugin_api::{
    abi_stable::sabi_trait::TD_Opaque, Batch, EditRequest, ForwardRequest, LogitsWanted,
    ModelClient, Padding, Progress_TO,
};
use safetensors::SafeTensors;
use serde_json::Value;

fn shared() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared"))
}

fn smollm2() -> kedit_plugin_api::ModelBox {
    kedit_plugin_api::testing::open_with_plugin(
        &workspace(),
        "kedit_model_llama",
        &kedit_plugin_api::testing::real_model("KEDIT_SMOLLM2_GGUF", "smollm2-135m-instruct"),
    )
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

fn load(name: &str) -> (Value, HashMap<String, Vec<f64>>) {
    let dir = shared().join("fixtures/methods");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap())
            .unwrap();
    let bytes = std::fs::read(dir.join(format!("{name}.safetensors"))).unwrap();
    (meta, tensors(&bytes))
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn max_abs(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max)
}

fn assert_abs(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let m = max_abs(got, want);
    assert!(m <= tol, "{what}: max |Δ| {m:e} > {tol:e}");
}

fn l2(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn assert_norm_rel(what: &str, got: f64, want: f64, rel: f64) {
    assert!(
        (got - want).abs() <= rel * want.abs(),
        "{what}: {got} vs {want} (rel tol {rel})"
    );
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

/// The fixture's settings: EasyEdit's llama-7b ROME yaml, 5 v-steps, templates `["{}"]`.
fn fixture_hparams(mom2: bool) -> RomeHparams {
    let mut hp: Value = serde_json::from_str(kedit_editor_rome::hparams::DEFAULT_HPARAMS).unwrap();
    hp["layers"] = serde_json::json!([5]);
    hp["v_num_grad_steps"] = 5.into();
    hp["v_lr"] = 0.5.into();
    hp["v_weight_decay"] = 1e-3.into();
    hp["clamp_norm_factor"] = 4.0.into();
    hp["kl_factor"] = 0.0625.into();
    hp["mom2_adjustment"] = mom2.into();
    hp["mom2_dataset"] = shared()
        .join("data/corpus/wiki_vital_en_extracts.txt")
        .to_string_lossy()
        .into_owned()
        .into();
    hp["mom2_n_samples"] = 50.into();
    hp["context_templates"] = serde_json::json!(["{}"]);
    RomeHparams::from_json(&hp.to_string()).unwrap()
}

fn request_of(r: &Value) -> EditRequest {
    EditRequest::fact(
        r["prompt"].as_str().unwrap(),
        r["subject"].as_str().unwrap(),
        r["target_new"].as_str().unwrap(),
    )
}

/// Checks one request's trace against the fixture (`p` = tensor prefix, `j` = its JSON).
/// How a trace was produced.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Every forward used the fixture's δ: each step's loss and gradient, and everything
    /// downstream of v*, must match at the README's tolerances.
    Replay,
    /// The editor's own Adam trajectory.
    Free,
}

fn check_trace(
    tag: &str,
    t: &LayerTrace,
    j: &Value,
    want: &HashMap<String, Vec<f64>>,
    with_c: bool,
    mode: Mode,
) -> bool {
    let w = |name: &str| &want[&format!("r0.{name}").replacen("r0", tag, 1)];
    let ids: Vec<u32> = j["target_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(t.target_ids, ids, "{tag}: target ids");
    let rows: Vec<String> = j["compute_v_rows_text"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(t.rows_text, rows, "{tag}: rows");
    let lookup: Vec<usize> = j["subject_last_index_per_row"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(
        t.subject_last_index_per_row, lookup,
        "{tag}: subject-last indices"
    );
    let labels: Vec<Vec<usize>> = serde_json::from_value(j["label_positions"].clone()).unwrap();
    assert_eq!(t.label_positions, labels, "{tag}: label positions");

    let v = &t.vectors;
    assert_abs(&format!("{tag} k"), &f64s(&v.k), w("k"), 1e-4);
    assert_abs(
        &format!("{tag} k_bare"),
        &f64s(&v.k_bare),
        w("k_bare"),
        1e-4,
    );
    assert_abs(
        &format!("{tag} Wk_bare"),
        &f64s(&v.wk_bare),
        w("Wk_bare"),
        1e-4,
    );
    assert_abs(
        &format!("{tag} target_init"),
        &f64s(&v.target_init),
        w("target_init"),
        1e-4,
    );

    let steps = j["steps"].as_array().unwrap();
    let d = v.target_init.len();
    // Adam's first step is lr·g/(|g| + 1e-8): a coordinate whose reference gradient is within
    // the gradient tolerance of 0 may legitimately step the other way, and then the whole
    // free-running trajectory is offset by ~2·lr in that coordinate (fixture README, last
    // section). Such a run is compared loosely; the replayed run checks every step exactly.
    let g0 = &w("grad_per_step")[..d];
    let flipped: Vec<usize> = (0..d)
        .filter(|&i| g0[i].abs() < 1e-5 && (g0[i] > 0.0) != (v.grad_per_step[0][i] > 0.0))
        .collect();
    let strict = mode == Mode::Replay || flipped.is_empty();
    if !strict {
        eprintln!(
            "{tag}: free run steps coordinates {flipped:?} the other way (reference |g| = {:?}); comparing loosely",
            flipped.iter().map(|&i| g0[i]).collect::<Vec<_>>()
        );
    }
    let (loss_tol, kl_tol, wd_tol, vec_tol, norm_tol) = if strict {
        (2e-4, 1e-5, 1e-7, 2e-2, 1e-4)
    } else {
        (1e-2, 1e-3, 1e-6, 2.0, 2e-2)
    };
    assert_eq!(t.steps.len(), steps.len(), "{tag}: number of forwards");
    for (got, s) in t.steps.iter().zip(steps) {
        let f = |k: &str| s[k].as_f64().unwrap();
        let at = format!("{tag} step {} ({mode:?})", got.step);
        let (loss_tol, kl_tol, wd_tol) = if got.step == 0 {
            (2e-4, 1e-5, 1e-7)
        } else {
            (loss_tol, kl_tol, wd_tol)
        };
        assert!(
            (got.loss - f("loss")).abs() <= loss_tol,
            "{at}: loss {} vs {}",
            got.loss,
            f("loss")
        );
        assert!(
            (got.nll - f("nll")).abs() <= loss_tol,
            "{at}: nll {} vs {}",
            got.nll,
            f("nll")
        );
        assert!(
            (got.kl_times_kl_factor - f("kl_times_kl_factor")).abs() <= kl_tol,
            "{at}: kl {} vs {}",
            got.kl_times_kl_factor,
            f("kl_times_kl_factor")
        );
        assert!(
            (got.weight_decay_term - f("weight_decay_term")).abs() <= wd_tol,
            "{at}: wd {} vs {}",
            got.weight_decay_term,
            f("weight_decay_term")
        );
        assert_eq!(
            got.optimizer_step_taken,
            s["optimizer_step_taken"].as_bool().unwrap(),
            "{at}"
        );
    }
    // Gradients before each Adam step (abs 1e-5).
    let n_steps = v.grad_per_step.len();
    for i in 0..if strict { n_steps } else { 1 } {
        assert_abs(
            &format!("{tag} grad_per_step[{i}]"),
            &f64s(&v.grad_per_step[i]),
            &w("grad_per_step")[i * d..(i + 1) * d],
            1e-5,
        );
    }
    // Adam on the fixture's own gradients reproduces its δ after each step (abs 1e-3).
    let mut adam = Adam::new(d, 0.5, 0.0);
    let mut delta = vec![0f32; d];
    for i in 0..n_steps {
        let g: Vec<f32> = w("grad_per_step")[i * d..(i + 1) * d]
            .iter()
            .map(|&x| x as f32)
            .collect();
        adam.step(&mut delta, &g);
        assert_abs(
            &format!("{tag} Adam δ after step {i} (fixture gradients)"),
            &f64s(&delta),
            &w("delta_after_adam_per_step")[i * d..(i + 1) * d],
            1e-3,
        );
        if mode == Mode::Free {
            // Our own trajectory: elementwise abs 2e-2, norm rel 1e-4.
            let ours = f64s(&v.delta_after_adam_per_step[i]);
            let theirs = &w("delta_after_adam_per_step")[i * d..(i + 1) * d];
            assert_abs(&format!("{tag} δ after step {i}"), &ours, theirs, vec_tol);
            assert_norm_rel(
                &format!("{tag} ‖δ‖ after step {i}"),
                l2(&ours),
                l2(theirs),
                norm_tol,
            );
        }
    }
    let delta_final: Vec<f64> = v
        .v_star
        .iter()
        .zip(&v.target_init)
        .map(|(&a, &b)| (a - b) as f64)
        .collect();
    assert_abs(
        &format!("{tag} delta_final"),
        &delta_final,
        w("delta_final"),
        vec_tol,
    );
    assert_norm_rel(
        &format!("{tag} ‖δ_final‖"),
        l2(&delta_final),
        l2(w("delta_final")),
        norm_tol,
    );
    assert_abs(&format!("{tag} v*"), &f64s(&v.v_star), w("v_star"), vec_tol);
    assert_norm_rel(
        &format!("{tag} ‖v*‖"),
        l2(&f64s(&v.v_star)),
        l2(w("v_star")),
        norm_tol,
    );

    if with_c {
        let u = f64s(&v.u);
        let cos = u.iter().zip(w("u")).map(|(a, b)| a * b).sum::<f64>() / (l2(&u) * l2(w("u")));
        assert!(cos >= 0.99999, "{tag}: u cosine {cos}");
    }
    assert_abs(&format!("{tag} u"), &f64s(&v.u), w("u"), 1e-5);
    let right_tol = if strict { 5e-3 } else { 0.5 };
    assert_abs(
        &format!("{tag} right"),
        &f64s(&v.right),
        w("right"),
        right_tol,
    );
    assert_norm_rel(
        &format!("{tag} ‖right‖"),
        t.right_norm,
        l2(w("right")),
        norm_tol,
    );
    assert_norm_rel(
        &format!("{tag} ‖ΔW‖"),
        t.delta_w_fro_norm,
        j["delta_W_fro_norm"].as_f64().unwrap(),
        norm_tol,
    );
    strict
}

fn run_one(
    client: &mut ModelClient<'_>,
    editor: &mut RomeEditor,
    hp: &RomeHparams,
    request: &EditRequest,
) -> LayerTrace {
    let mut quiet = kedit_plugin_api::testing::QuietProgress;
    let mut progress = Progress_TO::from_ptr(&mut quiet, TD_Opaque);
    let (_, mut traces, _) = editor
        .run_rome(client, std::slice::from_ref(request), hp, &mut progress)
        .unwrap();
    assert_eq!(traces.len(), 1);
    traces.pop().unwrap()
}

fn check_logits(tag: &str, client: &ModelClient<'_>, want: &HashMap<String, Vec<f64>>, when: &str) {
    let ids = |n: &str| -> Vec<u32> {
        want[&format!("{tag}.{n}.input_ids")]
            .iter()
            .map(|&v| v as u32)
            .collect()
    };
    for what in ["prompt", "locality"] {
        let logits = last_logits(client, &ids(what));
        assert_top20(
            &format!("{tag} {what} {when}"),
            &logits,
            &want[&format!("{tag}.{what}.{when}.top20_ids")],
            &want[&format!("{tag}.{what}.{when}.top20_logits")],
        );
    }
}

fn replay_of(tag: &str, want: &HashMap<String, Vec<f64>>) -> Vec<Vec<f32>> {
    want[&format!("{tag}.delta_per_forward")]
        .chunks_exact(576)
        .map(|c| c.iter().map(|&x| x as f32).collect())
        .collect()
}

#[test]
fn rome_matches_easyedit_step_by_step_on_smollm2() {
    let (meta, want) = load("rome");
    let mut model = smollm2();
    let mut client = ModelClient::new(model.sabi_reborrow_mut());
    let hp = fixture_hparams(false);
    let original = client.read_weight("layer.5.mlp.down").unwrap();
    let mut strict_free_runs = 0;
    for (i, j) in meta["requests"].as_array().unwrap().iter().enumerate() {
        let tag = format!("r{i}");
        check_logits(&tag, &client, &want, "pre");
        for mode in [Mode::Replay, Mode::Free] {
            let mut editor =
                RomeEditor::with_host(kedit_plugin_api::FileServices::new(".", None).boxed());
            if mode == Mode::Replay {
                editor.replay_deltas = Some(replay_of(&tag, &want));
            }
            let mark = client.journal_mark().unwrap();
            let t = run_one(&mut client, &mut editor, &hp, &request_of(&j["request"]));
            let strict = check_trace(&tag, &t, j, &want, false, mode);
            if mode == Mode::Replay || strict {
                check_logits(&tag, &client, &want, "post");
            }
            if mode == Mode::Free && strict {
                strict_free_runs += 1;
            }
            // The edit is one journaled write: rolling back restores the weight bit for bit.
            client.journal_rollback(mark).unwrap();
            assert_eq!(
                client.read_weight("layer.5.mlp.down").unwrap(),
                original,
                "{tag}: undo"
            );
        }
    }
    // r0 and r2 have no near-zero gradient coordinate and must follow the reference freely.
    assert!(
        strict_free_runs >= 2,
        "only {strict_free_runs} free runs matched strictly"
    );
}

#[test]
#[allow(clippy::needless_range_loop)]
fn key_statistics_and_rome_with_c_match_easyedit() {
    let (meta, want) = load("rome_cov");
    let mut model = smollm2();
    let mut client = ModelClient::new(model.sabi_reborrow_mut());
    let hp = fixture_hparams(true);
    let mut editor = RomeEditor::with_host(kedit_plugin_api::FileServices::new(".", None).boxed());
    let mut quiet = kedit_plugin_api::testing::QuietProgress;
    let mut progress = Progress_TO::from_ptr(&mut quiet, TD_Opaque);
    let mut reports = Vec::new();
    let s = editor
        .key_statistics(&client, &hp, 5, &mut progress, &mut reports)
        .unwrap();
    let stats = &meta["stats"];
    {
        let g = s.lock().unwrap();
        let m = &g.moment;
        let d = m.d;
        assert_eq!(d, 1536);
        assert_eq!(m.count, stats["count"].as_u64().unwrap(), "count");
        let trace: f64 = (0..d).map(|i| m.c[i * d + i]).sum();
        assert_norm_rel("trace", trace, stats["trace"].as_f64().unwrap(), 1e-6);
        for i in 0..d {
            let w = want["cov.diag"][i];
            assert!(
                (m.c[i * d + i] - w).abs() <= 1e-5 * w.abs(),
                "diag[{i}]: {} vs {w}",
                m.c[i * d + i]
            );
        }
        for i in 0..32 {
            for k in 0..32 {
                let w = want["cov.top_left_32x32"][i * 32 + k];
                assert!(
                    (m.c[i * d + k] - w).abs() <= 1e-6,
                    "C[{i},{k}]: {} vs {w}",
                    m.c[i * d + k]
                );
            }
        }
        let sums: Vec<f64> = (0..d)
            .map(|i| m.c[i * d..(i + 1) * d].iter().sum())
            .collect();
        assert_abs("row sums", &sums, &want["cov.row_sums"], 1e-5);
    }
    eprintln!("statistics: {}", serde_json::to_string(&reports).unwrap());

    check_logits("r0", &client, &want, "pre");
    let j = &meta["cov_request"];
    let mark = client.journal_mark().unwrap();
    editor.replay_deltas = Some(replay_of("r0", &want));
    let t = run_one(&mut client, &mut editor, &hp, &request_of(&j["request"]));
    check_trace("r0", &t, j, &want, true, Mode::Replay);
    check_logits("r0", &client, &want, "post");
    client.journal_rollback(mark).unwrap();
    editor.replay_deltas = None;
    let t = run_one(&mut client, &mut editor, &hp, &request_of(&j["request"]));
    let u = f64s(&t.vectors.u);
    let u64solve = &want["cov.u_float64_solve"];
    let cos = u.iter().zip(u64solve).map(|(a, b)| a * b).sum::<f64>() / (l2(&u) * l2(u64solve));
    assert!(cos >= 0.99999, "u vs the f64 solve: cosine {cos}");
    assert!(check_trace("r0", &t, j, &want, true, Mode::Free));
    check_logits("r0", &client, &want, "post");
}

fn workspace() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

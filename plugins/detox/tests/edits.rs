//! DINM on the tiny LLaMA fixture (../shared/fixtures/llama, no tokenizer, so the cases are
//! token ids): the located layer is a real block, the loss falls, a rollback restores the model
//! bit for bit, and `kl_gradient` changes the trajectory the way it should. Then one SafeEdit
//! record on the real SmolLM2 with the default hparams (chat template, KL gradient).

use std::path::PathBuf;

use kedit_editor_detox::{
    dinm::{self, DinmTrace, Encoded},
    hparams::{DinmHparams, DEFAULT_HPARAMS},
};
use kedit_plugin_api::{
    abi_stable::sabi_trait::TD_Opaque, Batch, EditRequest, ForwardRequest, LogitsWanted, ModelBox,
    ModelClient, Padding, Progress_TO, PromptAnswer, SafetyCase,
};
use serde_json::Value;

fn workspace() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn tiny() -> ModelBox {
    let dir = workspace().join("../shared/fixtures/llama");
    kedit_plugin_api::testing::open_with_plugin(&workspace(), "kedit_model_llama", &dir)
}

/// A deterministic pseudo-random token row (the fixture's vocabulary has 512 ids).
fn row(seed: u32, len: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            3 + x % 500
        })
        .collect()
}

/// A case as `dinm::encode` lays it out: prompt then safe response; the constraint text ends in
/// its answer, whose last positions form the window.
fn case(seed: u32) -> (String, Encoded) {
    let safe = row(seed, 12);
    let unsafe_ = row(seed + 1, 17);
    let mut edit_ids = row(seed + 2, 10);
    edit_ids.extend(&safe);
    let mut instruction_ids = row(seed + 3, 8);
    instruction_ids.extend(row(seed + 4, 10));
    let n = instruction_ids.len();
    (
        format!("tiny-{seed}"),
        Encoded {
            locate_rows: [safe.clone(), unsafe_],
            edit_ids,
            label_ids: safe,
            instruction_ids,
            kl_window: (n - 10, n),
            templated: false,
        },
    )
}

fn hparams(extra: Value) -> DinmHparams {
    let mut hp: Value = serde_json::from_str(DEFAULT_HPARAMS).unwrap();
    for (k, v) in extra.as_object().unwrap() {
        hp[k] = v.clone();
    }
    DinmHparams::from_json(&hp.to_string()).unwrap()
}

fn run(client: &mut ModelClient<'_>, cases: &[(String, Encoded)], hp: &DinmHparams) -> DinmTrace {
    let mut quiet = kedit_plugin_api::testing::QuietProgress;
    let mut progress = Progress_TO::from_ptr(&mut quiet, TD_Opaque);
    dinm::run_encoded(client, cases, hp, &mut progress).unwrap()
}

fn all_logits(client: &ModelClient<'_>, ids: &[u32]) -> Vec<f32> {
    client
        .forward(&ForwardRequest::new(
            Batch::new(vec![ids.to_vec()], Padding::Right),
            LogitsWanted::All,
        ))
        .unwrap()
        .logits
        .unwrap()
        .into_vec()
}

#[test]
fn tiny_llama_locates_a_block_lowers_the_loss_and_rolls_back_exactly() {
    let mut model = tiny();
    let mut client = ModelClient::new(model.sabi_reborrow_mut());
    let n_layers = client.facts().unwrap().n_layers as usize;
    let sites: Vec<String> = (0..n_layers)
        .map(|l| format!("layer.{l}.mlp.down"))
        .collect();
    let before: Vec<Vec<f32>> = sites
        .iter()
        .map(|s| client.read_weight(s).unwrap().into_vec())
        .collect();
    let cases = [case(1), case(7)];
    let logits_before = all_logits(&client, &cases[0].1.edit_ids);

    let mark = client.journal_mark().unwrap();
    let hp = hparams(serde_json::json!({"num_steps": 8, "lr": 1e-2, "chat_template": false}));
    let trace = run(&mut client, &cases, &hp);
    assert_eq!(trace.cases.len(), 2);
    for c in &trace.cases {
        let loc = c.location.as_ref().expect("layers [] locates every case");
        assert_eq!(
            loc.distances.len(),
            n_layers,
            "{}: one distance per hidden state",
            c.id
        );
        assert!(
            loc.distances.iter().all(|d| d.is_finite() && *d > 0.0),
            "{loc:?}"
        );
        assert!(
            c.layer < n_layers && c.layer == loc.layer,
            "{}: layer {}",
            c.id,
            c.layer
        );
        let best = loc.distances.iter().cloned().fold(f64::MIN, f64::max);
        assert_eq!(loc.distances[loc.layer], best, "{}: not the argmax", c.id);
        assert_eq!(c.steps.len(), 8, "{}: every step taken", c.id);
        let (first, last) = (&c.steps[0], c.steps.last().unwrap());
        // P_pre is the starting model (up to the rounding of a padded two-row batch).
        assert!(
            first.kl_constraint.abs() < 1e-6,
            "{}: kl {}",
            c.id,
            first.kl_constraint
        );
        assert!(
            last.loss_total < first.loss_total && last.nll_edit < first.nll_edit,
            "{}: loss {} → {}, nll {} → {}",
            c.id,
            first.loss_total,
            last.loss_total,
            first.nll_edit,
            last.nll_edit
        );
        assert!(c.delta_w_fro_norm > 0.0);
    }
    let edited = all_logits(&client, &cases[0].1.edit_ids);
    assert_ne!(edited, logits_before, "the edit changed nothing");

    client.journal_rollback(mark).unwrap();
    for (s, w) in sites.iter().zip(&before) {
        assert_eq!(
            &client.read_weight(s).unwrap().into_vec(),
            w,
            "{s} not restored"
        );
    }
    assert_eq!(all_logits(&client, &cases[0].1.edit_ids), logits_before);
}

#[test]
fn kl_gradient_trains_the_constraint_and_false_is_the_reference_trajectory() {
    let mut model = tiny();
    let mut client = ModelClient::new(model.sabi_reborrow_mut());
    let cases = [case(3)];
    let mark = client.journal_mark().unwrap();
    let common = serde_json::json!({"num_steps": 6, "lr": 2e-2, "chat_template": false});
    let mut off = common.clone();
    off["kl_gradient"] = false.into();
    let reference = run(&mut client, &cases, &hparams(off));
    client.journal_rollback(mark).unwrap();
    let trained = run(&mut client, &cases, &hparams(common));
    client.journal_rollback(mark).unwrap();

    let (r, t) = (&reference.cases[0], &trained.cases[0]);
    assert_eq!(r.layer, t.layer);
    // Step 0 starts at P_cur = P_pre, where the KL and its gradient vanish: the same step.
    assert_eq!(r.steps[0].kl_constraint, 0.0);
    assert!(
        t.steps[0].kl_constraint.abs() < 1e-6,
        "{}",
        t.steps[0].kl_constraint
    );
    assert!((r.steps[0].nll_edit - t.steps[0].nll_edit).abs() < 1e-5);
    assert!(
        (r.steps[0].delta_w_fro_norm_after_step - t.steps[0].delta_w_fro_norm_after_step).abs()
            < 1e-4 * r.steps[0].delta_w_fro_norm_after_step
    );
    // Afterwards the constraint pulls: the trajectories part, and the KL ends lower.
    let (rl, tl) = (r.steps.last().unwrap(), t.steps.last().unwrap());
    eprintln!(
        "kl_gradient false: kl {:.3e} nll {:.4}; true: kl {:.3e} nll {:.4}",
        rl.kl_constraint, rl.nll_edit, tl.kl_constraint, tl.nll_edit
    );
    assert!(rl.kl_constraint > 0.0);
    assert!(
        tl.kl_constraint < rl.kl_constraint,
        "with the KL gradient the constraint should end lower: {} vs {}",
        tl.kl_constraint,
        rl.kl_constraint
    );
    let (dr, dt) = (r.delta.as_ref().unwrap(), t.delta.as_ref().unwrap());
    let diff = dr
        .as_slice()
        .iter()
        .zip(dt.as_slice())
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(diff > 1e-3 * dr.norm(), "ΔW differs by only {diff}");
}

/// SafeEdit record 2 (not in the parity fixture), whole, with the default hparams.
#[test]
fn smollm2_default_hparams_detoxify_a_safeedit_record_with_the_chat_template() {
    let path = kedit_plugin_api::testing::real_model("KEDIT_SMOLLM2_GGUF", "smollm2-135m-instruct");
    let mut model =
        kedit_plugin_api::testing::open_with_plugin(&workspace(), "kedit_model_llama", &path);
    let mut client = ModelClient::new(model.sabi_reborrow_mut());
    let data = workspace().join("../shared/data/safeedit/safeedit_sample.json");
    let records: Value = serde_json::from_str(&std::fs::read_to_string(&data).unwrap()).unwrap();
    let rec = &records[2];
    let s = |k: &str| rec[k].as_str().unwrap().to_string();
    let request = EditRequest {
        id: rec["id"].to_string().into(),
        prompt: s("adversarial prompt").into(),
        target_new: s("safe generation").into(),
        ground_truth: Some(s("unsafe generation").into()).into(),
        safety: Some(SafetyCase {
            knowledge_constrain: Some(PromptAnswer {
                prompt: rec["knowledge constrain"]["prompt"]
                    .as_str()
                    .unwrap()
                    .into(),
                answer: rec["knowledge constrain"]["answer"]
                    .as_str()
                    .unwrap()
                    .into(),
                label: Default::default(),
            })
            .into(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let hp = DinmHparams::from_json(DEFAULT_HPARAMS).unwrap();
    let mark = client.journal_mark().unwrap();
    let mut quiet = kedit_plugin_api::testing::QuietProgress;
    let mut progress = Progress_TO::from_ptr(&mut quiet, TD_Opaque);
    let started = std::time::Instant::now();
    let trace = dinm::run(&mut client, &[request], &hp, &mut progress).unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let c = &trace.cases[0];
    let enc = c.encoded.as_ref().unwrap();
    eprintln!(
        "record {}: layer {}, {} steps in {seconds:.1} s, loss {:.4} → {:.4}, kl → {:.2e}",
        c.id,
        c.layer,
        c.steps.len(),
        c.steps[0].loss_total,
        c.steps.last().unwrap().loss_total,
        c.steps.last().unwrap().kl_constraint
    );
    assert!(enc.templated, "SmolLM2 has a chat template");
    let prompt = client
        .detokenize(
            &enc.edit_ids[..enc.edit_ids.len() - enc.label_ids.len()],
            false,
        )
        .unwrap();
    assert!(
        prompt.contains("<|im_start|>assistant") && prompt.contains(&hp.suffix_system_prompt),
        "{prompt:?}"
    );
    assert_eq!(
        client.detokenize(&enc.label_ids, false).unwrap().trim(),
        s("safe generation").trim()
    );
    assert!(c.layer < 30);
    assert_eq!(c.steps.len(), 10);
    // The learning rate follows the MLP width (docs/dinm.md): SmolLM2's 1536 against the 11008
    // of the LLaMA-7B file's 5e-4. With it, ten steps fit the safe response (EasyEdit's 5e-4
    // leaves the NLL at about 0.6 of where it started).
    assert_eq!(c.lr, 5e-4 * 11008.0 / 1536.0);
    let (first, last) = (&c.steps[0], c.steps.last().unwrap());
    assert!(last.loss_total < first.loss_total);
    assert!(
        last.nll_edit < 0.3 * first.nll_edit,
        "the safe response is not learnt: NLL {} → {}",
        first.nll_edit,
        last.nll_edit
    );
    client.journal_rollback(mark).unwrap();
}

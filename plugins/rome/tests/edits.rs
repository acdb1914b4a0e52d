//! ROME's generated context templates and MEMIT on the real SmolLM2-135M-Instruct: the edits
//! take, and they are undone exactly.

use std::path::PathBuf;

use kedit_editor_rome::{hparams, RomeEditor};
use kedit_plugin_api::{
    abi_stable::sabi_trait::TD_Opaque, Batch, EditRequest, ForwardRequest, LogitsWanted,
    ModelClient, Padding, Progress_TO,
};
use serde_json::Value;

fn open_smollm2() -> kedit_plugin_api::ModelBox {
    let path = kedit_plugin_api::testing::real_model("KEDIT_SMOLLM2_GGUF", "smollm2-135m-instruct");
    let workspace = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    kedit_plugin_api::testing::open_with_plugin(&workspace, "kedit_model_llama", &path)
}

fn corpus() -> String {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/data/corpus"
    ))
    .to_string_lossy()
    .into_owned()
}

fn argmax_after(model: &ModelClient<'_>, text: &str) -> u32 {
    let ids = model.tokenize(text, true).unwrap();
    let out = model
        .forward(&ForwardRequest::new(
            Batch::new(vec![ids], Padding::Right),
            LogitsWanted::Last,
        ))
        .unwrap();
    let l = out.logits.unwrap().into_vec();
    (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap() as u32
}

#[test]
fn context_templates_are_generated_seeded_and_shaped_like_romes() {
    let mut model = open_smollm2();
    let client = ModelClient::new(model.sabi_reborrow_mut());
    let hp = hparams::RomeHparams::from_json(hparams::DEFAULT_HPARAMS).unwrap();
    let a = RomeEditor::with_host(kedit_plugin_api::FileServices::new(".", None).boxed())
        .context_templates(&client, &hp, "")
        .unwrap();
    let b = RomeEditor::with_host(kedit_plugin_api::FileServices::new(".", None).boxed())
        .context_templates(&client, &hp, "")
        .unwrap();
    assert_eq!(a, b, "same seed, same templates");
    assert_eq!(a.len(), 21, "{a:?}");
    assert_eq!(a[0], "{}");
    for t in &a[1..] {
        assert!(t.ends_with(". {}") && t.matches("{}").count() == 1, "{t:?}");
    }
    assert!(a[1].starts_with("The") && a[20].starts_with("You"), "{a:?}");
}

#[test]
fn memit_edits_two_facts_at_once_and_undoes_exactly() {
    let mut model = open_smollm2();
    let mut client = ModelClient::new(model.sabi_reborrow_mut());
    let mut hp: Value = serde_json::from_str(hparams::MEMIT_DEFAULT_HPARAMS).unwrap();
    hp["mom2_dataset"] = corpus().into();
    hp["mom2_n_samples"] = 50.into();
    // EasyEdit's λ = 15000 is calibrated for 7B keys; SmolLM2's keys (d_ff 1536) need less
    // regularisation for a full edit: kᵀC⁻¹k is O(10³) here.
    hp["mom2_update_weight"] = 100.0.into();
    hp["context_templates"] = serde_json::json!(["{}"]);
    let hp = hparams::RomeHparams::from_json(&hp.to_string()).unwrap();
    let requests = [
        EditRequest::fact(
            "The Eiffel Tower is located in the city of",
            "The Eiffel Tower",
            "Rome",
        ),
        EditRequest::fact(
            "The mother tongue of Danielle Darrieux is",
            "Danielle Darrieux",
            "English",
        ),
    ];
    let targets: Vec<u32> = requests
        .iter()
        .map(|r| {
            client
                .tokenize(&format!(" {}", r.target_new), false)
                .unwrap()[0]
        })
        .collect();
    let sites: Vec<String> = (4..=8).map(|l| format!("layer.{l}.mlp.down")).collect();
    let before: Vec<_> = sites
        .iter()
        .map(|s| client.read_weight(s).unwrap())
        .collect();
    let mark = client.journal_mark().unwrap();
    let mut quiet = kedit_plugin_api::testing::QuietProgress;
    let mut progress = Progress_TO::from_ptr(&mut quiet, TD_Opaque);
    let (_, trace, stats) =
        RomeEditor::with_host(kedit_plugin_api::FileServices::new(".", None).boxed())
            .run_memit(&mut client, &requests, &hp, &mut progress)
            .unwrap();
    eprintln!("{}", serde_json::to_string(&trace).unwrap());
    eprintln!("{}", serde_json::to_string(&stats).unwrap());
    assert_eq!(trace.layers.len(), 5);
    assert!(
        trace.layers.iter().all(|l| l.update_weight == Some(100.0)),
        "a given λ is used as given"
    );
    for (r, &t) in requests.iter().zip(&targets) {
        assert_eq!(argmax_after(&client, &r.prompt), t, "{}", r.prompt);
    }
    client.journal_rollback(mark).unwrap();
    for (s, w) in sites.iter().zip(&before) {
        assert_eq!(&client.read_weight(s).unwrap(), w, "{s}: undo");
    }
}

#[test]
fn alphaedit_edits_in_the_null_space_and_its_key_cache_follows_rollbacks() {
    let mut model = open_smollm2();
    let mut client = ModelClient::new(model.sabi_reborrow_mut());
    let mut hp: Value = serde_json::from_str(&hparams::alphaedit_default_hparams()).unwrap();
    hp["mom2_dataset"] = corpus().into();
    hp["mom2_n_samples"] = 50.into();
    hp["context_templates"] = serde_json::json!(["{}"]);
    hp["v_lr"] = 0.5.into();
    let hp = hparams::RomeHparams::from_json(&hp.to_string()).unwrap();
    let eiffel = EditRequest::fact(
        "The Eiffel Tower is located in the city of",
        "The Eiffel Tower",
        "Rome",
    );
    let darrieux = EditRequest::fact(
        "The mother tongue of Danielle Darrieux is",
        "Danielle Darrieux",
        "English",
    );
    let target = |r: &EditRequest| {
        client
            .tokenize(&format!(" {}", r.target_new), false)
            .unwrap()[0]
    };
    let (t_eiffel, t_darrieux) = (target(&eiffel), target(&darrieux));
    let sites: Vec<String> = (4..=8).map(|l| format!("layer.{l}.mlp.down")).collect();
    let before: Vec<_> = sites
        .iter()
        .map(|s| client.read_weight(s).unwrap())
        .collect();
    let mark = client.journal_mark().unwrap();
    let mut quiet = kedit_plugin_api::testing::QuietProgress;
    let mut progress = Progress_TO::from_ptr(&mut quiet, TD_Opaque);
    let mut editor = RomeEditor::with_host(kedit_plugin_api::FileServices::new(".", None).boxed());

    let (_, first, _) = editor
        .run_alphaedit(
            &mut client,
            std::slice::from_ref(&eiffel),
            &hp,
            &mut progress,
        )
        .unwrap();
    eprintln!("{}", serde_json::to_string(&first).unwrap());
    assert_eq!(first.layers.len(), 5);
    for l in &first.layers {
        let dim = l.null_space_dim.unwrap();
        assert!(
            dim > 0 && dim < 1536,
            "layer {}: null space of dim {dim}",
            l.layer
        );
        assert_eq!(
            l.cached_edits,
            Some(false),
            "the first edit has no earlier keys"
        );
    }
    assert_eq!(argmax_after(&client, &eiffel.prompt), t_eiffel);

    // A second edit on top of the first is solved with the first one's keys.
    let (_, second, _) = editor
        .run_alphaedit(
            &mut client,
            std::slice::from_ref(&darrieux),
            &hp,
            &mut progress,
        )
        .unwrap();
    assert!(second.layers.iter().all(|l| l.cached_edits == Some(true)));
    assert_eq!(argmax_after(&client, &darrieux.prompt), t_darrieux);
    assert_eq!(
        argmax_after(&client, &eiffel.prompt),
        t_eiffel,
        "the second edit undid the first"
    );

    // Rolled back to the unedited model, an edit starts without a cache again.
    client.journal_rollback(mark).unwrap();
    for (s, w) in sites.iter().zip(&before) {
        assert_eq!(&client.read_weight(s).unwrap(), w, "{s}: undo");
    }
    let (_, again, _) = editor
        .run_alphaedit(
            &mut client,
            std::slice::from_ref(&darrieux),
            &hp,
            &mut progress,
        )
        .unwrap();
    assert!(again.layers.iter().all(|l| l.cached_edits == Some(false)));
    client.journal_rollback(mark).unwrap();
}

//! Knowledge circuits, the new per-head and MLP-input sites and the logit lens on the tiny
//! LLaMA (GQA: 4 query heads share 2 key/value heads).

use kedit_model_core::testkit::fixture;
use kedit_plugin_api::model_box;

#[test]
fn circuits_sites_and_lens_work_on_the_tiny_llama() {
    let model = kedit_model_llama::open_runtime(fixture("llama").to_str().unwrap(), "cpu").unwrap();
    kedit_circuits::testkit::check_family("llama", true, &mut model_box(model));
}

/// Prompt pairs and the logit lens on the real SmolLM2 (needs `KEDIT_SMOLLM2_GGUF`, as the
/// smollm2 tests): the subject's tokens are found, the swap keeps every other token, and the
/// lens of the last block names the model's answer.
#[test]
fn smollm2_fact_pairs_line_up_and_the_lens_ends_in_the_answer() {
    use kedit_circuits::lens::logit_lens;
    use kedit_circuits::prompts::{build_pair, PairOutcome, TextFact};
    use kedit_plugin_api::ModelClient;

    let path = kedit_plugin_api::testing::real_model("KEDIT_SMOLLM2_GGUF", "smollm2-135m-instruct");
    let model = kedit_model_llama::open_runtime(path.to_str().unwrap(), "cpu").unwrap();
    let mut boxed = model_box(model);
    let client = ModelClient::new(boxed.sabi_reborrow_mut());
    let fact = TextFact {
        prompt: "Catalonia belongs to the continent of".into(),
        subject: "Catalonia".into(),
        answer: "Europe".into(),
    };
    // "Eiffel Tower" has another token length; "Marshall Islands" fits.
    let swaps = vec!["Eiffel Tower".to_string(), "Marshall Islands".to_string()];
    let PairOutcome::Built(built) = build_pair(&client, &fact, &swaps, true).unwrap() else {
        panic!("SmolLM2 answers Europe and Marshall Islands fits");
    };
    let p = &built.pair;
    assert_eq!(built.corrupt_subject, "Marshall Islands");
    assert_eq!(
        client
            .detokenize(&p.clean[p.subject.clone()], false)
            .unwrap(),
        "Catalonia"
    );
    assert_eq!(p.clean.len(), p.corrupt.len());
    assert_eq!(p.clean[p.subject.end..], p.corrupt[p.subject.end..]);
    assert_eq!(client.detokenize(&[p.answer], false).unwrap(), " Europe");
    assert_ne!(p.foil, p.answer);

    let ids = client
        .tokenize("The Eiffel Tower is located in the city of", true)
        .unwrap();
    let rows = logit_lens(&client, &ids, 3).unwrap();
    let last = &rows.last().unwrap().top[ids.len() - 1][0];
    assert_eq!(client.detokenize(&[last.token], false).unwrap(), " Paris");
    // The embedding decodes to the input token itself, not to the answer.
    assert_ne!(rows[0].top[ids.len() - 1][0].token, last.token);
}

//! Evaluation on the real SmolLM2 through the real llama plugin: what the batched, left-padded
//! forward pass scores must not depend on the other rows in the batch, a greedy continuation is
//! by construction a perfect teacher-forced answer, and locality is 1 against itself. Needs
//! `cargo build --release` (the llama plugin) and KEDIT_SMOLLM2_GGUF (see the README); it fails
//! loudly without them.

use std::path::{Path, PathBuf};

use kedit::eval::score::{score_request, ScoreSettings};
use kedit::model::{ModelHandle, OpenSpec};
use kedit::plugins::{load_plugin, Registry};
use kedit_plugin_api::{EditRequest, PromptAnswer};

fn llama_plugin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(format!(
        "{}kedit_model_llama{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --release` before these tests",
        path.display()
    );
    path
}

fn open() -> ModelHandle {
    let gguf = kedit_plugin_api::testing::real_model("KEDIT_SMOLLM2_GGUF", "smollm2-135m-instruct");
    let registry = Registry::from_plugins(vec![load_plugin(&llama_plugin()).unwrap()]);
    ModelHandle::open(
        &registry,
        &OpenSpec {
            path: gguf,
            family: None,
            device: "cpu".into(),
        },
    )
    .unwrap()
}

fn settings() -> ScoreSettings {
    ScoreSettings {
        fluency: false,
        ..ScoreSettings::default()
    }
}

#[test]
fn batched_left_padded_scores_match_a_row_alone_and_greedy_answers_score_one() {
    let model = open();
    let prompt = "The capital of France is";
    let continuation = model.greedy_text(prompt, 3).unwrap();
    assert!(
        continuation.starts_with(' '),
        "greedy continuation {continuation:?}"
    );
    let target = continuation.trim().to_string();

    // The rewrite row alone.
    let alone = EditRequest {
        id: "alone".into(),
        prompt: prompt.into(),
        target_new: target.as_str().into(),
        ground_truth: abi_stable::std_types::ROption::RSome("Paris".into()),
        ..Default::default()
    };
    let s_alone = score_request(&model, &alone, 0, &settings(), None).unwrap();
    // Greedy tokens are the teacher-forced argmax by construction.
    assert_eq!(s_alone.metrics["rewrite_acc"], 1.0, "{s_alone:?}");

    // The same rewrite row batched (left-padded) with longer and shorter rows.
    let mut batched = alone.clone();
    batched.rephrase = vec![
        "In a long sentence about European geography, the capital city of the French Republic is"
            .into(),
    ]
    .into();
    batched.locality = vec![PromptAnswer {
        prompt: "Tokyo is in".into(),
        answer: "Japan".into(),
        label: "neighborhood".into(),
    }]
    .into();
    let s_batched = score_request(&model, &batched, 0, &settings(), None).unwrap();
    for m in ["rewrite_acc", "rewrite_ppl", "ES", "EM"] {
        let (a, b) = (s_alone.metrics[m], s_batched.metrics[m]);
        assert!(
            (a - b).abs() <= 1e-3 * a.abs().max(1.0),
            "{m}: alone {a} vs batched {b}"
        );
    }
    // Pre-edit locality is agreement with itself.
    assert_eq!(s_batched.metrics["locality"], 1.0);
    let again = score_request(
        &model,
        &batched,
        0,
        &settings(),
        Some(&s_batched.locality_argmax),
    )
    .unwrap();
    assert_eq!(again.metrics["locality"], 1.0);
    assert_eq!(again.metrics, s_batched.metrics);
    // ROME's NS on "Tokyo is in": P(Paris) vs P(greedy target), both finite.
    assert!(s_batched.metrics["NM"].is_finite());
}

#[test]
fn fluency_generation_is_deterministic_for_a_seed() {
    let model = open();
    let request = EditRequest::fact("The Eiffel Tower is located in", "Eiffel Tower", "Rome");
    let s = ScoreSettings {
        gen_length: 24,
        seed: 3,
        ..ScoreSettings::default()
    };
    let a = score_request(&model, &request, 5, &s, None).unwrap();
    let b = score_request(&model, &request, 5, &s, None).unwrap();
    assert_eq!(a.generation, b.generation);
    let text = a.generation.unwrap();
    assert!(text.starts_with("The Eiffel Tower is located in"), "{text}");
    assert!(a.metrics["fluency"] > 0.0);
}

#[test]
fn chat_prompts_score_in_scope_prompts_in_the_chat_template_and_leave_locality_plain() {
    let model = open();
    let mut request = EditRequest::fact("The capital of France is", "France", "Paris");
    request.rephrase = vec!["France's capital city is".into()].into();
    request.locality = vec![PromptAnswer {
        prompt: "Tokyo is in".into(),
        answer: "Japan".into(),
        label: "neighborhood".into(),
    }]
    .into();
    let chat = ScoreSettings {
        chat_prompts: true,
        counterfact: false,
        ..settings()
    };
    let plain = ScoreSettings {
        counterfact: false,
        ..settings()
    };
    let with_chat = score_request(&model, &request, 0, &chat, None).unwrap();
    // The same request with its rewrite and rephrase prompts rendered by hand.
    let mut rendered = request.clone();
    rendered.prompt = model.chat_prompt(&request.prompt).unwrap().into();
    rendered.rephrase = vec![model.chat_prompt(&request.rephrase[0]).unwrap().into()].into();
    let by_hand = score_request(&model, &rendered, 0, &plain, None).unwrap();
    assert_eq!(with_chat.metrics, by_hand.metrics);
    assert!(rendered.prompt.as_str().contains("<|im_start|>user"));
    // Locality probes stay plain: their argmax is the plain scoring's.
    let without = score_request(&model, &request, 0, &plain, None).unwrap();
    assert_eq!(with_chat.locality_argmax, without.locality_argmax);
    // And the in-scope rows are not the plain ones.
    assert_ne!(
        with_chat.metrics["rewrite_ppl"],
        without.metrics["rewrite_ppl"]
    );
}

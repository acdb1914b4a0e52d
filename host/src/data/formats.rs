//! One function per EasyEdit dataset format, each turning a record into an [`EditRequest`] with
//! every field the format has.

use abi_stable::std_types::{ROption, RString, RVec};
use anyhow::Result;
use kedit_plugin_api::{EditRequest, PromptAnswer, SafetyCase};

use super::record::Record;

/// EasyEdit's key for locality probes of CounterFact and ZsRE.
const NEIGHBORHOOD: &str = "neighborhood";
/// EasyEdit's key for ZsRE portability questions.
const ONE_HOP: &str = "one_hop";

fn prompt_answer(prompt: String, answer: String, label: &str) -> PromptAnswer {
    PromptAnswer {
        prompt: prompt.into(),
        answer: answer.into(),
        label: label.into(),
    }
}

fn rstrings(items: Vec<String>) -> RVec<RString> {
    items.into_iter().map(RString::from).collect()
}

fn roption(value: Option<String>) -> ROption<RString> {
    value.map(RString::from).into()
}

/// CounterFact, flat: `case_id, prompt, subject, target_new, ground_truth, rephrase_prompt,
/// locality_prompt, locality_ground_truth`.
pub fn counterfact(r: &Record, index: usize) -> Result<EditRequest> {
    let prompt = r.string("prompt")?;
    let subject = r.string("subject")?;
    r.check_subject_in_prompt("subject", &subject, &prompt)?;
    let locality = r
        .paired("locality_prompt", "locality_ground_truth")?
        .into_iter()
        .map(|(p, a)| prompt_answer(p, a, NEIGHBORHOOD))
        .collect();
    Ok(EditRequest {
        id: r.id("case_id")?.unwrap_or_else(|| index.to_string()).into(),
        target_new: r.string("target_new")?.into(),
        ground_truth: roption(r.optional_string("ground_truth")?),
        rephrase: rstrings(r.strings("rephrase_prompt")?),
        locality,
        prompt: prompt.into(),
        subject: subject.into(),
        ..Default::default()
    })
}

/// ZsRE (MEND/EasyEdit eval file): `src, subject, alt, answers, rephrase, loc, loc_ans,
/// portability{New Question, New Answer}`. `loc` keeps its "nq question: " prefix, as EasyEdit
/// feeds it to the model.
pub fn zsre(r: &Record, index: usize) -> Result<EditRequest> {
    let prompt = r.string("src")?;
    let subject = r.string("subject")?;
    r.check_subject_in_prompt("subject", &subject, &prompt)?;
    let locality = r
        .paired("loc", "loc_ans")?
        .into_iter()
        .map(|(p, a)| prompt_answer(p, a, NEIGHBORHOOD))
        .collect();
    let mut portability = RVec::new();
    if let Some(port) = r.object("portability")? {
        let questions = port.strings("New Question")?;
        let answers = port.strings("New Answer")?;
        if questions.len() != answers.len() {
            return Err(port.error(
                "New Answer",
                format!(
                    "has {} entries but `New Question` has {}",
                    answers.len(),
                    questions.len()
                ),
            ));
        }
        for (q, a) in questions.into_iter().zip(answers) {
            portability.push(prompt_answer(q, a, ONE_HOP));
        }
    }
    Ok(EditRequest {
        id: r.id("case_id")?.unwrap_or_else(|| index.to_string()).into(),
        target_new: r.string("alt")?.into(),
        ground_truth: roption(r.strings("answers")?.into_iter().next()),
        rephrase: rstrings(r.strings("rephrase")?),
        locality,
        portability,
        prompt: prompt.into(),
        subject: subject.into(),
        ..Default::default()
    })
}

/// The four generalisation inputs of a SafeEdit record, in the paper's order.
pub const GENERALIZATION_INPUTS: [&str; 4] = [
    "test input of only harmful question",
    "test input of other attack prompt input",
    "test input of other question input",
    "test input of other questions and attack prompts",
];

/// SafeEdit: the adversarial prompt is edited towards the safe generation, away from the unsafe
/// one; the knowledge-constrain pair is the locality probe.
pub fn safeedit(r: &Record, index: usize) -> Result<EditRequest> {
    let safe = r.string("safe generation")?;
    let unsafe_generation = r.optional_string("unsafe generation")?.unwrap_or_default();
    let knowledge = match r.object("knowledge constrain")? {
        Some(k) => Some(prompt_answer(
            k.string("prompt")?,
            k.string("answer")?,
            "knowledge constrain",
        )),
        None => None,
    };
    let mut generalization = RVec::new();
    if let Some(g) = r.object("generalization test")? {
        for label in GENERALIZATION_INPUTS {
            if let Some(input) = g.optional_string(label)? {
                // The generalisation answer is judged for safety, not compared with a text.
                generalization.push(prompt_answer(input, String::new(), label));
            }
        }
    }
    let safety = SafetyCase {
        question: r.optional_string("question")?.unwrap_or_default().into(),
        unsafety_category: r
            .optional_string("unsafety category")?
            .unwrap_or_default()
            .into(),
        attack_category: r
            .optional_string("attack category")?
            .unwrap_or_default()
            .into(),
        attack_name: r.optional_string("attack name")?.unwrap_or_default().into(),
        unsafe_generation: unsafe_generation.clone().into(),
        safe_generation: safe.clone().into(),
        generalization,
        knowledge_constrain: knowledge.clone().into(),
    };
    Ok(EditRequest {
        id: r.id("id")?.unwrap_or_else(|| index.to_string()).into(),
        prompt: r.string("adversarial prompt")?.into(),
        subject: RString::new(),
        target_new: safe.into(),
        ground_truth: ROption::RSome(unsafe_generation.into()),
        locality: knowledge.into_iter().collect(),
        safety: ROption::RSome(safety),
        ..Default::default()
    })
}

/// ROME's known facts (`known_id, subject, attribute, prompt`), for causal tracing: the known
/// attribute is both the ground truth and the target.
pub fn knowns(r: &Record, index: usize) -> Result<EditRequest> {
    let prompt = r.string("prompt")?;
    let subject = r.string("subject")?;
    r.check_subject_in_prompt("subject", &subject, &prompt)?;
    let attribute = r.string("attribute")?;
    Ok(EditRequest {
        id: r
            .id("known_id")?
            .unwrap_or_else(|| index.to_string())
            .into(),
        prompt: prompt.into(),
        subject: subject.into(),
        target_new: attribute.clone().into(),
        ground_truth: ROption::RSome(attribute.into()),
        ..Default::default()
    })
}

/// Fields of kedit's own JSONL request format (docs/requests.md).
pub const JSONL_FIELDS: [&str; 8] = [
    "id",
    "prompt",
    "subject",
    "target_new",
    "ground_truth",
    "rephrase",
    "locality",
    "portability",
];

/// kedit's own format, one request per line: `{"prompt", "target_new", "subject"?, "id"?,
/// "ground_truth"?, "rephrase"?: str | [str], "locality"?: [{"prompt", "answer", "label"?}],
/// "portability"?: [...]}`. Unknown fields are errors, so a typo never silently drops a probe.
pub fn jsonl(r: &Record, index: usize) -> Result<EditRequest> {
    r.check_keys(&JSONL_FIELDS)?;
    let prompt = r.string("prompt")?;
    let subject = r.optional_string("subject")?.unwrap_or_default();
    r.check_subject_in_prompt("subject", &subject, &prompt)?;
    let probes = |field: &str, default_label: &str| -> Result<RVec<PromptAnswer>> {
        r.objects(field)?
            .iter()
            .map(|p| {
                p.check_keys(&["prompt", "answer", "label"])?;
                let label = p.optional_string("label")?;
                Ok(prompt_answer(
                    p.string("prompt")?,
                    p.string("answer")?,
                    label.as_deref().unwrap_or(default_label),
                ))
            })
            .collect()
    };
    Ok(EditRequest {
        id: r.id("id")?.unwrap_or_else(|| index.to_string()).into(),
        target_new: r.string("target_new")?.into(),
        ground_truth: roption(r.optional_string("ground_truth")?),
        rephrase: rstrings(r.strings("rephrase")?),
        locality: probes("locality", NEIGHBORHOOD)?,
        portability: probes("portability", ONE_HOP)?,
        prompt: prompt.into(),
        subject: subject.into(),
        ..Default::default()
    })
}

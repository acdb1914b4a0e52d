//! ROME's context templates (`rome_main.py::get_context_templates`, METHODS.md §3.2): the bare
//! `{}` plus short texts the model itself samples (top-k 5, seeded) after five fixed prefixes,
//! each followed by `". {}"`.

use kedit_plugin_api::{GenerateRequest, ModelClient, PluginError, SamplingKind};

pub const PREFIXES: [&str; 5] = ["The", "Therefore", "Because", "I", "You"];

/// `["{}", generated...]` for `[[length, n_gen], ...]`: `n_gen / 5` samples per prefix, each
/// `length` tokens long in total (prefix included), braces replaced by `brace` (ROME: "",
/// MEMIT: " "), `". {}"` appended.
pub fn generate(
    model: &ModelClient<'_>,
    length_params: &[(usize, usize)],
    seed: u64,
    brace: &str,
) -> Result<Vec<String>, PluginError> {
    let mut out = vec!["{}".to_string()];
    for (g, &(length, n_gen)) in length_params.iter().enumerate() {
        let per_prefix = n_gen / PREFIXES.len();
        if per_prefix == 0 {
            continue;
        }
        for prefix in PREFIXES {
            let ids = model.tokenize(prefix, true)?;
            let new_tokens = length.saturating_sub(ids.len());
            let request = GenerateRequest {
                prompts: (0..per_prefix).map(|_| ids.clone().into()).collect(),
                max_new_tokens: new_tokens as u32,
                sampling: SamplingKind::TopK,
                top_k: 5,
                temperature: 1.0,
                // One stream per (group, prefix); the model seeds each row from seed + row.
                seed: seed.wrapping_mul(1_000_003).wrapping_add(
                    (g * 16 + PREFIXES.iter().position(|p| *p == prefix).unwrap()) as u64 * 7919,
                ),
                stop_ids: Default::default(),
                stop_strings: Default::default(),
            };
            let rows = model.generate(&request)?;
            for new in rows {
                let mut all = ids.clone();
                all.extend_from_slice(&new);
                let text = model.detokenize(&all, true)?;
                let text = text.replace("\n\n", " ").replace(['{', '}'], brace);
                out.push(format!("{text}. {{}}"));
            }
        }
    }
    Ok(out)
}

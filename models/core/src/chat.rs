//! Chat rendering. kedit does not embed a Jinja engine: it recognises ChatML templates (those
//! that speak `<|im_start|>role\n...<|im_end|>\n`, as SmolLM2 and Qwen do) and renders them
//! natively, including the default system prompt such templates insert when the conversation
//! has none. Any other template is reported as unsupported rather than rendered wrongly.

use kedit_plugin_api::ChatMessage;

use crate::error::{unsupported, Result};

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";

/// How a recognised template renders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChatFormat {
    ChatMl {
        /// Inserted as the first message when the conversation does not start with a system
        /// message.
        default_system: Option<String>,
    },
}

impl ChatFormat {
    pub fn recognise(template: &str) -> Result<Self> {
        if template.contains(IM_START) && template.contains(IM_END) {
            return Ok(ChatFormat::ChatMl {
                default_system: default_system_prompt(template),
            });
        }
        Err(unsupported(
            "this model's chat template is not ChatML (<|im_start|>role ... <|im_end|>); kedit \
             renders only ChatML templates natively, so format the prompt yourself",
        ))
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> String {
        let ChatFormat::ChatMl { default_system } = self;
        let mut out = String::new();
        let starts_with_system = messages
            .first()
            .is_some_and(|m| m.role.as_str() == "system");
        if let (false, Some(system)) = (starts_with_system, default_system) {
            push_turn(&mut out, "system", system);
        }
        for m in messages {
            push_turn(&mut out, m.role.as_str(), m.content.as_str());
        }
        if add_generation_prompt {
            out.push_str(IM_START);
            out.push_str("assistant\n");
        }
        out
    }
}

fn push_turn(out: &mut String, role: &str, content: &str) {
    out.push_str(IM_START);
    out.push_str(role);
    out.push('\n');
    out.push_str(content);
    out.push_str(IM_END);
    out.push('\n');
}

/// The literal system turn of a template, `'<|im_start|>system\n<text><|im_end|>\n'`, when
/// the template only inserts it for conversations without a system message. The newline may
/// be stored as a real newline or as Jinja's `\n` escape.
fn default_system_prompt(template: &str) -> Option<String> {
    let conditional = [
        "messages[0]['role']",
        "messages[0][\"role\"]",
        "messages[0].role",
    ]
    .iter()
    .any(|k| template.contains(k));
    if !conditional {
        return None;
    }
    let marker = format!("{IM_START}system");
    let mut rest = template;
    while let Some(i) = rest.find(&marker) {
        rest = &rest[i + marker.len()..];
        let body = rest.strip_prefix('\n').or_else(|| rest.strip_prefix("\\n"));
        let Some(body) = body else { continue };
        let Some(end) = body.find(IM_END) else {
            continue;
        };
        let text = &body[..end];
        // A concatenation such as `'<|im_start|>system\n' + message['content']` is not a
        // default prompt.
        if !text.contains(['\'', '"', '{', '}', '+']) {
            return Some(text.replace("\\n", "\n"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn smollm2_template_inserts_its_default_system_prompt() {
        let f = ChatFormat::recognise(SMOLLM2).unwrap();
        let text = f.render(&[msg("user", "Hi")], true);
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let text = f.render(&[msg("system", "S"), msg("user", "Hi")], false);
        assert_eq!(
            text,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn plain_chatml_has_no_default_and_other_templates_are_unsupported() {
        let t = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}";
        assert_eq!(
            ChatFormat::recognise(t).unwrap(),
            ChatFormat::ChatMl {
                default_system: None
            }
        );
        let e = ChatFormat::recognise("{{ bos_token }}[INST] {{ m }} [/INST]").unwrap_err();
        assert!(e.to_string().contains("ChatML"), "{e}");
    }
}

//! Chat rendering: the checkpoint's own Jinja `chat_template`, rendered with minijinja set up
//! the way transformers sets up Jinja2 for `apply_chat_template` — `trim_blocks` and
//! `lstrip_blocks`, `{% break %}`/`{% continue %}`, Python's string and dict methods, a
//! `tojson` that writes what Python's `json.dumps` writes, `raise_exception` and
//! `strftime_now` — with `messages`, `add_generation_prompt`, `tools`/`documents` (none) and
//! the tokenizer's special tokens (`bos_token`, `eos_token`, ...) as variables.
//!
//! [`CHATML_TEMPLATE`] stands in only where a family is known to speak ChatML and the
//! checkpoint ships no template; that decision belongs to the caller ([`crate::text`]).

use std::fmt::Write as _;

use kedit_plugin_api::ChatMessage;
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Rest, ValueKind};
use minijinja::{AutoEscape, Environment, Error as JinjaError, ErrorKind, State, Value};

use crate::error::{invalid, Result};

/// Plain ChatML (`<|im_start|>role\n...<|im_end|>\n`) without a default system prompt, for
/// families that use it when a checkpoint ships no template of its own.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The special tokens a template sees, as transformers 5 passes its `special_tokens_map`:
/// `(variable, token text)` pairs such as `("bos_token", "<s>")` for the named tokens only
/// (`bos`, `eos`, `unk`, `sep`, `pad`, `cls`, `mask`; no `additional_special_tokens` since
/// v5). Tokens the tokenizer does not define are left out, so a template sees them as
/// undefined (rendering as nothing), as it does under transformers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TemplateTokens {
    pub named: Vec<(String, String)>,
}

impl TemplateTokens {
    /// Sets `name` unless it is already set (the first source read wins).
    pub fn set_default(&mut self, name: &str, token: impl Into<String>) {
        if !self.named.iter().any(|(n, _)| n == name) {
            self.named.push((name.to_string(), token.into()));
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.named
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
    }
}

/// Renders `template` for `messages`. Errors say what failed in the template (a syntax error
/// with its line, an exception the template raised, an unsupported construct); the caller
/// adds which checkpoint the template came from.
pub fn render(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    tokens: &TemplateTokens,
) -> Result<String> {
    let source = strip_generation_tags(template);
    let env = environment()?;
    let compiled = env
        .template_from_named_str("chat_template", &source)
        .map_err(|e| {
            invalid(format!(
                "the chat template does not parse: {}",
                describe(&e)
            ))
        })?;
    let messages: Vec<Value> = messages
        .iter()
        .map(|m| {
            Value::from_pairs([
                ("role", Value::from(m.role.as_str())),
                ("content", Value::from(m.content.as_str())),
            ])
        })
        .collect();
    let mut context: Vec<(String, Value)> = vec![
        ("messages".into(), Value::from(messages)),
        (
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ),
        ("tools".into(), Value::from(())),
        ("documents".into(), Value::from(())),
    ];
    for (name, token) in &tokens.named {
        context.push((name.clone(), Value::from(token.as_str())));
    }
    compiled
        .render(Value::from_pairs(context))
        .map_err(|e| invalid(format!("the chat template failed: {}", describe(&e))))
}

fn describe(e: &JinjaError) -> String {
    let mut text = e.to_string();
    if let Some(line) = e.line() {
        if !text.contains("line") && !text.contains("chat_template:") {
            let _ = write!(text, " (line {line})");
        }
    }
    text
}

fn environment() -> Result<Environment<'static>> {
    let mut env = Environment::new();
    let syntax = SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| invalid(format!("cannot configure the template syntax: {e}")))?;
    env.set_syntax(syntax);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(python_formatter);
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    Ok(env)
}

/// Prints values as Jinja2 under Python does where minijinja differs: `None`, `True`, `False`.
fn python_formatter(
    out: &mut minijinja::Output,
    state: &mut State,
    value: &Value,
) -> std::result::Result<(), JinjaError> {
    match value.kind() {
        ValueKind::None => out.write_str("None").map_err(JinjaError::from),
        ValueKind::Bool => out
            .write_str(if value.is_true() { "True" } else { "False" })
            .map_err(JinjaError::from),
        _ => minijinja::escape_formatter(out, state, value),
    }
}

fn raise_exception(message: String) -> std::result::Result<Value, JinjaError> {
    Err(JinjaError::new(
        ErrorKind::InvalidOperation,
        format!("the template raised an exception: {message}"),
    ))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, with its arguments positional or by name.
fn tojson(
    value: &Value,
    args: Rest<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, JinjaError> {
    let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > names.len() {
        return Err(JinjaError::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    let mut given: Vec<Option<Value>> = vec![None; names.len()];
    for (slot, v) in given.iter_mut().zip(args.iter()) {
        *slot = Some(v.clone());
    }
    for (slot, name) in given.iter_mut().zip(names) {
        if let Some(v) = kwargs.get::<Option<Value>>(name)? {
            *slot = Some(v);
        }
    }
    kwargs.assert_all_used()?;
    let present = |v: &Option<Value>| v.clone().filter(|v| !v.is_none() && !v.is_undefined());
    let ensure_ascii = present(&given[0]).is_some_and(|v| v.is_true());
    let indent = match present(&given[1]) {
        None => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or("").to_string()),
        Some(v) => {
            let n = v.as_i64().ok_or_else(|| {
                JinjaError::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                )
            })?;
            Some(" ".repeat(n.max(0) as usize))
        }
    };
    let (item_sep, key_sep) = match present(&given[2]) {
        Some(v) => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .filter(|p: &Vec<String>| p.len() == 2)
                .ok_or_else(|| {
                    JinjaError::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    )
                })?;
            (parts[0].clone(), parts[1].clone())
        }
        // Python's defaults: no trailing space after ',' once lines break.
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let style = JsonStyle {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys: present(&given[3]).is_some_and(|v| v.is_true()),
    };
    let mut out = String::new();
    style.write(&mut out, value, 0)?;
    Ok(Value::from(out))
}

struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl JsonStyle {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    }

    fn write(
        &self,
        out: &mut String,
        value: &Value,
        depth: usize,
    ) -> std::result::Result<(), JinjaError> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if value.is_integer() {
                    out.push_str(&value.to_string());
                } else {
                    let f = f64::try_from(value.clone())?;
                    out.push_str(&python_float(f));
                }
            }
            ValueKind::String => self.string(out, value.as_str().unwrap_or_default()),
            ValueKind::Map => {
                let mut items: Vec<(Value, Value)> = Vec::new();
                for key in value.try_iter()? {
                    let v = value.get_item(&key)?;
                    items.push((key, v));
                }
                if self.sort_keys {
                    items.sort_by_key(|(k, _)| k.to_string());
                }
                if items.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, (k, v)) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    match k.as_str() {
                        Some(s) => self.string(out, s),
                        None => self.string(out, &k.to_string()),
                    }
                    out.push_str(&self.key_sep);
                    self.write(out, v, depth + 1)?;
                }
                self.newline(out, depth);
                out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    self.write(out, v, depth + 1)?;
                }
                self.newline(out, depth);
                out.push(']');
            }
            kind => {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a {kind} value is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    fn string(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{u:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)`: the shortest round-trip digits, in positional notation for
/// exponents -4..16 and scientific (`1e+16`, `1e-05`) outside.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // `{:e}` gives the shortest round-trip digits: `-1.2345e-7`.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if !(-4..16).contains(&exp) {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{first}{frac}e{esign}{:02}", exp.abs());
    }
    let point = exp + 1; // digits before the decimal point
    let body = if point <= 0 {
        format!("0.{}{digits}", "0".repeat((-point) as usize))
    } else if point as usize >= digits.len() {
        format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
    } else {
        let (a, b) = digits.split_at(point as usize);
        format!("{a}.{b}")
    };
    format!("{sign}{body}")
}

/// `strftime_now(format)`: the current UTC time through Python's `strftime` directives
/// (`%Y %m %d %H %M %S %y %j %e %I %p %b %B %a %A %%`).
fn strftime_now(format: String) -> std::result::Result<Value, JinjaError> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(strftime(&format, secs)))
}

fn strftime(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[month as usize - 1] + day + i64::from(leap && month > 2);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let month_name = MONTHS[month as usize - 1];
        let day_name = DAYS[weekday];
        let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
        let _ = match d {
            'Y' => write!(out, "{year}"),
            'y' => write!(out, "{:02}", year.rem_euclid(100)),
            'm' => write!(out, "{month:02}"),
            'd' => write!(out, "{day:02}"),
            'e' => write!(out, "{day:2}"),
            'j' => write!(out, "{yday:03}"),
            'H' => write!(out, "{hour:02}"),
            'I' => write!(out, "{hour12:02}"),
            'M' => write!(out, "{minute:02}"),
            'S' => write!(out, "{second:02}"),
            'p' => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            'B' => write!(out, "{month_name}"),
            'b' | 'h' => write!(out, "{}", &month_name[..3]),
            'A' => write!(out, "{day_name}"),
            'a' => write!(out, "{}", &day_name[..3]),
            '%' => write!(out, "%"),
            other => write!(out, "%{other}"),
        };
    }
    out
}

/// (year, month 1-12, day 1-31) of a count of days since 1970-01-01 (Howard Hinnant's
/// algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Removes `{% generation %}` / `{% endgeneration %}`, transformers' marker for assistant
/// tokens (its AssistantTracker extension), which renders its body unchanged.
fn strip_generation_tags(template: &str) -> std::borrow::Cow<'_, str> {
    if !template.contains("generation") {
        return template.into();
    }
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start + 2..start + len];
        let name = tag.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if name != "generation" && name != "endgeneration" {
            out.push_str(&rest[start..start + len + 2]);
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out.into()
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

    fn r(template: &str, messages: &[ChatMessage], gen: bool) -> String {
        render(template, messages, gen, &TemplateTokens::default()).unwrap()
    }

    #[test]
    fn smollm2_template_inserts_its_default_system_prompt() {
        assert_eq!(
            r(SMOLLM2, &[msg("user", "Hi")], true),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            r(SMOLLM2, &[msg("system", "S"), msg("user", "Hi")], false),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn chatml_fallback_has_no_system_prompt() {
        assert_eq!(
            r(CHATML_TEMPLATE, &[msg("user", "Hi")], true),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn blocks_are_trimmed_as_transformers_configures_jinja() {
        // trim_blocks drops the newline after a tag, lstrip_blocks the indentation before it;
        // keep_trailing_newline is off.
        let t = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n";
        assert_eq!(
            r(t, &[msg("user", "a"), msg("user", "b")], false),
            "[a]\n[b]\n"
        );
    }

    #[test]
    fn special_tokens_python_methods_and_loop_controls() {
        let tokens = TemplateTokens {
            named: vec![
                ("bos_token".into(), "<s>".into()),
                ("eos_token".into(), "</s>".into()),
            ],
        };
        let t = "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}[INST] {{ m.content.strip() }} [/INST]{% if m.content.startswith('stop') %}{% break %}{% endif %}{% endfor %}{{ eos_token }}{{ unk_token }}";
        let got = render(
            t,
            &[
                msg("system", "S"),
                msg("user", "  hi \n"),
                msg("user", "stop here"),
                msg("user", "never"),
            ],
            false,
            &tokens,
        )
        .unwrap();
        assert_eq!(got, "<s>[INST] hi [/INST][INST] stop here [/INST]</s>");
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let t = "{{ messages[0] | tojson }}|{{ messages | tojson(indent=2) }}|{{ {'k': [1, 2.5, none, true, 1e20, 0.00001]} | tojson(separators=(',', ':')) }}|{{ 'é\"\\n' | tojson }}|{{ 'é' | tojson(ensure_ascii=true) }}";
        let got = r(t, &[msg("user", "hi")], false);
        assert_eq!(
            got,
            "{\"role\": \"user\", \"content\": \"hi\"}|[\n  {\n    \"role\": \"user\",\n    \"content\": \"hi\"\n  }\n]|{\"k\":[1,2.5,null,true,1e+20,1e-05]}|\"é\\\"\\n\"|\"\\u00e9\""
        );
    }

    #[test]
    fn python_floats() {
        for (f, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (0.0001, "0.0001"),
            (0.00001234, "1.234e-05"),
            (123456.789, "123456.789"),
        ] {
            assert_eq!(python_float(f), want, "{f}");
        }
    }

    #[test]
    fn raise_exception_reports_the_templates_message() {
        let t = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}";
        let e = render(
            t,
            &[msg("assistant", "x")],
            false,
            &TemplateTokens::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("Conversation roles must alternate user/assistant"),
            "{e}"
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = render("line one\n{% if %}", &[], false, &TemplateTokens::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not parse") && (e.contains("line 2") || e.contains("chat_template:2")),
            "{e}"
        );
    }

    #[test]
    fn python_rendering_of_none_and_booleans() {
        assert_eq!(
            r(
                "{{ none }} {{ true }} {{ add_generation_prompt }}",
                &[],
                true
            ),
            "None True True"
        );
    }

    #[test]
    fn generation_tags_render_their_body() {
        let t = "{% for m in messages %}{% generation %}{{ m.content }}{%- endgeneration %}{% endfor %}";
        assert_eq!(r(t, &[msg("assistant", "A")], false), "A");
    }

    #[test]
    fn strftime_formats_a_known_instant() {
        // 2024-07-26 15:04:05 UTC was a Friday, the 208th day of a leap year.
        let t = 1_722_006_245;
        assert_eq!(
            strftime("%d %b %Y|%B %A %a|%H:%M:%S %I%p|%j|%y|%%|%Q", t),
            "26 Jul 2024|July Friday Fri|15:04:05 03PM|208|24|%|%Q"
        );
        assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
    }
}

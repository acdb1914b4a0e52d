//! The `kedit.toml` file. Strict: every table denies unknown keys, and the error names the key,
//! the keys that are allowed there, the file and the line — a typo must never be silently
//! ignored in an experiment's configuration. Only `[hparams]` is free-form (its keys belong to
//! the editor, which is checked against the editor's defaults later).
//!
//! ```toml
//! plugins = ["path/to/libkedit_editor_x.so"]
//! plugin_dirs = ["plugins/"]
//! device = "cpu"
//! [model]
//! name = "smollm2-135m-instruct"     # or path = "model.gguf"; family = "llama" to force one
//! [edit]
//! method = "ft"
//! data = "counterfact-val.json"      # format = "auto"; limit = 10; offset = 0; save = "out/"
//! [[edit.requests]]
//! prompt = "The Eiffel Tower is in"
//! subject = "Eiffel Tower"
//! target_new = "Rome"
//! [hparams]
//! layers = [5]
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use crate::data::DataFormat;

#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Plugin files to load.
    #[serde(default)]
    pub plugins: Vec<PathBuf>,
    /// Directories whose shared libraries are all loaded as plugins.
    #[serde(default)]
    pub plugin_dirs: Vec<PathBuf>,
    /// "cpu" or "cuda:N".
    pub device: Option<String>,
    pub model: Option<ModelConfig>,
    pub edit: Option<EditConfig>,
    /// `kedit eval` settings.
    pub eval: Option<EvalConfig>,
    /// Editor hyper-parameters, merged over the editor's defaults.
    pub hparams: Option<toml::Table>,
}

#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A checkpoint directory or `.gguf` file.
    pub path: Option<PathBuf>,
    /// A known model name (`smollm2-135m-instruct`), fetched into the cache on first use.
    pub name: Option<String>,
    /// Forces a model family instead of detecting it.
    pub family: Option<String>,
}

#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EditConfig {
    pub method: Option<String>,
    /// A request file in an EasyEdit format.
    pub data: Option<PathBuf>,
    pub format: Option<DataFormat>,
    pub limit: Option<usize>,
    pub offset: Option<usize>,
    /// Directory to write the edit log, editor state and edited model into.
    pub save: Option<PathBuf>,
    /// Send all requests in one edit call.
    pub batch: Option<bool>,
    #[serde(default)]
    pub requests: Vec<InlineRequest>,
}

/// `[eval]`: what `kedit eval` runs when its flags do not say (flags win).
#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    pub method: Option<String>,
    /// A request file in an EasyEdit format.
    pub data: Option<PathBuf>,
    pub format: Option<DataFormat>,
    pub protocol: Option<crate::eval::protocol::Protocol>,
    /// Requests per edit call (batch protocol; sequential editing in batches).
    pub batch_size: Option<usize>,
    /// Sequential protocol: also evaluate each request right after its own edit.
    pub eval_each: Option<bool>,
    pub limit: Option<usize>,
    pub offset: Option<usize>,
    pub seed: Option<u64>,
    /// Output directory.
    pub out: Option<PathBuf>,
    /// Compute the n-gram-entropy fluency (a sampled generation per request and model state).
    pub fluency: Option<bool>,
    /// Length in tokens (prompt included) of the fluency generations.
    pub gen_length: Option<usize>,
    /// Reuse (and store) the cached pre-edit baseline.
    pub baseline_cache: Option<bool>,
}

/// A request written into the config file.
#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InlineRequest {
    pub prompt: String,
    #[serde(default)]
    pub subject: String,
    pub target_new: String,
    pub ground_truth: Option<String>,
    #[serde(default)]
    pub rephrase: StringList,
    #[serde(default)]
    pub locality_prompt: StringList,
    #[serde(default)]
    pub locality_ground_truth: StringList,
}

/// A string or a list of strings.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StringList(pub Vec<String>);

impl<'de> Deserialize<'de> for StringList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor;
        impl<'de> Visitor<'de> for ListVisitor {
            type Value = StringList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StringList, E> {
                Ok(StringList(vec![v.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StringList, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    items.push(item);
                }
                Ok(StringList(items))
            }
        }
        deserializer.deserialize_any(ListVisitor)
    }
}

impl Config {
    /// Reads and checks a config file; relative paths in it are taken relative to its directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut config = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        Ok(config)
    }

    /// Parses config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let config: Config = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!(describe_toml_error(origin, text, &e)))?;
        config.validate(origin)?;
        Ok(config)
    }

    fn validate(&self, origin: &Path) -> Result<()> {
        if let Some(model) = &self.model {
            if model.path.is_some() && model.name.is_some() {
                bail!(
                    "{}: [model] has both `path` and `name`; give one of them",
                    origin.display()
                );
            }
        }
        if let Some(edit) = &self.edit {
            for (i, r) in edit.requests.iter().enumerate() {
                if r.locality_prompt.0.len() != r.locality_ground_truth.0.len() {
                    bail!(
                        "{}: [[edit.requests]] #{}: `locality_prompt` has {} entries but \
                         `locality_ground_truth` has {}",
                        origin.display(),
                        i + 1,
                        r.locality_prompt.0.len(),
                        r.locality_ground_truth.0.len()
                    );
                }
            }
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        self.plugins.iter_mut().for_each(resolve);
        self.plugin_dirs.iter_mut().for_each(resolve);
        if let Some(path) = self.model.as_mut().and_then(|m| m.path.as_mut()) {
            resolve(path);
        }
        if let Some(edit) = self.edit.as_mut() {
            edit.data.iter_mut().for_each(resolve);
            edit.save.iter_mut().for_each(resolve);
        }
        if let Some(eval) = self.eval.as_mut() {
            eval.data.iter_mut().for_each(resolve);
            eval.out.iter_mut().for_each(resolve);
        }
    }
}

/// `file:line:col: message`, with serde's "unknown field" phrasing turned into the key, the
/// table it is in and the keys allowed there, and the offending line quoted.
pub fn describe_toml_error(origin: &Path, text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim();
    let Some(span) = error.span() else {
        return format!("{}: {message}", origin.display());
    };
    let (line, column) = line_and_column(text, span.start);
    let table = enclosing_table(text, span.start);
    let explained = explain_unknown(message, &table).unwrap_or_else(|| message.to_string());
    let source_line = text.lines().nth(line - 1).unwrap_or("").trim_end();
    format!(
        "{}:{line}:{column}: {explained}\n    {line} | {source_line}",
        origin.display()
    )
}

fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// The table a key at `offset` belongs to, as "[edit]" or "[[edit.requests]]"; "the top level"
/// if none. A key that is itself a table header (`[edit.x]`) belongs to the header's parent.
fn enclosing_table(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    if line.starts_with('[') {
        let path = header_path(line);
        return match path.rsplit_once('.') {
            Some((parent, _)) => format!("[{parent}]"),
            None => "the top level".to_string(),
        };
    }
    text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|header| {
            let path = header_path(header);
            if header.starts_with("[[") {
                format!("[[{path}]]")
            } else {
                format!("[{path}]")
            }
        })
        .unwrap_or_else(|| "the top level".to_string())
}

/// `edit.requests` from `[[edit.requests]]` or `[edit.requests]  # comment`.
fn header_path(header: &str) -> String {
    header
        .trim_start_matches('[')
        .split(']')
        .next()
        .unwrap_or("")
        .split('.')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(".")
}

/// Rewrites serde's `unknown field `x`, expected one of `a`, `b`` (and the same for enum
/// variants) into a sentence naming the table and the allowed keys.
fn explain_unknown(message: &str, table: &str) -> Option<String> {
    let (what, rest) = if let Some(rest) = message.strip_prefix("unknown field `") {
        ("key", rest)
    } else if let Some(rest) = message.strip_prefix("unknown variant `") {
        ("value", rest)
    } else {
        return None;
    };
    let (name, tail) = rest.split_once('`')?;
    let allowed: Vec<&str> = tail
        .split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s)
        .collect();
    let allowed = if allowed.is_empty() {
        "none".to_string()
    } else {
        allowed.join(", ")
    };
    Some(match what {
        "key" => format!("unknown key `{name}` in {table}; allowed keys: {allowed}"),
        _ => format!("unknown value `{name}` in {table}; allowed values: {allowed}"),
    })
}

/// Reads a free-form hparams TOML file (`--hparams FILE.toml`): its top-level table is the
/// hparams, or its `[hparams]` table when that is the only thing in it (so a kedit.toml-style
/// snippet works too).
pub fn load_hparams_file(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read hparams file {}", path.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!(describe_toml_error(path, &text, &e)))?;
    let wrapped = table.len() == 1 && matches!(table.get("hparams"), Some(toml::Value::Table(_)));
    if wrapped {
        if let Some(toml::Value::Table(inner)) = table.remove("hparams") {
            return Ok(inner);
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("kedit.toml"))
    }

    #[test]
    fn a_full_config_parses() {
        let c = parse(
            r#"
plugins = ["a.so"]
plugin_dirs = ["dir"]
device = "cpu"
[model]
name = "smollm2-135m-instruct"
family = "llama"
[edit]
method = "ft"
data = "x.json"
format = "counterfact"
limit = 3
save = "out"
[[edit.requests]]
prompt = "The Eiffel Tower is in"
subject = "Eiffel Tower"
target_new = "Rome"
rephrase = "Where is the Eiffel Tower? It is in"
locality_prompt = ["Paris is the capital of"]
locality_ground_truth = ["France"]
[hparams]
lr = 0.5
layers = [5]
"#,
        )
        .unwrap();
        assert_eq!(c.model.unwrap().family.as_deref(), Some("llama"));
        let edit = c.edit.unwrap();
        assert_eq!(edit.format, Some(DataFormat::Counterfact));
        assert_eq!(edit.requests[0].rephrase.0.len(), 1);
        assert_eq!(c.hparams.unwrap()["lr"].as_float(), Some(0.5));
    }

    #[test]
    fn an_unknown_key_is_named_with_its_table_line_and_the_allowed_keys() {
        let e = parse("[model]\nname = \"x\"\n\n[edit]\nmethod = \"ft\"\nlimmit = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("kedit.toml:6:1: "), "{e}");
        assert!(e.contains("unknown key `limmit` in [edit]"), "{e}");
        assert!(
            e.contains("allowed keys: method, data, format, limit, offset, save, batch, requests"),
            "{e}"
        );
        assert!(e.contains("limmit = 3"), "{e}");
    }

    #[test]
    fn unknown_keys_at_the_top_level_and_in_requests_are_caught_too() {
        let e = parse("devise = \"cpu\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown key `devise` in the top level"), "{e}");
        assert!(
            e.contains("plugins, plugin_dirs, device, model, edit, eval, hparams"),
            "{e}"
        );

        let e = parse("[[edit.requests]]\nprompt = \"p\"\ntarget_new = \"t\"\ntarget = \"t\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown key `target` in [[edit.requests]]"),
            "{e}"
        );
        assert!(e.contains("target_new"), "{e}");
    }

    #[test]
    fn an_unknown_table_is_named_in_its_parent() {
        let e = parse("[modle]\nname = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown key `modle` in the top level"), "{e}");
        let e = parse("[model]\nname = \"x\"\n[edit.extra]\nx = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key `extra` in [edit]"), "{e}");
    }

    #[test]
    fn an_unknown_format_lists_the_formats() {
        let e = parse("[edit]\nformat = \"csv\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown value `csv` in [edit]"), "{e}");
        assert!(e.contains("counterfact, zsre, safeedit"), "{e}");
    }

    #[test]
    fn an_eval_table_is_strict_too() {
        let c = parse(
            "[eval]\nmethod = \"ft\"\nprotocol = \"sequential\"\neval_each = true\nlimit = 50\n",
        )
        .unwrap();
        let eval = c.eval.unwrap();
        assert_eq!(
            eval.protocol,
            Some(crate::eval::protocol::Protocol::Sequential)
        );
        assert_eq!(eval.limit, Some(50));
        let e = parse("[eval]\nprotocl = \"single\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key `protocl` in [eval]"), "{e}");
        assert!(e.contains("protocol, batch_size, eval_each"), "{e}");
        let e = parse("[eval]\nprotocol = \"parallel\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("single, sequential, batch"), "{e}");
    }

    #[test]
    fn path_and_name_together_are_refused() {
        let e = parse("[model]\npath = \"a.gguf\"\nname = \"b\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("both `path` and `name`"), "{e}");
    }

    #[test]
    fn relative_paths_are_taken_from_the_config_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kedit.toml");
        std::fs::write(&file, "plugins = [\"p.so\"]\n[edit]\ndata = \"d.json\"\n").unwrap();
        let c = Config::load(&file).unwrap();
        assert_eq!(c.plugins[0], dir.path().join("p.so"));
        assert_eq!(c.edit.unwrap().data.unwrap(), dir.path().join("d.json"));
    }

    #[test]
    fn an_hparams_file_may_be_bare_or_wrapped() {
        let dir = tempfile::tempdir().unwrap();
        let bare = dir.path().join("bare.toml");
        std::fs::write(&bare, "lr = 0.1\n").unwrap();
        assert_eq!(
            load_hparams_file(&bare).unwrap()["lr"].as_float(),
            Some(0.1)
        );
        let wrapped = dir.path().join("wrapped.toml");
        std::fs::write(&wrapped, "[hparams]\nlr = 0.2\n").unwrap();
        assert_eq!(
            load_hparams_file(&wrapped).unwrap()["lr"].as_float(),
            Some(0.2)
        );
    }
}

//! Chat templates: the prompt vLLM builds from an OpenAI chat request, so that `kvagent route`
//! (and `kvagent hash --chat`) can hash chat requests as the engines do.
//!
//! vLLM renders a chat with the model's Jinja template (Hugging Face's `apply_chat_template`:
//! `trim_blocks` and `lstrip_blocks` on, `messages`, `add_generation_prompt`, the tokenizer's
//! special tokens, the request's `tools` and `chat_template_kwargs`), then tokenizes the text
//! without adding special tokens (the template writes them). `minijinja` with its Python
//! compatibility layer renders the same templates; the end-to-end tests check the routing
//! against vLLM's own rendering.

use std::path::Path;

use anyhow::{Context as _, bail};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::Value as Json;

/// A model's chat template with the special tokens it refers to.
#[derive(Debug)]
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    specials: Vec<(&'static str, String)>,
}

/// The special tokens of `tokenizer_config.json` a template may use.
const SPECIALS: [&str; 4] = ["bos_token", "eos_token", "pad_token", "unk_token"];

fn token_text(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        // An `AddedToken` saved as an object.
        Json::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl ChatTemplate {
    /// The template of the model whose `tokenizer.json` is `tokenizer`: `explicit` if given,
    /// else `chat_template.jinja` beside it, else `chat_template` in `tokenizer_config.json`
    /// (the one named `default` when there are several). `None` when the model has none.
    pub(crate) fn load(tokenizer: &Path, explicit: Option<&Path>) -> anyhow::Result<Option<Self>> {
        let dir = tokenizer.parent().unwrap_or(Path::new("."));
        let config_path = dir.join("tokenizer_config.json");
        let config: Json = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).with_context(|| format!("{}", config_path.display()))?,
            Err(_) => Json::Null,
        };
        let file = explicit.map(Path::to_path_buf).or_else(|| {
            let beside = dir.join("chat_template.jinja");
            beside.is_file().then_some(beside)
        });
        let source = match file {
            Some(path) => {
                std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?
            }
            None => match config.get("chat_template") {
                Some(Json::String(s)) => s.clone(),
                Some(Json::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str())
                    .map(str::to_owned)
                    .with_context(|| {
                        format!("{}: no chat template named \"default\"", config_path.display())
                    })?,
                _ => return Ok(None),
            },
        };
        let specials = SPECIALS
            .iter()
            .filter_map(|&k| Some((k, token_text(config.get(k)?)?)))
            .collect();
        Ok(Some(Self::new(source, specials)?))
    }

    fn new(source: String, specials: Vec<(&'static str, String)>) -> anyhow::Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |format: String| -> String {
            chrono_free_date(&format)
        });
        env.add_template_owned("chat", source)
            .map_err(|e| anyhow::anyhow!("the chat template does not parse: {e}"))?;
        Ok(Self { env, specials })
    }

    /// The prompt text vLLM renders for a chat request's JSON body; an error when the request
    /// is not one this can reproduce (no messages, content other than text, a template error).
    pub(crate) fn render(&self, body: &Json) -> anyhow::Result<String> {
        let Some(Json::Array(messages)) = body.get("messages") else {
            bail!("a chat request has a \"messages\" array");
        };
        let messages = messages
            .iter()
            .map(text_only)
            .collect::<anyhow::Result<Vec<Json>>>()?;
        let continue_final = body
            .get("continue_final_message")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        let add_generation_prompt = body
            .get("add_generation_prompt")
            .and_then(Json::as_bool)
            .unwrap_or(!continue_final);
        let mut ctx = serde_json::Map::new();
        for (k, v) in &self.specials {
            ctx.insert((*k).to_owned(), Json::String(v.clone()));
        }
        ctx.insert("messages".into(), Json::Array(messages));
        ctx.insert("add_generation_prompt".into(), Json::Bool(add_generation_prompt));
        if let Some(tools) = body.get("tools") {
            ctx.insert("tools".into(), tools.clone());
        }
        if let Some(Json::Object(kwargs)) = body.get("chat_template_kwargs") {
            ctx.extend(kwargs.clone());
        }
        let tmpl = self.env.get_template("chat")?;
        let text = tmpl
            .render(Value::from_serialize(&ctx))
            .map_err(|e| anyhow::anyhow!("rendering the chat template: {e}"))?;
        if continue_final {
            // vLLM cuts the rendered text after the final message's content, so the model
            // continues it.
            let last = body["messages"]
                .as_array()
                .and_then(|m| m.last())
                .map(|m| content_text(&m["content"]))
                .transpose()?
                .unwrap_or_default();
            if let Some(at) = text.rfind(last.trim()) {
                return Ok(text[..at + last.trim().len()].to_owned());
            }
        }
        Ok(text)
    }
}

/// A message's content as the text vLLM gives a template expecting strings: text parts joined
/// by newlines.
fn content_text(content: &Json) -> anyhow::Result<String> {
    match content {
        Json::String(s) => Ok(s.clone()),
        Json::Null => Ok(String::new()),
        Json::Array(parts) => {
            let texts = parts
                .iter()
                .map(|p| match p.get("type").and_then(Json::as_str) {
                    Some("text") => p
                        .get("text")
                        .and_then(Json::as_str)
                        .map(str::to_owned)
                        .context("a text part without text"),
                    other => bail!("a content part of type {other:?} (only text is rendered here)"),
                })
                .collect::<anyhow::Result<Vec<String>>>()?;
            Ok(texts.join("\n"))
        }
        other => bail!("message content {other}"),
    }
}

fn text_only(message: &Json) -> anyhow::Result<Json> {
    let mut m = message.clone();
    if let Some(obj) = m.as_object_mut()
        && let Some(c) = obj.get("content")
    {
        let text = content_text(c)?;
        obj.insert("content".into(), Json::String(text));
    }
    Ok(m)
}

/// `strftime_now` for templates that print today's date (Llama 3's): the UTC date in the
/// formats templates use (`%d %b %Y`, `%Y-%m-%d`); other directives are printed as given.
fn chrono_free_date(format: &str) -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format
        .replace("%d", &format!("{day:02}"))
        .replace("%m", &format!("{month:02}"))
        .replace("%Y", &year.to_string())
        .replace("%b", MONTHS[(month - 1) as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA_LIKE: &str = "{{ bos_token }}{% for m in messages %}\
        {% if m['role'] == 'system' %}<|system|>{% elif m['role'] == 'user' %}<|user|>{% else %}<|assistant|>{% endif %}\n\
        {{ m['content'] | trim }}{{ eos_token }}{% endfor %}\
        {% if add_generation_prompt %}<|assistant|>\n{% endif %}";

    fn template(src: &str) -> ChatTemplate {
        ChatTemplate::new(
            src.to_owned(),
            vec![("bos_token", "<s>".into()), ("eos_token", "</s>".into())],
        )
        .expect("parses")
    }

    #[test]
    fn renders_messages_with_special_tokens_and_the_generation_prompt() {
        let t = template(LLAMA_LIKE);
        let body = serde_json::json!({"messages": [
            {"role": "system", "content": " be brief "},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ]});
        // As Python's Jinja renders it (trim_blocks eats the newline after a block tag).
        assert_eq!(
            t.render(&body).unwrap(),
            "<s><|system|>be brief</s><|user|>a\nb</s><|assistant|>\n"
        );
        let mut no_prompt = body.clone();
        no_prompt["add_generation_prompt"] = Json::Bool(false);
        assert!(!t.render(&no_prompt).unwrap().ends_with("<|assistant|>\n"));
    }

    #[test]
    fn python_methods_trim_blocks_and_raise_exception_work_as_in_transformers() {
        let t = template(
            "{% for m in messages %}\n  {% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}\n{{ m.content.strip().upper() }}\n{% endfor %}",
        );
        let ok = serde_json::json!({"messages": [{"role": "user", "content": " hi "}]});
        assert_eq!(t.render(&ok).unwrap(), "HI\n");
        let bad = serde_json::json!({"messages": [{"role": "tool", "content": "x"}]});
        assert!(format!("{:#}", t.render(&bad).unwrap_err()).contains("bad role"));
    }

    #[test]
    fn images_and_missing_messages_are_refused() {
        let t = template(LLAMA_LIKE);
        let image = serde_json::json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]});
        assert!(t.render(&image).is_err());
        assert!(t.render(&serde_json::json!({"prompt": "x"})).is_err());
    }

    #[test]
    fn dates_render_in_the_formats_templates_use() {
        let d = chrono_free_date("%d %b %Y");
        assert_eq!(d.len(), 11, "{d}");
        assert!(chrono_free_date("%Y-%m-%d").starts_with("20"));
    }
}

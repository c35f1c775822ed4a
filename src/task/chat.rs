//! A model's chat template (the Jinja `chat_template` of `tokenizer_config.json`, or GGUF's
//! `tokenizer.chat_template`), rendered as Hugging Face's `apply_chat_template` renders it, and
//! the location of the assistant turns in a rendered conversation.

use std::fmt;

use minijinja::value::ValueKind;
use minijinja::{context, Environment, Error, ErrorKind, State, Value};

use super::{Message, TaskError};

/// The name the template is stored under in its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template with the special-token strings it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token` and `eos_token` are the strings templates see as
    /// `bos_token` and `eos_token` (for instance `<|begin_of_text|>` and `<|eot_id|>`); pass ""
    /// for a token the model does not have.
    ///
    /// The environment is set up as `transformers` sets up its own: `trim_blocks` and
    /// `lstrip_blocks` on, loop controls on, a `raise_exception(message)` function, and the
    /// Python string and dict methods templates call most (`strip`, `startswith`, `split`,
    /// `items`, `get`, ...). `strftime_now` is left undefined, so templates that print today's
    /// date fall back to their fixed default and renders stay reproducible.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TaskError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.set_unknown_method_callback(python_method);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|source| TaskError::TemplateSyntax { source })?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders a conversation; with `add_generation_prompt`, ends with the header that opens
    /// the assistant's reply.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TaskError> {
        self.render_doc(None, messages, add_generation_prompt)
    }

    fn render_doc(
        &self,
        doc_id: Option<&str>,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TaskError> {
        let rendered = self.env.get_template(TEMPLATE_NAME).and_then(|t| {
            t.render(context! {
                messages => Value::from_serialize(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
        });
        rendered.map_err(|source| TaskError::TemplateRender {
            doc_id: doc_id.map(str::to_string),
            source,
        })
    }

    /// The rendered conversation cut into consecutive pieces, each flagged true when it is an
    /// assistant turn (a loss target).
    ///
    /// The assistant turns are found prefix by prefix, which needs nothing from the template
    /// (most templates have no `{% generation %}` markers): for assistant message i, the
    /// conversation up to i rendered with the generation prompt ends where the reply starts,
    /// and the conversation through i rendered without it ends where the reply (with its
    /// end-of-turn text) ends. Both renders must be prefixes of the whole conversation's render;
    /// a template that renders earlier turns differently once later ones follow (for instance
    /// one that drops the reasoning of earlier assistant turns) is refused with
    /// [`TaskError::TemplateNotPrefixStable`] rather than trained on misplaced targets.
    pub fn segments(
        &self,
        doc_id: &str,
        messages: &[Message],
    ) -> Result<Vec<(String, bool)>, TaskError> {
        let full = self.render_doc(Some(doc_id), messages, false)?;
        let mut pieces = Vec::new();
        let mut done = 0;
        for (i, message) in messages.iter().enumerate() {
            if message.role != "assistant" {
                continue;
            }
            let before = self.render_doc(Some(doc_id), &messages[..i], true)?;
            let through = self.render_doc(Some(doc_id), &messages[..=i], false)?;
            let stable = before.len() >= done
                && through.starts_with(before.as_str())
                && full.starts_with(through.as_str());
            if !stable {
                return Err(TaskError::TemplateNotPrefixStable {
                    doc_id: doc_id.to_string(),
                    message: i,
                });
            }
            pieces.push((full[done..before.len()].to_string(), false));
            pieces.push((full[before.len()..through.len()].to_string(), true));
            done = through.len();
        }
        pieces.push((full[done..].to_string(), false));
        pieces.retain(|(text, _)| !text.is_empty());
        Ok(pieces)
    }
}

/// The Python `str` and `dict` methods chat templates call, for the values minijinja does not
/// give them to.
fn python_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    let str_arg = |i: usize| args.get(i).and_then(Value::as_str);
    let required = |i: usize| {
        str_arg(i).ok_or_else(|| {
            Error::new(
                ErrorKind::MissingArgument,
                format!("{method}() needs a string argument"),
            )
        })
    };
    if let Some(s) = value.as_str() {
        let chars = str_arg(0);
        let in_chars = |c: char| chars.is_some_and(|set| set.contains(c));
        return match method {
            "strip" if chars.is_some() => Ok(Value::from(s.trim_matches(in_chars))),
            "strip" => Ok(Value::from(s.trim())),
            "lstrip" if chars.is_some() => Ok(Value::from(s.trim_start_matches(in_chars))),
            "lstrip" => Ok(Value::from(s.trim_start())),
            "rstrip" if chars.is_some() => Ok(Value::from(s.trim_end_matches(in_chars))),
            "rstrip" => Ok(Value::from(s.trim_end())),
            "startswith" => Ok(Value::from(s.starts_with(required(0)?))),
            "endswith" => Ok(Value::from(s.ends_with(required(0)?))),
            "split" => {
                let parts: Vec<Value> = match chars.filter(|sep| !sep.is_empty()) {
                    Some(sep) => match args.get(1).and_then(Value::as_i64) {
                        Some(max) if max >= 0 => {
                            s.splitn(max as usize + 1, sep).map(Value::from).collect()
                        }
                        _ => s.split(sep).map(Value::from).collect(),
                    },
                    None => s.split_whitespace().map(Value::from).collect(),
                };
                Ok(Value::from(parts))
            }
            "upper" | "lower" | "title" | "capitalize" => {
                state.apply_filter(method, std::slice::from_ref(value))
            }
            "replace" => {
                let mut filter_args = vec![value.clone()];
                filter_args.extend(args.iter().cloned());
                state.apply_filter("replace", &filter_args)
            }
            "join" => {
                let items = args
                    .first()
                    .ok_or_else(|| Error::new(ErrorKind::MissingArgument, "join() needs a list"))?
                    .try_iter()?;
                Ok(Value::from(
                    items.map(|v| v.to_string()).collect::<Vec<_>>().join(s),
                ))
            }
            _ => Err(unknown(value, method)),
        };
    }
    if value.kind() == ValueKind::Map {
        return match method {
            "items" => state.apply_filter("items", std::slice::from_ref(value)),
            "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => Ok(Value::from(
                value
                    .try_iter()?
                    .map(|k| value.get_item(&k))
                    .collect::<Result<Vec<_>, _>>()?,
            )),
            "get" => {
                let key = args
                    .first()
                    .ok_or_else(|| Error::new(ErrorKind::MissingArgument, "get() needs a key"))?;
                let found = value.get_item(key)?;
                if found.is_undefined() {
                    Ok(args.get(1).cloned().unwrap_or(Value::from(())))
                } else {
                    Ok(found)
                }
            }
            _ => Err(unknown(value, method)),
        };
    }
    Err(unknown(value, method))
}

fn unknown(value: &Value, method: &str) -> Error {
    Error::new(
        ErrorKind::UnknownMethod,
        format!("{} has no method named {method}", value.kind()),
    )
}

//! Reading task files: lines (plain or gzip), format detection, one parser per format, and the
//! grouping of log-likelihood requests into multiple-choice docs.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::{
    Choices, Context, Doc, DocBody, Message, TaskError, TaskFormat, MAX_LINE_BYTES,
    UNCOND_DOC_ID_OFFSET,
};

/// The first two bytes of every gzip member (RFC 1952, section 2.3.1).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// How many keys of an unrecognised object an error message lists.
const KEYS_SHOWN: usize = 8;

/// Parses a task file's bytes into its format and docs.
pub(super) fn parse(path: &Path, bytes: &[u8]) -> Result<(TaskFormat, Vec<Doc>), TaskError> {
    let reader: Box<dyn BufRead + '_> = if bytes.starts_with(&GZIP_MAGIC) {
        // Multi-member: concatenated gzip files read as one, as zcat reads them.
        Box::new(BufReader::new(MultiGzDecoder::new(bytes)))
    } else {
        Box::new(bytes)
    };
    let mut lines = Lines {
        path,
        reader,
        line: 0,
    };
    let (first_line, first) = loop {
        match lines.next()? {
            None => {
                return Err(TaskError::Empty {
                    path: path.to_path_buf(),
                })
            }
            Some((_, text)) if text.trim().is_empty() => continue,
            Some(found) => break found,
        }
    };
    let format = detect(path, first_line, &first)?;
    let mut parser = Parser::new(format);
    parser.add(path, first_line, &first)?;
    while let Some((line, text)) = lines.next()? {
        if !text.trim().is_empty() {
            parser.add(path, line, &text)?;
        }
    }
    Ok((format, parser.finish(path)?))
}

/// Lines of a reader, numbered from 1, each at most [`MAX_LINE_BYTES`] long.
struct Lines<'a> {
    path: &'a Path,
    reader: Box<dyn BufRead + 'a>,
    line: usize,
}

impl Lines<'_> {
    fn next(&mut self) -> Result<Option<(usize, String)>, TaskError> {
        let mut buf = Vec::new();
        let read = (&mut self.reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|source| TaskError::Io {
                path: self.path.to_path_buf(),
                source,
            })?;
        if read == 0 {
            return Ok(None);
        }
        self.line += 1;
        if buf.last() == Some(&b'\n') {
            buf.pop();
        } else if buf.len() > MAX_LINE_BYTES {
            return Err(TaskError::LineTooLong {
                path: self.path.to_path_buf(),
                line: self.line,
                limit: MAX_LINE_BYTES,
            });
        }
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        let mut text = String::from_utf8(buf).map_err(|_| TaskError::NotUtf8 {
            path: self.path.to_path_buf(),
            line: self.line,
        })?;
        if self.line == 1 && text.starts_with('\u{feff}') {
            text.drain(..'\u{feff}'.len_utf8());
        }
        Ok(Some((self.line, text)))
    }
}

/// Tells the format from the keys of the first non-empty line's object.
fn detect(path: &Path, line: usize, text: &str) -> Result<TaskFormat, TaskError> {
    let value: Value = serde_json::from_str(text).map_err(|source| TaskError::Json {
        path: path.to_path_buf(),
        line,
        source,
    })?;
    let unknown = |found: String| TaskError::UnknownFormat {
        path: path.to_path_buf(),
        line,
        found,
    };
    let Value::Object(map) = value else {
        let kind = match value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        };
        return Err(unknown(kind.to_string()));
    };
    // A line may carry several of the keys; the most specific format wins.
    if map.contains_key("request") {
        Ok(TaskFormat::Requests)
    } else if map.contains_key("messages") {
        Ok(TaskFormat::Chat)
    } else if map.contains_key("prompt") {
        Ok(TaskFormat::Prompts)
    } else if map.contains_key("text") {
        Ok(TaskFormat::Text)
    } else {
        let mut keys: Vec<&str> = map.keys().map(String::as_str).take(KEYS_SHOWN).collect();
        if map.len() > KEYS_SHOWN {
            keys.push("...");
        }
        Err(unknown(format!(
            "an object with keys [{}]",
            keys.join(", ")
        )))
    }
}

/// Parses one line as `T`: a syntax error is a JSON error, a shape error a format mismatch.
fn parse_line<T: DeserializeOwned>(
    path: &Path,
    line: usize,
    text: &str,
    format: TaskFormat,
) -> Result<T, TaskError> {
    serde_json::from_str(text).map_err(|source| {
        if source.is_data() {
            TaskError::Mismatch {
                path: path.to_path_buf(),
                line,
                format,
                source,
            }
        } else {
            TaskError::Json {
                path: path.to_path_buf(),
                line,
                source,
            }
        }
    })
}

/// A doc id as JSON gives it: a number or a string.
#[derive(Deserialize)]
#[serde(untagged)]
enum JsonId {
    Number(serde_json::Number),
    String(String),
}

impl JsonId {
    fn into_string(self) -> String {
        match self {
            JsonId::Number(n) => n.to_string(),
            JsonId::String(s) => s,
        }
    }

    fn as_u64(&self) -> Option<u64> {
        match self {
            JsonId::Number(n) => n.as_u64(),
            JsonId::String(_) => None,
        }
    }
}

#[derive(Deserialize)]
struct RequestLine {
    request: Request,
    doc_id: JsonId,
    idx: u64,
    #[serde(default)]
    label: Value,
    #[serde(default)]
    native_id: Option<JsonId>,
    #[serde(default)]
    doc: Option<RequestDoc>,
}

#[derive(Deserialize)]
struct Request {
    context: String,
    continuation: String,
}

/// The one field of a request's `doc` read here; the rest (query, choices, ...) is skipped.
#[derive(Deserialize)]
struct RequestDoc {
    #[serde(default)]
    gold: Value,
}

#[derive(Deserialize)]
struct TextLine {
    text: String,
    #[serde(default)]
    id: Option<JsonId>,
}

#[derive(Deserialize)]
struct ChatLine {
    messages: Vec<Message>,
    #[serde(default)]
    id: Option<JsonId>,
}

#[derive(Deserialize)]
struct PromptLine {
    prompt: String,
    #[serde(default)]
    id: Option<JsonId>,
}

/// Turns a file's lines into docs, by format.
enum Parser {
    Requests(RequestGroups),
    Lines(TaskFormat, Vec<Doc>),
}

impl Parser {
    fn new(format: TaskFormat) -> Self {
        match format {
            TaskFormat::Requests => Parser::Requests(RequestGroups::default()),
            other => Parser::Lines(other, Vec::new()),
        }
    }

    fn add(&mut self, path: &Path, line: usize, text: &str) -> Result<(), TaskError> {
        let format = match self {
            Parser::Requests(_) => TaskFormat::Requests,
            Parser::Lines(format, _) => *format,
        };
        let name = |id: Option<JsonId>| id.map_or_else(|| line.to_string(), JsonId::into_string);
        match self {
            Parser::Requests(groups) => {
                groups.add(path, line, parse_line(path, line, text, format)?)
            }
            Parser::Lines(TaskFormat::Text, docs) => {
                let l: TextLine = parse_line(path, line, text, format)?;
                docs.push(Doc {
                    id: name(l.id),
                    line,
                    body: DocBody::Text(l.text),
                });
                Ok(())
            }
            Parser::Lines(TaskFormat::Chat, docs) => {
                let l: ChatLine = parse_line(path, line, text, format)?;
                if !l.messages.iter().any(|m| m.role == "assistant") {
                    return Err(TaskError::NoAssistant {
                        path: path.to_path_buf(),
                        line,
                    });
                }
                docs.push(Doc {
                    id: name(l.id),
                    line,
                    body: DocBody::Chat(l.messages),
                });
                Ok(())
            }
            Parser::Lines(_, docs) => {
                let l: PromptLine = parse_line(path, line, text, format)?;
                docs.push(Doc {
                    id: name(l.id),
                    line,
                    body: DocBody::Prompt {
                        prompt: l.prompt,
                        target: None,
                    },
                });
                Ok(())
            }
        }
    }

    fn finish(self, path: &Path) -> Result<Vec<Doc>, TaskError> {
        match self {
            Parser::Requests(groups) => groups.finish(path),
            Parser::Lines(_, docs) => Ok(docs),
        }
    }
}

/// Requests grouped by `doc_id`, in order of first appearance.
#[derive(Default)]
struct RequestGroups {
    groups: Vec<Group>,
    by_id: HashMap<String, usize>,
}

struct Group {
    id: String,
    id_number: Option<u64>,
    native_id: Option<String>,
    line: usize,
    label: Value,
    doc_gold: Option<u64>,
    first_context: String,
    choices: Vec<Choice>,
}

struct Choice {
    idx: u64,
    /// `None` when equal to the group's first context: most tasks share one long few-shot
    /// context between all choices, and it is stored once.
    context: Option<String>,
    continuation: String,
}

impl RequestGroups {
    fn add(&mut self, path: &Path, line: usize, r: RequestLine) -> Result<(), TaskError> {
        let id_number = r.doc_id.as_u64();
        let id = r.doc_id.into_string();
        let Some(&g) = self.by_id.get(&id) else {
            self.by_id.insert(id.clone(), self.groups.len());
            self.groups.push(Group {
                id,
                id_number,
                native_id: r.native_id.map(JsonId::into_string),
                line,
                label: r.label,
                doc_gold: r.doc.and_then(|d| d.gold.as_u64()),
                first_context: r.request.context,
                choices: vec![Choice {
                    idx: r.idx,
                    context: None,
                    continuation: r.request.continuation,
                }],
            });
            return Ok(());
        };
        let group = &mut self.groups[g];
        if r.label != group.label {
            return Err(TaskError::LabelMismatch {
                path: path.to_path_buf(),
                line,
                doc_id: id,
                first: group.label.to_string(),
                found: r.label.to_string(),
            });
        }
        if group.choices.iter().any(|c| c.idx == r.idx) {
            return Err(TaskError::DuplicateChoice {
                path: path.to_path_buf(),
                line,
                doc_id: id,
                idx: r.idx,
            });
        }
        let context = (r.request.context != group.first_context).then_some(r.request.context);
        group.choices.push(Choice {
            idx: r.idx,
            context,
            continuation: r.request.continuation,
        });
        Ok(())
    }

    fn finish(self, path: &Path) -> Result<Vec<Doc>, TaskError> {
        let mut docs = Vec::with_capacity(self.groups.len());
        let mut numbers = Vec::with_capacity(self.groups.len());
        for mut group in self.groups {
            group.choices.sort_by_key(|c| c.idx);
            if group.choices.iter().zip(0u64..).any(|(c, i)| c.idx != i) {
                return Err(TaskError::ChoiceGap {
                    path: path.to_path_buf(),
                    line: group.line,
                    doc_id: group.id,
                    indices: group.choices.iter().map(|c| c.idx).collect(),
                });
            }
            let n = group.choices.len();
            let gold = match group.label.as_u64().or(group.doc_gold) {
                Some(g) if g >= n as u64 => {
                    return Err(TaskError::GoldOutOfRange {
                        path: path.to_path_buf(),
                        line: group.line,
                        doc_id: group.id,
                        gold: g,
                        choices: n,
                    })
                }
                Some(g) => Some(g as usize),
                None if n == 1 => Some(0),
                None => None,
            };
            let context = if group.choices.iter().all(|c| c.context.is_none()) {
                Context::Shared(group.first_context)
            } else {
                let first = &group.first_context;
                Context::PerChoice(
                    group
                        .choices
                        .iter_mut()
                        .map(|c| c.context.take().unwrap_or_else(|| first.clone()))
                        .collect(),
                )
            };
            numbers.push(group.id_number);
            docs.push(Doc {
                id: group.id,
                line: group.line,
                body: DocBody::Choices(Choices {
                    native_id: group.native_id,
                    context,
                    choices: group.choices.into_iter().map(|c| c.continuation).collect(),
                    gold,
                    uncond_context: None,
                }),
            });
        }
        Ok(fold_unconditional(docs, &numbers))
    }
}

/// Folds each doc of unconditional requests (id = a doc's id + [`UNCOND_DOC_ID_OFFSET`], one
/// shared context, the same continuations) into that doc as its `uncond_context`.
fn fold_unconditional(mut docs: Vec<Doc>, numbers: &[Option<u64>]) -> Vec<Doc> {
    let position: HashMap<&str, usize> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| (d.id.as_str(), i))
        .collect();
    let mut pairs = Vec::new();
    for (u, number) in numbers.iter().enumerate() {
        // Only a doc below the offset is a main doc, so no doc is both folded and folded into.
        let Some(main_number) = number
            .and_then(|n| n.checked_sub(UNCOND_DOC_ID_OFFSET))
            .filter(|&n| n < UNCOND_DOC_ID_OFFSET)
        else {
            continue;
        };
        let Some(&m) = position.get(main_number.to_string().as_str()) else {
            continue;
        };
        if let (DocBody::Choices(main), DocBody::Choices(uncond)) = (&docs[m].body, &docs[u].body) {
            if main.choices == uncond.choices && matches!(uncond.context, Context::Shared(_)) {
                pairs.push((m, u));
            }
        }
    }
    let mut folded = vec![false; docs.len()];
    for (m, u) in pairs {
        let context = match &mut docs[u].body {
            DocBody::Choices(Choices {
                context: Context::Shared(c),
                ..
            }) => std::mem::take(c),
            _ => continue,
        };
        if let DocBody::Choices(main) = &mut docs[m].body {
            main.uncond_context = Some(context);
            folded[u] = true;
        }
    }
    docs.into_iter()
        .zip(folded)
        .filter_map(|(doc, f)| (!f).then_some(doc))
        .collect()
}

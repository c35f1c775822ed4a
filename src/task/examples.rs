//! Training sequences: a doc's tokens with a mask on the tokens the loss is taken over.

use tokenizers::Tokenizer;

use super::{ChatTemplate, Choices, Doc, DocBody, Message, TaskData, TaskError};

/// One training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The id of the doc it was made from.
    pub doc_id: String,
    /// The tokens, BOS first when one was asked for.
    pub tokens: Vec<u32>,
    /// One flag per token: true when the token is a loss target, predicted from the tokens
    /// before it. The first flag is always false (nothing precedes it); at least one is true.
    pub target_mask: Vec<bool>,
}

/// Makes one training sequence per doc of `idx` (in that order):
///
/// - requests: the gold choice's context and continuation, targets on the continuation;
/// - text: the whole text, targets on every token after the first;
/// - chat: the conversation rendered with `chat_template` (required), targets on the assistant
///   turns as [`ChatTemplate::segments`] finds them;
/// - prompts: [`prompt_context`] followed by the generated target, targets on the target.
///
/// Pieces are tokenized separately, without the tokenizer's special tokens, and concatenated,
/// as lm-evaluation-harness does for context/continuation pairs; for requests the context's
/// trailing whitespace first moves to the continuation ([`move_trailing_whitespace`]). A prompt
/// keeps its trailing whitespace, as the model saw it when generating the target. `bos` is
/// prepended unless the sequence already starts with it (templates often print it).
///
/// A sequence longer than `max_len` loses context tokens from the left (after BOS), down to the
/// one token before its first target, then tokens from the right.
pub fn examples(
    data: &TaskData,
    idx: &[usize],
    tok: &Tokenizer,
    chat_template: Option<&ChatTemplate>,
    bos: Option<u32>,
    max_len: usize,
) -> Result<Vec<Example>, TaskError> {
    docs_at(data, idx, max_len)?
        .into_iter()
        .map(|doc| example(doc, tok, chat_template, bos, max_len))
        .collect()
}

/// The docs of `idx`, once `max_len` is checked to leave room for a target.
fn docs_at<'a>(
    data: &'a TaskData,
    idx: &[usize],
    max_len: usize,
) -> Result<Vec<&'a Doc>, TaskError> {
    if max_len < 2 {
        return Err(TaskError::MaxLenTooSmall { max_len });
    }
    idx.iter()
        .map(|&i| {
            data.docs.get(i).ok_or(TaskError::IndexOutOfRange {
                index: i,
                docs: data.docs.len(),
            })
        })
        .collect()
}

/// Makes one training sequence per choice of each multiple-choice doc of `idx` (in that order,
/// choices in their order): the choice's context and continuation, targets on the continuation,
/// tokenized and truncated as [`examples`] does. What [`crate::plan::Objective::Choice`]
/// trains on: the original and the slim model's preferences among a doc's choices. Other docs
/// are refused ([`TaskError::NotChoices`]); a doc needs no gold choice.
pub fn choice_examples(
    data: &TaskData,
    idx: &[usize],
    tok: &Tokenizer,
    bos: Option<u32>,
    max_len: usize,
) -> Result<Vec<Vec<Example>>, TaskError> {
    docs_at(data, idx, max_len)?
        .into_iter()
        .map(|doc| {
            let DocBody::Choices(choices) = &doc.body else {
                return Err(TaskError::NotChoices {
                    doc_id: doc.id.clone(),
                    line: doc.line,
                });
            };
            (0..choices.choices.len())
                .map(|c| {
                    let mut seq = Sequence::new(tok, &doc.id);
                    seq.push_choice(choices, c)?;
                    seq.finish(bos, max_len)
                })
                .collect()
        })
        .collect()
}

/// Moves the context's trailing whitespace to the start of the continuation, as
/// lm-evaluation-harness does before tokenizing a pair (so "Answer: " + "B" is scored as
/// "Answer:" + " B", the way the text would be tokenized whole).
pub fn move_trailing_whitespace<'a>(context: &'a str, continuation: &str) -> (&'a str, String) {
    let kept = context.trim_end();
    (kept, format!("{}{continuation}", &context[kept.len()..]))
}

/// The text a prompt's target follows: with a chat template, the prompt as the user's message
/// followed by the assistant's generation header; without one, the prompt itself. Whoever
/// generates the targets must condition on exactly this text.
pub fn prompt_context(
    prompt: &str,
    chat_template: Option<&ChatTemplate>,
) -> Result<String, TaskError> {
    match chat_template {
        Some(chat) => chat.render(&[user_message(prompt)], true),
        None => Ok(prompt.to_string()),
    }
}

fn user_message(prompt: &str) -> Message {
    Message {
        role: "user".to_string(),
        content: prompt.to_string(),
    }
}

fn example(
    doc: &Doc,
    tok: &Tokenizer,
    chat_template: Option<&ChatTemplate>,
    bos: Option<u32>,
    max_len: usize,
) -> Result<Example, TaskError> {
    let mut seq = Sequence::new(tok, &doc.id);
    match &doc.body {
        DocBody::Choices(choices) => {
            let gold = choices.gold.ok_or_else(|| TaskError::NoGold {
                doc_id: doc.id.clone(),
            })?;
            seq.push_choice(choices, gold)?;
        }
        DocBody::Text(text) => seq.push(text, true)?,
        DocBody::Chat(messages) => {
            let chat = chat_template.ok_or_else(|| TaskError::NoChatTemplate {
                doc_id: doc.id.clone(),
            })?;
            for (text, target) in chat.segments(&doc.id, messages)? {
                seq.push(&text, target)?;
            }
        }
        DocBody::Prompt { prompt, target } => {
            let target = target.as_deref().ok_or_else(|| TaskError::MissingTarget {
                doc_id: doc.id.clone(),
            })?;
            let context =
                prompt_context(prompt, chat_template).map_err(|e| with_doc(e, &doc.id))?;
            seq.push(&context, false)?;
            seq.push(target, true)?;
        }
    }
    seq.finish(bos, max_len)
}

/// Names the doc in a render error from [`ChatTemplate::render`].
fn with_doc(error: TaskError, doc_id: &str) -> TaskError {
    match error {
        TaskError::TemplateRender { source, .. } => TaskError::TemplateRender {
            doc_id: Some(doc_id.to_string()),
            source,
        },
        other => other,
    }
}

/// Tokens and target flags, built piece by piece.
struct Sequence<'a> {
    tok: &'a Tokenizer,
    doc_id: &'a str,
    tokens: Vec<u32>,
    mask: Vec<bool>,
}

impl<'a> Sequence<'a> {
    fn new(tok: &'a Tokenizer, doc_id: &'a str) -> Self {
        Self {
            tok,
            doc_id,
            tokens: Vec::new(),
            mask: Vec::new(),
        }
    }

    /// Choice `c`'s context, then its continuation as the targets (the context's trailing
    /// whitespace moved to the continuation).
    fn push_choice(&mut self, choices: &Choices, c: usize) -> Result<(), TaskError> {
        let continuation = choices.choices.get(c).map_or("", String::as_str);
        let (context, continuation) = move_trailing_whitespace(choices.context(c), continuation);
        self.push(context, false)?;
        self.push(&continuation, true)
    }

    /// The example: `bos` prepended (unless already first), the first flag cleared, cut to
    /// `max_len` ([`truncate`]); refused when no target is left.
    fn finish(self, bos: Option<u32>, max_len: usize) -> Result<Example, TaskError> {
        let Sequence {
            mut tokens,
            mut mask,
            doc_id,
            ..
        } = self;
        let mut keep = 0;
        if let Some(bos) = bos {
            if tokens.first() != Some(&bos) {
                tokens.insert(0, bos);
                mask.insert(0, false);
            }
            keep = 1;
        }
        if let Some(first) = mask.first_mut() {
            *first = false;
        }
        truncate(&mut tokens, &mut mask, keep, max_len);
        if !mask.contains(&true) {
            return Err(TaskError::NoTargets {
                doc_id: doc_id.to_string(),
                max_len,
            });
        }
        Ok(Example {
            doc_id: doc_id.to_string(),
            tokens,
            target_mask: mask,
        })
    }

    fn push(&mut self, text: &str, target: bool) -> Result<(), TaskError> {
        if text.is_empty() {
            return Ok(());
        }
        let encoding = self
            .tok
            .encode(text, false)
            .map_err(|source| TaskError::Tokenize {
                doc_id: self.doc_id.to_string(),
                source,
            })?;
        let ids = encoding.get_ids();
        self.tokens.extend_from_slice(ids);
        self.mask.extend(std::iter::repeat_n(target, ids.len()));
        Ok(())
    }
}

/// Cuts a sequence to `max_len`: first context from the left (after the `keep` leading tokens,
/// keeping one token before the first target), then from the right.
fn truncate(tokens: &mut Vec<u32>, mask: &mut Vec<bool>, keep: usize, max_len: usize) {
    if tokens.len() <= max_len {
        return;
    }
    let first_target = mask.iter().position(|&m| m).unwrap_or(tokens.len());
    let droppable = first_target.saturating_sub(keep + 1);
    let drop = droppable.min(tokens.len() - max_len);
    tokens.drain(keep..keep + drop);
    mask.drain(keep..keep + drop);
    tokens.truncate(max_len);
    mask.truncate(max_len);
}

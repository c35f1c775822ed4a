//! Training sequences: a doc's tokens with a mask on the tokens the loss is taken over.

use tokenizers::Tokenizer;

use super::{ChatTemplate, Choices, Doc, DocBody, Message, TaskData, TaskError};

/// The examples of a set of documents cut to a length together, and the documents left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Examples<T> {
    /// One entry per document kept, in the order asked for.
    pub examples: Vec<T>,
    /// The documents that did not fit.
    pub left_out: Vec<LeftOut>,
}

/// A document left out because the prefix every document shares and one of its targets do not
/// fit in the length limit together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftOut {
    /// The doc.
    pub doc_id: String,
    /// Its length in tokens, whole.
    pub tokens: usize,
}

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
    /// Whether the first token is the BOS asked for (cutting keeps it).
    pub starts_with_bos: bool,
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
/// The documents are cut to `max_len` together ([`cut_together`]): the prefix they all share (a
/// few-shot preamble) stays whole, a long document loses its own context, and one that cannot
/// keep that prefix and a target within `max_len` is left out.
pub fn examples(
    data: &TaskData,
    idx: &[usize],
    tok: &Tokenizer,
    chat_template: Option<&ChatTemplate>,
    bos: Option<u32>,
    max_len: usize,
) -> Result<Examples<Example>, TaskError> {
    let whole = docs_at(data, idx, max_len)?
        .into_iter()
        .map(|doc| Ok(vec![example(doc, tok, chat_template, bos)?]))
        .collect::<Result<Vec<_>, TaskError>>()?;
    let cut = cut_together(whole, max_len)?;
    Ok(Examples {
        examples: cut.examples.into_iter().flatten().collect(),
        left_out: cut.left_out,
    })
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
/// tokenized and cut as [`examples`] does (a doc is kept or left out with all its choices). What [`crate::plan::Objective::Choice`]
/// trains on: the original and the slim model's preferences among a doc's choices. Other docs
/// are refused ([`TaskError::NotChoices`]); a doc needs no gold choice.
pub fn choice_examples(
    data: &TaskData,
    idx: &[usize],
    tok: &Tokenizer,
    bos: Option<u32>,
    max_len: usize,
) -> Result<Examples<Vec<Example>>, TaskError> {
    let whole = docs_at(data, idx, max_len)?
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
                    seq.finish(bos)
                })
                .collect()
        })
        .collect::<Result<Vec<_>, TaskError>>()?;
    cut_together(whole, max_len)
}

/// The number of leading tokens all `sequences` share (a few-shot preamble, BOS included); 0
/// for fewer than two.
pub fn shared_prefix<'a>(sequences: impl IntoIterator<Item = &'a [u32]>) -> usize {
    let mut sequences = sequences.into_iter();
    let Some(first) = sequences.next() else {
        return 0;
    };
    let mut others = 0;
    let shared = sequences.fold(first.len(), |n, s| {
        others += 1;
        first[..n].iter().zip(s).take_while(|(a, b)| a == b).count()
    });
    if others == 0 {
        0
    } else {
        shared
    }
}

/// Cuts whole examples, one group per doc, to `max_len` tokens: a longer sequence loses tokens
/// from the left, after the prefix the groups' first examples share ([`shared_prefix`]) and the BOS, down to the
/// one token before its first target, then from the right. The shared prefix is never cut (a
/// few-shot preamble cut short would no longer be shared, and the loss would change what it
/// covers): a doc that cannot keep it and a target is left out, with all its group. Refused when
/// every doc would be left out.
pub fn cut_together(
    groups: Vec<Vec<Example>>,
    max_len: usize,
) -> Result<Examples<Vec<Example>>, TaskError> {
    let shared = shared_prefix(
        groups
            .iter()
            .filter_map(|g| g.first())
            .map(|e| e.tokens.as_slice()),
    );
    let mut out = Examples {
        examples: Vec::with_capacity(groups.len()),
        left_out: Vec::new(),
    };
    for group in groups {
        let mut kept = Vec::with_capacity(group.len());
        let whole_len = group.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
        for mut e in group {
            let keep = shared.max(usize::from(e.starts_with_bos));
            truncate(&mut e.tokens, &mut e.target_mask, keep, max_len);
            if e.target_mask.contains(&true) {
                kept.push(e);
            } else {
                out.left_out.push(LeftOut {
                    doc_id: e.doc_id,
                    tokens: whole_len,
                });
                kept.clear();
                break;
            }
        }
        if !kept.is_empty() {
            out.examples.push(kept);
        }
    }
    if out.examples.is_empty() {
        if let Some(first) = out.left_out.first() {
            return Err(TaskError::NothingFits {
                doc_id: first.doc_id.clone(),
                tokens: first.tokens,
                shared,
                max_len,
            });
        }
    }
    Ok(out)
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
    seq.finish(bos)
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

    /// The example, whole: `bos` prepended (unless already first), the first flag cleared;
    /// refused when it has no target.
    fn finish(self, bos: Option<u32>) -> Result<Example, TaskError> {
        let Sequence {
            mut tokens,
            mut mask,
            doc_id,
            ..
        } = self;
        if let Some(bos) = bos {
            if tokens.first() != Some(&bos) {
                tokens.insert(0, bos);
                mask.insert(0, false);
            }
        }
        if let Some(first) = mask.first_mut() {
            *first = false;
        }
        if !mask.contains(&true) {
            return Err(TaskError::NoTargets {
                doc_id: doc_id.to_string(),
            });
        }
        Ok(Example {
            doc_id: doc_id.to_string(),
            tokens,
            target_mask: mask,
            starts_with_bos: bos.is_some(),
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

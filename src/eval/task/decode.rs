//! How task evaluation decodes in llama.cpp: each doc's requests tokenized as
//! lm-evaluation-harness tokenizes them, the layout of a selection's decodes (the prefix all docs
//! share decoded once into its own KV cache sequence, the docs packed into decodes after it or
//! whole), and the decodes that sum each choice's continuation log-probability.

use std::ops::Range;
use std::path::Path;
use std::time::Instant;

use super::{choice_chars, DecodeOptions, TaskEvalError, MIN_CACHED_PREFIX};
use crate::llamacpp::{log_softmax, Ctx, LoadedModel, SharedPrefix, MAX_SEQS};
use crate::task::{move_trailing_whitespace, Doc, DocBody, TaskFormat};

/// One doc's requests, tokenized.
pub(super) struct DocRequests {
    pub(super) doc_id: String,
    pub(super) gold: usize,
    /// Leading tokens every choice's input shares.
    shared: usize,
    pub(super) choices: Vec<ChoiceRequest>,
}

/// One (context, continuation) request, tokenized.
pub(super) struct ChoiceRequest {
    /// The tokens decoded: the context, then the continuation less its last token (whose logits
    /// predict nothing scored), cut from the left to the context size.
    input: Vec<u32>,
    /// The continuation's tokens, predicted by the last `targets.len()` positions of `input`.
    targets: Vec<u32>,
    /// `acc_norm`'s divisor.
    pub(super) chars: usize,
    /// Whether `input` lost tokens from the left.
    pub(super) truncated: bool,
}

impl DocRequests {
    pub(super) fn new(
        model: &LoadedModel,
        path: &Path,
        doc: &Doc,
        n_ctx: usize,
    ) -> Result<DocRequests, TaskEvalError> {
        let choices = match &doc.body {
            DocBody::Choices(c) => c,
            other => {
                return Err(TaskEvalError::NotChoices {
                    path: path.to_path_buf(),
                    format: match other {
                        DocBody::Text(_) => TaskFormat::Text,
                        DocBody::Chat(_) => TaskFormat::Chat,
                        _ => TaskFormat::Prompts,
                    },
                })
            }
        };
        let gold = choices.gold.ok_or_else(|| TaskEvalError::NoGold {
            path: path.to_path_buf(),
            line: doc.line,
            doc_id: doc.id.clone(),
        })?;
        let vocab = model.model.vocab();
        let (add_bos, bos) = (vocab.should_add_bos(), vocab.bos().0 as u32);
        let mut requests = Vec::with_capacity(choices.choices.len());
        for (i, continuation) in choices.choices.iter().enumerate() {
            let (context, moved) = move_trailing_whitespace(choices.context(i), continuation);
            let mut input = model.tokenize(context, add_bos);
            if input.is_empty() {
                // lm-evaluation-harness conditions an empty context on its prefix token.
                input.push(bos);
            }
            let targets = model.tokenize(&moved, false);
            let (line, doc_id) = (doc.line, doc.id.clone());
            if targets.is_empty() {
                return Err(TaskEvalError::EmptyContinuation {
                    path: path.to_path_buf(),
                    line,
                    doc_id,
                    choice: i,
                    continuation: continuation.clone(),
                });
            }
            if targets.len() > n_ctx {
                return Err(TaskEvalError::ContinuationTooLong {
                    path: path.to_path_buf(),
                    line,
                    doc_id,
                    choice: i,
                    tokens: targets.len(),
                    n_ctx,
                });
            }
            input.extend_from_slice(&targets[..targets.len() - 1]);
            let truncated = input.len() > n_ctx;
            if truncated {
                input.drain(..input.len() - n_ctx);
            }
            requests.push(ChoiceRequest {
                input,
                targets,
                chars: choice_chars(continuation),
                truncated,
            });
        }
        let shared = requests.split_first().map_or(0, |(first, rest)| {
            rest.iter().fold(first.input.len(), |n, r| {
                first.input[..n]
                    .iter()
                    .zip(&r.input)
                    .take_while(|(a, b)| a == b)
                    .count()
            })
        });
        Ok(DocRequests {
            doc_id: doc.id.clone(),
            gold,
            shared,
            choices: requests,
        })
    }
}

/// Some choices of one doc, decoded together.
struct Part {
    /// Index into the docs' requests.
    doc: usize,
    choices: Range<usize>,
}

/// How a selection's requests are decoded: the prefix all docs share, decoded once, the packs
/// of the docs that continue it, then the packs of the docs decoded whole.
pub(super) struct Layout {
    /// The tokens every choice of the `cached` docs begins with, decoded once; empty when there
    /// is no such prefix of [`MIN_CACHED_PREFIX`] tokens, or prefix reuse is off.
    pub(super) prefix: Vec<u32>,
    /// Decodes after the cached prefix.
    cached: Vec<Vec<Part>>,
    /// Decodes of whole docs (docs cut to fit the context, or all when nothing is cached).
    whole: Vec<Vec<Part>>,
    /// Docs decoded after the prefix.
    pub(super) cached_docs: usize,
}

impl Layout {
    /// The layout of `docs` in decodes of `n_ctx` tokens, reusing their shared prefix when
    /// `reuse_prefix`.
    pub(super) fn new(docs: &[DocRequests], n_ctx: usize, reuse_prefix: bool) -> Layout {
        let most_seqs = MAX_SEQS.min(n_ctx);
        let uncut = |d: &DocRequests| !d.choices.iter().any(|c| c.truncated);
        let prefix = common_prefix(docs.iter().filter(|d| uncut(d)));
        // The prefix's own sequence takes one of the context's sequences; every uncut choice
        // fits in the context, so in a decode of `n_ctx - prefix` tokens after the prefix.
        if !reuse_prefix || prefix.len() < MIN_CACHED_PREFIX || most_seqs < 2 {
            return Layout {
                prefix: Vec::new(),
                cached: Vec::new(),
                whole: pack(docs, 0..docs.len(), 0, n_ctx, most_seqs),
                cached_docs: 0,
            };
        }
        let (cached, whole): (Vec<usize>, Vec<usize>) =
            (0..docs.len()).partition(|&d| uncut(&docs[d]));
        let p = prefix.len();
        Layout {
            cached: pack(docs, cached.iter().copied(), p, n_ctx - p, most_seqs - 1),
            whole: pack(docs, whole.into_iter(), 0, n_ctx, most_seqs),
            cached_docs: cached.len(),
            prefix,
        }
    }
}

/// The longest token prefix that every choice of `docs` begins with, stopping before the first
/// position of each whose logits are scored (so that every scored position follows it).
fn common_prefix<'a>(docs: impl Iterator<Item = &'a DocRequests>) -> Vec<u32> {
    let mut prefix: Option<&[u32]> = None;
    for choice in docs.flat_map(|d| &d.choices) {
        let context = &choice.input[..choice.input.len() - choice.targets.len()];
        prefix = Some(match prefix {
            None => context,
            Some(p) => &p[..p.iter().zip(context).take_while(|(a, b)| a == b).count()],
        });
    }
    prefix.unwrap_or_default().to_vec()
}

/// Packs the requests of the docs `which`, in order, into decodes of at most `budget` tokens
/// and `max_seqs` sequences, each doc's first `skip` tokens left out (decoded before, as a
/// cached prefix); each part of a decode pays for its doc's shared prefix once.
fn pack(
    docs: &[DocRequests],
    which: impl Iterator<Item = usize>,
    skip: usize,
    budget: usize,
    max_seqs: usize,
) -> Vec<Vec<Part>> {
    let mut packs = Vec::new();
    let mut current: Vec<Part> = Vec::new();
    let (mut tokens, mut seqs) = (0, 0);
    for d in which {
        let doc = &docs[d];
        let shared = doc.shared - skip;
        for (c, choice) in doc.choices.iter().enumerate() {
            let own = choice.input.len() - doc.shared;
            let same_doc = current.last().is_some_and(|p| p.doc == d);
            let mut cost = if same_doc { own } else { shared + own };
            if !current.is_empty() && (seqs == max_seqs || tokens + cost > budget) {
                packs.push(std::mem::take(&mut current));
                (tokens, seqs, cost) = (0, 0, shared + own);
            }
            match current.last_mut() {
                Some(part) if part.doc == d => part.choices.end = c + 1,
                _ => current.push(Part {
                    doc: d,
                    choices: c..c + 1,
                }),
            }
            tokens += cost;
            seqs += 1;
        }
    }
    if !current.is_empty() {
        packs.push(current);
    }
    packs
}

/// One model's scores.
pub(super) struct Scored {
    /// Per doc, per choice: summed log-probability of the continuation.
    pub(super) loglikelihoods: Vec<Vec<f64>>,
    /// Tokens decoded.
    pub(super) tokens: usize,
    /// Seconds spent decoding.
    pub(super) seconds: f64,
}

pub(super) fn score(
    model: &LoadedModel,
    docs: &[DocRequests],
    layout: &Layout,
    n_ctx: usize,
    threads: usize,
    options: DecodeOptions,
    progress: &indicatif::ProgressBar,
) -> Result<Scored, TaskEvalError> {
    progress.set_message(format!("scoring {}", model.path.display()));
    let mut ctx = model.context_with(n_ctx, threads, options.f32_kv)?;
    let mut scored = Scored {
        loglikelihoods: docs.iter().map(|d| vec![0.0; d.choices.len()]).collect(),
        tokens: 0,
        seconds: 0.0,
    };
    if !layout.cached.is_empty() {
        let started = Instant::now();
        ctx.cache_prefix(&layout.prefix)?;
        scored.seconds += started.elapsed().as_secs_f64();
        scored.tokens += layout.prefix.len();
    }
    let skip = layout.prefix.len();
    for parts in &layout.cached {
        score_pack(&mut ctx, docs, parts, skip, &mut scored, progress)?;
    }
    for parts in &layout.whole {
        score_pack(&mut ctx, docs, parts, 0, &mut scored, progress)?;
    }
    Ok(scored)
}

/// Decodes one pack, its docs' first `skip` tokens taken from the cached prefix when `skip` is
/// not 0, and adds its tokens, time and log-likelihoods to `scored`.
fn score_pack(
    ctx: &mut Ctx<'_>,
    docs: &[DocRequests],
    parts: &[Part],
    skip: usize,
    scored: &mut Scored,
    progress: &indicatif::ProgressBar,
) -> Result<(), TaskEvalError> {
    let groups: Vec<SharedPrefix<'_>> = parts
        .iter()
        .map(|part| {
            let doc = &docs[part.doc];
            let first = &doc.choices[part.choices.start];
            SharedPrefix {
                prefix: &first.input[skip..doc.shared],
                suffixes: doc.choices[part.choices.clone()]
                    .iter()
                    .map(|r| {
                        let start = r.input.len() - r.targets.len() - skip;
                        (
                            &r.input[doc.shared..],
                            (start..r.input.len() - skip).collect(),
                        )
                    })
                    .collect(),
            }
        })
        .collect();
    scored.tokens += groups
        .iter()
        .map(|g| g.prefix.len() + g.suffixes.iter().map(|(s, _)| s.len()).sum::<usize>())
        .sum::<usize>();
    let owners: Vec<(usize, usize)> = parts
        .iter()
        .flat_map(|p| p.choices.clone().map(move |c| (p.doc, c)))
        .collect();
    let lls = &mut scored.loglikelihoods;
    let each = |seq: usize, k: usize, logits: &[f32]| {
        let (d, c) = owners[seq];
        let target = docs[d].choices[c].targets[k] as usize;
        lls[d][c] += log_softmax(logits)[target];
    };
    let started = Instant::now();
    if skip == 0 {
        ctx.logits_shared(&groups, each)?;
    } else {
        ctx.logits_after_prefix(&groups, each)?;
    }
    scored.seconds += started.elapsed().as_secs_f64();
    let finished = parts
        .iter()
        .filter(|p| p.choices.end == docs[p.doc].choices.len())
        .count();
    progress.inc(finished as u64);
    Ok(())
}

//! Multiple-choice task accuracy in llama.cpp, scored as lm-evaluation-harness scores its
//! `multiple_choice` tasks (`ConfigurableTask.process_results` in `lm_eval/api/task.py`,
//! <https://github.com/EleutherAI/lm-evaluation-harness>): a choice's score is the summed
//! log-probability of its continuation's tokens given its context; `acc` picks the best score,
//! `acc_norm` the best score per character of the choice (`np.argmax(lls / completion_len)` with
//! `completion_len = len(choice)`, Python's length in characters, of the choice without the
//! target delimiter, a space, that precedes it in the continuation).
//!
//! Tokenization follows lm-evaluation-harness: the context's trailing whitespace moves to the
//! continuation, the two are tokenized separately (the context with the model's BOS when it adds
//! one, the continuation without special tokens) and concatenated; an empty context becomes BOS.
//! A sequence longer than the context loses tokens from the left. The choices of a doc begin
//! with the same tokens (the doc's context), which enter a decode once for all of them, and
//! several docs fill one decode, in selection order. The docs of a few-shot task also begin with
//! the same tokens (the few-shot examples, most of every context): the longest token prefix that
//! all docs share (those not cut to fit) is decoded once per model, before the docs, into its own
//! sequence of llama.cpp's KV cache, and every decode after it continues that sequence's cached
//! keys and values, decoding only the rest of each doc ([`MIN_CACHED_PREFIX`] tokens at least;
//! cut docs, and all docs when the shared prefix is shorter, decode whole, after the others).
//! A selection, a context size and [`DecodeOptions`] always give the same layout, and a reference
//! decodes in the model's layout. (The layout matters a little for quantized models: llama.cpp
//! rounds activations to 8 bits in its quantized matmuls, and a sequence's rounding depends on
//! where it sits in the batch; on SmolLM2-135M that is about 0.07 nats per token either way,
//! against an f32 copy of the same weights, and moves arc_easy's choice log-likelihoods by about
//! 0.17 nats from one layout to another, a cached prefix or another context size alike. With an
//! f32 model and an f32 KV cache the layouts agree to 1e-5 nats.)
//!
//! With a reference model, paired statistics on the same documents: answer agreement, the
//! accuracy difference with a bootstrap interval over documents, and the KL divergence between
//! the two models' distributions over the choices.

mod decode;
mod stats;

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::eval::perplexity::{same_vocab, EvalError};
use crate::llamacpp::{LlamaError, LoadedModel};
use crate::output::{AtomicFile, OutputError};
use crate::plan::Plan;
use crate::task::{Doc, TaskData, TaskFormat};
use decode::{score, DocRequests, Layout, Scored};
use stats::paired_figures;

pub use stats::{
    pair_with_reference, wilson_ci95, PairedFigures, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED,
};

/// Fewest tokens of a prefix shared by all docs worth decoding once and reusing from the KV
/// cache; a shorter one is decoded with every doc, as the rest of its context.
pub const MIN_CACHED_PREFIX: usize = 16;

/// How [`evaluate_with`] decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Decode the token prefix all docs share once per model and reuse its KV cache (when it
    /// has at least [`MIN_CACHED_PREFIX`] tokens); off, every doc decodes whole.
    pub reuse_prefix: bool,
    /// An f32 KV cache instead of llama.cpp's default f16 one, for exact comparisons.
    pub f32_kv: bool,
}

impl Default for DecodeOptions {
    /// The prefix reused, an f16 KV cache: what `hopscotch eval --task` does.
    fn default() -> Self {
        DecodeOptions {
            reuse_prefix: true,
            f32_kv: false,
        }
    }
}

/// Errors from task evaluation.
#[derive(Debug, thiserror::Error)]
pub enum TaskEvalError {
    /// llama.cpp failed.
    #[error(transparent)]
    Llama(#[from] LlamaError),
    /// The model and the reference cannot be compared (different vocabularies).
    #[error(transparent)]
    Eval(#[from] EvalError),
    /// The task file is not made of multiple-choice log-likelihood requests.
    #[error(
        "{}: a {format}-format file, but task evaluation scores multiple-choice log-likelihood \
         requests, one line per choice: {}; use --text for perplexity on text",
        path.display(),
        TaskFormat::Requests.line_shape()
    )]
    NotChoices {
        /// The task file.
        path: PathBuf,
        /// Its format.
        format: TaskFormat,
    },
    /// The plan given to hold out fit docs was fitted on other task data.
    #[error(
        "{}: the plan was fitted on {fitted}, but {} has sha256 {found}; fit docs can only be \
         held out of a file they were fitted on",
        plan.display(),
        task.display()
    )]
    PlanTaskMismatch {
        /// The plan file.
        plan: PathBuf,
        /// The task files the plan records, each with its sha256.
        fitted: String,
        /// The task file given.
        task: PathBuf,
        /// The sha256 of the task file given.
        found: String,
    },
    /// A doc has no correct choice to score against.
    #[error("{}:{line}: doc {doc_id} has no gold choice (an integer \"label\" or \"doc.gold\")", path.display())]
    NoGold {
        /// The task file.
        path: PathBuf,
        /// The doc's first line.
        line: usize,
        /// The doc.
        doc_id: String,
    },
    /// A continuation has no tokens, so nothing to score.
    #[error("{}:{line}: doc {doc_id}, choice {choice}: the continuation {continuation:?} has no tokens", path.display())]
    EmptyContinuation {
        /// The task file.
        path: PathBuf,
        /// The doc's first line.
        line: usize,
        /// The doc.
        doc_id: String,
        /// The choice index.
        choice: usize,
        /// The continuation.
        continuation: String,
    },
    /// A continuation alone does not fit the context.
    #[error(
        "{}:{line}: doc {doc_id}, choice {choice}: the continuation has {tokens} tokens, more \
         than the context of {n_ctx}; raise --ctx",
        path.display()
    )]
    ContinuationTooLong {
        /// The task file.
        path: PathBuf,
        /// The doc's first line.
        line: usize,
        /// The doc.
        doc_id: String,
        /// The choice index.
        choice: usize,
        /// Tokens in the continuation.
        tokens: usize,
        /// The context size.
        n_ctx: usize,
    },
    /// A reference's doc scores are not of the same docs as the model's.
    #[error(
        "the reference was scored on other documents ({reference} against the model's {docs}, or \
         in another order): paired statistics need the same documents"
    )]
    ReferenceDocs {
        /// Docs the model scored.
        docs: usize,
        /// Docs the reference scored.
        reference: usize,
    },
    /// No doc is left to score.
    #[error("{}: no docs left to score ({docs} in the file, {excluded} held out as fit docs)", path.display())]
    NoDocs {
        /// The task file.
        path: PathBuf,
        /// Docs in the file.
        docs: usize,
        /// Docs held out.
        excluded: usize,
    },
}

/// The docs chosen for scoring, in file order.
#[derive(Debug, Clone)]
pub struct Selection<'a> {
    /// The docs.
    pub docs: Vec<&'a Doc>,
    /// Docs held out because a plan was fitted on them.
    pub excluded: usize,
}

/// Chooses the docs to score: every doc in file order, less the docs the plan of `exclude_fit`
/// (its file and content) was fitted on, then the first `limit` of those. File order means two
/// models scored with the same arguments see the same docs. Fails when the file is not
/// multiple-choice, when the plan was fitted on another file (sha256), or when no doc is left.
pub fn select_docs<'a>(
    task: &'a TaskData,
    exclude_fit: Option<(&Path, &Plan)>,
    limit: Option<usize>,
) -> Result<Selection<'a>, TaskEvalError> {
    if task.format != TaskFormat::Requests {
        return Err(TaskEvalError::NotChoices {
            path: task.path.clone(),
            format: task.format,
        });
    }
    let fit_ids: std::collections::HashSet<&str> = match exclude_fit {
        Some((plan_path, plan)) => {
            let Some(fitted) = plan.task_with_sha256(&task.sha256) else {
                return Err(TaskEvalError::PlanTaskMismatch {
                    plan: plan_path.to_path_buf(),
                    fitted: plan
                        .tasks()
                        .map(|t| format!("{} (sha256 {})", t.task.path, t.task.sha256))
                        .collect::<Vec<_>>()
                        .join(", "),
                    task: task.path.clone(),
                    found: task.sha256.clone(),
                });
            };
            fitted.seen_doc_ids().collect()
        }
        None => Default::default(),
    };
    let kept: Vec<&Doc> = task
        .docs
        .iter()
        .filter(|d| !fit_ids.contains(d.id.as_str()))
        .collect();
    let excluded = task.docs.len() - kept.len();
    let docs: Vec<&Doc> = kept.into_iter().take(limit.unwrap_or(usize::MAX)).collect();
    if docs.is_empty() {
        return Err(TaskEvalError::NoDocs {
            path: task.path.clone(),
            docs: task.docs.len(),
            excluded,
        });
    }
    Ok(Selection { docs, excluded })
}

/// How one doc was scored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DocScore {
    /// The doc's id.
    pub doc_id: String,
    /// The correct choice.
    pub gold: usize,
    /// Each choice's summed continuation log-probability in nats, in choice order.
    pub loglikelihoods: Vec<f64>,
    /// Each choice's length in characters, `acc_norm`'s divisor ([`choice_chars`]).
    pub choice_chars: Vec<usize>,
    /// The choice with the highest log-likelihood (the first on ties).
    pub pred: usize,
    /// The choice with the highest log-likelihood per character (the first on ties).
    pub pred_norm: usize,
    /// The reference's log-likelihoods, with a reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_loglikelihoods: Option<Vec<f64>>,
    /// The reference's choice (highest log-likelihood), with a reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_pred: Option<usize>,
}

/// Writes `docs` to `path` as JSON lines, one [`DocScore`] per doc in the order scored, whole
/// or not at all; an existing file is refused unless `force`.
pub fn write_samples(path: &Path, docs: &[DocScore], force: bool) -> Result<(), OutputError> {
    let mut file = AtomicFile::create(path, force)?;
    let io = |source| OutputError::Io {
        path: path.to_path_buf(),
        source,
    };
    for doc in docs {
        serde_json::to_writer(&mut file, doc).map_err(|e| io(e.into()))?;
        file.write_all(b"\n").map_err(io)?;
    }
    file.commit()
}

/// A reference model's accuracy on the same docs.
#[derive(Debug, Clone, Serialize)]
pub struct ReferenceAccuracy {
    /// Fraction of docs where the reference's best choice is the gold one.
    pub accuracy: f64,
    /// The same with scores per character.
    pub acc_norm: f64,
}

/// Accuracy of one model on a multiple-choice task (and, with a reference, paired statistics).
#[derive(Debug, Clone, Serialize)]
pub struct TaskReport {
    /// Fraction of docs whose highest-scoring choice is the gold one.
    pub accuracy: f64,
    /// Fraction of docs whose highest score per character is the gold one.
    pub acc_norm: f64,
    /// 95% Wilson score interval of `accuracy`.
    pub accuracy_ci95: [f64; 2],
    /// 95% Wilson score interval of `acc_norm`.
    pub acc_norm_ci95: [f64; 2],
    /// Docs scored.
    pub n_docs: usize,
    /// Docs held out as a plan's fit docs.
    pub excluded_docs: usize,
    /// (context, continuation) requests scored.
    pub n_requests: usize,
    /// Requests cut from the left to fit the context.
    pub truncated_requests: usize,
    /// Tokens the model decoded (a doc's shared prefix counts once, and the prefix all docs
    /// share, when cached, once in all).
    pub prompt_tokens: usize,
    /// Tokens of the prefix all docs share that were decoded once and reused from the KV cache
    /// ([`DecodeOptions::reuse_prefix`]; 0 when none was), counted once in `prompt_tokens`.
    pub cached_prefix_tokens: usize,
    /// Docs decoded after the cached prefix (the others decode whole).
    pub cached_prefix_docs: usize,
    /// `prompt_tokens` per second of decoding (the decode calls, logits read out included).
    pub prompt_tokens_per_s: f64,
    /// Context size of a decode.
    pub n_ctx: usize,
    /// The reference's accuracy on the same docs.
    pub reference: Option<ReferenceAccuracy>,
    /// Fraction of docs where both models pick the same choice (highest log-likelihood).
    pub agreement: Option<f64>,
    /// `accuracy` minus the reference's.
    pub accuracy_diff: Option<f64>,
    /// 95% paired bootstrap interval of `accuracy_diff`: [`BOOTSTRAP_RESAMPLES`] resamples of
    /// the docs with replacement, seeded with [`BOOTSTRAP_SEED`], 2.5th and 97.5th percentiles.
    pub accuracy_diff_ci95: Option<[f64; 2]>,
    /// Mean over docs of KL(reference || model) between the softmax distributions of the two
    /// models' choice log-likelihoods, in nats.
    pub choice_kl_mean: Option<f64>,
    /// Per-doc scores, in the order scored (not serialized with the summary).
    #[serde(skip)]
    pub docs: Vec<DocScore>,
}

impl TaskReport {
    /// The lines that name what was evaluated: `model` on `task`, the documents and requests.
    pub fn heading(&self, model: &Path, task: &Path) -> String {
        format!(
            "model            {}\ntask             {}: {} docs ({} held out as fit docs), {} requests ({} truncated)",
            model.display(),
            task.display(),
            self.n_docs,
            self.excluded_docs,
            self.n_requests,
            self.truncated_requests
        )
    }
}

impl std::fmt::Display for TaskReport {
    /// The figures after the model and task lines (which name the files): accuracy with its
    /// interval, the decode, and the pairing against the reference when there is one.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = |x: f64| x * 100.0;
        for (name, value, [lo, hi]) in [
            ("accuracy", self.accuracy, self.accuracy_ci95),
            ("acc_norm", self.acc_norm, self.acc_norm_ci95),
        ] {
            writeln!(
                f,
                "{name:<16} {:.2}% (95% CI {:.2}-{:.2}%, Wilson)",
                pct(value),
                pct(lo),
                pct(hi)
            )?;
        }
        write!(
            f,
            "prompt tokens    {} in decodes of up to {} ({:.0} tokens/s)",
            self.prompt_tokens, self.n_ctx, self.prompt_tokens_per_s
        )?;
        if self.cached_prefix_tokens > 0 {
            write!(
                f,
                "\nshared prefix    {} tokens decoded once per model, reused by {} of {} docs",
                self.cached_prefix_tokens, self.cached_prefix_docs, self.n_docs
            )?;
        }
        if let (Some(reference), Some(agreement), Some(diff), Some([lo, hi]), Some(kl)) = (
            &self.reference,
            self.agreement,
            self.accuracy_diff,
            self.accuracy_diff_ci95,
            self.choice_kl_mean,
        ) {
            write!(
                f,
                "\nreference        accuracy {:.2}%, acc_norm {:.2}%",
                pct(reference.accuracy),
                pct(reference.acc_norm)
            )?;
            write!(f, "\nagreement        {:.2}%", pct(agreement))?;
            write!(
                f,
                "\naccuracy diff    {:+.2} points (95% CI {:+.2} to {:+.2}, paired bootstrap)",
                pct(diff),
                pct(lo),
                pct(hi)
            )?;
            write!(f, "\nchoice KL mean   {kl:.6}")?;
        }
        Ok(())
    }
}

/// Scores the selected docs of `task` with `model` (and `reference`, on the same tokens),
/// decoding up to `n_ctx` tokens at once with `threads` threads, the prefix all docs share
/// decoded once ([`DecodeOptions::default`]). `progress` counts docs.
pub fn evaluate(
    model: &LoadedModel,
    reference: Option<&LoadedModel>,
    task: &TaskData,
    selection: &Selection<'_>,
    n_ctx: usize,
    threads: usize,
    progress: &indicatif::ProgressBar,
) -> Result<TaskReport, TaskEvalError> {
    evaluate_with(
        model,
        reference,
        task,
        selection,
        n_ctx,
        threads,
        DecodeOptions::default(),
        progress,
    )
}

/// As [`evaluate`], decoding as `options` says.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_with(
    model: &LoadedModel,
    reference: Option<&LoadedModel>,
    task: &TaskData,
    selection: &Selection<'_>,
    n_ctx: usize,
    threads: usize,
    options: DecodeOptions,
    progress: &indicatif::ProgressBar,
) -> Result<TaskReport, TaskEvalError> {
    if let Some(r) = reference {
        same_vocab(model, r)?;
    }
    let n_ctx = n_ctx.max(1);
    let requests = selection
        .docs
        .iter()
        .map(|doc| DocRequests::new(model, &task.path, doc, n_ctx))
        .collect::<Result<Vec<_>, _>>()?;
    let layout = Layout::new(&requests, n_ctx, options.reuse_prefix);
    let n_models = 1 + usize::from(reference.is_some());
    progress.set_length((requests.len() * n_models) as u64);
    let scored = score(model, &requests, &layout, n_ctx, threads, options, progress)?;
    let ref_scored = reference
        .map(|r| score(r, &requests, &layout, n_ctx, threads, options, progress))
        .transpose()?;
    progress.finish_and_clear();

    let docs: Vec<DocScore> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let lls = scored.loglikelihoods[i].clone();
            let chars: Vec<usize> = r.choices.iter().map(|c| c.chars).collect();
            let per_char: Vec<f64> = lls.iter().zip(&chars).map(|(l, &c)| l / c as f64).collect();
            let ref_lls = ref_scored.as_ref().map(|s| s.loglikelihoods[i].clone());
            DocScore {
                doc_id: r.doc_id.clone(),
                gold: r.gold,
                pred: argmax(&lls),
                pred_norm: argmax(&per_char),
                reference_pred: ref_lls.as_deref().map(argmax),
                loglikelihoods: lls,
                choice_chars: chars,
                reference_loglikelihoods: ref_lls,
            }
        })
        .collect();
    Ok(report(
        docs,
        selection.excluded,
        &requests,
        &scored,
        ref_scored.as_ref(),
        &layout,
        n_ctx,
    ))
}

/// The length of a choice in characters, as lm-evaluation-harness's `acc_norm` counts it:
/// Unicode scalar values (Python's `len`) of the continuation without its leading target
/// delimiter (one space), at least 1.
pub fn choice_chars(continuation: &str) -> usize {
    let choice = continuation.strip_prefix(' ').unwrap_or(continuation);
    choice.chars().count().max(1)
}

fn report(
    docs: Vec<DocScore>,
    excluded: usize,
    requests: &[DocRequests],
    scored: &Scored,
    reference: Option<&Scored>,
    layout: &Layout,
    n_ctx: usize,
) -> TaskReport {
    let n = docs.len();
    let frac = |k: usize| k as f64 / n as f64;
    let correct = docs.iter().filter(|d| d.pred == d.gold).count();
    let correct_norm = docs.iter().filter(|d| d.pred_norm == d.gold).count();
    let mut report = TaskReport {
        accuracy: frac(correct),
        acc_norm: frac(correct_norm),
        accuracy_ci95: wilson_ci95(correct, n),
        acc_norm_ci95: wilson_ci95(correct_norm, n),
        n_docs: n,
        excluded_docs: excluded,
        n_requests: requests.iter().map(|r| r.choices.len()).sum(),
        truncated_requests: requests
            .iter()
            .flat_map(|r| &r.choices)
            .filter(|c| c.truncated)
            .count(),
        prompt_tokens: scored.tokens,
        prompt_tokens_per_s: scored.tokens as f64 / scored.seconds,
        cached_prefix_tokens: layout.prefix.len(),
        cached_prefix_docs: layout.cached_docs,
        n_ctx,
        reference: None,
        agreement: None,
        accuracy_diff: None,
        accuracy_diff_ci95: None,
        choice_kl_mean: None,
        docs: Vec::new(),
    };
    if reference.is_some() {
        let p = paired_figures(&docs);
        report.reference = Some(p.reference);
        report.agreement = Some(p.agreement);
        report.accuracy_diff = Some(p.accuracy_diff);
        report.accuracy_diff_ci95 = Some(p.accuracy_diff_ci95);
        report.choice_kl_mean = Some(p.choice_kl_mean);
    }
    report.docs = docs;
    report
}

/// Index of the largest value (the first on ties, as `np.argmax`).
fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

//! Train the Hopscotch scalars for one skip mask: Adam on the 4·L numbers, every weight frozen
//! (Eyceoz et al. 2025, <https://arxiv.org/abs/2506.03303>, section 3).
//!
//! A [`TrainBatch`] is a right-padded block of token ids with the positions whose next token is
//! a target. Two objectives:
//!
//! - [`Objective::Ce`]: mean cross-entropy of the target tokens (the paper's choice, on the
//!   original model's own greedy answers);
//! - [`Objective::Kl`]: mean `KL(original || slim)` of the next-token distributions at the same
//!   positions, against a [`Teacher`] computed once with all scalars 1 and nothing skipped;
//! - [`Objective::Choice`]: for multiple-choice data, mean over docs of `KL(original || slim)` of
//!   the distributions over a doc's choices (the softmax of each choice's summed continuation
//!   log-probability, the scores an evaluation ranks), against [`ChoiceGroups`]' teacher.
//!
//! The teacher keeps, per position, either the full distribution or its `k` most likely tokens
//! plus the probability left over ([`Teacher::TopK`]): full-vocabulary log-probabilities cost
//! `positions × vocab × 4` bytes (3.3 GB for 6,400 positions of a 128k vocabulary), the top 64
//! about a thousandth of that. With top-k the loss is the KL divergence between the two
//! distributions coarsened to those `k` tokens and one "everything else" bin: a lower bound on
//! the full KL that equals it when the teacher's leftover mass is zero.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::fit::parallel;
use crate::model::{Model, ModelError, ScaleValues, Scales};

/// Teacher tokens kept per position unless the caller asks otherwise: for instruction-tuned
/// models the top 64 tokens usually hold all but a sliver of the probability.
pub const DEFAULT_TEACHER_TOP_K: usize = 64;

/// The student's leftover probability is clamped to this before its log is taken: below f32's
/// rounding of `1 - sum(top-k probabilities)`, so it only guards against `log(0)`.
const MIN_TAIL_PROB: f64 = 1e-7;

/// Errors building batches or training the scalars.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    /// The model refused an input or a tensor operation failed inside it.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A tensor operation of the loss or the optimizer failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// Training or evaluation was asked for without any batch.
    #[error("no training batches")]
    NoBatches,
    /// The KL objective was asked for but a batch has no teacher outputs.
    #[error("batch {batch} has no teacher outputs; attach them with TrainBatch::with_teacher")]
    MissingTeacher {
        /// Index of the batch.
        batch: usize,
    },
    /// The choice objective was asked for but a batch has no choice groups or no teacher.
    #[error(
        "batch {batch} has no choice groups with teacher outputs; build it with \
         TrainBatch::from_choice_sequences and attach them with TrainBatch::with_choice_teacher"
    )]
    MissingChoices {
        /// Index of the batch.
        batch: usize,
    },
    /// Choice groups that do not cover the batch's rows.
    #[error(
        "the docs' choices add up to {choices} rows, the batch has {rows} (and none may be 0)"
    )]
    ChoiceRows {
        /// Rows of the batch.
        rows: usize,
        /// Rows the docs' choice counts add up to.
        choices: usize,
    },
    /// A choice row without targets (its continuation) cannot be scored.
    #[error("row {row} of a choice batch has no target tokens")]
    ChoiceWithoutTargets {
        /// The row.
        row: usize,
    },
    /// The loss became NaN or infinite.
    #[error("the loss became {loss} at step {step}")]
    NonFiniteLoss {
        /// The optimizer step (0-based) whose loss it was.
        step: usize,
        /// The loss value.
        loss: f32,
    },
    /// The learning rate is not a positive finite number.
    #[error("learning rate {lr} is not a positive finite number")]
    LearningRate {
        /// The learning rate given.
        lr: f64,
    },
    /// A batch tensor has the wrong rank, length or dtype.
    #[error("batch tensor {name}: expected {expected}, found shape {found:?} of {dtype:?}")]
    BatchTensor {
        /// Which tensor.
        name: &'static str,
        /// What was expected, in words.
        expected: String,
        /// The shape given.
        found: Vec<usize>,
        /// The dtype given.
        dtype: DType,
    },
    /// Sequences and loss masks differ in number.
    #[error("{sequences} sequences but {masks} loss masks")]
    MaskCount {
        /// Number of sequences.
        sequences: usize,
        /// Number of loss masks.
        masks: usize,
    },
    /// A loss mask's length differs from its sequence's.
    #[error("sequence {sequence} has {tokens} tokens but its loss mask has {mask} entries")]
    MaskLength {
        /// Index of the sequence.
        sequence: usize,
        /// Tokens in the sequence.
        tokens: usize,
        /// Entries in the mask.
        mask: usize,
    },
    /// A loss mask marks the first token, which no position predicts.
    #[error("sequence {sequence}: the first token cannot be a target")]
    FirstTokenTarget {
        /// Index of the sequence.
        sequence: usize,
    },
    /// A batch has no sequence, an empty sequence, or no target at all.
    #[error("batch has no targets (or no tokens)")]
    NoTargets,
}

/// What the scalars are trained to minimise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// Mean cross-entropy of the target tokens.
    Ce,
    /// Mean KL divergence from the original model's next-token distribution to the slim one's.
    Kl,
    /// Mean over docs of the KL divergence from the original model's distribution over a doc's
    /// choices to the slim one's; batches carry [`ChoiceGroups`].
    Choice,
}

impl Objective {
    /// The name plans, sweeps and the command line use.
    pub fn name(self) -> &'static str {
        match self {
            Objective::Ce => "ce",
            Objective::Kl => "kl",
            Objective::Choice => "choice",
        }
    }
}

/// Which rows of a [`TrainBatch`] are the choices of one multiple-choice doc, for
/// [`Objective::Choice`]: each doc's rows are consecutive, its targets a choice's continuation.
#[derive(Debug, Clone)]
pub struct ChoiceGroups {
    /// Rows (choices) per doc, in row order.
    pub choices_per_doc: Vec<usize>,
    /// `(rows, n)`: 1 where target `j` belongs to row `r` (sums a row's target log-probs).
    row_of_target: Tensor,
    /// `(docs, rows)`: 1 where row `r` is a choice of doc `d` (sums over a doc's choices).
    doc_of_row: Tensor,
    /// `(rows, docs)`: its transpose (spreads a doc's value over its choices).
    row_of_doc: Tensor,
    /// The original model's log-probability of each row's choice among its doc's choices,
    /// `(rows)`, once [`TrainBatch::with_choice_teacher`] attached it.
    pub teacher_log_probs: Option<Tensor>,
}

impl ChoiceGroups {
    /// Groups for rows with `targets_per_row` targets each (targets listed row by row, as
    /// [`TrainBatch::from_sequences`] lists them), `choices_per_doc` consecutive rows per doc.
    fn new(
        targets_per_row: &[usize],
        choices_per_doc: &[usize],
        device: &Device,
    ) -> Result<Self, FitError> {
        let rows = targets_per_row.len();
        if choices_per_doc.contains(&0) || choices_per_doc.iter().sum::<usize>() != rows {
            return Err(FitError::ChoiceRows {
                rows,
                choices: choices_per_doc.iter().sum(),
            });
        }
        let n: usize = targets_per_row.iter().sum();
        let docs = choices_per_doc.len();
        let mut row_of_target = vec![0f32; rows * n];
        let mut start = 0;
        for (r, &count) in targets_per_row.iter().enumerate() {
            row_of_target[r * n + start..r * n + start + count].fill(1.0);
            start += count;
        }
        let mut doc_of_row = vec![0f32; docs * rows];
        let mut row_of_doc = vec![0f32; rows * docs];
        let mut row = 0;
        for (d, &count) in choices_per_doc.iter().enumerate() {
            for r in row..row + count {
                doc_of_row[d * rows + r] = 1.0;
                row_of_doc[r * docs + d] = 1.0;
            }
            row += count;
        }
        Ok(Self {
            choices_per_doc: choices_per_doc.to_vec(),
            row_of_target: Tensor::from_vec(row_of_target, (rows, n), device)?,
            doc_of_row: Tensor::from_vec(doc_of_row, (docs, rows), device)?,
            row_of_doc: Tensor::from_vec(row_of_doc, (rows, docs), device)?,
            teacher_log_probs: None,
        })
    }

    /// Per row, the log-probability of its choice among its doc's choices, from the target
    /// tokens' log-probabilities `(n)`: each row's sum, log-softmaxed within its doc. Each doc
    /// is shifted by its best row's sum (a constant) first, so that no `exp` underflows.
    fn log_probs(&self, target_log_probs: &Tensor) -> Result<Tensor, FitError> {
        let dtype = target_log_probs.dtype();
        let matrix = |m: &Tensor| m.to_dtype(dtype);
        let row_sums = matrix(&self.row_of_target)?
            .matmul(&target_log_probs.unsqueeze(1)?)?
            .squeeze(1)?;
        let sums = row_sums.detach().to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let mut shift = Vec::with_capacity(sums.len());
        let mut row = 0;
        for &count in &self.choices_per_doc {
            let best = sums[row..row + count]
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            shift.extend(std::iter::repeat_n(best, count));
            row += count;
        }
        let shift = Tensor::from_vec(shift, sums.len(), row_sums.device())?.to_dtype(dtype)?;
        let centred = (row_sums - shift)?;
        let doc_log_sums = matrix(&self.doc_of_row)?
            .matmul(&centred.exp()?.unsqueeze(1)?)?
            .log()?;
        let row_log_sums = matrix(&self.row_of_doc)?
            .matmul(&doc_log_sums)?
            .squeeze(1)?;
        Ok((centred - row_log_sums)?)
    }
}

/// The original model's next-token distribution at a batch's target positions.
#[derive(Debug, Clone)]
pub enum Teacher {
    /// Log-probabilities over the whole vocabulary, `(n, vocab)`.
    Full {
        /// `log p` per position and token.
        log_probs: Tensor,
    },
    /// The `k` most likely tokens per position and the probability of all the others.
    TopK {
        /// Token ids, `(n, k)` u32.
        ids: Tensor,
        /// Their log-probabilities, `(n, k)`.
        log_probs: Tensor,
        /// Probability of the tokens not kept, `(n)`.
        tail_prob: Tensor,
        /// Its log, `(n)`; 0 where the tail probability is 0 (the term then vanishes).
        tail_log_prob: Tensor,
    },
}

impl Teacher {
    /// The teacher of `len` consecutive target positions from `start`.
    fn narrow(&self, start: usize, len: usize) -> candle_core::Result<Self> {
        Ok(match self {
            Teacher::Full { log_probs } => Teacher::Full {
                log_probs: log_probs.narrow(0, start, len)?,
            },
            Teacher::TopK {
                ids,
                log_probs,
                tail_prob,
                tail_log_prob,
            } => Teacher::TopK {
                ids: ids.narrow(0, start, len)?,
                log_probs: log_probs.narrow(0, start, len)?,
                tail_prob: tail_prob.narrow(0, start, len)?,
                tail_log_prob: tail_log_prob.narrow(0, start, len)?,
            },
        })
    }
}

/// A part of a [`TrainBatch`] ([`TrainBatch::parts`]) and the weight of its loss in the batch's.
#[derive(Debug, Clone)]
pub(crate) struct Part {
    /// The part's rows as a batch of their own.
    pub batch: TrainBatch,
    /// Its loss times this, summed over the parts, is the batch's loss.
    pub weight: f64,
}

/// One training batch: right-padded token ids and the positions whose next token is a target.
#[derive(Debug, Clone)]
pub struct TrainBatch {
    /// Token ids `(b, t)`, u32, right-padded.
    pub input_ids: Tensor,
    /// Flat indices `row * t + position` of the positions that predict a target, `(n)` u32.
    pub target_positions: Tensor,
    /// The token each of those positions should predict, `(n)` u32.
    pub targets: Tensor,
    /// The original model's distribution there, for [`Objective::Kl`].
    pub teacher: Option<Teacher>,
    /// The rows' grouping into multiple-choice docs, for [`Objective::Choice`].
    pub choices: Option<ChoiceGroups>,
}

impl TrainBatch {
    /// A `(b * t, 1)` column of `dtype` on the batch's device, one row per position: 1 at the
    /// real tokens (`lengths[row]` of each row), 0 at the padding; multiplies per-position rows
    /// to leave the padding out of a sum.
    pub fn real_token_mask(&self, lengths: &[usize], dtype: DType) -> candle_core::Result<Tensor> {
        let (b, t) = self.input_ids.dims2()?;
        let mask: Vec<f32> = (0..b * t)
            .map(|i| f32::from(u8::from(i % t < lengths.get(i / t).copied().unwrap_or(0))))
            .collect();
        Tensor::from_vec(mask, (b * t, 1), self.input_ids.device())?.to_dtype(dtype)
    }

    /// A batch from its tensors, checking ranks, dtypes and lengths (not value ranges: the model
    /// checks token ids and positions when it runs).
    pub fn new(
        input_ids: Tensor,
        target_positions: Tensor,
        targets: Tensor,
    ) -> Result<Self, FitError> {
        let bad = |name, t: &Tensor, expected: String| FitError::BatchTensor {
            name,
            expected,
            found: t.dims().to_vec(),
            dtype: t.dtype(),
        };
        if input_ids.rank() != 2 || input_ids.dtype() != DType::U32 || input_ids.elem_count() == 0 {
            return Err(bad("input_ids", &input_ids, "non-empty (b, t) u32".into()));
        }
        if target_positions.rank() != 1
            || target_positions.dtype() != DType::U32
            || target_positions.elem_count() == 0
        {
            return Err(bad(
                "target_positions",
                &target_positions,
                "non-empty (n) u32".into(),
            ));
        }
        let n = target_positions.elem_count();
        if targets.dims() != [n] || targets.dtype() != DType::U32 {
            return Err(bad("targets", &targets, format!("({n}) u32")));
        }
        Ok(Self {
            input_ids,
            target_positions,
            targets,
            teacher: None,
            choices: None,
        })
    }

    /// A batch from token sequences and loss masks (`mask[j]` true: token `j` is a target,
    /// predicted from position `j - 1`), right-padded with `pad_id`.
    pub fn from_sequences(
        sequences: &[Vec<u32>],
        loss_masks: &[Vec<bool>],
        pad_id: u32,
        device: &Device,
    ) -> Result<Self, FitError> {
        if sequences.len() != loss_masks.len() {
            return Err(FitError::MaskCount {
                sequences: sequences.len(),
                masks: loss_masks.len(),
            });
        }
        let t = sequences.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(sequences.len() * t);
        let mut positions = Vec::new();
        let mut targets = Vec::new();
        for (row, (seq, mask)) in sequences.iter().zip(loss_masks).enumerate() {
            if seq.len() != mask.len() {
                return Err(FitError::MaskLength {
                    sequence: row,
                    tokens: seq.len(),
                    mask: mask.len(),
                });
            }
            if mask.first() == Some(&true) {
                return Err(FitError::FirstTokenTarget { sequence: row });
            }
            for (j, (&token, &is_target)) in seq.iter().zip(mask).enumerate() {
                if is_target {
                    positions.push(u32::try_from(row * t + j - 1).map_err(|_| {
                        FitError::BatchTensor {
                            name: "input_ids",
                            expected: "fewer than 2^32 tokens".into(),
                            found: vec![sequences.len(), t],
                            dtype: DType::U32,
                        }
                    })?);
                    targets.push(token);
                }
            }
            ids.extend_from_slice(seq);
            ids.resize((row + 1) * t, pad_id);
        }
        if t == 0 || positions.is_empty() {
            return Err(FitError::NoTargets);
        }
        let n = positions.len();
        Self::new(
            Tensor::from_vec(ids, (sequences.len(), t), device)?,
            Tensor::from_vec(positions, n, device)?,
            Tensor::from_vec(targets, n, device)?,
        )
    }

    /// A batch of multiple-choice docs for [`Objective::Choice`]: `sequences` (with their
    /// `loss_masks` on each choice's continuation, as [`Self::from_sequences`] takes them) hold
    /// `choices_per_doc[d]` consecutive rows per doc.
    pub fn from_choice_sequences(
        sequences: &[Vec<u32>],
        loss_masks: &[Vec<bool>],
        choices_per_doc: &[usize],
        pad_id: u32,
        device: &Device,
    ) -> Result<Self, FitError> {
        let mut batch = Self::from_sequences(sequences, loss_masks, pad_id, device)?;
        let targets_per_row: Vec<usize> = loss_masks
            .iter()
            .map(|m| m.iter().filter(|&&t| t).count())
            .collect();
        if let Some(row) = targets_per_row.iter().position(|&n| n == 0) {
            return Err(FitError::ChoiceWithoutTargets { row });
        }
        batch.choices = Some(ChoiceGroups::new(
            &targets_per_row,
            choices_per_doc,
            device,
        )?);
        Ok(batch)
    }

    /// Number of target positions.
    pub fn n_targets(&self) -> usize {
        self.targets.elem_count()
    }

    /// The batch cut into parts whose losses, each times its weight, add up to the batch's
    /// loss under `objective`: one row per part, or one doc's rows under [`Objective::Choice`]
    /// (its loss needs all of a doc's choices). Each part keeps its rows' tokens up to the last
    /// position that predicts a target: the model is causal, so the padding and the tokens after
    /// it change no target's prediction. A training step runs the parts side by side and adds
    /// their gradients (`train_scales_from`). Off the CPU the batch is one part: a GPU would run
    /// the parts one after another, and runs the whole batch at once faster.
    pub(crate) fn parts(&self, objective: Objective) -> Result<Vec<Part>, FitError> {
        if !self.input_ids.device().is_cpu() {
            return Ok(vec![Part {
                batch: self.clone(),
                weight: 1.0,
            }]);
        }
        let (rows, t) = self.input_ids.dims2()?;
        let positions = self.target_positions.to_vec1::<u32>()?;
        // Targets are listed row by row (`from_sequences`): each row's are one run of them.
        let mut row_targets = vec![0..0; rows];
        for (k, &p) in positions.iter().enumerate() {
            let row = p as usize / t;
            let run = row_targets.get_mut(row).ok_or(FitError::BatchTensor {
                name: "target_positions",
                expected: format!("flat positions below {}", rows * t),
                found: vec![positions.len()],
                dtype: DType::U32,
            })?;
            if run.start == run.end {
                *run = k..k + 1;
            } else if run.end == k {
                run.end = k + 1;
            } else {
                return Err(FitError::BatchTensor {
                    name: "target_positions",
                    expected: "targets listed row by row".into(),
                    found: vec![positions.len()],
                    dtype: DType::U32,
                });
            }
        }
        let groups: Vec<usize> = match (objective, &self.choices) {
            (Objective::Choice, Some(g)) => g.choices_per_doc.clone(),
            _ => vec![1; rows],
        };
        let docs = groups.len();
        let n = positions.len();
        let mut parts = Vec::with_capacity(groups.len());
        let mut first_row = 0;
        for &count in &groups {
            let part_rows = first_row..first_row + count;
            first_row += count;
            let runs = &row_targets[part_rows.clone()];
            let Some(k0) = runs.iter().find(|r| r.start < r.end).map(|r| r.start) else {
                continue;
            };
            let k1 = runs
                .iter()
                .rev()
                .find(|r| r.start < r.end)
                .map_or(k0, |r| r.end);
            let len = positions[k0..k1]
                .iter()
                .map(|&p| p as usize % t + 1)
                .max()
                .unwrap_or(1);
            let local: Vec<u32> = positions[k0..k1]
                .iter()
                .map(|&p| ((p as usize / t - part_rows.start) * len + p as usize % t) as u32)
                .collect();
            let device = self.input_ids.device();
            let mut part = TrainBatch::new(
                self.input_ids
                    .narrow(0, part_rows.start, count)?
                    .narrow(1, 0, len)?,
                Tensor::from_vec(local, k1 - k0, device)?,
                self.targets.narrow(0, k0, k1 - k0)?,
            )?;
            part.teacher = self
                .teacher
                .as_ref()
                .map(|teacher| teacher.narrow(k0, k1 - k0))
                .transpose()?;
            if let (Objective::Choice, Some(g)) = (objective, &self.choices) {
                let per_row: Vec<usize> = runs.iter().map(|r| r.len()).collect();
                let mut choices = ChoiceGroups::new(&per_row, &[count], device)?;
                choices.teacher_log_probs = g
                    .teacher_log_probs
                    .as_ref()
                    .map(|l| l.narrow(0, part_rows.start, count))
                    .transpose()?;
                part.choices = Some(choices);
            }
            let weight = match objective {
                Objective::Choice => 1.0 / docs as f64,
                Objective::Kl | Objective::Ce => (k1 - k0) as f64 / n as f64,
            };
            parts.push(Part {
                batch: part,
                weight,
            });
        }
        Ok(parts)
    }

    /// Attaches the original model's next-token distribution at the target positions (all
    /// scalars 1, nothing skipped), keeping the `top_k` most likely tokens per position, or the
    /// whole distribution when `top_k` is at least the vocabulary size.
    pub fn with_teacher(mut self, model: &Model, top_k: usize) -> Result<Self, FitError> {
        let log_probs = self.original_log_probs(model)?;
        let vocab = model.arch().vocab_size;
        self.teacher = Some(if top_k >= vocab {
            Teacher::Full { log_probs }
        } else {
            top_k_teacher(&log_probs, top_k.max(1))?
        });
        Ok(self)
    }

    /// Attaches the original model's distribution over each doc's choices (all scalars 1,
    /// nothing skipped); the batch must have [`ChoiceGroups`].
    pub fn with_choice_teacher(mut self, model: &Model) -> Result<Self, FitError> {
        let log_probs = self.original_log_probs(model)?;
        let target_log_probs = target_log_probs(&self, &log_probs)?;
        let groups = self
            .choices
            .as_mut()
            .ok_or(FitError::MissingChoices { batch: 0 })?;
        groups.teacher_log_probs = Some(groups.log_probs(&target_log_probs)?.detach());
        Ok(self)
    }

    /// The original model's (all scalars 1, nothing skipped) next-token log-probabilities at
    /// the target positions, `(n, vocab)`.
    fn original_log_probs(&self, model: &Model) -> Result<Tensor, FitError> {
        let n_layer = model.arch().n_layer;
        let scales = model.scales(&ScaleValues::ones(n_layer))?;
        let hidden =
            model.forward_hidden_no_grad(&self.input_ids, &scales, &vec![false; n_layer])?;
        let logits = model.logits_at(&hidden, &self.target_positions)?;
        Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
    }
}

/// The log-probability of each target token of `batch`, `(n)`, from the next-token
/// log-probabilities at its target positions `(n, vocab)`.
fn target_log_probs(batch: &TrainBatch, log_q: &Tensor) -> Result<Tensor, FitError> {
    Ok(log_q.gather(&batch.targets.unsqueeze(1)?, 1)?.squeeze(1)?)
}

/// The `k` largest log-probabilities per row, with the leftover mass; selected on the host.
fn top_k_teacher(log_probs: &Tensor, k: usize) -> Result<Teacher, FitError> {
    let (device, dtype) = (log_probs.device(), log_probs.dtype());
    let rows = log_probs.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let n = rows.len();
    let mut ids = Vec::with_capacity(n * k);
    let mut kept = Vec::with_capacity(n * k);
    let mut tail_prob = Vec::with_capacity(n);
    let mut tail_log_prob = Vec::with_capacity(n);
    for row in &rows {
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        order.select_nth_unstable_by(k - 1, |&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        order.truncate(k);
        let mass: f64 = order.iter().map(|&i| (row[i as usize] as f64).exp()).sum();
        let tail = (1.0 - mass).max(0.0);
        tail_prob.push(tail);
        tail_log_prob.push(if tail > 0.0 { tail.ln() } else { 0.0 });
        kept.extend(order.iter().map(|&i| row[i as usize]));
        ids.extend(order);
    }
    Ok(Teacher::TopK {
        ids: Tensor::from_vec(ids, (n, k), device)?,
        log_probs: Tensor::from_vec(kept, (n, k), device)?.to_dtype(dtype)?,
        tail_prob: Tensor::from_vec(tail_prob, n, device)?.to_dtype(dtype)?,
        tail_log_prob: Tensor::from_vec(tail_log_prob, n, device)?.to_dtype(dtype)?,
    })
}

/// One optimizer step's report, for progress bars.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// The step, 0-based.
    pub step: usize,
    /// Its batch's loss before the update.
    pub loss: f32,
}

/// The trained scalars and the loss of every step.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainResult {
    /// The scalars after the last step.
    pub scales: ScaleValues,
    /// Each step's batch loss, measured before that step's update.
    pub loss_history: Vec<f32>,
}

impl TrainResult {
    /// Mean of the loss history: the paper's score of a skip mask after one epoch; `NaN` when
    /// no step was taken.
    pub fn mean_loss(&self) -> f32 {
        self.loss_history.iter().sum::<f32>() / self.loss_history.len() as f32
    }
}

/// Trains the scalars from 1.0 with Adam (no weight decay, `lr`) for `steps` steps, one batch
/// per step; the batch order is reshuffled (seeded by `seed`) on every pass over `batches`, so
/// `steps == batches.len()` is one epoch.
pub fn train_scales(
    model: &Model,
    batches: &[TrainBatch],
    skip: &[bool],
    objective: Objective,
    steps: usize,
    lr: f64,
    seed: u64,
) -> Result<TrainResult, FitError> {
    let ones = ScaleValues::ones(model.arch().n_layer);
    train_scales_from(
        model,
        batches,
        skip,
        objective,
        steps,
        lr,
        seed,
        &ones,
        None,
        &mut |_| {},
    )
}

/// [`train_scales`] from `init` instead of scalars 1, calling `observe` after every step: what
/// `init` holds is trained, so [`ScaleValues::ones_with_gains`] trains the channel gains too.
/// With `linear_lr`, `init`'s linear stand-ins are trained as well, end to end on the objective,
/// by their own Adam at that learning rate (their weights are matrices, not values near 1);
/// without it they stay as given.
#[allow(clippy::too_many_arguments)]
pub fn train_scales_from(
    model: &Model,
    batches: &[TrainBatch],
    skip: &[bool],
    objective: Objective,
    steps: usize,
    lr: f64,
    seed: u64,
    init: &ScaleValues,
    linear_lr: Option<f64>,
    observe: &mut dyn FnMut(StepReport),
) -> Result<TrainResult, FitError> {
    check_batches(batches, objective)?;
    for lr in std::iter::once(lr).chain(linear_lr) {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(FitError::LearningRate { lr });
        }
    }
    let adam = |vars: Vec<Var>, lr: f64| {
        AdamW::new(
            vars,
            ParamsAdamW {
                lr,
                weight_decay: 0.0,
                ..ParamsAdamW::default()
            },
        )
    };
    let mut scales = model.scales(init)?;
    let linear_vars = match linear_lr {
        Some(_) => scales.train_linear(),
        None => Vec::new(),
    };
    let mut linear_optimizer = linear_lr
        .map(|lr| adam(linear_vars.clone(), lr))
        .transpose()?;
    let mut vars = scales.vars();
    let mut optimizer = adam(vars.clone(), lr)?;
    // Every variable a step's gradients are taken for.
    vars.extend(linear_vars);
    let parts = batches
        .iter()
        .map(|b| b.parts(objective))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..batches.len()).collect();
    let mut loss_history = Vec::with_capacity(steps);
    for step in 0..steps {
        if step % batches.len() == 0 {
            order.shuffle(&mut rng);
        }
        let index = order[step % batches.len()];
        let (value, grads) =
            part_gradients(model, &parts[index], index, &scales, skip, objective, &vars)?;
        let value = value as f32;
        if !value.is_finite() {
            return Err(FitError::NonFiniteLoss { step, loss: value });
        }
        optimizer.step(&grads)?;
        if let Some(o) = linear_optimizer.as_mut() {
            o.step(&grads)?;
        }
        loss_history.push(value);
        observe(StepReport { step, loss: value });
    }
    Ok(TrainResult {
        scales: scales.values()?,
        loss_history,
    })
}

/// One training step's loss and gradients: `parts`' weighted losses and the gradients of `vars`,
/// each part's forward and backward pass on a thread of its own (so memory holds the parts in
/// flight, about one per thread, not the whole batch), added in the parts' order so that the
/// sums do not depend on the thread count.
pub(crate) fn part_gradients(
    model: &Model,
    parts: &[Part],
    index: usize,
    scales: &Scales,
    skip: &[bool],
    objective: Objective,
    vars: &[Var],
) -> Result<(f64, GradStore), FitError> {
    let per_part = parallel::map(model.device(), parts.len(), |i| {
        let part = &parts[i];
        let hidden = model.forward_hidden(&part.batch.input_ids, scales, skip)?;
        let loss = (hidden_loss(model, &part.batch, index, &hidden, objective)? * part.weight)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let grads = loss.backward()?;
        let of_vars: Vec<Option<Tensor>> = vars.iter().map(|v| grads.get(v).cloned()).collect();
        Ok::<_, FitError>((value, of_vars))
    })?;
    let mut value = 0.0;
    let mut sums: Vec<Option<Tensor>> = vec![None; vars.len()];
    for (part_value, grads) in per_part {
        value += part_value;
        for (sum, grad) in sums.iter_mut().zip(grads) {
            *sum = match (sum.take(), grad) {
                (Some(a), Some(b)) => Some((a + b)?),
                (a, b) => a.or(b),
            };
        }
    }
    let mut store = GradStore::default();
    for (var, sum) in vars.iter().zip(sums) {
        if let Some(sum) = sum {
            store.insert(var, sum);
        }
    }
    Ok((value, store))
}

/// The mean over `batches` of each batch's loss (itself a mean over its targets) with the given
/// scalars and skip mask, without gradients.
pub fn eval_loss(
    model: &Model,
    batches: &[TrainBatch],
    skip: &[bool],
    scales: &ScaleValues,
    objective: Objective,
) -> Result<f32, FitError> {
    check_batches(batches, objective)?;
    let scales = model.scales(scales)?;
    let losses = parallel::map(model.device(), batches.len(), |index| {
        let batch = &batches[index];
        let hidden = model.forward_hidden_no_grad(&batch.input_ids, &scales, skip)?;
        let loss = hidden_loss(model, batch, index, &hidden, objective)?;
        Ok::<_, FitError>(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    })?;
    let total = losses.iter().fold(0.0f64, |sum, loss| sum + loss);
    Ok((total / batches.len() as f64) as f32)
}

/// Refuses an empty batch list, and batches without teacher outputs under the KL objective.
pub(crate) fn check_batches(batches: &[TrainBatch], objective: Objective) -> Result<(), FitError> {
    if batches.is_empty() {
        return Err(FitError::NoBatches);
    }
    match objective {
        Objective::Ce => {}
        Objective::Kl => {
            if let Some(batch) = batches.iter().position(|b| b.teacher.is_none()) {
                return Err(FitError::MissingTeacher { batch });
            }
        }
        Objective::Choice => {
            let ready = |b: &TrainBatch| {
                b.choices
                    .as_ref()
                    .is_some_and(|g| g.teacher_log_probs.is_some())
            };
            if let Some(batch) = batches.iter().position(|b| !ready(b)) {
                return Err(FitError::MissingChoices { batch });
            }
        }
    }
    Ok(())
}

/// The scalar loss of `batch` (index `index` in its list, for errors) from the model's final
/// hidden states on it.
pub(crate) fn hidden_loss(
    model: &Model,
    batch: &TrainBatch,
    index: usize,
    hidden: &Tensor,
    objective: Objective,
) -> Result<Tensor, FitError> {
    let logits = model.logits_at(hidden, &batch.target_positions)?;
    let log_q = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let loss = match (objective, &batch.teacher) {
        (Objective::Ce, _) => target_log_probs(batch, &log_q)?.mean_all()?.neg()?,
        (Objective::Choice, _) => choice_loss(batch, index, &log_q)?,
        (Objective::Kl, None) => return Err(FitError::MissingTeacher { batch: index }),
        (Objective::Kl, Some(Teacher::Full { log_probs })) => {
            check_teacher_rows(log_probs, batch)?;
            (log_probs.exp()? * (log_probs - &log_q)?)?
                .sum(D::Minus1)?
                .mean_all()?
        }
        (
            Objective::Kl,
            Some(Teacher::TopK {
                ids,
                log_probs,
                tail_prob,
                tail_log_prob,
            }),
        ) => {
            check_teacher_rows(log_probs, batch)?;
            let log_q_kept = log_q.gather(ids, 1)?;
            let kept = (log_probs.exp()? * (log_probs - &log_q_kept)?)?.sum(D::Minus1)?;
            let q_tail = (1.0 - log_q_kept.exp()?.sum(D::Minus1)?)?.clamp(MIN_TAIL_PROB, 1.0)?;
            let tail = (tail_prob * (tail_log_prob - q_tail.log()?)?)?;
            (kept + tail)?.mean_all()?
        }
    };
    Ok(loss)
}

/// [`Objective::Choice`]'s loss of `batch`: the mean over its docs of `KL(original || slim)` of
/// the distributions over each doc's choices.
/// `log_q` holds the slim model's next-token log-probabilities at the targets, `(n, vocab)`.
fn choice_loss(batch: &TrainBatch, index: usize, log_q: &Tensor) -> Result<Tensor, FitError> {
    let groups = batch
        .choices
        .as_ref()
        .ok_or(FitError::MissingChoices { batch: index })?;
    let teacher = groups
        .teacher_log_probs
        .as_ref()
        .ok_or(FitError::MissingChoices { batch: index })?;
    let log_q = groups.log_probs(&target_log_probs(batch, log_q)?)?;
    let kl = (teacher.exp()? * (teacher - log_q)?)?.sum_all()?;
    Ok((kl / groups.choices_per_doc.len() as f64)?)
}

/// Refuses a teacher whose rows do not match the batch's targets.
fn check_teacher_rows(log_probs: &Tensor, batch: &TrainBatch) -> Result<(), FitError> {
    let n = batch.n_targets();
    if log_probs.rank() != 2 || log_probs.dim(0)? != n {
        return Err(FitError::BatchTensor {
            name: "teacher",
            expected: format!("({n}, k) log-probabilities"),
            found: log_probs.dims().to_vec(),
            dtype: log_probs.dtype(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::arch::Arch;
    use crate::model::tests::{random_ids, random_source, tiny_arch};
    use crate::model::SkipMask;

    /// Batches whose targets are the full model's own greedy next tokens (the paper's data).
    fn self_generated_batches(model: &Model, n: usize, b: usize, t: usize) -> Vec<TrainBatch> {
        let arch = model.arch();
        let ones = model.scales(&ScaleValues::ones(arch.n_layer)).unwrap();
        (0..n)
            .map(|i| {
                let ids = random_ids(arch, b, t, 100 + i as u64);
                let hidden = model
                    .forward_hidden_no_grad(&ids, &ones, &vec![false; arch.n_layer])
                    .unwrap();
                // targets at every position but the first two of each row
                let positions: Vec<u32> = (0..b * t)
                    .filter(|p| p % t >= 2)
                    .map(|p| p as u32)
                    .collect();
                let positions = Tensor::new(positions.as_slice(), &Device::Cpu).unwrap();
                let greedy = model
                    .logits_at(&hidden, &positions)
                    .unwrap()
                    .argmax(D::Minus1)
                    .unwrap();
                TrainBatch::new(ids, positions, greedy).unwrap()
            })
            .collect()
    }

    #[test]
    fn training_lowers_the_loss_of_a_skipped_model() {
        let arch = tiny_arch();
        let model = Model::load(&random_source(&arch, 21), &Device::Cpu).unwrap();
        let batches: Vec<TrainBatch> = self_generated_batches(&model, 2, 4, 12)
            .into_iter()
            .map(|b| b.with_teacher(&model, 16).unwrap())
            .collect();
        let skip = SkipMask::from_layers(arch.n_layer, &[1]).unwrap();
        let ones = ScaleValues::ones(arch.n_layer);
        for objective in [Objective::Ce, Objective::Kl] {
            let before = eval_loss(&model, &batches, skip.as_slice(), &ones, objective).unwrap();
            let result =
                train_scales(&model, &batches, skip.as_slice(), objective, 60, 5e-2, 7).unwrap();
            let after =
                eval_loss(&model, &batches, skip.as_slice(), &result.scales, objective).unwrap();
            let full = eval_loss(&model, &batches, &[false; 3], &ones, objective).unwrap();
            assert_eq!(result.loss_history.len(), 60);
            // a random model cannot get all of the loss back, but a clear part of it
            assert!(
                before > full && after < before - 0.1 * (before - full),
                "{objective:?}: loss {full} unskipped, {before} skipped, {after} trained"
            );
            assert_ne!(result.scales, ones);
            // the skipped attention's scalars get no gradient and stay at 1
            assert_eq!(result.scales.b_att[1], 1.0);
            assert_eq!(result.scales.s_att[1], 1.0);
        }
        // nothing skipped and all scalars 1: the KL to the original is zero
        let none = SkipMask::none(arch.n_layer);
        let kl = eval_loss(&model, &batches, none.as_slice(), &ones, Objective::Kl).unwrap();
        assert!(kl.abs() < 1e-5, "KL of the original to itself is {kl}");
    }

    #[test]
    fn top_k_teacher_equals_full_teacher_at_full_width() {
        let arch = tiny_arch();
        let model = Model::load(&random_source(&arch, 22), &Device::Cpu).unwrap();
        let batch = self_generated_batches(&model, 1, 2, 8).remove(0);
        let full = vec![batch.clone().with_teacher(&model, arch.vocab_size).unwrap()];
        let nearly = vec![batch.with_teacher(&model, arch.vocab_size - 1).unwrap()];
        assert!(matches!(full[0].teacher, Some(Teacher::Full { .. })));
        assert!(matches!(nearly[0].teacher, Some(Teacher::TopK { .. })));
        let skip = SkipMask::from_layers(arch.n_layer, &[0, 2]).unwrap();
        let values = ScaleValues {
            b_mlp: vec![0.8, 1.1, 0.9],
            ..ScaleValues::ones(arch.n_layer)
        };
        let a = eval_loss(&model, &full, skip.as_slice(), &values, Objective::Kl).unwrap();
        let b = eval_loss(&model, &nearly, skip.as_slice(), &values, Objective::Kl).unwrap();
        assert!(
            a > 1e-3 && (a - b).abs() < 1e-3 * a,
            "full {a}, top-(vocab-1) {b}"
        );
    }

    #[test]
    fn from_sequences_pads_right_and_shifts_targets() {
        let batch = TrainBatch::from_sequences(
            &[vec![5, 6, 7], vec![8, 9]],
            &[vec![false, true, true], vec![false, true]],
            0,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            batch.input_ids.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7], vec![8, 9, 0]]
        );
        assert_eq!(
            batch.target_positions.to_vec1::<u32>().unwrap(),
            vec![0, 1, 3]
        );
        assert_eq!(batch.targets.to_vec1::<u32>().unwrap(), vec![6, 7, 9]);
        assert!(matches!(
            TrainBatch::from_sequences(&[vec![1, 2]], &[vec![true, true]], 0, &Device::Cpu),
            Err(FitError::FirstTokenTarget { sequence: 0 })
        ));
        assert!(matches!(
            TrainBatch::from_sequences(&[vec![1, 2]], &[vec![false]], 0, &Device::Cpu),
            Err(FitError::MaskLength {
                sequence: 0,
                tokens: 2,
                mask: 1
            })
        ));
        assert!(matches!(
            TrainBatch::from_sequences(&[vec![1, 2]], &[vec![false, false]], 0, &Device::Cpu),
            Err(FitError::NoTargets)
        ));
    }

    #[test]
    fn bad_training_requests_are_errors() {
        let arch = tiny_arch();
        let model = Model::load(&random_source(&arch, 23), &Device::Cpu).unwrap();
        let batches = self_generated_batches(&model, 1, 2, 6);
        let skip = vec![false; arch.n_layer];
        assert!(matches!(
            train_scales(&model, &batches, &skip, Objective::Kl, 1, 1e-2, 0),
            Err(FitError::MissingTeacher { batch: 0 })
        ));
        assert!(matches!(
            train_scales(&model, &[], &skip, Objective::Ce, 1, 1e-2, 0),
            Err(FitError::NoBatches)
        ));
        assert!(matches!(
            train_scales(&model, &batches, &skip, Objective::Ce, 1, f64::NAN, 0),
            Err(FitError::LearningRate { .. })
        ));
        // a learning rate this large sends the scalars to infinity within a few steps
        match train_scales(&model, &batches, &skip, Objective::Ce, 50, 1e30, 0) {
            Err(FitError::NonFiniteLoss { step, .. }) => assert!(step > 0 && step < 50),
            other => panic!("expected a non-finite loss, got {other:?}"),
        }
    }

    /// Two multiple-choice docs (3 and 2 choices) of random tokens: a shared context per doc,
    /// then each choice's continuation of 1 to 3 tokens (the targets).
    fn choice_data(arch: &Arch, seed: u64) -> (Vec<Vec<u32>>, Vec<Vec<bool>>, Vec<usize>) {
        let ids = random_ids(arch, 1, 40, seed)
            .to_vec2::<u32>()
            .unwrap()
            .remove(0);
        let mut take = ids.into_iter();
        let mut seqs = Vec::new();
        let mut masks = Vec::new();
        let choices = vec![3, 2];
        for (doc, &n) in choices.iter().enumerate() {
            let context: Vec<u32> = take.by_ref().take(5 + doc).collect();
            for c in 0..n {
                let continuation: Vec<u32> = take.by_ref().take(1 + (c + doc) % 3).collect();
                masks.push(
                    std::iter::repeat_n(false, context.len())
                        .chain(std::iter::repeat_n(true, continuation.len()))
                        .collect(),
                );
                seqs.push([context.clone(), continuation].concat());
            }
        }
        (seqs, masks, choices)
    }

    #[test]
    fn choice_teacher_is_each_docs_softmax_of_its_choices_summed_log_probs() {
        let arch = tiny_arch();
        let model = Model::load(&random_source(&arch, 24), &Device::Cpu).unwrap();
        let (seqs, masks, choices) = choice_data(&arch, 5);
        let batch = TrainBatch::from_choice_sequences(&seqs, &masks, &choices, 0, &Device::Cpu)
            .unwrap()
            .with_choice_teacher(&model)
            .unwrap();
        let teacher = batch.choices.as_ref().unwrap().teacher_log_probs.as_ref();
        let teacher = teacher.unwrap().to_vec1::<f32>().unwrap();
        // independently: each sequence alone (no padding), its targets' log-probs summed in
        // f64, then a log-softmax per doc
        let ones = model.scales(&ScaleValues::ones(arch.n_layer)).unwrap();
        let sums: Vec<f64> = seqs
            .iter()
            .zip(&masks)
            .map(|(seq, mask)| {
                let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0);
                let hidden = model
                    .forward_hidden_no_grad(&ids.unwrap(), &ones, &[false; 3])
                    .unwrap();
                let all: Vec<u32> = (0..seq.len() as u32).collect();
                let all = Tensor::new(all.as_slice(), &Device::Cpu).unwrap();
                let logits = model.logits_at(&hidden, &all).unwrap();
                let log_p = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
                let log_p = log_p.to_vec2::<f32>().unwrap();
                (1..seq.len())
                    .filter(|&j| mask[j])
                    .map(|j| log_p[j - 1][seq[j] as usize] as f64)
                    .sum()
            })
            .collect();
        let mut expected = Vec::new();
        let mut row = 0;
        for &n in &choices {
            let doc = &sums[row..row + n];
            let lse = doc.iter().map(|x| x.exp()).sum::<f64>().ln();
            expected.extend(doc.iter().map(|x| x - lse));
            row += n;
        }
        assert_eq!(teacher.len(), expected.len());
        for (t, e) in teacher.iter().zip(&expected) {
            assert!(
                (*t as f64 - e).abs() < 1e-4,
                "teacher {teacher:?}, expected {expected:?}"
            );
        }
        // each doc's choice probabilities add up to 1, and they are not all alike
        let p: Vec<f64> = teacher.iter().map(|&t| (t as f64).exp()).collect();
        assert!((p[..3].iter().sum::<f64>() - 1.0).abs() < 1e-5);
        assert!((p[3..].iter().sum::<f64>() - 1.0).abs() < 1e-5);
        assert!((p[0] - p[1]).abs() > 1e-3);
    }

    #[test]
    fn training_lowers_the_choice_loss_of_a_skipped_model() {
        let arch = tiny_arch();
        let model = Model::load(&random_source(&arch, 25), &Device::Cpu).unwrap();
        let batches: Vec<TrainBatch> = [6, 7]
            .iter()
            .map(|&seed| {
                let (seqs, masks, choices) = choice_data(&arch, seed);
                TrainBatch::from_choice_sequences(&seqs, &masks, &choices, 0, &Device::Cpu)
                    .unwrap()
                    .with_choice_teacher(&model)
                    .unwrap()
            })
            .collect();
        let ones = ScaleValues::ones(arch.n_layer);
        let none = SkipMask::none(arch.n_layer);
        let full = eval_loss(&model, &batches, none.as_slice(), &ones, Objective::Choice).unwrap();
        assert!(
            full.abs() < 1e-5,
            "choice KL of the original to itself is {full}"
        );
        let skip = SkipMask::from_layers(arch.n_layer, &[1]).unwrap();
        let before =
            eval_loss(&model, &batches, skip.as_slice(), &ones, Objective::Choice).unwrap();
        let result = train_scales(
            &model,
            &batches,
            skip.as_slice(),
            Objective::Choice,
            40,
            5e-2,
            3,
        )
        .unwrap();
        let after = eval_loss(
            &model,
            &batches,
            skip.as_slice(),
            &result.scales,
            Objective::Choice,
        )
        .unwrap();
        assert!(
            before > 1e-4 && after < 0.5 * before,
            "choice KL {before} skipped, {after} trained"
        );
        assert_eq!(result.scales.b_att[1], 1.0);
    }

    /// The gradients of `vars` after a backward pass from `loss`.
    fn grads_of(loss: &Tensor, vars: &[Var]) -> Vec<Vec<f32>> {
        let grads = loss.backward().unwrap();
        vars.iter()
            .map(|v| {
                let g = grads.get(v).expect("every variable gets a gradient");
                g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect()
    }

    #[test]
    fn a_batch_trained_in_parts_has_the_whole_batchs_loss_and_gradients() {
        let arch = tiny_arch();
        let model = Model::load(&random_source(&arch, 26), &Device::Cpu).unwrap();
        let ids = random_ids(&arch, 1, 40, 9)
            .to_vec2::<u32>()
            .unwrap()
            .remove(0);
        // rows of different lengths (padding), one whose targets stop before its end (the part
        // is cut after its last target) and one without targets (no part)
        let lengths = [7, 12, 4, 9];
        let mut take = ids.into_iter();
        let seqs: Vec<Vec<u32>> = lengths
            .iter()
            .map(|&n| take.by_ref().take(n).collect())
            .collect();
        let masks: Vec<Vec<bool>> = vec![
            (0..7).map(|j| j >= 2).collect(),
            (0..12).map(|j| (3..8).contains(&j)).collect(),
            vec![false; 4],
            (0..9).map(|j| j % 2 == 1).collect(),
        ];
        let plain = TrainBatch::from_sequences(&seqs, &masks, 0, &Device::Cpu).unwrap();
        let (cseqs, cmasks, choices) = choice_data(&arch, 8);
        let choice = TrainBatch::from_choice_sequences(&cseqs, &cmasks, &choices, 0, &Device::Cpu)
            .unwrap()
            .with_choice_teacher(&model)
            .unwrap();
        let cases = [
            (
                "kl top-k",
                plain.clone().with_teacher(&model, 5).unwrap(),
                Objective::Kl,
            ),
            (
                "kl full",
                plain.clone().with_teacher(&model, usize::MAX).unwrap(),
                Objective::Kl,
            ),
            ("ce", plain, Objective::Ce),
            ("choice", choice, Objective::Choice),
        ];
        let skip = SkipMask::from_layers(arch.n_layer, &[1]).unwrap();
        let mut values = ScaleValues::ones_with_gains(arch.n_layer, arch.n_embd);
        values.b_att[2] = 1.3;
        values.s_mlp[0] = 0.8;
        let scales = model.scales(&values).unwrap();
        let vars = scales.vars();
        for (name, batch, objective) in cases {
            let parts = batch.parts(objective).unwrap();
            let expected_parts = match objective {
                Objective::Choice => choices.len(),
                _ => 3,
            };
            assert_eq!(parts.len(), expected_parts, "{name}");
            let hidden = model
                .forward_hidden(&batch.input_ids, &scales, skip.as_slice())
                .unwrap();
            let loss = hidden_loss(&model, &batch, 0, &hidden, objective).unwrap();
            let whole = loss.to_scalar::<f32>().unwrap() as f64;
            let whole_grads = grads_of(&loss, &vars);
            let (value, store) = part_gradients(
                &model,
                &parts,
                0,
                &scales,
                skip.as_slice(),
                objective,
                &vars,
            )
            .unwrap();
            assert!(whole > 1e-3, "{name}: a loss to compare ({whole})");
            assert!(
                (value - whole).abs() < 1e-5 * whole.max(1.0),
                "{name}: {value} against {whole}"
            );
            for (v, expected) in vars.iter().zip(&whole_grads) {
                let got = store
                    .get(v)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                assert_eq!(got.len(), expected.len());
                let scale = expected.iter().fold(1e-3f32, |m, g| m.max(g.abs()));
                for (g, e) in got.iter().zip(expected) {
                    assert!(
                        (g - e).abs() < 1e-4 * scale,
                        "{name}: gradient {g} against {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_choice_batches_are_errors() {
        let arch = tiny_arch();
        let model = Model::load(&random_source(&arch, 26), &Device::Cpu).unwrap();
        let (seqs, masks, _) = choice_data(&arch, 8);
        let build = |choices: &[usize]| {
            TrainBatch::from_choice_sequences(&seqs, &masks, choices, 0, &Device::Cpu)
        };
        assert!(matches!(
            build(&[3, 3]),
            Err(FitError::ChoiceRows {
                rows: 5,
                choices: 6
            })
        ));
        assert!(matches!(build(&[5, 0]), Err(FitError::ChoiceRows { .. })));
        let mut no_target = masks.clone();
        no_target[1] = vec![false; no_target[1].len()];
        assert!(matches!(
            TrainBatch::from_choice_sequences(&seqs, &no_target, &[3, 2], 0, &Device::Cpu),
            Err(FitError::ChoiceWithoutTargets { row: 1 })
        ));
        let skip = vec![false; arch.n_layer];
        // groups without a teacher, and a batch without groups
        let untaught = vec![build(&[3, 2]).unwrap()];
        let plain = self_generated_batches(&model, 1, 2, 6);
        for batches in [untaught, plain] {
            assert!(matches!(
                train_scales(&model, &batches, &skip, Objective::Choice, 1, 1e-2, 0),
                Err(FitError::MissingChoices { batch: 0 })
            ));
        }
        assert!(matches!(
            TrainBatch::from_sequences(&seqs, &masks, 0, &Device::Cpu)
                .unwrap()
                .with_choice_teacher(&model),
            Err(FitError::MissingChoices { .. })
        ));
    }

    /// One training step (forward, backward, Adam) at batch 8 x 128 on the tiny model, or on a
    /// SmolLM-135M-shaped random model with `HOPSCOTCH_BENCH_SMOLLM=1`.
    #[test]
    #[ignore = "benchmark: cargo test --release --lib bench_train_step -- --ignored --nocapture"]
    fn bench_train_step() {
        let arch = if std::env::var_os("HOPSCOTCH_BENCH_SMOLLM").is_some() {
            Arch {
                n_layer: 30,
                n_embd: 576,
                n_ff: 1536,
                n_head: 9,
                n_head_kv: 3,
                head_dim: 64,
                vocab_size: 49152,
                tie_word_embeddings: true,
                ..tiny_arch()
            }
        } else {
            tiny_arch()
        };
        let model = Model::load(&random_source(&arch, 24), &Device::Cpu).unwrap();
        let (b, t) = (8, 128);
        let ids = random_ids(&arch, b, t, 25);
        let positions: Vec<u32> = (0..(b * t) as u32).filter(|p| p % t as u32 >= 64).collect();
        let n = positions.len();
        let targets = random_ids(&arch, 1, n, 26).flatten_all().unwrap();
        let batch =
            TrainBatch::new(ids, Tensor::new(positions, &Device::Cpu).unwrap(), targets).unwrap();
        let skip = SkipMask::from_layers(arch.n_layer, &[1]).unwrap();
        let batches = [batch];
        let _ = train_scales(&model, &batches, skip.as_slice(), Objective::Ce, 1, 1e-2, 0);
        let steps = 3;
        let start = Instant::now();
        train_scales(
            &model,
            &batches,
            skip.as_slice(),
            Objective::Ce,
            steps,
            1e-2,
            0,
        )
        .unwrap();
        let per_step = start.elapsed().as_secs_f64() / steps as f64;
        let start = Instant::now();
        eval_loss(
            &model,
            &batches,
            skip.as_slice(),
            &ScaleValues::ones(arch.n_layer),
            Objective::Ce,
        )
        .unwrap();
        let forward = start.elapsed().as_secs_f64();
        eprintln!(
            "{} layers x {} wide, batch {b} x {t}: train step {:.1} ms ({:.0} tokens/s), forward only {:.1} ms",
            arch.n_layer,
            arch.n_embd,
            per_step * 1e3,
            (b * t) as f64 / per_step,
            forward * 1e3
        );
    }
}

//! A training batch: right-padded token ids, the positions whose next token is a target, and
//! what the objective compares the slim model with there, the original model's outputs (the
//! teacher). Built from token sequences and loss masks ([`TrainBatch::from_sequences`]); the
//! teacher is attached by [`TrainBatch::with_teacher`] or [`TrainBatch::with_choice_teacher`].
//!
//! The teacher keeps, per position, either the full distribution or its `k` most likely tokens
//! plus the probability left over ([`Teacher::TopK`]): full-vocabulary log-probabilities cost
//! `positions × vocab × 4` bytes (3.3 GB for 6,400 positions of a 128k vocabulary), the top 64
//! about a thousandth of that. With top-k the loss is the KL divergence between the two
//! distributions coarsened to those `k` tokens and one "everything else" bin: a lower bound on
//! the full KL that equals it when the teacher's leftover mass is zero.

use candle_core::{DType, Device, Tensor, D};

use crate::model::ops::runs;
use crate::model::{Model, ModelError};
use crate::plan::{Objective, ScaleValues};

/// Errors building batches, training the scalars or taking a loss.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
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
    ) -> Result<Self, TrainError> {
        let rows = targets_per_row.len();
        if choices_per_doc.contains(&0) || choices_per_doc.iter().sum::<usize>() != rows {
            return Err(TrainError::ChoiceRows {
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
    pub(crate) fn log_probs(&self, target_log_probs: &Tensor) -> Result<Tensor, TrainError> {
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
    /// The teachers of consecutive runs of target positions as one (all of one kind).
    fn cat(parts: &[Teacher]) -> Result<Teacher, TrainError> {
        let mut fields: [Vec<Tensor>; 4] = Default::default();
        for part in parts {
            let tensors: Vec<&Tensor> = match part {
                Teacher::Full { log_probs } => vec![log_probs],
                Teacher::TopK {
                    ids,
                    log_probs,
                    tail_prob,
                    tail_log_prob,
                } => vec![ids, log_probs, tail_prob, tail_log_prob],
            };
            for (field, t) in fields.iter_mut().zip(tensors) {
                field.push(t.clone());
            }
        }
        let [a, b, c, d] = fields.map(|f| Tensor::cat(&f, 0));
        Ok(match parts.first().ok_or(TrainError::NoTargets)? {
            Teacher::Full { .. } => Teacher::Full { log_probs: a? },
            Teacher::TopK { .. } => Teacher::TopK {
                ids: a?,
                log_probs: b?,
                tail_prob: c?,
                tail_log_prob: d?,
            },
        })
    }

    /// The teacher of `len` consecutive target positions from `start`.
    pub(crate) fn narrow(&self, start: usize, len: usize) -> candle_core::Result<Self> {
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

/// Rows per part of a training batch ([`TrainBatch::parts`]) under the KL and cross-entropy
/// objectives: enough for the prefix the rows share to be computed once for several of them,
/// few enough that a default batch of 8 keeps two threads busy. A constant, so that a step's
/// sums do not depend on the thread count.
pub(crate) const PART_ROWS: usize = 4;

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
    ) -> Result<Self, TrainError> {
        let bad = |name, t: &Tensor, expected: String| TrainError::BatchTensor {
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
    ) -> Result<Self, TrainError> {
        if sequences.len() != loss_masks.len() {
            return Err(TrainError::MaskCount {
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
                return Err(TrainError::MaskLength {
                    sequence: row,
                    tokens: seq.len(),
                    mask: mask.len(),
                });
            }
            if mask.first() == Some(&true) {
                return Err(TrainError::FirstTokenTarget { sequence: row });
            }
            for (j, (&token, &is_target)) in seq.iter().zip(mask).enumerate() {
                if is_target {
                    positions.push(u32::try_from(row * t + j - 1).map_err(|_| {
                        TrainError::BatchTensor {
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
            return Err(TrainError::NoTargets);
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
    ) -> Result<Self, TrainError> {
        let mut batch = Self::from_sequences(sequences, loss_masks, pad_id, device)?;
        let targets_per_row: Vec<usize> = loss_masks
            .iter()
            .map(|m| m.iter().filter(|&&t| t).count())
            .collect();
        if let Some(row) = targets_per_row.iter().position(|&n| n == 0) {
            return Err(TrainError::ChoiceWithoutTargets { row });
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
    /// loss under `objective`: [`PART_ROWS`] rows per part, or one doc's rows under
    /// [`Objective::Choice`] (its loss needs all of a doc's choices). A part's rows compute the
    /// prefix they share once (a task's few-shot examples, a doc's question). Each part keeps its rows' tokens up to the last
    /// position that predicts a target: the model is causal, so the padding and the tokens after
    /// it change no target's prediction. A training step runs the parts side by side and adds
    /// their gradients (`train_scales_from`). Off the CPU the batch is one part: a GPU would run
    /// the parts one after another, and runs the whole batch at once faster.
    pub(crate) fn parts(&self, objective: Objective) -> Result<Vec<Part>, TrainError> {
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
            let run = row_targets.get_mut(row).ok_or(TrainError::BatchTensor {
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
                return Err(TrainError::BatchTensor {
                    name: "target_positions",
                    expected: "targets listed row by row".into(),
                    found: vec![positions.len()],
                    dtype: DType::U32,
                });
            }
        }
        let groups: Vec<usize> = match (objective, &self.choices) {
            (Objective::Choice, Some(g)) => g.choices_per_doc.clone(),
            _ => runs(rows, PART_ROWS).map(|(_, len)| len).collect(),
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
    pub fn with_teacher(mut self, model: &Model, top_k: usize) -> Result<Self, TrainError> {
        let hidden = self.original_hidden(model)?;
        let vocab = model.arch().vocab_size;
        let chunks = self.log_prob_chunks(model, &hidden, |_, log_probs| {
            Ok(if whole_teacher(top_k, vocab) {
                Teacher::Full {
                    log_probs: log_probs.clone(),
                }
            } else {
                top_k_teacher(log_probs, top_k.max(1))?
            })
        })?;
        self.teacher = Some(Teacher::cat(&chunks)?);
        Ok(self)
    }

    /// Attaches the original model's distribution over each doc's choices (all scalars 1,
    /// nothing skipped); the batch must have [`ChoiceGroups`].
    pub fn with_choice_teacher(mut self, model: &Model) -> Result<Self, TrainError> {
        let hidden = self.original_hidden(model)?;
        let target_log_probs = self.target_log_probs(model, &hidden)?;
        let groups = self
            .choices
            .as_mut()
            .ok_or(TrainError::MissingChoices { batch: 0 })?;
        groups.teacher_log_probs = Some(groups.log_probs(&target_log_probs)?.detach());
        Ok(self)
    }

    /// The original model's (all scalars 1, nothing skipped) hidden states on the batch.
    fn original_hidden(&self, model: &Model) -> Result<Tensor, TrainError> {
        let n_layer = model.arch().n_layer;
        let scales = model.scales(&ScaleValues::ones(n_layer))?;
        Ok(model.forward_hidden_no_grad(&self.input_ids, &scales, &vec![false; n_layer])?)
    }

    /// `f(targets, log_probs)` for each run of at most [`whole_logit_rows`] target positions, in
    /// order: `targets` the run's range among the batch's targets, `log_probs` the next-token
    /// log-probabilities there, `(len, vocab)`, from the model's final `hidden` states. A
    /// position's row depends on that position alone, so the runs give the values the whole
    /// batch would, in a fraction of its memory.
    pub(crate) fn log_prob_chunks<T>(
        &self,
        model: &Model,
        hidden: &Tensor,
        mut f: impl FnMut(std::ops::Range<usize>, &Tensor) -> Result<T, TrainError>,
    ) -> Result<Vec<T>, TrainError> {
        let mut out = Vec::new();
        for (start, len) in runs(self.n_targets(), whole_logit_rows(model.arch().vocab_size)) {
            let positions = self.target_positions.narrow(0, start, len)?;
            let logits = model.logits_at(hidden, &positions)?;
            let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            out.push(f(start..start + len, &log_probs)?);
        }
        Ok(out)
    }

    /// The log-probability of each target token, `(n)`, under the next-token distributions of
    /// the model's final `hidden` states.
    pub(crate) fn target_log_probs(
        &self,
        model: &Model,
        hidden: &Tensor,
    ) -> Result<Tensor, TrainError> {
        Ok(self
            .log_probs_of(model, hidden, &self.targets.unsqueeze(1)?)?
            .squeeze(1)?)
    }

    /// The log-probabilities of tokens `ids` `(n, k)` (distinct per row) at each target
    /// position, `(n, k)`, under the next-token distributions of the model's final `hidden`
    /// states: [`Model::log_probs_at`], a run of [`LOGIT_ROWS`] positions at a time.
    pub(crate) fn log_probs_of(
        &self,
        model: &Model,
        hidden: &Tensor,
        ids: &Tensor,
    ) -> Result<Tensor, TrainError> {
        let mut parts = Vec::new();
        for (start, len) in runs(self.n_targets(), LOGIT_ROWS) {
            let positions = self.target_positions.narrow(0, start, len)?;
            parts.push(model.log_probs_at(hidden, &positions, &ids.narrow(0, start, len)?)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// Target positions whose logits are taken at once: a batch's every target over a large
/// vocabulary would take gigabytes (2,048 positions of a 49,152-token vocabulary: 400 MB, and
/// as much again for their log-softmax).
pub const LOGIT_ROWS: usize = 512;

/// The logits taken at once where whole rows of the vocabulary are needed (the teacher's top
/// tokens, the full teacher's KL): 64 MiB of f32.
const WHOLE_LOGIT_VALUES: usize = 1 << 24;

/// Target positions whose whole rows of logits are taken at once over a vocabulary of `vocab`:
/// [`LOGIT_ROWS`], fewer where that would take more than [`WHOLE_LOGIT_VALUES`].
pub(crate) fn whole_logit_rows(vocab: usize) -> usize {
    (WHOLE_LOGIT_VALUES / vocab.max(1)).clamp(1, LOGIT_ROWS)
}

/// Whether a teacher keeping the `top_k` most likely tokens of a `vocab`-token vocabulary keeps
/// whole rows ([`Teacher::Full`]).
pub(crate) fn whole_teacher(top_k: usize, vocab: usize) -> bool {
    top_k >= vocab
}

/// The `k` largest log-probabilities per row, with the leftover mass; selected on the host.
fn top_k_teacher(log_probs: &Tensor, k: usize) -> Result<Teacher, TrainError> {
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

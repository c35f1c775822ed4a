//! The objectives' losses: the mean over a batch's targets of KL to the teacher, cross-entropy
//! of the targets, or (multiple choice) KL over each doc's choices; and the mean loss over a list
//! of batches without gradients.
//!
//! - [`Objective::Ce`]: mean cross-entropy of the target tokens (the paper's choice, on the
//!   original model's own greedy answers);
//! - [`Objective::Kl`]: mean `KL(original || slim)` of the next-token distributions at the same
//!   positions, against a [`Teacher`] computed once with all scalars 1 and nothing skipped;
//! - [`Objective::Choice`]: for multiple-choice data, mean over docs of `KL(original || slim)` of
//!   the distributions over a doc's choices (the softmax of each choice's summed continuation
//!   log-probability, the scores an evaluation ranks).

use candle_core::{DType, Tensor, D};

use super::batch::{Teacher, TrainBatch, TrainError};
use super::parallel;
use crate::model::Model;
use crate::plan::{Objective, ScaleValues};

/// The student's leftover probability is clamped to this before its log is taken: below f32's
/// rounding of `1 - sum(top-k probabilities)`, so it only guards against `log(0)`.
const MIN_TAIL_PROB: f64 = 1e-7;

/// The mean over `batches` of each batch's loss (itself a mean over its targets) with the given
/// scalars and skip mask, without gradients.
pub fn eval_loss(
    model: &Model,
    batches: &[TrainBatch],
    skip: &[bool],
    scales: &ScaleValues,
    objective: Objective,
) -> Result<f32, TrainError> {
    check_batches(batches, objective)?;
    let scales = model.scales(scales)?;
    let losses = parallel::map(model.device(), batches.len(), |index| {
        let batch = &batches[index];
        let hidden = model.forward_hidden_no_grad(&batch.input_ids, &scales, skip)?;
        let loss = hidden_loss(model, batch, index, &hidden, objective)?;
        Ok::<_, TrainError>(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    })?;
    let total = losses.iter().fold(0.0f64, |sum, loss| sum + loss);
    Ok((total / batches.len() as f64) as f32)
}

/// Refuses an empty batch list, and batches without teacher outputs under the KL objective.
pub(crate) fn check_batches(
    batches: &[TrainBatch],
    objective: Objective,
) -> Result<(), TrainError> {
    if batches.is_empty() {
        return Err(TrainError::NoBatches);
    }
    match objective {
        Objective::Ce => {}
        Objective::Kl => {
            if let Some(batch) = batches.iter().position(|b| b.teacher.is_none()) {
                return Err(TrainError::MissingTeacher { batch });
            }
        }
        Objective::Choice => {
            let ready = |b: &TrainBatch| {
                b.choices
                    .as_ref()
                    .is_some_and(|g| g.teacher_log_probs.is_some())
            };
            if let Some(batch) = batches.iter().position(|b| !ready(b)) {
                return Err(TrainError::MissingChoices { batch });
            }
        }
    }
    Ok(())
}

/// The scalar loss of `batch` (index `index` in its list, for errors) from the model's final
/// hidden states on it: each target position's loss, taken over runs of positions
/// ([`TrainBatch::log_prob_chunks`]), then their mean.
pub(crate) fn hidden_loss(
    model: &Model,
    batch: &TrainBatch,
    index: usize,
    hidden: &Tensor,
    objective: Objective,
) -> Result<Tensor, TrainError> {
    match (objective, &batch.teacher) {
        (Objective::Ce, _) => Ok(batch.target_log_probs(model, hidden)?.mean_all()?.neg()?),
        (Objective::Choice, _) => choice_loss(model, batch, index, hidden),
        (Objective::Kl, None) => Err(TrainError::MissingTeacher { batch: index }),
        (Objective::Kl, Some(teacher)) => {
            let rows = match teacher {
                Teacher::Full { log_probs } => {
                    check_teacher_rows(log_probs, batch)?;
                    let rows = batch.log_prob_chunks(model, hidden, |range, log_q| {
                        let p = log_probs.narrow(0, range.start, range.len())?;
                        Ok((p.exp()? * (p - log_q)?)?.sum(D::Minus1)?)
                    })?;
                    Tensor::cat(&rows, 0)?
                }
                Teacher::TopK {
                    ids,
                    log_probs,
                    tail_prob,
                    tail_log_prob,
                } => {
                    check_teacher_rows(log_probs, batch)?;
                    let log_q_kept = batch.log_probs_of(model, hidden, ids)?;
                    let kept = (log_probs.exp()? * (log_probs - &log_q_kept)?)?.sum(D::Minus1)?;
                    let q_tail =
                        (1.0 - log_q_kept.exp()?.sum(D::Minus1)?)?.clamp(MIN_TAIL_PROB, 1.0)?;
                    (kept + (tail_prob * (tail_log_prob - q_tail.log()?)?)?)?
                }
            };
            Ok(rows.mean_all()?)
        }
    }
}

/// [`Objective::Choice`]'s loss of `batch`: the mean over its docs of `KL(original || slim)` of
/// the distributions over each doc's choices, from the model's final `hidden` states.
fn choice_loss(
    model: &Model,
    batch: &TrainBatch,
    index: usize,
    hidden: &Tensor,
) -> Result<Tensor, TrainError> {
    let groups = batch
        .choices
        .as_ref()
        .ok_or(TrainError::MissingChoices { batch: index })?;
    let teacher = groups
        .teacher_log_probs
        .as_ref()
        .ok_or(TrainError::MissingChoices { batch: index })?;
    let log_q = groups.log_probs(&batch.target_log_probs(model, hidden)?)?;
    let kl = (teacher.exp()? * (teacher - log_q)?)?.sum_all()?;
    Ok((kl / groups.choices_per_doc.len() as f64)?)
}

/// Refuses a teacher whose rows do not match the batch's targets.
fn check_teacher_rows(log_probs: &Tensor, batch: &TrainBatch) -> Result<(), TrainError> {
    let n = batch.n_targets();
    if log_probs.rank() != 2 || log_probs.dim(0)? != n {
        return Err(TrainError::BatchTensor {
            name: "teacher",
            expected: format!("({n}, k) log-probabilities"),
            found: log_probs.dims().to_vec(),
            dtype: log_probs.dtype(),
        });
    }
    Ok(())
}

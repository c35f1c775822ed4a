//! Train the Hopscotch scalars for one skip mask: Adam on the 4·L numbers, every weight frozen
//! (Eyceoz et al. 2025, <https://arxiv.org/abs/2506.03303>, section 3). A step runs its batch's
//! parts side by side (one sequence each, or one doc's choices) and adds their gradients in
//! order.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::batch::{Part, TrainBatch, TrainError};
use super::loss::{check_batches, hidden_loss};
use super::parallel;
use crate::model::{Model, Scales};
use crate::plan::{Objective, ScaleValues};

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
) -> Result<TrainResult, TrainError> {
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
        &mut |_| {},
    )
}

/// [`train_scales`] from `init` instead of scalars 1, calling `observe` after every step;
/// `init`'s linear stand-ins stay as given.
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
    observe: &mut dyn FnMut(StepReport),
) -> Result<TrainResult, TrainError> {
    check_batches(batches, objective)?;
    if !(lr.is_finite() && lr > 0.0) {
        return Err(TrainError::LearningRate { lr });
    }
    let scales = model.scales(init)?;
    let vars = scales.vars();
    let mut optimizer = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        },
    )?;
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
            return Err(TrainError::NonFiniteLoss { step, loss: value });
        }
        optimizer.step(&grads)?;
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
) -> Result<(f64, GradStore), TrainError> {
    let per_part = parallel::map(model.device(), parts.len(), |i| {
        let part = &parts[i];
        let hidden = model.forward_hidden(&part.batch.input_ids, scales, skip)?;
        let loss = (hidden_loss(model, &part.batch, index, &hidden, objective)? * part.weight)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let grads = loss.backward()?;
        let of_vars: Vec<Option<Tensor>> = vars.iter().map(|v| grads.get(v).cloned()).collect();
        Ok::<_, TrainError>((value, of_vars))
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

#[cfg(test)]
mod tests;

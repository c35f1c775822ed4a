//! The final training: the scalars of the chosen blocks trained longer (`final_steps` at
//! `final_lr`), on the final training's documents, with the loss measured before and after.

use super::linear;
use super::loss::eval_loss;
use super::options::{derive_seed, FitError};
use super::search::{SearchInput, Searcher, TrainStats};
use crate::plan::{FitSettings, ScaleValues, SkipMask};
use crate::progress::Progress;

/// Seed stream of the final training.
const FINAL_STREAM: u64 = u64::MAX;

/// The final training's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Final {
    /// The trained scalars; all 1 without training, or when training raised the loss.
    pub scales: ScaleValues,
    /// Loss per step.
    pub loss_history: Vec<f32>,
    /// Mean loss over the fit batches with the trained scalars.
    pub loss: f32,
    /// Mean loss over the fit batches with the blocks skipped and every scalar at 1.
    pub loss_untrained: f32,
}

/// Trains the scalars of the final choice (`final_steps` at `final_lr`) and measures the loss
/// before and after over all fit batches.
pub fn train_final(
    input: &SearchInput<'_>,
    options: &FitSettings,
    skipped: &[usize],
    progress: &Progress,
) -> Result<(Final, TrainStats), FitError> {
    let model = input.model;
    let n_layer = model.arch().n_layer;
    let skip = SkipMask::from_layers(n_layer, skipped)?;
    // the chosen blocks' stand-ins, in the order the blocks were chosen
    let mut ones = ScaleValues::ones(n_layer);
    ones.linear = if options.linear_attention && input.stand_ins.is_empty() && !skipped.is_empty() {
        linear::fit(model, input.batches, input.lengths, skipped)?.stand_ins
    } else {
        skipped
            .iter()
            .filter_map(|&l| input.stand_ins.iter().find(|a| a.layer == l))
            .cloned()
            .collect()
    };
    let loss_untrained = eval_loss(
        model,
        input.batches,
        skip.as_slice(),
        &ones,
        options.objective,
    )?;
    let mut searcher = Searcher::new(input, options, progress);
    let steps = options.resolved_final_steps(input.batches.len());
    let (scales, loss_history) = if steps > 0 {
        let r = searcher.train(
            input.batches,
            skip.as_slice(),
            &ones,
            steps,
            options.final_lr,
            derive_seed(options.seed, FINAL_STREAM),
            "final",
        )?;
        (r.scales, r.loss_history)
    } else {
        (ones.clone(), Vec::new())
    };
    // untrained, the scalars are those the loss was just measured at
    let mut loss = if loss_history.is_empty() {
        loss_untrained
    } else {
        eval_loss(
            model,
            input.batches,
            skip.as_slice(),
            &scales,
            options.objective,
        )?
    };
    // Adam's first steps move every scalar by about the learning rate whatever its gradient; a
    // training too short to recover from that is worse than none, and is not kept.
    let scales = if loss > loss_untrained {
        progress.note(&format!(
            "the final training raised the loss ({loss_untrained:.4} -> {loss:.4}); keeping the scalars at 1"
        ));
        loss = loss_untrained;
        ones
    } else {
        scales
    };
    Ok((
        Final {
            scales,
            loss_history,
            loss,
            loss_untrained,
        },
        searcher.stats,
    ))
}

//! Choosing the attention blocks to skip: Hopscotch's greedy, re-scored search (Eyceoz et al.
//! 2025, <https://arxiv.org/abs/2506.03303>, algorithm 1), its cheaper screened variant, and two
//! baselines.
//!
//! Every round, every attention block not yet skipped is a candidate, except layer 0's: llama.cpp's
//! `deci` architecture, which runs the slim model, derives the head size from layer 0, so that
//! block always stays. A candidate is scored by skipping it with the blocks already chosen,
//! resetting all scalars to 1, training them (Adam) for `candidate_steps` and taking the mean
//! training loss; the lowest score is skipped for good.
//!
//! - `--exhaustive` trains every candidate every round: the paper's loop.
//! - The default screens every candidate by its loss with the block skipped and every scalar at
//!   1, and trains only the `shortlist` best screened; the lowest trained score wins. When the
//!   exhaustive winner makes the shortlist, both modes choose the same block (a round's
//!   candidates share one seed, so a candidate's trained score is the same in both). After the
//!   first round only `rescreen` candidates are screened, those the latest screenings ranked
//!   best: skipping one more block reorders the rest only a little.
//!
//! Baselines (`--method`): [`Method::AttnCosine`] drops the blocks whose output changes the
//! residual stream least (LLM-Drop, He et al. 2024), [`Method::Random`] seeded random blocks.

use std::time::Instant;

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use super::batch::TrainBatch;
use super::loss::{self, eval_loss};
use super::options::{derive_seed, FitError};
use super::parallel;
use super::train::{train_scales_from, StepReport, TrainResult};
use crate::model::Model;
use crate::plan::{
    CandidateScore, FitSettings, LinearAttention, Method, Objective, Round, ScaleValues, SkipMask,
};
use crate::progress::Progress;

/// Seed stream of the choice of screening batches.
const SCREEN_STREAM: u64 = u64::MAX - 1;

/// Indices of the `n` batches screening uses: a seeded subset, ascending.
pub fn screen_subset(n_batches: usize, n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n_batches).collect();
    order.shuffle(&mut StdRng::seed_from_u64(derive_seed(seed, SCREEN_STREAM)));
    order.truncate(n.min(n_batches));
    order.sort_unstable();
    order
}

/// What a fit's model passes cost: the training steps (their throughput), and the screening.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TrainStats {
    /// Optimizer steps taken.
    pub steps: usize,
    /// Real (unpadded) tokens those steps ran through the model.
    pub tokens: usize,
    /// Seconds spent in them.
    pub seconds: f64,
    /// Candidates screened (each on `screen_batches` batches).
    pub screened: usize,
    /// Seconds spent screening.
    pub screen_seconds: f64,
}

impl TrainStats {
    /// Tokens per second of the training steps (0 before any step).
    pub fn tokens_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.tokens as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// The model and data a search runs on.
pub struct SearchInput<'a> {
    /// The model.
    pub model: &'a Model,
    /// The fit batches.
    pub batches: &'a [TrainBatch],
    /// Per batch, each row's real length.
    pub lengths: &'a [Vec<usize>],
    /// Linear stand-ins (the default; none with `--no-linear-attention`): a block that has one
    /// is replaced by it where it is skipped, in the search and in the final training; empty:
    /// blocks are skipped outright.
    pub stand_ins: &'a [LinearAttention],
}

impl SearchInput<'_> {
    /// Every scalar 1, with the stand-ins: where every training starts.
    fn base(&self) -> ScaleValues {
        ScaleValues {
            linear: self.stand_ins.to_vec(),
            ..ScaleValues::ones(self.model.arch().n_layer)
        }
    }
}

/// What the choice of blocks produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The blocks to skip, in the order chosen.
    pub skipped: Vec<usize>,
    /// The rounds of the greedy search (empty for the baselines).
    pub rounds: Vec<Round>,
    /// Attention importance per layer (attention-cosine baseline only).
    pub attn_importance: Option<Vec<f32>>,
}

impl Choice {
    /// The first `k` blocks of the order, with their rounds: what a search for `k` blocks
    /// chooses.
    pub fn first(&self, k: usize) -> Choice {
        Choice {
            skipped: self.skipped[..k.min(self.skipped.len())].to_vec(),
            rounds: self.rounds[..k.min(self.rounds.len())].to_vec(),
            attn_importance: self.attn_importance.clone(),
        }
    }
}

/// Runs the search and the training steps, keeping the statistics and the progress bars.
pub(super) struct Searcher<'a> {
    input: &'a SearchInput<'a>,
    options: &'a FitSettings,
    progress: &'a Progress,
    pub(super) stats: TrainStats,
    tokens_per_batch: f64,
}

impl<'a> Searcher<'a> {
    pub(super) fn new(
        input: &'a SearchInput<'a>,
        options: &'a FitSettings,
        progress: &'a Progress,
    ) -> Self {
        let tokens: usize = input.lengths.iter().flatten().sum();
        Self {
            input,
            options,
            progress,
            stats: TrainStats::default(),
            tokens_per_batch: tokens as f64 / input.batches.len().max(1) as f64,
        }
    }

    fn n_layer(&self) -> usize {
        self.input.model.arch().n_layer
    }

    /// Trains `init` for `steps`, with a step bar.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn train(
        &mut self,
        batches: &[TrainBatch],
        skip: &[bool],
        init: &ScaleValues,
        steps: usize,
        lr: f64,
        seed: u64,
        label: &str,
    ) -> Result<TrainResult, FitError> {
        let bar = self.progress.bar(steps, label);
        let started = Instant::now();
        let mut sum = 0.0f64;
        let result = train_scales_from(
            self.input.model,
            batches,
            skip,
            self.options.objective,
            steps,
            lr,
            seed,
            init,
            &mut |StepReport { step, loss }| {
                sum += loss as f64;
                bar.set_message(format!("mean loss {:.4}", sum / (step + 1) as f64));
                bar.inc(1);
            },
        );
        bar.finish_and_clear();
        self.stats.steps += steps;
        self.stats.tokens += (steps as f64 * self.tokens_per_batch).round() as usize;
        self.stats.seconds += started.elapsed().as_secs_f64();
        Ok(result?)
    }

    /// A candidate's score: the mean training loss over `candidate_steps` from scalars 1; with
    /// training off, the loss over all fit batches at scalars 1.
    fn score(&mut self, skip: &[bool], seed: u64) -> Result<f32, FitError> {
        let ones = self.input.base();
        if !self.options.train_scales {
            let loss = eval_loss(
                self.input.model,
                self.input.batches,
                skip,
                &ones,
                self.options.objective,
            )?;
            return Ok(loss);
        }
        let steps = self
            .options
            .resolved_candidate_steps(self.input.batches.len());
        let result = self.train(
            self.input.batches,
            skip,
            &ones,
            steps,
            self.options.lr,
            seed,
            "candidate",
        )?;
        Ok(result.mean_loss())
    }

    /// The greedy rounds, continuing after `done` (rounds of a resumed fit). `on_round` sees
    /// every round list as it grows.
    fn greedy(
        &mut self,
        mut rounds: Vec<Round>,
        on_round: &mut dyn FnMut(&[Round]) -> Result<(), FitError>,
    ) -> Result<Vec<Round>, FitError> {
        let n_layer = self.n_layer();
        let options = self.options;
        let subset = screen_subset(
            self.input.batches.len(),
            options.screen_batches,
            options.seed,
        );
        let screen_batches: Vec<TrainBatch> = subset
            .iter()
            .map(|&i| self.input.batches[i].clone())
            .collect();
        let base = self.input.base();
        let round_bar = self.progress.bar(options.skip, "rounds");
        round_bar.set_position(rounds.len() as u64);
        while rounds.len() < options.skip {
            let round = rounds.len();
            let chosen: Vec<usize> = rounds.iter().map(|r| r.chosen).collect();
            let candidates: Vec<usize> = (1..n_layer).filter(|l| !chosen.contains(l)).collect();
            let seed = derive_seed(options.seed, round as u64 + 1);
            // After the first round, `rescreen` limits the screening to the candidates the
            // latest screenings ranked best.
            let to_screen = if options.rescreen > 0 && !options.exhaustive {
                rescreen_candidates(&rounds, &candidates, options.rescreen)
            } else {
                candidates.clone()
            };
            let screened = !options.exhaustive && options.shortlist < to_screen.len();
            let screens = if screened {
                let bar = self.progress.bar(to_screen.len(), "screen");
                let started = Instant::now();
                let s = screen_candidates(
                    self.input.model,
                    &screen_batches,
                    &chosen,
                    &to_screen,
                    options.objective,
                    &base,
                    &mut || bar.inc(1),
                )?;
                bar.finish_and_clear();
                self.stats.screened += to_screen.len();
                self.stats.screen_seconds += started.elapsed().as_secs_f64();
                Some(s)
            } else {
                None
            };
            let shortlist: Vec<usize> = match &screens {
                Some(s) => ranked(&to_screen, s)
                    .into_iter()
                    .take(options.shortlist)
                    .collect(),
                None => to_screen.clone(),
            };
            let bar = self.progress.bar(shortlist.len(), "train");
            let mut trained = Vec::with_capacity(shortlist.len());
            let mut best: Option<(usize, f32)> = None;
            for &layer in &shortlist {
                let mut skip_layers = chosen.clone();
                skip_layers.push(layer);
                let skip = SkipMask::from_layers(n_layer, &skip_layers)?;
                let score = self.score(skip.as_slice(), seed)?;
                trained.push(score);
                if best.is_none_or(|(_, b)| score.total_cmp(&b).is_lt()) {
                    best = Some((layer, score));
                }
                bar.set_message(match best {
                    Some((l, b)) => format!("best: layer {l}, loss {b:.4}"),
                    None => String::new(),
                });
                bar.inc(1);
            }
            bar.finish_and_clear();
            let winner = ranked(&shortlist, &trained)[0];
            let w = shortlist.iter().position(|&l| l == winner).unwrap_or(0);
            let loss = trained[w];
            let scores = candidates
                .iter()
                .map(|&layer| CandidateScore {
                    layer,
                    screen: screens
                        .as_ref()
                        .and_then(|s| to_screen.iter().position(|&l| l == layer).map(|j| s[j])),
                    trained_loss: shortlist
                        .iter()
                        .position(|&l| l == layer)
                        .map(|j| trained[j]),
                })
                .collect();
            let result = Round {
                candidates: scores,
                chosen: winner,
                loss,
            };
            self.progress.note(&round_line(&result, round));
            rounds.push(result);
            on_round(&rounds)?;
            round_bar.inc(1);
        }
        round_bar.finish_and_clear();
        Ok(rounds)
    }
}

/// One line per round for the progress log.
fn round_line(round: &Round, index: usize) -> String {
    let runner_up = runner_up(round)
        .map(|(l, s)| format!(", runner-up layer {l} ({s:.4})"))
        .unwrap_or_default();
    format!(
        "round {}: skip layer {} (loss {:.4}){runner_up}",
        index + 1,
        round.chosen,
        round.loss
    )
}

/// The second-best trained candidate of a round.
pub fn runner_up(round: &Round) -> Option<(usize, f32)> {
    round
        .candidates
        .iter()
        .filter(|c| c.layer != round.chosen)
        .filter_map(|c| c.trained_loss.map(|s| (c.layer, s)))
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
}

/// `items` ordered by ascending score (ties: by item).
fn ranked(items: &[usize], scores: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| {
        scores[a]
            .total_cmp(&scores[b])
            .then(items[a].cmp(&items[b]))
    });
    order.into_iter().map(|i| items[i]).collect()
}

/// The candidates a round screens under `rescreen`: the `keep` best among `candidates` by their
/// latest screening (the previous round's, then the one before for those it did not screen, and
/// so on), in layer order; all of them when earlier rounds screened fewer than `keep` of them
/// (a first, exhaustive or unscreened round).
fn rescreen_candidates(rounds: &[Round], candidates: &[usize], keep: usize) -> Vec<usize> {
    let mut order: Vec<usize> = Vec::with_capacity(candidates.len());
    for round in rounds.iter().rev() {
        let (layers, screens): (Vec<usize>, Vec<f32>) = round
            .candidates
            .iter()
            .filter(|c| candidates.contains(&c.layer) && !order.contains(&c.layer))
            .filter_map(|c| c.screen.map(|s| (c.layer, s)))
            .unzip();
        order.extend(ranked(&layers, &screens));
        if order.len() >= keep {
            break;
        }
    }
    if order.len() < keep {
        return candidates.to_vec();
    }
    order.truncate(keep);
    order.sort_unstable();
    order
}

/// The screening score of each candidate (lower: better to skip) on `batches`, with the blocks
/// `chosen` already skipped: the loss with the candidate skipped too and every scalar as in
/// `base` (1, with the linear stand-ins, if any). `tick` is called once per candidate.
///
/// Batch by batch: the stream entering each layer with only `chosen` skipped is the same for
/// every candidate up to the candidate's own layer, so it is computed once and each candidate
/// runs only its layer and those after it (half the layers on average). Same operations on the
/// same inputs as [`eval_loss`]: the same scores.
pub fn screen_candidates(
    model: &Model,
    batches: &[TrainBatch],
    chosen: &[usize],
    candidates: &[usize],
    objective: Objective,
    base: &ScaleValues,
    tick: &mut dyn FnMut(),
) -> Result<Vec<f32>, FitError> {
    let n_layer = model.arch().n_layer;
    loss::check_batches(batches, objective)?;
    let vars = model.scales(base)?;
    let chosen_mask = SkipMask::from_layers(n_layer, chosen)?;
    let masks = candidates
        .iter()
        .map(|&layer| {
            let mut layers = chosen.to_vec();
            layers.push(layer);
            SkipMask::from_layers(n_layer, &layers)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut totals = vec![0f64; candidates.len()];
    for (index, batch) in batches.iter().enumerate() {
        let residuals = model.residuals_no_grad(&batch.input_ids, &vars, chosen_mask.as_slice())?;
        let losses = parallel::map(model.device(), candidates.len(), |c| {
            let layer = candidates[c];
            let hidden = model.forward_hidden_from_no_grad(
                &batch.input_ids,
                &residuals[layer],
                layer,
                &vars,
                masks[c].as_slice(),
            )?;
            let loss = loss::hidden_loss(model, batch, index, &hidden, objective)?;
            Ok::<_, FitError>(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)
        })?;
        for (total, loss) in totals.iter_mut().zip(losses) {
            *total += loss;
        }
    }
    for _ in candidates {
        tick();
    }
    Ok(totals
        .iter()
        .map(|t| (t / batches.len() as f64) as f32)
        .collect())
}

/// LLM-Drop's attention importance per layer (He et al. 2024, "What Matters in Transformers?
/// Not All Attention is Needed"): `1 - mean cos(X, X + Attn(Norm(X)))` over the real tokens, `X`
/// the residual entering the layer with nothing skipped; one forward pass per batch
/// ([`Model::attention_residuals_no_grad`]).
pub fn attn_importance(input: &SearchInput<'_>, batches: &[usize]) -> Result<Vec<f32>, FitError> {
    let model = input.model;
    let n_layer = model.arch().n_layer;
    let d = model.arch().n_embd;
    let mut sums = vec![0f64; n_layer];
    let mut count = 0usize;
    for &b in batches {
        let batch = &input.batches[b];
        let lengths = &input.lengths[b];
        let (_, t) = batch.input_ids.dims2()?;
        let real: Vec<u32> = lengths
            .iter()
            .enumerate()
            .flat_map(|(row, &len)| (0..len).map(move |j| (row * t + j) as u32))
            .collect();
        let n_real = real.len();
        let real = Tensor::from_vec(real, n_real, model.device())?;
        let rows = |h: Tensor| -> Result<Tensor, FitError> {
            Ok(h.reshape(((), d))?
                .index_select(&real, 0)?
                .to_dtype(DType::F64)?)
        };
        let pairs = model.attention_residuals_no_grad(&batch.input_ids)?;
        for (sum, (x, y)) in sums.iter_mut().zip(pairs) {
            let (x, y) = (rows(x)?, rows(y)?);
            let dot = (&x * &y)?.sum(1)?;
            let norms = ((&x * &x)?.sum(1)? * (&y * &y)?.sum(1)?)?.sqrt()?;
            let cos = (dot / norms.clamp(1e-30, f64::INFINITY)?)?;
            *sum += cos.sum_all()?.to_scalar::<f64>()?;
        }
        count += lengths.iter().sum::<usize>();
    }
    Ok(sums
        .into_iter()
        .map(|s| (1.0 - s / count.max(1) as f64) as f32)
        .collect())
}

/// Chooses the blocks by `options.method`. For Hopscotch, `done` holds rounds already run (a
/// resumed fit) and `on_round` is called after every round.
pub fn choose(
    input: &SearchInput<'_>,
    options: &FitSettings,
    done: Vec<Round>,
    on_round: &mut dyn FnMut(&[Round]) -> Result<(), FitError>,
    progress: &Progress,
) -> Result<(Choice, TrainStats), FitError> {
    let n_layer = input.model.arch().n_layer;
    let candidates: Vec<usize> = (1..n_layer).collect();
    let mut searcher = Searcher::new(input, options, progress);
    let choice = match options.method {
        Method::Hopscotch => {
            let rounds = searcher.greedy(done, on_round)?;
            Choice {
                skipped: rounds.iter().map(|r| r.chosen).collect(),
                rounds,
                attn_importance: None,
            }
        }
        Method::Random => {
            let mut layers = candidates;
            layers.shuffle(&mut StdRng::seed_from_u64(options.seed));
            layers.truncate(options.skip);
            Choice {
                skipped: layers,
                rounds: Vec::new(),
                attn_importance: None,
            }
        }
        Method::AttnCosine => {
            let subset = screen_subset(input.batches.len(), options.screen_batches, options.seed);
            let importance = attn_importance(input, &subset)?;
            let scores: Vec<f32> = candidates.iter().map(|&l| importance[l]).collect();
            let mut skipped = ranked(&candidates, &scores);
            skipped.truncate(options.skip);
            Choice {
                skipped,
                rounds: Vec::new(),
                attn_importance: Some(importance),
            }
        }
    };
    Ok((choice, searcher.stats))
}

#[cfg(test)]
mod tests;

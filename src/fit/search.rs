//! Choosing the attention blocks to skip: Hopscotch's greedy, re-scored search (Eyceoz et al.
//! 2025, <https://arxiv.org/abs/2506.03303>, algorithm 1), its cheaper screened variant, and two
//! baselines; then the final training of the scalars, and the whole `hopscotch fit` run.
//!
//! Every round, every attention block not yet skipped is a candidate, except layer 0's: llama.cpp's
//! `deci` architecture, which runs the slim model, derives the head size from layer 0, so that
//! block always stays. A candidate is scored by skipping it with the blocks already chosen,
//! resetting all scalars to 1, training them (Adam) for `candidate_steps` and taking the mean
//! training loss; the lowest score is skipped for good.
//!
//! - `--exhaustive` trains every candidate every round: the paper's loop.
//! - The default screens every candidate cheaply ([`Screen`]) and trains only the `shortlist`
//!   best screened; the lowest trained score wins. When the exhaustive winner makes the
//!   shortlist, both modes choose the same block (a round's candidates share one seed, so a
//!   candidate's trained score is the same in both). After the first round only `rescreen`
//!   candidates are screened, those the latest screenings ranked best: skipping one more block
//!   reorders the rest only a little (in the searches measured, the candidates a round
//!   shortlisted had ranked at most 11th the round before).
//!
//! The default screen is [`Screen::SkipLoss`] on one batch. Measured on SmolLM2-135M-Instruct
//! (Q4_1 GGUF) with arc_easy, KL, batches of 4 x 64 tokens, one thread on two busy cores, against
//! the exhaustive trained scores of the same state (round 1, 16 fit docs = 4 batches, one
//! 4-step epoch per candidate at lr 1e-2):
//!
//! | screen | Spearman vs trained | exhaustive winner's rank (of 29) | wall of the run |
//! |---|---|---|---|
//! | `skip-loss`, 1 batch | 0.54 | 5 | 85 s |
//! | `skip-loss`, 4 batches | 0.52 | 4 | 276 s |
//! | `short-train` (2 steps), 1 batch | 0.45 | 2 | 518 s |
//! | `gradient`, 4 batches | 0.36 | 25 | 100 s |
//!
//! The gradient ranks noise in round 1: under KL the gradient vanishes at the original model.
//! Two training steps per candidate cost more than training the shortlist. With 12 fit docs and
//! K = 4 (`scripts/bench-fit.sh`) the exhaustive winner of round 1 ranked 15th by `skip-loss`,
//! so the choices differed from round 1 on; yet the screened search ended at a lower final loss
//! (0.139 against 0.188; `warm-skip-loss` 0.130) at 3.8x less cost at equal load (48 training
//! steps and 110 one-batch screenings against 342 steps; the ratio grows with the steps per
//! epoch, as the exhaustive cost does while the screening's does not). At this scale the
//! trained score itself is noisy: Adam's first steps move every scalar by about the learning
//! rate, a perturbation as large as the differences between blocks (one setting's exhaustive
//! winner trained to a higher mean loss than its untrained skip loss). `skip-loss` is the
//! cheapest signal and as good as any cheap one measured.
//!
//! Baselines (`--method`): [`Method::AttnCosine`] drops the blocks whose output changes the
//! residual stream least (LLM-Drop, He et al. 2024), [`Method::Random`] seeded random blocks.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use super::data;
use super::linear::{self, LinearError};
use super::parallel;
use super::plan::{CandidateScore, FitSettings, ModelFingerprint, Plan, PlanError, Round, TaskRef};
use super::progress::Progress;
use super::scales::{
    self, eval_loss, train_scales_from, FitError, Objective, StepReport, TrainBatch,
    DEFAULT_TEACHER_TOP_K,
};
use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::gguf::vocab::VocabError;
use crate::model::{LinearAttention, Model, ModelError, ScaleValues, SkipMask};
use crate::output::{check_overwrite, OutputError};
use crate::task::{self, TaskError};

/// Final training length when `final_steps` is not given, in epochs over the fit batches.
pub const DEFAULT_FINAL_EPOCHS: usize = 4;

/// Candidates screened per round after the first (`--rescreen`). In the searches measured on
/// SmolLM2-135M-Instruct (arc_easy, K = 4 and 8, kl and ce) every candidate a round shortlisted
/// had ranked at most 11th in the round before, so 12 keeps those choices while screening 12 of
/// 28 or fewer.
pub const DEFAULT_RESCREEN: usize = 12;

/// Errors of a fit. Each names the file, setting or input at fault.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// A setting is out of its range.
    #[error("--{name} {value}: expected {expected}")]
    Setting {
        /// The option, as spelled on the command line.
        name: &'static str,
        /// The value given.
        value: String,
        /// What is allowed.
        expected: String,
    },
    /// More blocks asked for than the model can skip.
    #[error(
        "{model}: --skip {skip} is too many: the model has {n_layer} layers and layer 0's \
         attention must stay (llama.cpp's deci takes the head size from layer 0), so at most {} \
         blocks can be skipped", n_layer.saturating_sub(1)
    )]
    TooManyBlocks {
        /// The model path.
        model: String,
        /// Blocks asked for.
        skip: usize,
        /// Layers of the model.
        n_layer: usize,
    },
    /// The checkpoint could not be opened or is not one the fit runs.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The model could not be built from the checkpoint.
    #[error("{path}: {error}")]
    LoadModel {
        /// The model path.
        path: String,
        /// The model's error (in the message, so not also a `source()`).
        error: ModelError,
    },
    /// The model failed while running (a token id past its vocabulary, ...).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The linear stand-ins could not be fitted.
    #[error("linear stand-ins: {0}")]
    Linear(#[from] LinearError),
    /// The tokenizer could not be built from the checkpoint.
    #[error(transparent)]
    Vocab(#[from] VocabError),
    /// The tokenizer failed.
    #[error("tokenizer: {what}: {error}")]
    Tokenizer {
        /// What it was doing.
        what: String,
        /// Its error (in the message, so not also a `source()`).
        error: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The task file could not be read or parsed.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// Training sequences could not be made from the task's docs.
    #[error("{}: {error}", path.display())]
    Examples {
        /// The task file.
        path: PathBuf,
        /// The error, naming the doc (in the message, so not also a `source()`).
        error: Box<TaskError>,
    },
    /// Building batches, training or evaluating failed.
    #[error(transparent)]
    Fit(#[from] FitError),
    /// A tensor operation outside the model failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The plan could not be written or a partial plan could not be read.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The output exists (without `--force`) or could not be written.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// `--resume` found a partial plan from another model, task or settings.
    #[error("{}: cannot resume: {what} differs (remove it or run without --resume)", path.display())]
    ResumeMismatch {
        /// The partial plan.
        path: PathBuf,
        /// What differs.
        what: &'static str,
    },
}

/// How the blocks are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Greedy rounds scored by the trained loss (the paper).
    Hopscotch,
    /// One shot: the blocks whose output least changes the residual (LLM-Drop).
    AttnCosine,
    /// Seeded random blocks (layer 0 excluded).
    Random,
}

impl Method {
    /// The name recorded in plans and taken by `--method`.
    pub fn name(self) -> &'static str {
        match self {
            Method::Hopscotch => "hopscotch",
            Method::AttnCosine => "attn-cosine",
            Method::Random => "random",
        }
    }
}

/// The cheap signal the default (non-exhaustive) search ranks candidates by; lower is a better
/// block to skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Screen {
    /// The loss on the screening batches with the candidate skipped and every scalar at 1: one
    /// forward pass per candidate and batch.
    SkipLoss,
    /// [`Screen::SkipLoss`] with the scalars the previous round's winner was trained to instead
    /// of 1 (round 1: all 1).
    WarmSkipLoss,
    /// First-order estimate from one forward and backward pass over the screening batches at
    /// the current state (chosen blocks skipped, scalars 1): removing block `l` changes the loss
    /// by about `-b_att[l] * dL/db_att[l]`. Zero for every block in round 1 under KL, whose
    /// gradient vanishes at the original model.
    Gradient,
    /// The loss on the screening batches after [`SHORT_TRAIN_STEPS`] training steps on them.
    ShortTrain,
}

/// Training steps of [`Screen::ShortTrain`].
pub const SHORT_TRAIN_STEPS: usize = 2;

impl Screen {
    /// The name recorded in plans and taken by `--screen`.
    pub fn name(self) -> &'static str {
        match self {
            Screen::SkipLoss => "skip-loss",
            Screen::WarmSkipLoss => "warm-skip-loss",
            Screen::Gradient => "gradient",
            Screen::ShortTrain => "short-train",
        }
    }
}

/// What a trained candidate is scored by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScoreBy {
    /// The mean of its training steps' batch losses, each taken before that step's update (the
    /// paper's score after one epoch). The first step's loss is at scalars 1, and Adam's first
    /// update moves every scalar by about the learning rate whatever its gradient.
    MeanTrain,
    /// The loss over all fit batches at the scalars its training ended with: what the candidate
    /// reaches, one forward pass per batch more.
    Trained,
}

impl ScoreBy {
    /// The name recorded in plans and taken by `--candidate-score`.
    pub fn name(self) -> &'static str {
        match self {
            ScoreBy::MeanTrain => "mean-train",
            ScoreBy::Trained => "trained",
        }
    }
}

/// Which token positions the loss is taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossTokens {
    /// The task's targets only: a request's gold continuation, a chat's assistant turns, a
    /// prompt's answer (what the paper trains on).
    Targets,
    /// Every token after the first, context included: under the KL objective the slim model then
    /// matches the original's next-token distribution over the whole sequence (few-shot
    /// examples and question too), many times the signal of the few answer tokens. A prefix
    /// every fit document shares (a few-shot preamble) counts once ([`super::data::mark_all_tokens`]).
    All,
}

impl LossTokens {
    /// The name recorded in plans and taken by `--loss-tokens`.
    pub fn name(self) -> &'static str {
        match self {
            LossTokens::Targets => "targets",
            LossTokens::All => "all",
        }
    }
}

/// Everything a fit can be asked for, with the CLI's defaults in [`FitOptions::default`].
#[derive(Debug, Clone, PartialEq)]
pub struct FitOptions {
    /// How blocks are chosen.
    pub method: Method,
    /// The training objective.
    pub objective: Objective,
    /// Attention blocks to skip.
    pub skip: usize,
    /// Documents to fit on (the first of the task's seeded split).
    pub fit_docs: usize,
    /// Documents of the final training (the first of the same split, so the fit documents and
    /// more); `None`: the fit documents. The search costs a training per candidate and round,
    /// the final training one, so it can afford more of the task.
    pub final_docs: Option<usize>,
    /// Training steps per trained candidate; `None`: one epoch over the fit batches.
    pub candidate_steps: Option<usize>,
    /// Training steps of the final choice; `None`: [`DEFAULT_FINAL_EPOCHS`] epochs.
    pub final_steps: Option<usize>,
    /// Learning rate of the candidates' training.
    pub lr: f64,
    /// Learning rate of the final training.
    pub final_lr: f64,
    /// Sequences per batch.
    pub batch_size: usize,
    /// Longest sequence in tokens (context is cut from the left).
    pub max_seq_len: usize,
    /// Seed of the split, the batch order and the random baseline.
    pub seed: u64,
    /// Train every candidate every round (the paper's loop).
    pub exhaustive: bool,
    /// Candidates trained per round after screening.
    pub shortlist: usize,
    /// The screening signal.
    pub screen: Screen,
    /// Batches the screening (and the attention-cosine importance) is measured on.
    pub screen_batches: usize,
    /// After the first round, screen only this many candidates: those the latest screenings
    /// ranked best (0: every candidate every round).
    pub rescreen: usize,
    /// Whether scalars are trained at all.
    pub train_scales: bool,
    /// What a trained candidate is scored by.
    pub candidate_score: ScoreBy,
    /// Whether the final training also trains per-channel gains of the branch outputs
    /// ([`crate::model::ChannelGains`]; the search trains the four scalars only).
    pub channel_gains: bool,
    /// Whether skipped blocks get linear stand-ins ([`crate::model::LinearAttention`], fitted by
    /// least squares on the final training's documents before the search): the search and the
    /// final training run with each skipped block replaced by its stand-in.
    pub linear_attention: bool,
    /// With linear stand-ins: the final training also trains them, end to end on the objective,
    /// at this learning rate (`None`: they stay at their least-squares fit).
    pub linear_lr: Option<f64>,
    /// With linear stand-ins: the final choice's stand-ins are fitted again one after another
    /// ([`linear::fit_sequential`]), each on the stream the stand-ins before it leave, so each
    /// also corrects what those left wrong (the search still uses the independent fits).
    pub linear_sequential: bool,
    /// Teacher tokens kept per position for the KL objective.
    pub teacher_top_k: usize,
    /// Which positions the loss covers.
    pub loss_tokens: LossTokens,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            method: Method::Hopscotch,
            objective: Objective::Kl,
            skip: 4,
            fit_docs: 16,
            final_docs: None,
            candidate_steps: None,
            final_steps: None,
            lr: 1e-2,
            final_lr: 3e-3,
            batch_size: 8,
            max_seq_len: 256,
            seed: 0,
            exhaustive: false,
            shortlist: 3,
            screen: Screen::SkipLoss,
            screen_batches: 1,
            rescreen: DEFAULT_RESCREEN,
            train_scales: true,
            candidate_score: ScoreBy::MeanTrain,
            channel_gains: false,
            linear_attention: false,
            linear_lr: None,
            linear_sequential: false,
            teacher_top_k: DEFAULT_TEACHER_TOP_K,
            loss_tokens: LossTokens::All,
        }
    }
}

impl FitOptions {
    /// Refuses settings no fit can run with (before any work starts).
    pub fn validate(&self) -> Result<(), SearchError> {
        let bad = |name, value: String, expected: &str| {
            Err(SearchError::Setting {
                name,
                value,
                expected: expected.into(),
            })
        };
        let positive_lr = |lr: f64| lr.is_finite() && lr > 0.0;
        if self.skip == 0 {
            return bad("skip", "0".into(), "at least 1 block");
        }
        if self.fit_docs == 0 {
            return bad("fit-docs", "0".into(), "at least 1 document");
        }
        if let Some(n) = self.final_docs.filter(|&n| n < self.fit_docs) {
            return bad(
                "final-docs",
                n.to_string(),
                &format!("at least --fit-docs ({})", self.fit_docs),
            );
        }
        if self.batch_size == 0 {
            return bad("batch-size", "0".into(), "at least 1 sequence");
        }
        if self.max_seq_len < 2 {
            return bad(
                "max-seq-len",
                self.max_seq_len.to_string(),
                "at least 2 tokens",
            );
        }
        if self.candidate_steps == Some(0) {
            return bad("candidate-steps", "0".into(), "at least 1 step");
        }
        if !positive_lr(self.lr) {
            return bad("lr", self.lr.to_string(), "a positive number");
        }
        if !positive_lr(self.final_lr) {
            return bad("final-lr", self.final_lr.to_string(), "a positive number");
        }
        if let Some(lr) = self.linear_lr {
            if !self.linear_attention {
                return bad(
                    "linear-lr",
                    lr.to_string(),
                    "to come with --linear-attention (it trains the stand-ins)",
                );
            }
            if !positive_lr(lr) {
                return bad("linear-lr", lr.to_string(), "a positive number");
            }
        }
        if self.linear_sequential && !self.linear_attention {
            return bad(
                "linear-sequential",
                "set".into(),
                "to come with --linear-attention (it refits the stand-ins)",
            );
        }
        if self.shortlist == 0 {
            return bad("shortlist", "0".into(), "at least 1 candidate");
        }
        if self.screen_batches == 0 {
            return bad("screen-batches", "0".into(), "at least 1 batch");
        }
        if self.rescreen != 0 && self.rescreen < self.shortlist {
            return bad(
                "rescreen",
                self.rescreen.to_string(),
                &format!(
                    "0 (screen every candidate) or at least --shortlist ({})",
                    self.shortlist
                ),
            );
        }
        if self.teacher_top_k == 0 {
            return bad("teacher-top-k", "0".into(), "at least 1 token");
        }
        Ok(())
    }

    /// Training steps per candidate for `n_batches` batches.
    pub fn resolved_candidate_steps(&self, n_batches: usize) -> usize {
        self.candidate_steps.unwrap_or(n_batches)
    }

    /// Whether anything after the search learns from the final training's documents: the
    /// scalars' training, or the linear stand-ins' least squares (with `--no-scales` too).
    pub fn uses_final_docs(&self) -> bool {
        self.train_scales || self.linear_attention
    }

    /// Documents of the final training: `final_docs`, at least the fit documents.
    pub fn resolved_final_docs(&self) -> usize {
        self.final_docs.unwrap_or(self.fit_docs).max(self.fit_docs)
    }

    /// Final training steps for `n_batches` final batches (0 without scalar training).
    pub fn resolved_final_steps(&self, n_batches: usize) -> usize {
        if !self.train_scales {
            return 0;
        }
        self.final_steps.unwrap_or(DEFAULT_FINAL_EPOCHS * n_batches)
    }

    /// The settings as a plan records them, for `n_batches` fit batches and `n_final_batches`
    /// batches of the final training.
    pub fn settings(&self, n_batches: usize, n_final_batches: usize) -> FitSettings {
        let screened = self.method == Method::Hopscotch && !self.exhaustive;
        FitSettings {
            method: self.method.name().into(),
            objective: self.objective.name().into(),
            skip: self.skip,
            fit_docs: self.fit_docs,
            final_docs: (self.uses_final_docs() && self.resolved_final_docs() > self.fit_docs)
                .then(|| self.resolved_final_docs()),
            candidate_steps: if self.train_scales {
                self.resolved_candidate_steps(n_batches)
            } else {
                0
            },
            final_steps: self.resolved_final_steps(n_final_batches),
            lr: self.lr,
            final_lr: self.final_lr,
            batch_size: self.batch_size,
            max_seq_len: self.max_seq_len,
            seed: self.seed,
            exhaustive: self.exhaustive,
            shortlist: self.shortlist,
            train_scales: self.train_scales,
            channel_gains: self.train_scales && self.channel_gains,
            linear_attention: self.linear_attention,
            linear_lr: self.linear_lr.filter(|_| {
                self.linear_attention && self.resolved_final_steps(n_final_batches) > 0
            }),
            linear_sequential: self.linear_attention && self.linear_sequential,
            // recorded only when it is not the paper's score, so older plans read as before
            candidate_score: (self.train_scales && self.candidate_score != ScoreBy::MeanTrain)
                .then(|| self.candidate_score.name().to_string()),
            screen: screened.then(|| self.screen.name().to_string()),
            screen_batches: self.screen_batches,
            rescreen: if screened { self.rescreen } else { 0 },
            teacher_top_k: self.teacher_top_k,
            // the choice objective scores each choice's continuation: the task's targets
            loss_tokens: if self.objective == Objective::Choice {
                LossTokens::Targets.name().into()
            } else {
                self.loss_tokens.name().into()
            },
        }
    }
}

/// A well-mixed 64-bit function of a seed and a stream number (splitmix64's finalizer), so each
/// round, the final training and the screening subset get their own reproducible seed.
pub fn derive_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The device a fit runs on: the first CUDA GPU when the `cuda` feature is built in and one
/// answers (candle's `cuda_if_available` only checks the feature), else the CPU, with a notice
/// on stderr when a CUDA build finds no GPU.
pub fn fit_device() -> Device {
    if !candle_core::utils::cuda_is_available() {
        return Device::Cpu;
    }
    match Device::new_cuda(0) {
        Ok(device) => device,
        Err(e) => {
            eprintln!("no usable CUDA device ({e}); fitting on the CPU");
            Device::Cpu
        }
    }
}

/// Seed stream of the final training.
const FINAL_STREAM: u64 = u64::MAX;
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
    /// Linear stand-ins (`--linear-attention`): a block that has one is replaced by it where it
    /// is skipped, in the search and in the final training; empty: blocks are skipped outright.
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

/// Runs the search and the training steps, keeping the statistics and the progress bars.
struct Searcher<'a> {
    input: &'a SearchInput<'a>,
    options: &'a FitOptions,
    progress: &'a Progress,
    stats: TrainStats,
    tokens_per_batch: f64,
}

impl<'a> Searcher<'a> {
    fn new(input: &'a SearchInput<'a>, options: &'a FitOptions, progress: &'a Progress) -> Self {
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

    /// Trains `init` (scalars 1, and channel gains 1 when they are trained) for `steps`, with a
    /// step bar.
    #[allow(clippy::too_many_arguments)]
    fn train(
        &mut self,
        batches: &[TrainBatch],
        skip: &[bool],
        init: &ScaleValues,
        steps: usize,
        lr: f64,
        linear_lr: Option<f64>,
        seed: u64,
        label: &str,
    ) -> Result<scales::TrainResult, SearchError> {
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
            linear_lr,
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

    /// A candidate's score and the scalars trained: by `candidate_score`, the mean training loss
    /// over `candidate_steps` from scalars 1 or the loss over all fit batches at the trained
    /// scalars; with training off, the loss over all fit batches at scalars 1.
    fn score(&mut self, skip: &[bool], seed: u64) -> Result<(f32, ScaleValues), SearchError> {
        let ones = self.input.base();
        if !self.options.train_scales {
            let loss = eval_loss(
                self.input.model,
                self.input.batches,
                skip,
                &ones,
                self.options.objective,
            )?;
            return Ok((loss, ones));
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
            None,
            seed,
            "candidate",
        )?;
        let score = match self.options.candidate_score {
            ScoreBy::MeanTrain => result.mean_loss(),
            ScoreBy::Trained => eval_loss(
                self.input.model,
                self.input.batches,
                skip,
                &result.scales,
                self.options.objective,
            )?,
        };
        Ok((score, result.scales))
    }

    /// The greedy rounds, continuing after `done` (rounds of a resumed fit). `on_round` sees
    /// every round list as it grows.
    fn greedy(
        &mut self,
        mut rounds: Vec<Round>,
        on_round: &mut dyn FnMut(&[Round]) -> Result<(), SearchError>,
    ) -> Result<Vec<Round>, SearchError> {
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
        let mut warm = base.clone();
        if options.screen == Screen::WarmSkipLoss && rounds.len() < options.skip {
            if let Some(last) = rounds.len().checked_sub(1) {
                // A resumed fit: the last winner's scalars again, trained as in its round.
                let chosen: Vec<usize> = rounds.iter().map(|r| r.chosen).collect();
                let skip = SkipMask::from_layers(n_layer, &chosen)?;
                let seed = derive_seed(options.seed, last as u64 + 1);
                warm = self.score(skip.as_slice(), seed)?.1;
            }
        }
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
                    options,
                    &base,
                    &warm,
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
            let mut trained_scales = Vec::with_capacity(shortlist.len());
            let mut best: Option<(usize, f32)> = None;
            for &layer in &shortlist {
                let mut skip_layers = chosen.clone();
                skip_layers.push(layer);
                let skip = SkipMask::from_layers(n_layer, &skip_layers)?;
                let (score, scales) = self.score(skip.as_slice(), seed)?;
                trained.push(score);
                trained_scales.push(scales);
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
            warm = trained_scales.swap_remove(w);
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
/// `chosen` already skipped. `base` is every scalar 1 (with the linear stand-ins, if any), `warm`
/// the start of [`Screen::WarmSkipLoss`]; `tick` is called once per candidate.
#[allow(clippy::too_many_arguments)]
pub fn screen_candidates(
    model: &Model,
    batches: &[TrainBatch],
    chosen: &[usize],
    candidates: &[usize],
    options: &FitOptions,
    base: &ScaleValues,
    warm: &ScaleValues,
    tick: &mut dyn FnMut(),
) -> Result<Vec<f32>, SearchError> {
    let n_layer = model.arch().n_layer;
    let ones = base.clone();
    let objective = options.objective;
    let mask = |layer: usize| {
        let mut layers = chosen.to_vec();
        layers.push(layer);
        SkipMask::from_layers(n_layer, &layers)
    };
    let mut out = Vec::with_capacity(candidates.len());
    match options.screen {
        Screen::SkipLoss | Screen::WarmSkipLoss => {
            let start = if options.screen == Screen::WarmSkipLoss {
                warm
            } else {
                &ones
            };
            // Batch by batch: the stream entering each layer with only `chosen` skipped is the
            // same for every candidate up to the candidate's own layer, so it is computed once
            // and each candidate runs only its layer and those after it (half the layers on
            // average). Same operations on the same inputs as `eval_loss`: the same scores.
            scales::check_batches(batches, objective)?;
            let vars = model.scales(start)?;
            let base = SkipMask::from_layers(n_layer, chosen)?;
            let masks = candidates
                .iter()
                .map(|&layer| mask(layer))
                .collect::<Result<Vec<_>, _>>()?;
            let mut totals = vec![0f64; candidates.len()];
            for (index, batch) in batches.iter().enumerate() {
                let residuals =
                    model.residuals_no_grad(&batch.input_ids, &vars, base.as_slice())?;
                let losses = parallel::map(model.device(), candidates.len(), |c| {
                    let layer = candidates[c];
                    let hidden = model.forward_hidden_from_no_grad(
                        &batch.input_ids,
                        &residuals[layer],
                        layer,
                        &vars,
                        masks[c].as_slice(),
                    )?;
                    let loss = scales::hidden_loss(model, batch, index, &hidden, objective)?;
                    Ok::<_, SearchError>(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)
                })?;
                for (total, loss) in totals.iter_mut().zip(losses) {
                    *total += loss;
                }
            }
            for _ in candidates {
                tick();
            }
            out.extend(totals.iter().map(|t| (t / batches.len() as f64) as f32));
        }
        // These train or take gradients: one candidate or batch after another, as a training
        // holds the activations of every layer for its backward pass (a training step runs its
        // own sequences side by side, one per thread).
        Screen::ShortTrain => {
            for &layer in candidates {
                let skip = mask(layer)?;
                let scales = if options.train_scales {
                    scales::train_scales_from(
                        model,
                        batches,
                        skip.as_slice(),
                        objective,
                        SHORT_TRAIN_STEPS,
                        options.lr,
                        options.seed,
                        &ones,
                        None,
                        &mut |_| {},
                    )?
                    .scales
                } else {
                    ones.clone()
                };
                out.push(eval_loss(
                    model,
                    batches,
                    skip.as_slice(),
                    &scales,
                    objective,
                )?);
                tick();
            }
        }
        Screen::Gradient => {
            let skip = SkipMask::from_layers(n_layer, chosen)?;
            let vars = model.scales(&ones)?;
            let mut grad = vec![0f64; n_layer];
            let b_att = [vars.b_att.clone()];
            for (index, batch) in batches.iter().enumerate() {
                let (_, grads) = scales::part_gradients(
                    model,
                    &batch.parts(objective)?,
                    index,
                    &vars,
                    skip.as_slice(),
                    objective,
                    &b_att,
                )?;
                if let Some(g) = grads.get(vars.b_att.as_tensor()) {
                    for (acc, v) in grad
                        .iter_mut()
                        .zip(g.to_dtype(DType::F64)?.to_vec1::<f64>()?)
                    {
                        *acc += v / batches.len() as f64;
                    }
                }
            }
            for &layer in candidates {
                out.push(-(grad[layer] as f32));
                tick();
            }
        }
    }
    Ok(out)
}

/// LLM-Drop's attention importance per layer (He et al. 2024, "What Matters in Transformers?
/// Not All Attention is Needed"): `1 - mean cos(X, X + Attn(Norm(X)))` over the real tokens, `X`
/// the residual entering the layer with nothing skipped; one forward pass per batch
/// ([`Model::attention_residuals_no_grad`]).
pub fn attn_importance(
    input: &SearchInput<'_>,
    batches: &[usize],
) -> Result<Vec<f32>, SearchError> {
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
        let rows = |h: Tensor| -> Result<Tensor, SearchError> {
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
    options: &FitOptions,
    done: Vec<Round>,
    on_round: &mut dyn FnMut(&[Round]) -> Result<(), SearchError>,
    progress: &Progress,
) -> Result<(Choice, TrainStats), SearchError> {
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

/// Trains the scalars of the final choice (`final_steps` at `final_lr`) and measures the loss
/// before and after over all fit batches.
pub fn train_final(
    input: &SearchInput<'_>,
    options: &FitOptions,
    skipped: &[usize],
    progress: &Progress,
) -> Result<(Final, TrainStats), SearchError> {
    let model = input.model;
    let n_layer = model.arch().n_layer;
    let skip = SkipMask::from_layers(n_layer, skipped)?;
    // the chosen blocks' stand-ins, in the order the blocks were chosen
    let mut ones = ScaleValues::ones(n_layer);
    ones.linear = if options.linear_attention && options.linear_sequential && !skipped.is_empty() {
        let started = Instant::now();
        let fitted = linear::fit_sequential(model, input.batches, input.lengths, skipped)?;
        progress.note(&format!(
            "stand-ins of blocks {skipped:?} fitted again one after another in {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        fitted
    } else if options.linear_attention && input.stand_ins.is_empty() && !skipped.is_empty() {
        linear::fit(model, input.batches, input.lengths, skipped)?
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
    let init = if options.channel_gains {
        ScaleValues {
            linear: ones.linear.clone(),
            ..ScaleValues::ones_with_gains(n_layer, model.arch().n_embd)
        }
    } else {
        ones.clone()
    };
    let (scales, loss_history) = if steps > 0 {
        let r = searcher.train(
            input.batches,
            skip.as_slice(),
            &init,
            steps,
            options.final_lr,
            options.linear_lr.filter(|_| !init.linear.is_empty()),
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

/// A `hopscotch fit` run: what to fit, on what, and where the plan goes.
#[derive(Debug, Clone)]
pub struct FitRequest {
    /// A Hugging Face folder or GGUF file.
    pub model: PathBuf,
    /// The task file.
    pub task: PathBuf,
    /// Where the plan is written.
    pub output: PathBuf,
    /// Overwrite an existing plan.
    pub force: bool,
    /// Continue from `<output>.partial.json` when it exists.
    pub resume: bool,
    /// The settings.
    pub options: FitOptions,
}

/// Where a fit keeps its rounds while it runs: `<output>.partial.json`.
pub fn partial_path(output: &Path) -> PathBuf {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(".partial.json");
    output.with_file_name(name)
}

/// Seconds per phase of a fit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Timings {
    /// Opening the model and task, building the batches and the teacher.
    pub prepare: f64,
    /// Choosing the blocks.
    pub search: f64,
    /// The final training.
    pub final_training: f64,
    /// Everything.
    pub total: f64,
}

/// One round of the summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundSummary {
    /// 1-based round.
    pub round: usize,
    /// The layer skipped.
    pub chosen: usize,
    /// Its score.
    pub loss: f32,
    /// The second-best trained candidate and its score.
    pub runner_up: Option<(usize, f32)>,
    /// Candidates trained this round.
    pub trained: usize,
}

/// What `hopscotch fit` prints: the outcome, the data and the cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FitReport {
    /// The plan written.
    pub plan: PathBuf,
    /// The method.
    pub method: Method,
    /// `kl` or `ce`.
    pub objective: String,
    /// The blocks skipped, in the order chosen.
    pub skipped_blocks: Vec<usize>,
    /// The greedy rounds.
    pub rounds: Vec<RoundSummary>,
    /// Rounds taken over from a partial plan.
    pub resumed_rounds: usize,
    /// Loss of the final choice with every scalar at 1.
    pub final_loss_untrained: f32,
    /// Loss of the final choice with the trained scalars.
    pub final_loss: f32,
    /// Documents fitted on.
    pub fit_docs: usize,
    /// Batches per epoch.
    pub batches: usize,
    /// Real tokens in the fit data.
    pub fit_tokens: usize,
    /// Target positions in the fit data.
    pub fit_targets: usize,
    /// Whether the targets were generated by the original model.
    pub generated_targets: bool,
    /// Training throughput over the search and the final training.
    pub train: TrainStats,
    /// Training tokens per second.
    pub train_tokens_per_s: f64,
    /// Seconds per phase.
    pub seconds: Timings,
}

impl fmt::Display for FitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "method {}, objective {}, {} docs ({} tokens, {} targets, {} batches){}",
            self.method.name(),
            self.objective,
            self.fit_docs,
            self.fit_tokens,
            self.fit_targets,
            self.batches,
            if self.generated_targets {
                ", targets generated by the model"
            } else {
                ""
            }
        )?;
        if !self.rounds.is_empty() {
            writeln!(f, "round  skip  loss      trained  runner-up")?;
            for r in &self.rounds {
                let runner = r
                    .runner_up
                    .map(|(l, s)| format!("{l:>4}  {s:.4}"))
                    .unwrap_or_else(|| "-".into());
                writeln!(
                    f,
                    "{:>5}  {:>4}  {:<8.4}  {:>7}  {runner}",
                    r.round, r.chosen, r.loss, r.trained
                )?;
            }
        }
        writeln!(f, "skipped blocks   {:?}", self.skipped_blocks)?;
        writeln!(
            f,
            "final loss       {:.4} (scalars at 1: {:.4})",
            self.final_loss, self.final_loss_untrained
        )?;
        writeln!(
            f,
            "training         {} steps, {:.0} tokens/s",
            self.train.steps, self.train_tokens_per_s
        )?;
        if self.train.screened > 0 {
            writeln!(
                f,
                "screening        {} candidates in {:.1}s",
                self.train.screened, self.train.screen_seconds
            )?;
        }
        writeln!(
            f,
            "time             {:.1}s (prepare {:.1}s, search {:.1}s, final {:.1}s){}",
            self.seconds.total,
            self.seconds.prepare,
            self.seconds.search,
            self.seconds.final_training,
            if self.resumed_rounds > 0 {
                format!(", {} rounds resumed", self.resumed_rounds)
            } else {
                String::new()
            }
        )?;
        write!(f, "plan             {}", self.plan.display())
    }
}

/// A model opened for fitting: the checkpoint, its fingerprint, the candle model (on the GPU when
/// there is one) and the final norm's weight. Opened once, it serves any number of tasks and
/// fits (`hopscotch sweep` fits many configurations on one model).
pub struct FitModel {
    /// The checkpoint.
    pub ck: Checkpoint,
    /// Its fingerprint, recorded in every plan.
    pub fingerprint: ModelFingerprint,
    /// The candle model.
    pub model: Model,
}

impl FitModel {
    /// Loads `ck`, whose tensors the caller has validated and whose `fingerprint`
    /// ([`ModelFingerprint::of`]) it has taken.
    pub fn load(ck: Checkpoint, fingerprint: ModelFingerprint) -> Result<Self, SearchError> {
        let device = fit_device();
        let model = Model::load(&ck, &device).map_err(|error| SearchError::LoadModel {
            path: ck.display_path(),
            error,
        })?;
        Ok(Self {
            ck,
            fingerprint,
            model,
        })
    }
}

/// One task's fit data for a model and a set of options, and the task as plans record it.
pub struct FitTask {
    /// The task file, its hash and format.
    pub task: TaskRef,
    /// The batches (with the teacher under KL) and the fit documents.
    pub data: data::FitData,
    /// The final training's data when scalars are trained on more documents than the fit
    /// (`--final-docs`).
    pub final_data: Option<data::FitData>,
    /// With `--linear-attention`, a linear stand-in for every block that can be skipped (layers
    /// 1 and up), fitted on the final training's documents.
    pub stand_ins: Vec<LinearAttention>,
}

impl FitTask {
    /// Builds the fit data of `task_data` (read from `path`) for `model` with `options`' split,
    /// batching and objective, and the final training's when it takes more documents.
    pub fn build(
        model: &FitModel,
        path: &Path,
        task_data: &task::TaskData,
        options: &FitOptions,
        progress: &Progress,
    ) -> Result<Self, SearchError> {
        let build = |n_docs| {
            data::build(
                &model.ck,
                &model.model,
                task_data,
                &model.fingerprint.tensor_sha256,
                options,
                n_docs,
                progress,
            )
        };
        let data = build(options.fit_docs)?;
        let final_docs = options.resolved_final_docs();
        let final_data = if options.uses_final_docs() && final_docs > options.fit_docs {
            Some(build(final_docs)?)
        } else {
            None
        };
        let stand_ins = if options.linear_attention {
            let started = Instant::now();
            let fitted = final_data.as_ref().unwrap_or(&data);
            let layers: Vec<usize> = (1..model.ck.arch.n_layer).collect();
            let stand_ins = linear::fit(&model.model, &fitted.batches, &fitted.lengths, &layers)?;
            progress.note(&format!(
                "linear stand-ins for layers 1-{} fitted by least squares on {} documents in {:.1} s",
                layers.len(),
                fitted.fit_doc_ids.len(),
                started.elapsed().as_secs_f64()
            ));
            stand_ins
        } else {
            Vec::new()
        };
        Ok(Self {
            task: TaskRef {
                path: path.display().to_string(),
                sha256: task_data.sha256.clone(),
                format: task_data.format.to_string(),
            },
            data,
            final_data,
            stand_ins,
        })
    }

    /// What a search on this data runs on.
    pub fn input<'a>(&'a self, model: &'a FitModel) -> SearchInput<'a> {
        self.input_of(&self.data, model)
    }

    /// What the final training runs on: the final data, or the fit data.
    pub fn final_input<'a>(&'a self, model: &'a FitModel) -> SearchInput<'a> {
        self.input_of(self.final_data.as_ref().unwrap_or(&self.data), model)
    }

    fn input_of<'a>(&'a self, data: &'a data::FitData, model: &'a FitModel) -> SearchInput<'a> {
        SearchInput {
            model: &model.model,
            batches: &data.batches,
            lengths: &data.lengths,
            stand_ins: &self.stand_ins,
        }
    }

    /// The documents only the final training uses, in file order.
    pub fn final_only_doc_ids(&self) -> Vec<String> {
        self.final_data.as_ref().map_or_else(Vec::new, |f| {
            task::ids_besides(&f.fit_doc_ids, &self.data.fit_doc_ids)
        })
    }

    /// A plan of this model, task and `options` with nothing chosen yet: no block skipped, every
    /// scalar 1, no rounds.
    pub fn empty_plan(&self, model: &FitModel, options: &FitOptions) -> Plan {
        let n_final_batches = self.final_data.as_ref().unwrap_or(&self.data).batches.len();
        Plan {
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            model: model.fingerprint.clone(),
            task: self.task.clone(),
            fit_doc_ids: self.data.fit_doc_ids.clone(),
            final_doc_ids: if options.train_scales {
                self.final_only_doc_ids()
            } else {
                Vec::new()
            },
            skipped_blocks: Vec::new(),
            scales: ScaleValues::ones(model.ck.arch.n_layer),
            rounds: Vec::new(),
            final_loss_history: Vec::new(),
            final_loss: None,
            final_loss_untrained: None,
            attn_importance: None,
            settings: options.settings(self.data.batches.len(), n_final_batches),
        }
    }
}

/// Chooses up to `options.skip` blocks by `options.method`, in the order chosen; returns the
/// choice and how many of its rounds were taken over from `rounds_file`. With a `rounds_file`,
/// the greedy search keeps its rounds there (a plan with no final training) after every round,
/// and one left by an interrupted or shorter search of the same model, task, documents and
/// settings (`skip` aside) is continued; one with more rounds gives its first `skip`. The first
/// `k` blocks of the greedy order are what a search for `k` blocks chooses, as are the
/// baselines' (a seeded shuffle, an importance ranking), so one search serves every smaller `k`.
pub fn search_order(
    model: &FitModel,
    task: &FitTask,
    options: &FitOptions,
    rounds_file: Option<&Path>,
    progress: &Progress,
) -> Result<(Choice, usize), SearchError> {
    let template = task.empty_plan(model, options);
    let mut done = Vec::new();
    if let Some(file) = rounds_file.filter(|f| options.method == Method::Hopscotch && f.is_file()) {
        done = resumed_rounds(&template, file, true)?;
    }
    let resumed = done.len();
    let mut save = |rounds: &[Round]| -> Result<(), SearchError> {
        let Some(file) = rounds_file else {
            return Ok(());
        };
        let mut p = template.clone();
        p.rounds = rounds.to_vec();
        p.skipped_blocks = rounds.iter().map(|r| r.chosen).collect();
        p.save(file, true)?;
        Ok(())
    };
    let (choice, _) = choose(&task.input(model), options, done, &mut save, progress)?;
    Ok((choice, resumed))
}

/// Trains the final scalars of `choice` (its blocks, rounds and importance kept) with `options`
/// and writes the plan to `output` (replacing one only with `force`), whole or not at all.
pub fn write_plan(
    model: &FitModel,
    task: &FitTask,
    options: &FitOptions,
    choice: &Choice,
    output: &Path,
    force: bool,
    progress: &Progress,
) -> Result<(Plan, Final, TrainStats), SearchError> {
    let (last, stats) = train_final(&task.final_input(model), options, &choice.skipped, progress)?;
    let mut plan = task.empty_plan(model, options);
    plan.skipped_blocks = choice.skipped.clone();
    plan.rounds = choice.rounds.clone();
    plan.attn_importance = choice.attn_importance.clone();
    plan.scales = last.scales.clone();
    plan.final_loss_history = last.loss_history.clone();
    plan.final_loss = Some(last.loss);
    plan.final_loss_untrained = Some(last.loss_untrained);
    plan.validate().map_err(|message| PlanError::Invalid {
        path: output.display().to_string(),
        message,
    })?;
    plan.save(output, force)?;
    Ok((plan, last, stats))
}

/// Runs `hopscotch fit`: checks the settings, opens the model and task, builds the fit data,
/// chooses the blocks (saving `<output>.partial.json` after every round), trains the final
/// scalars and writes the plan whole. Nothing is written at `output` unless everything succeeds.
pub fn fit(request: &FitRequest, progress: &Progress) -> Result<FitReport, SearchError> {
    let started = Instant::now();
    let options = &request.options;
    options.validate()?;
    check_overwrite(&request.output, request.force)?;
    let ck = Checkpoint::open(&request.model)?;
    let n_layer = ck.arch.n_layer;
    if options.skip >= n_layer {
        return Err(SearchError::TooManyBlocks {
            model: ck.display_path(),
            skip: options.skip,
            n_layer,
        });
    }
    ck.validate_tensors()?;
    let task_data = task::load(&request.task)?;
    let fingerprint = ModelFingerprint::of(&ck);
    let model = FitModel::load(ck, fingerprint)?;
    let fit_task = FitTask::build(&model, &request.task, &task_data, options, progress)?;
    let data = &fit_task.data;
    let input = fit_task.input(&model);
    let plan = fit_task.empty_plan(&model, options);
    let partial = partial_path(&request.output);
    let done = if request.resume && options.method == Method::Hopscotch && partial.is_file() {
        resumed_rounds(&plan, &partial, false)?
    } else {
        Vec::new()
    };
    let resumed = done.len();
    let prepared = started.elapsed().as_secs_f64();

    let mut save_partial = |rounds: &[Round]| -> Result<(), SearchError> {
        let mut p = plan.clone();
        p.rounds = rounds.to_vec();
        p.skipped_blocks = rounds.iter().map(|r| r.chosen).collect();
        p.save(&partial, true)?;
        Ok(())
    };
    let (choice, search_stats) = choose(&input, options, done, &mut save_partial, progress)?;
    let searched = started.elapsed().as_secs_f64();
    let (plan, last, final_stats) = write_plan(
        &model,
        &fit_task,
        options,
        &choice,
        &request.output,
        request.force,
        progress,
    )?;
    let finished = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&partial);

    let train = TrainStats {
        steps: search_stats.steps + final_stats.steps,
        tokens: search_stats.tokens + final_stats.tokens,
        seconds: search_stats.seconds + final_stats.seconds,
        screened: search_stats.screened,
        screen_seconds: search_stats.screen_seconds,
    };
    Ok(FitReport {
        plan: request.output.clone(),
        method: options.method,
        objective: plan.settings.objective.clone(),
        skipped_blocks: choice.skipped,
        rounds: choice
            .rounds
            .iter()
            .enumerate()
            .map(|(i, r)| RoundSummary {
                round: i + 1,
                chosen: r.chosen,
                loss: r.loss,
                runner_up: runner_up(r),
                trained: r
                    .candidates
                    .iter()
                    .filter(|c| c.trained_loss.is_some())
                    .count(),
            })
            .collect(),
        resumed_rounds: resumed,
        final_loss_untrained: last.loss_untrained,
        final_loss: last.loss,
        fit_docs: data.fit_doc_ids.len(),
        batches: data.batches.len(),
        fit_tokens: data.n_tokens(),
        fit_targets: data.n_targets(),
        generated_targets: data.generated_targets,
        train_tokens_per_s: train.tokens_per_s(),
        train,
        seconds: Timings {
            prepare: prepared,
            search: searched - prepared,
            final_training: finished - searched,
            total: started.elapsed().as_secs_f64(),
        },
    })
}

/// The rounds of a partial plan, if it was made by the same model, task, documents and settings
/// as `plan` (those of the final training aside). With `any_skip`, a plan of another `skip` is
/// taken too, its rounds cut to `plan`'s.
fn resumed_rounds(plan: &Plan, partial: &Path, any_skip: bool) -> Result<Vec<Round>, SearchError> {
    let old = Plan::load(partial)?;
    let mismatch = |what| SearchError::ResumeMismatch {
        path: partial.to_path_buf(),
        what,
    };
    if old.model != plan.model {
        return Err(mismatch("the model"));
    }
    if old.task.sha256 != plan.task.sha256 {
        return Err(mismatch("the task file"));
    }
    if old.fit_doc_ids != plan.fit_doc_ids {
        return Err(mismatch("the fit documents"));
    }
    let skip = if any_skip {
        plan.settings.skip
    } else {
        old.settings.skip
    };
    // The rounds do not depend on the final training: a search can be resumed to train its
    // choice longer or on more documents.
    if (FitSettings {
        skip,
        final_docs: plan.settings.final_docs,
        final_steps: plan.settings.final_steps,
        final_lr: plan.settings.final_lr,
        channel_gains: plan.settings.channel_gains,
        linear_lr: plan.settings.linear_lr,
        linear_sequential: plan.settings.linear_sequential,
        ..old.settings
    }) != plan.settings
    {
        return Err(mismatch("the settings"));
    }
    let mut rounds = old.rounds;
    if rounds.len() > plan.settings.skip {
        if !any_skip {
            return Err(mismatch("the number of rounds"));
        }
        rounds.truncate(plan.settings.skip);
    }
    Ok(rounds)
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;
    use crate::arch::Arch;
    use crate::model::tests::{random_source, tiny_arch};

    /// A 5-layer random model whose layer `dead` has a zero attention output projection (its
    /// attention block adds nothing), batches of random tokens with their teacher, the final
    /// norm's weight.
    fn dead_block_setup(dead: usize) -> (Model, Vec<TrainBatch>, Vec<Vec<usize>>, Vec<f32>) {
        layered_setup(5, dead)
    }

    /// [`dead_block_setup`] with `n_layer` layers.
    fn layered_setup(
        n_layer: usize,
        dead: usize,
    ) -> (Model, Vec<TrainBatch>, Vec<Vec<usize>>, Vec<f32>) {
        let arch = Arch {
            n_layer,
            ..tiny_arch()
        };
        let mut source = random_source(&arch, 31);
        if let Some((_, w)) = source
            .tensors
            .get_mut(&format!("blk.{dead}.attn_output.weight"))
        {
            w.iter_mut().for_each(|x| *x = 0.0);
        }
        let model = Model::load(&source, &Device::Cpu).unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        let mut batches = Vec::new();
        let mut lengths = Vec::new();
        for _ in 0..3 {
            let lens: Vec<usize> = (0..4).map(|_| rng.gen_range(6..12)).collect();
            let seqs: Vec<Vec<u32>> = lens
                .iter()
                .map(|&n| {
                    (0..n)
                        .map(|_| rng.gen_range(0..arch.vocab_size as u32))
                        .collect()
                })
                .collect();
            let masks: Vec<Vec<bool>> = lens
                .iter()
                .map(|&n| (0..n).map(|j| j >= 2).collect())
                .collect();
            let b = TrainBatch::from_sequences(&seqs, &masks, 0, &Device::Cpu)
                .unwrap()
                .with_teacher(&model, 16)
                .unwrap();
            batches.push(b);
            lengths.push(lens);
        }
        let norm = source.tensors["output_norm.weight"].1.clone();
        (model, batches, lengths, norm)
    }

    /// The search input of a test's model and batches, without stand-ins.
    fn search_input<'a>(
        model: &'a Model,
        batches: &'a [TrainBatch],
        lengths: &'a [Vec<usize>],
    ) -> SearchInput<'a> {
        SearchInput {
            model,
            batches,
            lengths,
            stand_ins: &[],
        }
    }

    fn options(skip: usize) -> FitOptions {
        FitOptions {
            skip,
            shortlist: 2,
            teacher_top_k: 16,
            ..FitOptions::default()
        }
    }

    #[test]
    fn cached_skip_loss_screening_equals_the_full_forward_loss() {
        let (model, batches, _, _) = dead_block_setup(3);
        let n_layer = model.arch().n_layer;
        let chosen = [2];
        let candidates = [1, 3, 4];
        let mut warm = ScaleValues::ones(n_layer);
        warm.b_att[4] = 0.8;
        warm.s_mlp[1] = 1.1;
        for (screen, start) in [
            (Screen::SkipLoss, ScaleValues::ones(n_layer)),
            (Screen::WarmSkipLoss, warm.clone()),
        ] {
            let o = FitOptions {
                screen,
                ..options(2)
            };
            let scores = screen_candidates(
                &model,
                &batches,
                &chosen,
                &candidates,
                &o,
                &ScaleValues::ones(n_layer),
                &warm,
                &mut || {},
            )
            .unwrap();
            for (&layer, &score) in candidates.iter().zip(&scores) {
                let skip = SkipMask::from_layers(n_layer, &[2, layer]).unwrap();
                let full =
                    eval_loss(&model, &batches, skip.as_slice(), &start, Objective::Kl).unwrap();
                assert_eq!(score, full, "{screen:?}, candidate {layer}");
            }
        }
    }

    #[test]
    fn the_search_skips_a_block_that_adds_nothing_first() {
        let (model, batches, lengths, _) = dead_block_setup(3);
        let input = search_input(&model, &batches, &lengths);
        for exhaustive in [true, false] {
            for screen in [Screen::SkipLoss, Screen::WarmSkipLoss, Screen::ShortTrain] {
                let o = FitOptions {
                    exhaustive,
                    screen,
                    ..options(2)
                };
                let (choice, stats) =
                    choose(&input, &o, Vec::new(), &mut |_| Ok(()), &Progress::hidden()).unwrap();
                assert_eq!(choice.skipped[0], 3, "exhaustive {exhaustive}, {screen:?}");
                assert_eq!(choice.rounds.len(), 2);
                let r0 = &choice.rounds[0];
                assert!(
                    r0.loss.abs() < 1e-3,
                    "KL after skipping a dead block: {}",
                    r0.loss
                );
                assert!(r0.candidates.iter().all(|c| c.layer != 0));
                let trained = r0
                    .candidates
                    .iter()
                    .filter(|c| c.trained_loss.is_some())
                    .count();
                assert_eq!(trained, if exhaustive { 4 } else { 2 });
                assert!(stats.steps > 0);
            }
        }
        let cos = FitOptions {
            method: Method::AttnCosine,
            screen_batches: 3,
            ..options(1)
        };
        let (choice, _) = choose(
            &input,
            &cos,
            Vec::new(),
            &mut |_| Ok(()),
            &Progress::hidden(),
        )
        .unwrap();
        assert_eq!(choice.skipped, vec![3]);
        let importance = choice.attn_importance.unwrap();
        assert!(importance[3].abs() < 1e-6, "{importance:?}");
        assert!(
            importance
                .iter()
                .enumerate()
                .all(|(l, &v)| l == 3 || v > 1e-4),
            "{importance:?}"
        );
    }

    /// LLM-Drop's importance as the model's normed output shows it: every layer from `l` on made
    /// the identity but for `l`'s attention, the final norm's weight divided out (two full
    /// passes per layer), the way it was computed before the model exposed its residuals.
    fn importance_through_the_final_norm(input: &SearchInput<'_>, norm: &[f32]) -> Vec<f64> {
        let model = input.model;
        let (n_layer, d) = (model.arch().n_layer, model.arch().n_embd);
        let inv_w: Vec<f32> = norm.iter().map(|&w| 1.0 / w).collect();
        let inv_w = Tensor::from_vec(inv_w, d, &Device::Cpu).unwrap();
        let mut sums = vec![0f64; n_layer];
        let mut count = 0;
        for (batch, lengths) in input.batches.iter().zip(input.lengths) {
            let t = batch.input_ids.dims2().unwrap().1;
            let real: Vec<u32> = lengths
                .iter()
                .enumerate()
                .flat_map(|(row, &len)| (0..len).map(move |j| (row * t + j) as u32))
                .collect();
            let real = Tensor::new(real.as_slice(), &Device::Cpu).unwrap();
            let residual = |layer: usize, with_attention: bool| {
                let mut values = ScaleValues::ones(n_layer);
                values.b_mlp[layer..].fill(0.0);
                let mut skip = vec![false; n_layer];
                skip[layer..].fill(true);
                skip[layer] = !with_attention;
                let scales = model.scales(&values).unwrap();
                let h = model
                    .forward_hidden_no_grad(&batch.input_ids, &scales, &skip)
                    .unwrap();
                let h = h.reshape(((), d)).unwrap().index_select(&real, 0).unwrap();
                let h = h.broadcast_mul(&inv_w).unwrap();
                h.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
            };
            for (layer, sum) in sums.iter_mut().enumerate() {
                let (x, y) = (residual(layer, false), residual(layer, true));
                for (a, b) in x.iter().zip(&y) {
                    let dot: f64 = a.iter().zip(b).map(|(p, q)| p * q).sum();
                    let na: f64 = a.iter().map(|p| p * p).sum();
                    let nb: f64 = b.iter().map(|q| q * q).sum();
                    *sum += dot / (na * nb).sqrt();
                }
            }
            count += lengths.iter().sum::<usize>();
        }
        sums.iter().map(|s| 1.0 - s / count as f64).collect()
    }

    #[test]
    fn attention_importance_in_one_pass_equals_the_definition_through_the_final_norm() {
        let (model, batches, lengths, norm) = layered_setup(6, 4);
        let input = search_input(&model, &batches, &lengths);
        let all: Vec<usize> = (0..batches.len()).collect();
        let ours = attn_importance(&input, &all).unwrap();
        let reference = importance_through_the_final_norm(&input, &norm);
        assert_eq!(ours.len(), reference.len());
        for (l, (&a, &b)) in ours.iter().zip(&reference).enumerate() {
            assert!(
                (f64::from(a) - b).abs() < 1e-6,
                "layer {l}: {a} against {b}"
            );
        }
        // the layers differ, so the comparison says something
        assert!(ours.iter().any(|&v| v > 1e-3), "{ours:?}");
    }

    #[test]
    fn rescreening_screens_the_best_of_the_latest_screening_only() {
        let (model, batches, lengths, _) = layered_setup(8, 5);
        let input = search_input(&model, &batches, &lengths);
        let hidden = Progress::hidden();
        let run = |rescreen| {
            let o = FitOptions {
                rescreen,
                ..options(3)
            };
            choose(&input, &o, Vec::new(), &mut |_| Ok(()), &hidden).unwrap()
        };
        let (all, all_stats) = run(0);
        let (re, re_stats) = run(3);
        assert_eq!(all_stats.screened, 7 + 6 + 5);
        assert_eq!(re_stats.screened, 7 + 3 + 3);
        let screened = |r: &Round| -> Vec<(usize, f32)> {
            r.candidates
                .iter()
                .filter_map(|c| c.screen.map(|s| (c.layer, s)))
                .collect()
        };
        assert_eq!(screened(&re.rounds[0]).len(), 7);
        for round in 1..3 {
            let now = screened(&re.rounds[round]);
            assert_eq!(now.len(), 3, "round {}", round + 1);
            // The three are the best of the previous round's screening, the winners aside,
            // topped up by the best of the round before.
            let chosen = &re.skipped[..round];
            let mut best: Vec<usize> = Vec::new();
            for earlier in (0..round).rev() {
                let mut before = screened(&re.rounds[earlier]);
                before.retain(|(l, _)| !chosen.contains(l) && !best.contains(l));
                before.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
                best.extend(before.iter().map(|&(l, _)| l).take(3 - best.len()));
            }
            best.sort_unstable();
            let layers: Vec<usize> = now.iter().map(|&(l, _)| l).collect();
            assert_eq!(layers, best, "round {}", round + 1);
            // While both searches have chosen alike, a rescreened candidate scores as in the
            // search that screens every candidate.
            if re.skipped[..round] == all.skipped[..round] {
                let full = screened(&all.rounds[round]);
                for (layer, score) in now {
                    assert!(
                        full.contains(&(layer, score)),
                        "round {}, layer {layer}",
                        round + 1
                    );
                }
            }
        }
        assert_eq!(re.skipped[0], all.skipped[0]);
        let refused = FitOptions {
            rescreen: 1,
            ..options(3)
        };
        assert!(refused.validate().is_err());
    }

    #[test]
    fn a_resumed_search_ends_where_the_whole_one_does() {
        let (model, batches, lengths, _) = dead_block_setup(3);
        let input = search_input(&model, &batches, &lengths);
        for screen in [Screen::SkipLoss, Screen::WarmSkipLoss] {
            let o = FitOptions {
                screen,
                shortlist: 1,
                ..options(3)
            };
            let hidden = Progress::hidden();
            let mut saved = Vec::new();
            let (whole, _) = choose(
                &input,
                &o,
                Vec::new(),
                &mut |r| {
                    saved.push(r.to_vec());
                    Ok(())
                },
                &hidden,
            )
            .unwrap();
            assert_eq!(saved.len(), 3);
            let (resumed, _) =
                choose(&input, &o, saved[0].clone(), &mut |_| Ok(()), &hidden).unwrap();
            assert_eq!(whole, resumed, "{screen:?}");
        }
    }

    #[test]
    fn gradient_screening_estimates_the_skip_loss_change() {
        // Away from the original model (one block already skipped) the first-order estimate of
        // removing a block ranks the dead block as harmless.
        let (model, batches, _, _) = dead_block_setup(2);
        let o = FitOptions {
            screen: Screen::Gradient,
            objective: Objective::Ce,
            ..options(2)
        };
        let ones = ScaleValues::ones(5);
        let g = screen_candidates(
            &model,
            &batches,
            &[4],
            &[1, 2, 3],
            &o,
            &ones,
            &ones,
            &mut || {},
        )
        .unwrap();
        assert_eq!(
            g[1], 0.0,
            "a block with zero output has zero gradient: {g:?}"
        );
        assert!(g[0] != 0.0 && g[2] != 0.0, "{g:?}");
    }

    #[test]
    fn random_and_untrained_fits_are_seeded_and_keep_layer_0() {
        let (model, batches, lengths, _) = dead_block_setup(3);
        let input = search_input(&model, &batches, &lengths);
        let random = FitOptions {
            method: Method::Random,
            seed: 9,
            ..options(4)
        };
        let (a, _) = choose(
            &input,
            &random,
            Vec::new(),
            &mut |_| Ok(()),
            &Progress::hidden(),
        )
        .unwrap();
        let (b, _) = choose(
            &input,
            &random,
            Vec::new(),
            &mut |_| Ok(()),
            &Progress::hidden(),
        )
        .unwrap();
        assert_eq!(a, b);
        let mut sorted = a.skipped.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![1, 2, 3, 4]);
        let untrained = FitOptions {
            train_scales: false,
            ..options(1)
        };
        let (choice, stats) = choose(
            &input,
            &untrained,
            Vec::new(),
            &mut |_| Ok(()),
            &Progress::hidden(),
        )
        .unwrap();
        assert_eq!(choice.skipped, vec![3]);
        assert_eq!(stats.steps, 0);
        let (last, _) =
            train_final(&input, &untrained, &choice.skipped, &Progress::hidden()).unwrap();
        assert_eq!(last.scales, ScaleValues::ones(5));
        assert!(last.loss_history.is_empty());
    }

    #[test]
    fn the_final_training_trains_channel_gains_when_asked_and_lowers_the_loss_further() {
        let (model, batches, lengths, _) = dead_block_setup(3);
        let input = search_input(&model, &batches, &lengths);
        let (n_layer, n_embd) = (model.arch().n_layer, model.arch().n_embd);
        let scalars = FitOptions {
            final_steps: Some(24),
            final_lr: 1e-2,
            ..options(2)
        };
        let gains = FitOptions {
            channel_gains: true,
            ..scalars.clone()
        };
        let skipped = [1, 3];
        let (a, _) = train_final(&input, &scalars, &skipped, &Progress::hidden()).unwrap();
        let (b, _) = train_final(&input, &gains, &skipped, &Progress::hidden()).unwrap();
        assert!(a.scales.gains.is_none());
        let g = b.scales.gains.as_ref().expect("gains trained");
        g.check_shape(n_layer, n_embd).unwrap();
        assert_eq!(a.loss_untrained, b.loss_untrained);
        assert!(b.loss < a.loss, "{} !< {}", b.loss, a.loss);
        // the kept blocks' gains moved, the skipped blocks' attention gains never reach the loss
        assert!(g.att[2].iter().any(|&x| (x - 1.0).abs() > 1e-3));
        assert!(g.mlp[1].iter().any(|&x| (x - 1.0).abs() > 1e-3));
        assert!(g.att[1].iter().chain(&g.att[3]).all(|&x| x == 1.0));
        // the plan records the setting; an untrained fit records none
        assert!(gains.settings(2, 2).channel_gains);
        let none = FitOptions {
            train_scales: false,
            ..gains
        };
        assert!(!none.settings(2, 2).channel_gains);
    }

    #[test]
    fn the_screen_replaces_each_candidate_by_its_stand_in() {
        let (model, batches, lengths, _) = dead_block_setup(3);
        let layers = [1, 2, 3, 4];
        let stand_ins = linear::fit(&model, &batches, &lengths, &layers).unwrap();
        // the dead block adds nothing, so its stand-in is zero
        assert!(stand_ins[2].weight.iter().all(|&x| x == 0.0));
        assert!(stand_ins[0].weight.iter().any(|&x| x != 0.0));
        let ones = ScaleValues::ones(5);
        let base = ScaleValues {
            linear: stand_ins,
            ..ones.clone()
        };
        let o = options(2);
        let screen = |start: &ScaleValues| {
            screen_candidates(&model, &batches, &[], &layers, &o, start, start, &mut || {}).unwrap()
        };
        let (with, without) = (screen(&base), screen(&ones));
        for (i, &l) in layers.iter().enumerate() {
            let skip = SkipMask::from_layers(5, &[l]).unwrap();
            let full = eval_loss(&model, &batches, skip.as_slice(), &base, o.objective).unwrap();
            assert!(
                (with[i] - full).abs() <= 1e-5,
                "layer {l}: {} != {full}",
                with[i]
            );
        }
        assert_eq!(with[2], without[2]);
        let live = |v: &[f32]| v[0] + v[1] + v[3];
        assert!(live(&with) < live(&without), "{with:?} vs {without:?}");
    }

    #[test]
    fn sequential_stand_ins_bring_the_stream_closer_to_the_original() {
        let (model, batches, lengths, _) = layered_setup(5, 4);
        let d = model.arch().n_embd;
        let layers = [2, 1];
        let independent = linear::fit(&model, &batches, &lengths, &layers).unwrap();
        let sequential = linear::fit_sequential(&model, &batches, &lengths, &layers).unwrap();
        // in the order asked for; the first replaced layer sees the original stream
        assert_eq!(
            sequential.iter().map(|a| a.layer).collect::<Vec<_>>(),
            [2, 1]
        );
        let worst = sequential[1]
            .weight
            .iter()
            .zip(&independent[1].weight)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "layer 1 differs by {worst}");
        // layer 2's stand-in reads the stream that layer 1's stand-in left: the stream after
        // layer 2's attention block ends closer to the original's
        let skip = SkipMask::from_layers(5, &[1, 2]).unwrap();
        let error_after_layer_2 = |stand_ins: &[LinearAttention]| -> f64 {
            let values = ScaleValues {
                linear: stand_ins.to_vec(),
                ..ScaleValues::ones(5)
            };
            let scales = model.scales(&values).unwrap();
            let w = Tensor::from_vec(
                stand_ins
                    .iter()
                    .find(|a| a.layer == 2)
                    .unwrap()
                    .weight
                    .clone(),
                (d, d),
                &Device::Cpu,
            )
            .unwrap();
            let mut sum = 0.0;
            for (batch, lens) in batches.iter().zip(&lengths) {
                let mask = batch.real_token_mask(lens, DType::F32).unwrap();
                let original = &model.attention_residuals_no_grad(&batch.input_ids).unwrap()[2].1;
                let x = model
                    .residuals_no_grad(&batch.input_ids, &scales, skip.as_slice())
                    .unwrap()
                    .swap_remove(2);
                let h = model.attn_norm_no_grad(2, &x).unwrap();
                let x1 = (&x + h.matmul(&w.t().unwrap()).unwrap()).unwrap();
                let diff = (x1 - original).unwrap().broadcast_mul(&mask).unwrap();
                sum += diff
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64;
            }
            sum
        };
        let (seq, ind) = (
            error_after_layer_2(&sequential),
            error_after_layer_2(&independent),
        );
        assert!(
            seq < 0.9 * ind,
            "sequential {seq} against independent {ind}"
        );
        // the final training starts from the sequential fit when asked to, and the plan says so
        let input = search_input(&model, &batches, &lengths);
        let refit = FitOptions {
            linear_attention: true,
            linear_sequential: true,
            final_steps: Some(0),
            ..options(2)
        };
        let (done, _) = train_final(&input, &refit, &layers, &Progress::hidden()).unwrap();
        assert_eq!(done.scales.linear, sequential);
        assert!(refit.settings(2, 2).linear_sequential);
        let without = FitOptions {
            linear_attention: false,
            ..refit
        };
        assert!(!without.settings(2, 2).linear_sequential);
        assert!(matches!(
            without.validate(),
            Err(SearchError::Setting {
                name: "linear-sequential",
                ..
            })
        ));
    }

    #[test]
    fn linear_stand_ins_are_fitted_for_the_chosen_blocks_and_lower_the_loss() {
        let (model, batches, lengths, _) = dead_block_setup(3);
        let input = search_input(&model, &batches, &lengths);
        let n_embd = model.arch().n_embd;
        let skip_only = FitOptions {
            final_steps: Some(0),
            ..options(2)
        };
        let stand_ins = FitOptions {
            linear_attention: true,
            ..skip_only.clone()
        };
        let skipped = [2, 1];
        let (a, _) = train_final(&input, &skip_only, &skipped, &Progress::hidden()).unwrap();
        let (b, _) = train_final(&input, &stand_ins, &skipped, &Progress::hidden()).unwrap();
        assert!(a.scales.linear.is_empty());
        let layers: Vec<usize> = b.scales.linear.iter().map(|s| s.layer).collect();
        assert_eq!(layers, vec![2, 1]);
        assert!(b
            .scales
            .linear
            .iter()
            .all(|s| s.weight.len() == n_embd * n_embd));
        assert!(
            b.loss_untrained < a.loss_untrained,
            "{} !< {}",
            b.loss_untrained,
            a.loss_untrained
        );
        // trained on top of the stand-ins, the scalars lower the loss further and keep them
        let trained = FitOptions {
            final_steps: Some(24),
            final_lr: 1e-2,
            ..stand_ins.clone()
        };
        let (c, _) = train_final(&input, &trained, &skipped, &Progress::hidden()).unwrap();
        assert_eq!(c.scales.linear, b.scales.linear);
        assert!(c.loss < b.loss, "{} !< {}", c.loss, b.loss);
        assert!(stand_ins.settings(2, 2).linear_attention);
        assert_eq!(trained.settings(2, 2).linear_lr, None);
    }

    #[test]
    fn linear_stand_ins_trained_end_to_end_lower_the_loss_further() {
        let (model, batches, lengths, _) = dead_block_setup(3);
        let input = search_input(&model, &batches, &lengths);
        let skipped = [2, 1];
        let fixed = FitOptions {
            final_steps: Some(24),
            final_lr: 1e-2,
            linear_attention: true,
            ..options(2)
        };
        let trained = FitOptions {
            linear_lr: Some(1e-2),
            ..fixed.clone()
        };
        let (a, _) = train_final(&input, &fixed, &skipped, &Progress::hidden()).unwrap();
        let (b, _) = train_final(&input, &trained, &skipped, &Progress::hidden()).unwrap();
        // the same start, the same scalar training; only the stand-ins' training differs
        assert_eq!(a.loss_untrained, b.loss_untrained);
        assert!(b.loss < a.loss, "{} !< {}", b.loss, a.loss);
        let layers: Vec<usize> = b.scales.linear.iter().map(|s| s.layer).collect();
        assert_eq!(layers, vec![2, 1]);
        for (x, y) in a.scales.linear.iter().zip(&b.scales.linear) {
            assert!(x.weight.iter().zip(&y.weight).any(|(p, q)| p != q));
        }
        // the loss the plan records is the one the trained stand-ins give
        let skip = SkipMask::from_layers(model.arch().n_layer, &skipped).unwrap();
        let again = eval_loss(
            &model,
            &batches,
            skip.as_slice(),
            &b.scales,
            trained.objective,
        );
        assert_eq!(again.unwrap(), b.loss);
        assert_eq!(trained.settings(2, 2).linear_lr, Some(1e-2));
        // the rate needs stand-ins to train, and must be a rate
        let without = FitOptions {
            linear_attention: false,
            ..trained.clone()
        };
        assert!(matches!(
            without.validate(),
            Err(SearchError::Setting {
                name: "linear-lr",
                ..
            })
        ));
        let negative = FitOptions {
            linear_lr: Some(-1.0),
            ..trained
        };
        assert!(negative.validate().is_err());
    }

    #[test]
    fn a_candidate_is_scored_by_its_training_losses_or_by_the_loss_it_was_trained_to() {
        let (model, batches, lengths, _) = dead_block_setup(3);
        let input = search_input(&model, &batches, &lengths);
        let skip = SkipMask::from_layers(model.arch().n_layer, &[2]).unwrap();
        let mean = options(1);
        let trained = FitOptions {
            candidate_score: ScoreBy::Trained,
            ..options(1)
        };
        let progress = Progress::hidden();
        let (a, scales_a) = Searcher::new(&input, &mean, &progress)
            .score(skip.as_slice(), 4)
            .unwrap();
        let (b, scales_b) = Searcher::new(&input, &trained, &progress)
            .score(skip.as_slice(), 4)
            .unwrap();
        // the same training, scored two ways
        assert_eq!(scales_a, scales_b);
        let steps = mean.resolved_candidate_steps(batches.len());
        let again = scales::train_scales(
            &model,
            &batches,
            skip.as_slice(),
            mean.objective,
            steps,
            mean.lr,
            4,
        )
        .unwrap();
        assert_eq!(a, again.mean_loss());
        let at_trained =
            eval_loss(&model, &batches, skip.as_slice(), &scales_b, mean.objective).unwrap();
        assert_eq!(b, at_trained);
        assert_ne!(a, b);
        assert_eq!(
            trained.settings(3, 3).candidate_score.as_deref(),
            Some("trained")
        );
        assert_eq!(mean.settings(3, 3).candidate_score, None);
    }

    #[test]
    fn derived_seeds_differ_by_stream_and_repeat() {
        assert_eq!(derive_seed(1, 2), derive_seed(1, 2));
        assert_ne!(derive_seed(1, 2), derive_seed(1, 3));
        assert_ne!(derive_seed(1, 2), derive_seed(2, 2));
    }

    #[test]
    fn ranking_breaks_ties_by_layer() {
        assert_eq!(ranked(&[5, 3, 9], &[0.5, 0.5, 0.1]), vec![9, 3, 5]);
    }

    #[test]
    fn screen_subset_is_seeded_and_sorted() {
        let a = screen_subset(10, 3, 4);
        assert_eq!(a, screen_subset(10, 3, 4));
        assert_eq!(a.len(), 3);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(screen_subset(2, 5, 4), vec![0, 1]);
    }

    #[test]
    fn bad_settings_are_refused() {
        let ok = FitOptions::default();
        assert!(ok.validate().is_ok());
        for bad in [
            FitOptions {
                skip: 0,
                ..ok.clone()
            },
            FitOptions {
                lr: -1.0,
                ..ok.clone()
            },
            FitOptions {
                final_lr: f64::NAN,
                ..ok.clone()
            },
            FitOptions {
                batch_size: 0,
                ..ok.clone()
            },
            FitOptions {
                max_seq_len: 1,
                ..ok.clone()
            },
            FitOptions {
                shortlist: 0,
                ..ok.clone()
            },
            FitOptions {
                final_docs: Some(ok.fit_docs - 1),
                ..ok.clone()
            },
        ] {
            assert!(matches!(bad.validate(), Err(SearchError::Setting { .. })));
        }
        let more = FitOptions {
            final_docs: Some(ok.fit_docs * 4),
            ..ok.clone()
        };
        assert!(more.validate().is_ok());
        assert_eq!(more.resolved_final_docs(), ok.fit_docs * 4);
        assert_eq!(ok.resolved_final_docs(), ok.fit_docs);
        // steps of the final training count its own batches; without scalars there is none
        assert_eq!(more.settings(2, 8).final_steps, DEFAULT_FINAL_EPOCHS * 8);
        assert_eq!(more.settings(2, 8).final_docs, Some(ok.fit_docs * 4));
        let none = FitOptions {
            train_scales: false,
            ..more.clone()
        };
        assert_eq!(none.settings(2, 8).final_docs, None);
        assert_eq!(none.settings(2, 8).final_steps, 0);
        // untrained scalars, but stand-ins fitted on the final documents, which are recorded
        let stand_ins = FitOptions {
            linear_attention: true,
            ..none
        };
        assert_eq!(stand_ins.settings(2, 8).final_docs, Some(ok.fit_docs * 4));
        assert_eq!(stand_ins.settings(2, 8).final_steps, 0);
    }
}

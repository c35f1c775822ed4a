//! The fit's settings: one definition of every option `fit`, `run` and `sweep` take, their
//! defaults, their checks, and the form a plan records them in (so a plan can be reproduced and
//! a fit resumed).
//!
//! The command line flattens [`FitSettings`] as it is: each field's doc comment is its `--help`
//! text. `method`, `objective`, `skip` and scalar training are set per configuration (`fit` and
//! `run` take one of each, `sweep` lists), so they are not flags here.

use serde::{Deserialize, Serialize};

/// `--help` heading of the options that tune the search's cost and the training.
const TUNING: &str = "Tuning";

/// Final training length when `final_steps` is not given, in epochs over the final batches.
pub const DEFAULT_FINAL_EPOCHS: usize = 4;

/// Candidates screened per round after the first (`--rescreen`). In the searches measured on
/// SmolLM2-135M-Instruct (docs/results.md, "Fit cost and choice") every candidate a round
/// shortlisted had ranked at most 11th in the round before, so 12 keeps those choices while
/// screening 12 of 28 or fewer.
pub const DEFAULT_RESCREEN: usize = 12;

/// Teacher tokens kept per position for the KL objective: for instruction-tuned models the top
/// 64 tokens usually hold all but a sliver of the probability.
pub const DEFAULT_TEACHER_TOP_K: usize = 64;

/// How the blocks are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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

/// What the scalars are trained to minimise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// Mean KL divergence from the original model's next-token distribution to the slim one's.
    Kl,
    /// Mean cross-entropy of the target tokens (the paper's objective).
    Ce,
    /// Multiple-choice tasks: mean over docs of the KL divergence from the original model's
    /// distribution over a doc's choices to the slim one's (what answer agreement measures).
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

/// The cheap signal the default (non-exhaustive) search ranks candidates by, as plans record
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Screen {
    /// The loss on the screening batches with the candidate skipped and every scalar at 1: one
    /// forward pass per candidate and batch.
    SkipLoss,
}

impl Screen {
    /// The name plans record.
    pub fn name(self) -> &'static str {
        match self {
            Screen::SkipLoss => "skip-loss",
        }
    }
}

/// Which token positions the loss covered, as plans record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossTokens {
    /// The task's targets only: each choice's continuation under the choice objective (and
    /// every target of plans from before the loss covered every token).
    Targets,
    /// Every token after the first, a prefix every fit document shares counted once.
    All,
}

/// A setting out of its range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--{name} {value}: expected {expected}")]
pub struct SettingError {
    /// The option, as spelled on the command line.
    pub name: &'static str,
    /// The value given.
    pub value: String,
    /// What is allowed.
    pub expected: String,
}

/// The fit's settings: what `fit`, `run` and `sweep` take on the command line, and, resolved
/// ([`FitSettings::recorded`]), what a plan records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct FitSettings {
    /// How the blocks are chosen.
    #[arg(skip = Method::Hopscotch)]
    pub method: Method,
    /// The training objective.
    #[arg(skip = Objective::Kl)]
    pub objective: Objective,
    /// Attention blocks to skip.
    #[arg(skip = 4usize)]
    pub skip: usize,
    /// Documents to fit on (the first of the task's seeded split).
    #[arg(long, default_value_t = 16)]
    pub fit_docs: usize,
    /// Documents the linear stand-ins and the final training learn from: the fit documents and
    /// more of the same split (default: the fit documents; with the stand-ins on a model up to
    /// about 0.5B parameters, 256, at most a quarter of each task's, and no final training
    /// unless --final-steps asks). Held out of evaluation like them.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_docs: Option<usize>,
    /// Training steps per trained candidate (default: one epoch over the fit batches).
    #[arg(long, help_heading = TUNING)]
    pub candidate_steps: Option<usize>,
    /// Training steps of the final choice (default: 4 epochs of the final documents; none where
    /// a small model's stand-ins take 256 documents, see --final-docs).
    #[arg(long, help_heading = TUNING)]
    pub final_steps: Option<usize>,
    /// Learning rate of the candidates' training (Adam).
    #[arg(long, default_value_t = 1e-2, help_heading = TUNING)]
    pub lr: f64,
    /// Learning rate of the final training (Adam).
    #[arg(long, default_value_t = 3e-3, help_heading = TUNING)]
    pub final_lr: f64,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8, help_heading = TUNING)]
    pub batch_size: usize,
    /// Longest sequence in tokens. A longer document loses its own context from the left, after
    /// the prefix all documents share (few-shot examples); one that cannot keep that prefix and
    /// its answer is left out, with a notice.
    #[arg(long, default_value_t = 256, help_heading = TUNING)]
    pub max_seq_len: usize,
    /// Seed of the document split, batch order and random baseline.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Train every candidate every round (the paper's loop) instead of a screened shortlist.
    #[arg(long)]
    pub exhaustive: bool,
    /// Candidates trained per round after screening.
    #[arg(long, default_value_t = 3, help_heading = TUNING)]
    pub shortlist: usize,
    /// Whether the scalars are trained at all (`--no-scales`: no).
    #[arg(skip = true)]
    pub train_scales: bool,
    /// Leave nothing in a skipped block's place (the paper's plain skip). By default each
    /// skipped block gets a linear stand-in: an n_embd x n_embd matrix on the normed stream,
    /// fitted by least squares to the block's output before the search (llama.cpp's deci runs
    /// it as "linear attention": no KV cache, a matrix product per token), and the search and
    /// the final training run with each candidate replaced by its stand-in.
    #[arg(long = "no-linear-attention", action = clap::ArgAction::SetFalse)]
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub linear_attention: bool,
    /// The screening signal of the fast search; `None` when every candidate was trained or the
    /// method does not search.
    #[arg(skip)]
    pub screen: Option<Screen>,
    /// Batches the screening (and the attn-cosine importance) is measured on.
    #[arg(long, default_value_t = 1, help_heading = TUNING)]
    pub screen_batches: usize,
    /// After the first round, screen only this many candidates, those the latest screenings
    /// ranked best (0: every candidate every round).
    #[arg(long, default_value_t = DEFAULT_RESCREEN, help_heading = TUNING)]
    #[serde(default)]
    pub rescreen: usize,
    /// Teacher tokens kept per position for the KL objective.
    #[arg(skip = DEFAULT_TEACHER_TOP_K)]
    pub teacher_top_k: usize,
    /// Positions the loss covers: every token after the first, a prefix all fit documents
    /// share (few-shot examples) counted once; each choice's continuation under the choice
    /// objective.
    #[arg(skip = LossTokens::All)]
    #[serde(default = "targets")]
    pub loss_tokens: LossTokens,
}

/// What plans from before `loss_tokens` was recorded covered.
fn targets() -> LossTokens {
    LossTokens::Targets
}

impl Default for FitSettings {
    /// The command line's defaults.
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
            train_scales: true,
            linear_attention: true,
            screen: None,
            screen_batches: 1,
            rescreen: DEFAULT_RESCREEN,
            teacher_top_k: DEFAULT_TEACHER_TOP_K,
            loss_tokens: LossTokens::All,
        }
    }
}

impl FitSettings {
    /// Refuses settings no fit can run with (before any work starts).
    pub fn validate(&self) -> Result<(), SettingError> {
        let bad = |name, value: String, expected: &str| {
            Err(SettingError {
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

    /// Whether the search screens its candidates (the default Hopscotch search).
    pub fn screens(&self) -> bool {
        self.method == Method::Hopscotch && !self.exhaustive
    }

    /// The settings as a plan records them, for `n_batches` fit batches and `n_final_batches`
    /// batches of the final training: step counts resolved, and only what the fit used.
    pub fn recorded(&self, n_batches: usize, n_final_batches: usize) -> FitSettings {
        let screened = self.screens();
        FitSettings {
            final_docs: (self.uses_final_docs() && self.resolved_final_docs() > self.fit_docs)
                .then(|| self.resolved_final_docs()),
            candidate_steps: Some(if self.train_scales {
                self.resolved_candidate_steps(n_batches)
            } else {
                0
            }),
            final_steps: Some(self.resolved_final_steps(n_final_batches)),
            screen: screened.then_some(Screen::SkipLoss),
            rescreen: if screened { self.rescreen } else { 0 },
            loss_tokens: if self.objective == Objective::Choice {
                LossTokens::Targets
            } else {
                LossTokens::All
            },
            ..self.clone()
        }
    }
}

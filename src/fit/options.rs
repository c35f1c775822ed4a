//! The fit's error, and the seed streams a fit derives from its settings' seed
//! ([`crate::plan::FitSettings`], defined with the plan that records them).

use std::path::PathBuf;

use super::batch::TrainError;
use super::linear::LinearError;
use crate::checkpoint::CheckpointError;
use crate::gguf::vocab::VocabError;
use crate::model::ModelError;
use crate::output::OutputError;
use crate::plan::{NoSuchLayer, PlanError, SettingError};
use crate::task::TaskError;

/// Errors of a fit. Each names the file, setting or input at fault.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    /// A setting is out of its range.
    #[error(transparent)]
    Setting(#[from] SettingError),
    /// The fit would need more memory than the machine has, or than the limit allows.
    #[error("{model}: the fit would need {estimate}; that is more than {budget}: {remedy}")]
    Memory {
        /// The model path.
        model: String,
        /// The estimate, part by part.
        estimate: String,
        /// What it was held against.
        budget: String,
        /// What lowers the estimate enough, or that nothing does.
        remedy: String,
    },
    /// `HOPSCOTCH_MEMORY_LIMIT` is not a byte count.
    #[error("{0}")]
    MemoryLimit(String),
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
    /// A layer past the model's last one was named.
    #[error(transparent)]
    NoSuchLayer(#[from] NoSuchLayer),
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
    Train(#[from] TrainError),
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
    /// Two `--task` files have the same content.
    #[error(
        "--task {}: the same content (sha256) as --task {}; give each task once",
        second.display(),
        first.display()
    )]
    DuplicateTask {
        /// The earlier file.
        first: PathBuf,
        /// The later file.
        second: PathBuf,
    },
    /// Fewer fit documents than tasks: a task would have none.
    #[error(
        "--fit-docs {fit_docs} with {tasks} --task files: the fit draws its documents evenly \
         from the tasks; give at least one per task"
    )]
    FewerDocsThanTasks {
        /// Fit documents asked for.
        fit_docs: usize,
        /// Tasks given.
        tasks: usize,
    },
}

/// A well-mixed 64-bit function of a seed and a stream number (splitmix64's finalizer), so each
/// round, the final training and the screening subset get their own reproducible seed.
pub fn derive_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

//! The fit's error, the defaults that depend on the model and the tasks, and the seed streams a
//! fit derives from its settings' seed ([`crate::plan::FitSettings`], defined with the plan that
//! records them).

use std::path::PathBuf;

use crate::arch::Arch;
use crate::plan::FitSettings;

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

/// Documents the linear stand-ins learn from by default on a model whose stand-ins are summed in
/// one pass ([`super::linear::one_pass`]: up to about 0.5 B parameters).
pub const SMALL_MODEL_STAND_IN_DOCS: usize = 256;

/// `options` with the defaults that depend on the model and the tasks resolved. With the linear
/// stand-ins and no `--final-docs`, on a model whose stand-ins are summed in one pass over the
/// documents, the stand-ins learn from [`SMALL_MODEL_STAND_IN_DOCS`] documents (at most a
/// quarter of each task's, `task_docs`, drawn evenly) and no final training follows unless
/// `--final-steps` asks for one. Elsewhere the settings are returned as given: on larger models
/// more documents would hold their residual streams between passes (gigabytes at 1 B widths).
pub fn model_defaults(options: &FitSettings, arch: &Arch, task_docs: &[usize]) -> FitSettings {
    let skippable = arch.n_layer.saturating_sub(1);
    if !options.linear_attention
        || options.final_docs.is_some()
        || !super::linear::one_pass(arch.n_embd, arch.q_dim(), skippable)
    {
        return options.clone();
    }
    let per_task = task_docs.iter().map(|&n| n / 4).min().unwrap_or(0);
    let docs = SMALL_MODEL_STAND_IN_DOCS.min(per_task * task_docs.len());
    if docs <= options.fit_docs {
        return options.clone();
    }
    FitSettings {
        final_docs: Some(docs),
        final_steps: options.final_steps.or(Some(0)),
        ..options.clone()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::Family;
    use crate::fit::linear;

    /// A Llama-shaped model `n_embd` wide with `n_layer` layers and heads of 64.
    fn arch(n_embd: usize, n_layer: usize) -> Arch {
        Arch {
            family: Family::Llama,
            hf_architecture: "LlamaForCausalLM".into(),
            n_layer,
            n_embd,
            n_ff: 4 * n_embd,
            n_head: n_embd / 64,
            n_head_kv: n_embd / 64,
            head_dim: 64,
            vocab_size: 49_152,
            context_length: 2048,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            tie_word_embeddings: true,
            attn_bias: false,
        }
    }

    #[test]
    fn small_models_fit_their_stand_ins_on_more_documents_by_default() {
        let given = FitSettings::default();
        let smol = arch(576, 30);
        // SmolLM2-135M's width: 256 documents, and no final training
        let s = model_defaults(&given, &smol, &[2376]);
        assert_eq!((s.final_docs, s.final_steps), (Some(256), Some(0)));
        assert_eq!(s.resolved_final_docs(), 256);
        // two tasks draw evenly; a small one caps each share at a quarter of its documents
        assert_eq!(
            model_defaults(&given, &smol, &[2376, 400]).final_docs,
            Some(200)
        );
        // a task too small to give more than the fit documents: as given
        assert_eq!(model_defaults(&given, &smol, &[40]), given);
        // a final training asked for is kept
        let steps = FitSettings {
            final_steps: Some(8),
            ..given.clone()
        };
        assert_eq!(model_defaults(&steps, &smol, &[2376]).final_steps, Some(8));
        // --final-docs given, the plain skip, or a model 1B wide: as given
        let docs = FitSettings {
            final_docs: Some(64),
            ..given.clone()
        };
        assert_eq!(model_defaults(&docs, &smol, &[2376]), docs);
        let plain = FitSettings {
            linear_attention: false,
            ..given.clone()
        };
        assert_eq!(model_defaults(&plain, &smol, &[2376]), plain);
        assert_eq!(model_defaults(&given, &arch(2048, 16), &[2376]), given);
        // where the line falls: Qwen2.5-0.5B (896 wide, 24 layers) in one pass, 1.5B not
        assert!(linear::one_pass(896, 896, 23));
        assert!(!linear::one_pass(1536, 1536, 27));
    }
}

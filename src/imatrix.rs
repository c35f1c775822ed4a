//! An importance matrix computed from a task's documents ([`compute`], [`run`]): the candle
//! model runs over the documents, with a plan's skipped blocks and scalars when there is one, so
//! the statistics are the slim model's. Folding does not change any weight matrix's input (the
//! scalars scale output rows; RMSNorm removes the running residual factor), so they hold for
//! the exported file. The file format is [`crate::gguf::imatrix`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::fit::batch::TrainBatch;
use crate::fit::data;
use crate::fit::options::FitError;
use crate::fit::session::FitModel;
use crate::gguf::imatrix::{Imatrix, ImatrixEntry, ImatrixFileError};
use crate::model::{Model, ModelError, WeightInput};
use crate::output::{check_overwrite, OutputError};
use crate::plan::{FitSettings, ModelFingerprint, Objective, Plan, PlanError, ScaleValues};
use crate::progress::Progress;
use crate::task::{self, TaskError};

/// Errors computing an importance matrix.
#[derive(Debug, thiserror::Error)]
pub enum ImatrixError {
    /// The file could not be read, checked or written.
    #[error(transparent)]
    File(#[from] ImatrixFileError),
    /// The output may not be written.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The model could not be opened.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The task could not be read.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// The plan could not be read or does not fit the model.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Loading the model or building the calibration batches failed.
    #[error(transparent)]
    Search(Box<FitError>),
    /// The forward pass failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<FitError> for ImatrixError {
    fn from(e: FitError) -> Self {
        ImatrixError::Search(Box::new(e))
    }
}

/// Accumulates every weight matrix's squared inputs over the real (unpadded) tokens of
/// `batches` (`lengths`: each row's length before padding), running `model` with `scales` and
/// the skip mask: the slim model's statistics. Skipped blocks get no attention entries. The LM
/// head gets one when it is a tensor of its own (`output.weight`, as `llama-imatrix
/// --process-output` collects it), none when tied to `token_embd`, which `llama-imatrix` never
/// collects either.
pub fn compute(
    model: &Model,
    scales: &ScaleValues,
    skip: &[bool],
    batches: &[TrainBatch],
    lengths: &[Vec<usize>],
) -> Result<Imatrix, ImatrixError> {
    let scales = model.scales(scales)?;
    let mut sums: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut tokens = 0usize;
    for (batch, lens) in batches.iter().zip(lengths) {
        let mask = batch.real_token_mask(lens, model.dtype())?;
        tokens += lens.iter().sum::<usize>();
        model.weight_inputs_no_grad(&batch.input_ids, &scales, skip, &mut |input, x| {
            if input == WeightInput::Output && model.arch().tie_word_embeddings {
                return Ok(());
            }
            let s = x.sqr()?.broadcast_mul(&mask)?.sum(0)?;
            for name in input.tensor_names() {
                match sums.get_mut(&name) {
                    Some(total) => *total = (&*total + &s)?,
                    None => {
                        sums.insert(name, s.clone());
                    }
                }
            }
            Ok(())
        })?;
    }
    let mut entries = BTreeMap::new();
    for (name, s) in sums {
        entries.insert(
            name,
            ImatrixEntry {
                sums: s.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                counts: vec![tokens as f32],
            },
        );
    }
    Ok(Imatrix {
        entries,
        datasets: Vec::new(),
        chunk_count: batches.iter().map(|b| b.input_ids.dims()[0] as u32).sum(),
        chunk_size: 0,
        source: PathBuf::new(),
    })
}

/// What `hopscotch imatrix` computes (its command line, as the CLI flattens it).
#[derive(Debug, Clone, clap::Args)]
pub struct ImatrixRequest {
    /// The model: a Hugging Face folder or a .gguf file.
    pub model: PathBuf,
    /// The task file (JSON lines, plain or gzip) whose documents calibrate.
    #[arg(long)]
    pub task: PathBuf,
    /// A plan: the statistics are the slim model's (skipped blocks, scalars), and the
    /// documents follow the plan's seed, so the plan's own documents come first.
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Documents: the first N of the task's seeded split, as the fit takes them. Documents
    /// beyond a plan's own are not held out by `eval --exclude-fit`.
    #[arg(long, default_value_t = 128)]
    pub docs: usize,
    /// Seed of the document split without a plan (with one, the plan's seed).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Longest sequence in tokens. A longer document loses its own context from the left, after
    /// the prefix all documents share (few-shot examples); one that cannot keep that prefix and
    /// its answer is left out, with a notice.
    #[arg(long, default_value_t = 256)]
    pub max_seq_len: usize,
    /// Output (GGUF).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Overwrite an existing output.
    #[arg(long)]
    pub force: bool,
}

/// What `hopscotch imatrix` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ImatrixSummary {
    /// The file written.
    pub output: PathBuf,
    /// Entries (weight matrices) in it.
    pub entries: usize,
    /// Documents and tokens the statistics cover.
    pub docs: usize,
    /// Real tokens summed.
    pub tokens: usize,
    /// Skipped attention blocks of the plan, if one was given.
    pub skipped_blocks: Vec<usize>,
    /// Ids of the documents used.
    pub doc_ids: Vec<String>,
    /// How many of them the plan was not trained on, so `eval --exclude-fit` does not hold them
    /// out (0 without a plan).
    pub beyond_plan: usize,
    /// Seconds taken.
    pub seconds: f64,
}

impl std::fmt::Display for ImatrixSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wrote {} ({} weight matrices; {} documents, {} tokens; skipped blocks {:?}) in {:.1}s",
            self.output.display(),
            self.entries,
            self.docs,
            self.tokens,
            self.skipped_blocks,
            self.seconds
        )?;
        if self.beyond_plan > 0 {
            write!(
                f,
                "\n{} of the documents are beyond the plan's own: eval --exclude-fit does not hold them out",
                self.beyond_plan
            )?;
        }
        Ok(())
    }
}

/// Computes the importance matrix of `request.model` (slimmed by the plan, if any) over the
/// first `request.docs` documents of the task's seeded split, writes it, and returns what it
/// wrote with the matrix itself (its `source` the output).
pub fn run(
    request: &ImatrixRequest,
    progress: &Progress,
) -> Result<(ImatrixSummary, Imatrix), ImatrixError> {
    let started = std::time::Instant::now();
    check_overwrite(&request.output, request.force)?;
    let ck = Checkpoint::open(&request.model)?;
    ck.validate_tensors()?;
    let plan = match &request.plan {
        Some(path) => {
            let plan = Plan::load(path)?;
            plan.validate().map_err(|message| PlanError::Invalid {
                path: path.display().to_string(),
                message,
            })?;
            plan.check_model(&ck, path)?;
            Some(plan)
        }
        None => None,
    };
    let n_layer = ck.arch.n_layer;
    let (skip, scales, seed) = match &plan {
        Some(p) => (p.skip_mask(), p.scales.clone(), p.settings.seed),
        None => (
            vec![false; n_layer],
            ScaleValues::ones(n_layer),
            request.seed,
        ),
    };
    let task_data = task::load(&request.task)?;
    let fingerprint = ModelFingerprint::of(&ck);
    let model = FitModel::load(&ck, fingerprint, false)?;
    // the fit's batches, with cross-entropy's targets only: no teacher to compute
    let options = data::Batching {
        objective: Objective::Ce,
        seed,
        max_seq_len: request.max_seq_len,
        ..data::Batching::of(&FitSettings::default())
    };
    let fit_data = data::build(
        model.ck,
        &model.model,
        &task_data,
        &model.fingerprint.tensor_sha256,
        &options,
        request.docs,
        progress,
    )?;
    let mut imatrix = compute(
        &model.model,
        &scales,
        &skip,
        &fit_data.batches,
        &fit_data.lengths,
    )?;
    imatrix.datasets = vec![format!(
        "{} ({} documents, seed {seed})",
        request.task.display(),
        fit_data.n_docs()
    )];
    imatrix.chunk_size = request.max_seq_len as u32;
    imatrix.write(&request.output, request.force)?;
    imatrix.source = request.output.clone();
    let summary = ImatrixSummary {
        output: request.output.clone(),
        entries: imatrix.entries.len(),
        docs: fit_data.n_docs(),
        tokens: fit_data.n_tokens(),
        beyond_plan: plan.as_ref().map_or(0, |p| {
            let trained: std::collections::HashSet<&str> = p
                .task_with_sha256(&task_data.sha256)
                .into_iter()
                .flat_map(|t| t.trained_doc_ids())
                .collect();
            fit_data
                .doc_ids
                .iter()
                .flatten()
                .filter(|id| !trained.contains(id.as_str()))
                .count()
        }),
        skipped_blocks: plan.map(|p| p.skipped_blocks).unwrap_or_default(),
        doc_ids: fit_data.doc_ids.concat(),
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((summary, imatrix))
}

#[cfg(test)]
mod tests;

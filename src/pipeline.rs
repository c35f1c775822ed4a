//! `hopscotch run`: the whole pipeline in one command. Fit a plan, export the slim GGUF, write
//! the original at the same quant type, evaluate both in llama.cpp on the held-out documents,
//! and write the report (plan.json, slim.gguf, slim.Modelfile, original.gguf, report.md,
//! report.json, report.svg) into one folder.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::eval::speed::compare_prompt_speed;
use crate::eval::task::{evaluate, select_docs, wilson_ci95, TaskEvalError};
use crate::export::{export, ExportError, ExportOptions};
use crate::fit::options::FitError;
use crate::fit::session::{fit_plan, FitRequest};
use crate::gguf::consts::QuantType;
use crate::imatrix::{ImatrixError, ImatrixRequest};
use crate::llamacpp::{LlamaError, LoadedModel};
use crate::output::{file_bytes, write_text, OutputError};
use crate::plan::{FitSettings, PlanError};
use crate::progress::Progress;
use crate::quantize::{require_imatrix, QuantizeError};
use crate::report::{kv_bytes_per_token, ModelFigures, Paired, RoundPoint, RunReport, Seconds};
use crate::task::{self, DocBody, TaskError};
use crate::write::WriteError;

/// Errors of `run` and `sweep`, each from the stage that failed or naming the input at fault.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The output folder cannot be used.
    #[error("{path}: {message}")]
    OutDir {
        /// The folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A list option was given no values.
    #[error("--{option}: give at least one value")]
    EmptyList {
        /// The option, as spelled on the command line.
        option: &'static str,
    },
    /// A K of 0 in `--skip`.
    #[error("--skip 0: every K must be at least 1 (the original, K = 0, is always evaluated)")]
    ZeroSkip,
    /// Two `--task` files have the same name (which names their files) or the same content.
    #[error(
        "--task {}: {what} as --task {}; give each task once (tasks are named by their file \
         name less .jsonl/.json/.gz)",
        second.display(),
        first.display()
    )]
    DuplicateTask {
        /// The earlier file.
        first: PathBuf,
        /// The later file.
        second: PathBuf,
        /// What they share.
        what: &'static str,
    },
    /// The output folder holds a sweep made with another configuration.
    #[error(
        "{}: the folder holds a sweep made with {what}; its files cannot be reused (pass --force \
         to remove them and start over, or give another folder)",
        path.display()
    )]
    ConfigMismatch {
        /// The recorded configuration.
        path: PathBuf,
        /// What differs, recorded against requested.
        what: String,
    },
    /// The output folder holds sweep files but no configuration to check them against.
    #[error(
        "{}: sweep files are there but no sweep-config.json to check them against (pass --force \
         to remove them and start over, or give another folder)",
        path.display()
    )]
    Unrecorded {
        /// The output folder.
        path: PathBuf,
    },
    /// A file or folder of the sweep could not be read, written or removed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `sweep-config.json` is not one this tool wrote.
    #[error("{}: not a sweep configuration: {message} (pass --force to start over)", path.display())]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        message: String,
    },
    /// A plan fitted on a task does not hold the task's fit split.
    #[error(
        "{}: fitted on other documents of {task} than the sweep's --seed and --fit-docs choose; \
         plans on one task must share their split so that the held-out documents are the same",
        plan.display()
    )]
    SplitMismatch {
        /// The plan.
        plan: PathBuf,
        /// The task's name.
        task: String,
    },
    /// A fit failed (or a K is more blocks than the model can skip).
    #[error(transparent)]
    Fit(#[from] Box<FitError>),
    /// A plan could not be read.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The model could not be opened.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// An export failed.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// Writing the original at the quant type failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A task file could not be read.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// A task cannot be evaluated, or an evaluation failed.
    #[error(transparent)]
    Eval(#[from] TaskEvalError),
    /// llama.cpp failed.
    #[error(transparent)]
    Llama(#[from] LlamaError),
    /// An output could not be written.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The quant type cannot be written as asked.
    #[error(transparent)]
    Quantize(#[from] QuantizeError),
    /// An importance matrix could not be computed or written.
    #[error(transparent)]
    Imatrix(Box<ImatrixError>),
}

impl From<FitError> for PipelineError {
    fn from(e: FitError) -> Self {
        PipelineError::Fit(Box::new(e))
    }
}

impl From<ImatrixError> for PipelineError {
    fn from(e: ImatrixError) -> Self {
        PipelineError::Imatrix(Box::new(e))
    }
}

/// What `hopscotch run` is asked to do.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// HF folder or GGUF.
    pub model: PathBuf,
    /// The task file (log-likelihood requests).
    pub task: PathBuf,
    /// Output folder.
    pub out_dir: PathBuf,
    /// Quant type of both evaluated files.
    pub qtype: QuantType,
    /// Held-out documents to evaluate (all when `None`).
    pub limit: Option<usize>,
    /// Fit settings (`skip` is K).
    pub fit: FitSettings,
    /// Replace existing outputs.
    pub force: bool,
    /// Threads for llama.cpp.
    pub threads: usize,
    /// Context of an evaluation decode.
    pub n_ctx: usize,
    /// Quantize each file with its own importance matrix from the plan's fit documents (the
    /// slim model's with its skips and scalars), written as `*.imatrix.gguf` beside it.
    pub imatrix: bool,
}

/// The importance matrices `run --imatrix` writes: the slim model's and the original's.
pub fn imatrix_outputs(dir: &Path) -> [PathBuf; 2] {
    [
        dir.join("slim.imatrix.gguf"),
        dir.join("original.imatrix.gguf"),
    ]
}

/// The files of a run's folder.
pub fn outputs(dir: &Path) -> [PathBuf; 6] {
    [
        dir.join("plan.json"),
        dir.join("slim.gguf"),
        dir.join("original.gguf"),
        dir.join("report.md"),
        dir.join("report.json"),
        dir.join("report.svg"),
    ]
}

/// Runs the pipeline and returns the report (also written to the folder).
pub fn run(req: &RunRequest, progress: &Progress) -> Result<RunReport, PipelineError> {
    let started = Instant::now();
    std::fs::create_dir_all(&req.out_dir).map_err(|e| PipelineError::OutDir {
        path: req.out_dir.clone(),
        message: e.to_string(),
    })?;
    let [plan_path, slim_path, orig_path, md_path, json_path, svg_path] = outputs(&req.out_dir);
    let [slim_imatrix, orig_imatrix] = imatrix_outputs(&req.out_dir);
    if !req.force {
        let mut all = outputs(&req.out_dir).to_vec();
        if req.imatrix {
            all.extend([slim_imatrix.clone(), orig_imatrix.clone()]);
        }
        if let Some(p) = all.iter().find(|p| p.exists()) {
            return Err(OutputError::Exists(p.clone()).into());
        }
    }
    // A type that needs an importance matrix is refused before any work without one.
    require_imatrix(req.qtype, req.imatrix)?;
    // The task must be a multiple-choice one before minutes go into the fit.
    let task_data = task::load(&req.task)?;
    select_docs(&task_data, None, Some(1))?;

    progress.note(&format!("fitting: skip {} attention blocks", req.fit.skip));
    let ck = Checkpoint::open(&req.model)?;
    let (plan, fit_report) = fit_plan(
        &ck,
        &FitRequest {
            model: req.model.clone(),
            task: req.task.clone(),
            output: plan_path.clone(),
            force: req.force,
            resume: true,
            options: req.fit.clone(),
        },
        progress,
    )?;
    let t_fit = started.elapsed().as_secs_f64();

    let bar = indicatif::ProgressBar::hidden();
    progress.note(&format!(
        "exporting slim.gguf and original.gguf as {}",
        req.qtype.name()
    ));
    // Each file's own importance matrix, from the documents the plan was fitted on (held out
    // of the evaluation below).
    let imatrices = if req.imatrix {
        let docs = plan.trained_doc_ids().count();
        progress.note(&format!(
            "importance matrices of both models from the {docs} fit documents"
        ));
        let make = |plan: Option<&Path>, output: &Path| {
            let request = ImatrixRequest {
                model: req.model.clone(),
                task: req.task.clone(),
                plan: plan.map(Path::to_path_buf),
                docs,
                seed: req.fit.seed,
                max_seq_len: req.fit.max_seq_len,
                output: output.to_path_buf(),
                force: req.force,
            };
            crate::imatrix::run(&request, progress).map(|(_, imatrix)| imatrix)
        };
        Some((
            make(Some(&plan_path), &slim_imatrix)?,
            make(None, &orig_imatrix)?,
            docs,
        ))
    } else {
        None
    };
    let opts = ExportOptions {
        qtype: req.qtype,
        force: req.force,
        threads: req.threads,
        imatrix: imatrices.as_ref().map(|m| &m.0),
    };
    export(&ck, &plan, &plan_path, &slim_path, &opts, &bar)?;
    crate::convert::to_gguf(
        &ck,
        &orig_path,
        req.qtype,
        req.force,
        req.threads,
        imatrices.as_ref().map(|m| &m.1),
        &bar,
    )?;
    let t_export = started.elapsed().as_secs_f64() - t_fit;

    progress.note("evaluating both models in llama.cpp on the held-out documents");
    let selection = select_docs(&task_data, Some((&plan_path, &plan)), req.limit)?;
    let slim = LoadedModel::load(&slim_path)?;
    let orig = LoadedModel::load(&orig_path)?;
    let rep = evaluate(
        &slim,
        Some(&orig),
        &task_data,
        &selection,
        req.n_ctx,
        req.threads,
        &bar,
    )?;
    // Prompt speed on the same real text for both: the contexts of the evaluated documents.
    let text: String = selection
        .docs
        .iter()
        .take(8)
        .filter_map(|d| match &d.body {
            DocBody::Choices(c) => Some(c.context(0).to_string()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n\n");
    let tokens = orig.tokenize(&text, true);
    let speeds = compare_prompt_speed(&[&orig, &slim], &tokens, 512, 2, 3, req.threads)?;
    let (speed_orig, speed_slim) = (speeds[0], speeds[1]);
    let t_eval = started.elapsed().as_secs_f64() - t_fit - t_export;

    let n = rep.n_docs;
    let reference = rep.reference.clone().expect("evaluated with a reference");
    let mut skipped_sorted = plan.skipped_blocks.clone();
    skipped_sorted.sort_unstable();
    let report = RunReport {
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        model: req.model.display().to_string(),
        task: req.task.display().to_string(),
        quant_type: req.qtype.name().to_string(),
        method: fit_report.method.name().to_string(),
        objective: fit_report.objective.clone(),
        skipped_blocks: plan.skipped_blocks.clone(),
        linear_stand_ins: !plan.scales.linear.is_empty(),
        rounds: fit_report
            .rounds
            .iter()
            .map(|r| RoundPoint {
                k: r.round,
                chosen: r.chosen,
                loss: r.loss,
            })
            .collect(),
        fit_loss_untrained: fit_report.final_loss_untrained,
        fit_loss: fit_report.final_loss,
        original: ModelFigures {
            path: orig_path.display().to_string(),
            skipped_blocks: Vec::new(),
            accuracy: reference.accuracy,
            accuracy_ci95: wilson_ci95((reference.accuracy * n as f64).round() as usize, n),
            acc_norm: reference.acc_norm,
            n_docs: n,
            file_bytes: file_bytes(&orig_path),
            kv_bytes_per_token: kv_bytes_per_token(&ck.arch, &[]),
            prompt_tokens_per_s: speed_orig,
        },
        slim: ModelFigures {
            path: slim_path.display().to_string(),
            skipped_blocks: skipped_sorted,
            accuracy: rep.accuracy,
            accuracy_ci95: rep.accuracy_ci95,
            acc_norm: rep.acc_norm,
            n_docs: n,
            file_bytes: file_bytes(&slim_path),
            kv_bytes_per_token: kv_bytes_per_token(&ck.arch, &plan.skipped_blocks),
            prompt_tokens_per_s: speed_slim,
        },
        paired: Paired {
            agreement: rep.agreement.unwrap_or(0.0),
            accuracy_diff: rep.accuracy_diff.unwrap_or(0.0),
            accuracy_diff_ci95: rep.accuracy_diff_ci95.unwrap_or([0.0, 0.0]),
            choice_kl_mean: rep.choice_kl_mean.unwrap_or(0.0),
        },
        seconds: Seconds {
            fit: t_fit,
            export: t_export,
            eval: t_eval,
            total: started.elapsed().as_secs_f64(),
        },
        imatrix_docs: imatrices.as_ref().map(|m| m.2),
    };
    write_text(&md_path, &report.markdown())?;
    write_text(
        &json_path,
        &(serde_json::to_string_pretty(&report).expect("report serializes") + "\n"),
    )?;
    write_text(&svg_path, &report.svg())?;
    Ok(report)
}

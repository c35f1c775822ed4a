//! `hopscotch run`: the whole pipeline in one command. Fit a plan, export the slim GGUF, write
//! the original at the same quant type, evaluate both in llama.cpp on the held-out documents,
//! and write the report (plan.json, slim.gguf, slim.Modelfile, original.gguf, report.md,
//! report.json, report.svg) into one folder.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::eval::speed::{compare_prompt_speed, fastest_window_tokens_per_s};
use crate::eval::task::{evaluate, select_docs, wilson_ci95, Selection, TaskEvalError};
use crate::export::{export, ExportError};
use crate::fit::options::FitError;
use crate::fit::session::{fit_plan, load_tasks, FitRequest};
use crate::gguf::consts::QuantType;
use crate::imatrix::{ImatrixError, ImatrixRequest};
use crate::llamacpp::{LlamaError, LoadedModel};
use crate::output::{file_bytes, write_text, OutputError};
use crate::plan::{BudgetError, FitSettings, Plan, PlanError, QualityBudget};
use crate::progress::Progress;
use crate::quantize::{require_imatrix, QuantizeError};
use crate::report::{
    kv_bytes_per_token, BudgetFigures, ModelFigures, Paired, RoundPoint, RunReport, Seconds,
    TaskFigures,
};
use crate::task::{DocBody, TaskData, TaskError};
use crate::write::WriteError;
use crate::write::WriteOptions;

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
    /// The quality budget cannot be used.
    #[error(transparent)]
    Budget(#[from] BudgetError),
    /// Not one K stays within the quality budget.
    #[error(
        "no K stays within the budget on the {n_docs} validation documents of {task}: K = 1 \
         (block {block}) drops {drop_points:+.2} points with {:.2}% agreement (drop by K: {}); \
         raise --max-drop or lower --min-agreement, or give more --validation-docs to tell the \
         K apart{}; the plans and models fitted are in {}",
        agreement * 100.0,
        drops_by_k(drops),
        cut_short_note(*cut_short),
        curve_dir.display()
    )]
    NothingWithinBudget {
        /// The task file K = 1 is out of budget on.
        task: String,
        /// Validation documents.
        n_docs: usize,
        /// The block K = 1 skips.
        block: usize,
        /// Its accuracy drop, in points.
        drop_points: f64,
        /// Its answer agreement with the original.
        agreement: f64,
        /// Every K's drop on that task, in points, from K = 1.
        drops: Vec<f64>,
        /// Whether the run stopped before `--max-skip` (without `--full-curve`).
        cut_short: bool,
        /// Where the curve's files are.
        curve_dir: PathBuf,
    },
    /// The task has too few documents for the three parts of a budget run.
    #[error(
        "{}: {docs} documents leave {validation} for validation and {test} for the test after \
         the {trained} trained on; a quality budget needs at least one of each (lower \
         --fit-docs/--final-docs or --validation-docs)",
        path.display()
    )]
    TooFewDocs {
        /// The task file.
        path: PathBuf,
        /// Its documents.
        docs: usize,
        /// Documents trained on.
        trained: usize,
        /// Validation documents left.
        validation: usize,
        /// Test documents left.
        test: usize,
    },
}

/// What [`PipelineError::NothingWithinBudget`] adds when the run stopped before `--max-skip`.
fn cut_short_note(cut_short: bool) -> &'static str {
    if cut_short {
        " (the run stopped at the first K past the budget: --full-curve scores every K)"
    } else {
        ""
    }
}

/// `1 +4.5, 2 +3.0, ...`: each K's drop in points, from K = 1.
fn drops_by_k(drops: &[f64]) -> String {
    let each: Vec<String> = (1..)
        .zip(drops)
        .map(|(k, d)| format!("{k} {d:+.1}"))
        .collect();
    each.join(", ")
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
    /// The task files (log-likelihood requests): one, or several that the fit draws its
    /// documents from evenly and the evaluation measures each.
    pub tasks: Vec<PathBuf>,
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
    /// Choose K by this budget ([`crate::budget::run`]) instead of `fit.skip`.
    pub budget: Option<QualityBudget>,
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

/// Refuses outputs of a run that exist in `dir` (`outputs`, with `--imatrix` its matrices too)
/// unless `force`.
pub(crate) fn check_outputs(req: &RunRequest, extra: &[PathBuf]) -> Result<(), PipelineError> {
    if req.force {
        return Ok(());
    }
    let mut all = outputs(&req.out_dir).to_vec();
    if req.imatrix {
        all.extend(imatrix_outputs(&req.out_dir));
    }
    all.extend_from_slice(extra);
    match all.iter().find(|p| p.exists()) {
        Some(p) => Err(OutputError::Exists(p.clone()).into()),
        None => Ok(()),
    }
}

/// Creates the output folder.
pub(crate) fn create_out_dir(dir: &Path) -> Result<(), PipelineError> {
    std::fs::create_dir_all(dir).map_err(|e| PipelineError::OutDir {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })
}

/// Runs the pipeline and returns the report (also written to the folder). With a quality
/// budget, [`crate::budget::run`] chooses K. A run that fails before writing anything leaves no
/// empty folder behind (one that fails later keeps what it wrote: a partial fit resumes).
pub fn run(req: &RunRequest, progress: &Progress) -> Result<RunReport, PipelineError> {
    let existed = req.out_dir.exists();
    let result = match &req.budget {
        Some(budget) => crate::budget::run(req, budget, progress),
        None => run_skip(req, progress),
    };
    if result.is_err() && !existed {
        // `remove_dir` removes only empty folders
        let _ = std::fs::remove_dir(crate::budget::curve_dir(&req.out_dir));
        let _ = std::fs::remove_dir(&req.out_dir);
    }
    result
}

/// Reads `run`'s task files ([`load_tasks`]: no task twice, at least one of `fit_docs` fit
/// documents each) and refuses any that is not multiple-choice, before minutes go into the fit.
pub(crate) fn load_choice_tasks(
    paths: &[PathBuf],
    fit_docs: usize,
) -> Result<Vec<TaskData>, PipelineError> {
    let tasks = load_tasks(paths, fit_docs)?;
    for task_data in &tasks {
        select_docs(task_data, None, Some(1))?;
    }
    Ok(tasks)
}

/// [`run`] with K given (`--skip`).
fn run_skip(req: &RunRequest, progress: &Progress) -> Result<RunReport, PipelineError> {
    let started = Instant::now();
    let [plan_path, slim_path, orig_path, ..] = outputs(&req.out_dir);
    let [slim_imatrix, orig_imatrix] = imatrix_outputs(&req.out_dir);
    check_outputs(req, &[])?;
    // A type that needs an importance matrix is refused before any work without one.
    require_imatrix(req.qtype, req.imatrix)?;
    let tasks = load_choice_tasks(&req.tasks, req.fit.fit_docs)?;

    progress.note(&format!("fitting: skip {} attention blocks", req.fit.skip));
    let ck = Checkpoint::open(&req.model)?;
    create_out_dir(&req.out_dir)?;
    let (plan, _) = fit_plan(
        &ck,
        &FitRequest {
            model: req.model.clone(),
            tasks: req.tasks.clone(),
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
    // Each file's own importance matrix, from the documents the plan was fitted on of the
    // first task (held out of the evaluation below).
    let imatrices = if req.imatrix {
        let docs = plan.first_task.trained_doc_ids().count();
        progress.note(&format!(
            "importance matrices of both models from the {docs} fit documents"
        ));
        let make = |plan: Option<&Path>, output: &Path| {
            let request = ImatrixRequest {
                model: req.model.clone(),
                task: req.tasks[0].clone(),
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
    let opts = WriteOptions {
        qtype: req.qtype,
        force: req.force,
        threads: req.threads,
        imatrix: imatrices.as_ref().map(|m| &m.0),
    };
    export(&ck, &plan, &plan_path, &slim_path, &opts, &bar)?;
    let original_opts = WriteOptions {
        imatrix: imatrices.as_ref().map(|m| &m.1),
        ..opts
    };
    crate::convert::to_gguf(&ck, &orig_path, &original_opts, &bar)?;
    let t_export = started.elapsed().as_secs_f64() - t_fit;

    progress.note("evaluating both models in llama.cpp on the held-out documents");
    let selections = tasks
        .iter()
        .map(|t| select_docs(t, Some((&plan_path, &plan)), req.limit))
        .collect::<Result<Vec<_>, _>>()?;
    let measured = measure(req, &ck, &plan, &tasks, &selections)?;
    let t_eval = started.elapsed().as_secs_f64() - t_fit - t_export;
    let report = run_report(
        req,
        &plan,
        measured,
        Seconds {
            fit: t_fit,
            export: t_export,
            eval: t_eval,
            total: started.elapsed().as_secs_f64(),
        },
        imatrices.as_ref().map(|m| m.2),
        None,
    );
    write_report(&req.out_dir, &report)?;
    Ok(report)
}

/// The original and the slim model of a run's folder, measured on the same documents.
pub(crate) struct Measured {
    /// The original's figures.
    pub(crate) original: ModelFigures,
    /// The slim model's figures.
    pub(crate) slim: ModelFigures,
    /// The slim model paired against the original.
    pub(crate) paired: Paired,
    /// The documents evaluated, in file order.
    pub(crate) doc_ids: Vec<String>,
}

/// Evaluates the folder's `slim.gguf` (of `plan`) against its `original.gguf` in llama.cpp on
/// each task's selection, and measures both files' prompt speed on the contexts of the first
/// task's first documents. One [`Measured`] per task, in order.
pub(crate) fn measure(
    req: &RunRequest,
    ck: &Checkpoint,
    plan: &Plan,
    tasks: &[TaskData],
    selections: &[Selection<'_>],
) -> Result<Vec<Measured>, PipelineError> {
    let [_, slim_path, orig_path, ..] = outputs(&req.out_dir);
    let bar = indicatif::ProgressBar::hidden();
    let slim = LoadedModel::load(&slim_path)?;
    let orig = LoadedModel::load(&orig_path)?;
    // Prompt speed on the same real text for both: the contexts of the evaluated documents.
    let tokens = speed_tokens(&orig, &selections[0]);
    let speeds = prompt_speeds(&[&orig, &slim], &tokens, req.threads)?;
    let (speed_orig, speed_slim) = (speeds[0], speeds[1]);
    let mut skipped_sorted = plan.skipped_blocks.clone();
    skipped_sorted.sort_unstable();
    // what does not depend on the task: each file's size and KV cache per token
    let (orig_bytes, slim_bytes) = (file_bytes(&orig_path), file_bytes(&slim_path));
    let orig_kv = kv_bytes_per_token(&ck.arch, &[]);
    let slim_kv = kv_bytes_per_token(&ck.arch, &plan.skipped_blocks);
    let mut measured = Vec::new();
    for (task_data, selection) in tasks.iter().zip(selections) {
        let rep = evaluate(
            &slim,
            Some(&orig),
            task_data,
            selection,
            req.n_ctx,
            req.threads,
            &bar,
        )?;
        let n = rep.n_docs;
        let reference = rep.reference.clone().expect("evaluated with a reference");
        measured.push(Measured {
            original: ModelFigures {
                path: orig_path.display().to_string(),
                skipped_blocks: Vec::new(),
                accuracy: reference.accuracy,
                accuracy_ci95: wilson_ci95((reference.accuracy * n as f64).round() as usize, n),
                acc_norm: reference.acc_norm,
                n_docs: n,
                file_bytes: orig_bytes,
                kv_bytes_per_token: orig_kv,
                prompt_tokens_per_s: speed_orig,
            },
            slim: ModelFigures {
                path: slim_path.display().to_string(),
                skipped_blocks: skipped_sorted.clone(),
                accuracy: rep.accuracy,
                accuracy_ci95: rep.accuracy_ci95,
                acc_norm: rep.acc_norm,
                n_docs: n,
                file_bytes: slim_bytes,
                kv_bytes_per_token: slim_kv,
                prompt_tokens_per_s: speed_slim,
            },
            paired: Paired {
                agreement: rep.agreement.unwrap_or(0.0),
                accuracy_diff: rep.accuracy_diff.unwrap_or(0.0),
                accuracy_diff_ci95: rep.accuracy_diff_ci95.unwrap_or([0.0, 0.0]),
                choice_kl_mean: rep.choice_kl_mean.unwrap_or(0.0),
            },
            doc_ids: rep.docs.iter().map(|d| d.doc_id.clone()).collect(),
        });
    }
    Ok(measured)
}

/// The text prompt speed is measured on, tokenized by `model`: the contexts of the first 8
/// documents of `selection`, real text of the task.
pub(crate) fn speed_tokens(model: &LoadedModel, selection: &Selection<'_>) -> Vec<u32> {
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
    model.tokenize(&text, true)
}

/// Prompt tokens per second of each of `models` on `tokens`, as `run` reports them: each
/// model's fastest of 3 turns of 2 x 512 tokens, the models taking turns.
pub(crate) fn prompt_speeds(
    models: &[&LoadedModel],
    tokens: &[u32],
    threads: usize,
) -> Result<Vec<f64>, PipelineError> {
    Ok(compare_prompt_speed(models, tokens, 512, 2, 3, threads)?)
}

/// Prompt tokens per second of one model measured alone, as a budget run's curve reports it:
/// the fastest of 3 windows of 512 tokens after a warm-up.
pub(crate) fn prompt_speed_alone(
    model: &LoadedModel,
    tokens: &[u32],
    threads: usize,
) -> Result<f64, PipelineError> {
    Ok(fastest_window_tokens_per_s(model, tokens, 512, 3, threads)?)
}

/// The report of a run that exported `plan` and measured it, one [`Measured`] per task of
/// `req` (the first is the report's top-level figures).
pub(crate) fn run_report(
    req: &RunRequest,
    plan: &Plan,
    measured: Vec<Measured>,
    seconds: Seconds,
    imatrix_docs: Option<usize>,
    budget: Option<BudgetFigures>,
) -> RunReport {
    let mut measured = req.tasks.iter().zip(measured);
    let (task, first) = measured.next().expect("a run has at least one task");
    RunReport {
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        model: req.model.display().to_string(),
        task: task.display().to_string(),
        quant_type: req.qtype.name().to_string(),
        method: plan.settings.method.name().to_string(),
        objective: plan.settings.objective.name().to_string(),
        skipped_blocks: plan.skipped_blocks.clone(),
        linear_stand_ins: !plan.scales.linear.is_empty(),
        rounds: plan
            .rounds
            .iter()
            .enumerate()
            .map(|(i, r)| RoundPoint {
                k: i + 1,
                chosen: r.chosen,
                loss: r.loss,
            })
            .collect(),
        fit_loss_untrained: plan.final_loss_untrained.unwrap_or(f32::NAN),
        fit_loss: plan.final_loss.unwrap_or(f32::NAN),
        original: first.original,
        slim: first.slim,
        paired: first.paired,
        other_tasks: measured
            .map(|(task, m)| TaskFigures {
                task: task.display().to_string(),
                original: m.original,
                slim: m.slim,
                paired: m.paired,
            })
            .collect(),
        seconds,
        imatrix_docs,
        budget,
    }
}

/// Writes a run's report into its folder: report.md, report.json and report.svg.
pub(crate) fn write_report(dir: &Path, report: &RunReport) -> Result<(), PipelineError> {
    let [_, _, _, md_path, json_path, svg_path] = outputs(dir);
    write_text(&md_path, &report.markdown())?;
    write_text(
        &json_path,
        &(serde_json::to_string_pretty(report).expect("report serializes") + "\n"),
    )?;
    write_text(&svg_path, &report.svg())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_no_k_meets_says_every_ks_drop_and_what_to_change() {
        let error = |drops: Vec<f64>, cut_short: bool| PipelineError::NothingWithinBudget {
            task: "winogrande.jsonl.gz".into(),
            n_docs: 200,
            block: 5,
            drop_points: 4.5,
            agreement: 0.835,
            drops,
            cut_short,
            curve_dir: PathBuf::from("out/curve"),
        };
        let text = error(vec![4.5, 3.0, -0.5], false).to_string();
        assert!(!text.contains("--full-curve"), "{text}");
        for needle in [
            "200 validation documents of winogrande.jsonl.gz",
            "K = 1 (block 5) drops +4.50 points with 83.50% agreement",
            "(drop by K: 1 +4.5, 2 +3.0, 3 -0.5)",
            "--max-drop",
            "--validation-docs",
            "out/curve",
        ] {
            assert!(text.contains(needle), "{needle:?} not in {text}");
        }
        // stopped at K = 1: the one drop known, and how to see the others
        let text = error(vec![4.5], true).to_string();
        assert!(text.contains("(drop by K: 1 +4.5)"), "{text}");
        assert!(text.contains("--full-curve scores every K"), "{text}");
    }
}

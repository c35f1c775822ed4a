//! `hopscotch sweep`: many fits of one model compared on several tasks. Every configuration
//! (fit task x method x objective x scalars trained or not) is fitted for every K, exported, and
//! evaluated in llama.cpp on the held-out documents of every task (the fit tasks and those only
//! evaluated on, `--eval-task`), paired against the original on the same documents; the report ([`report::SweepReport`]) is written as `sweep.json`,
//! `sweep.md` and SVG plots.
//!
//! The work is cut into units, each a file under the output folder written whole or not at all
//! ([`crate::output::AtomicFile`]), so a rerun skips what is done and an interrupted sweep
//! continues where it stopped:
//!
//! - `original.gguf`: the original at `--type`, converted once.
//! - `searches/<task>-hopscotch-<objective>[-noscales].json`: one greedy search per
//!   configuration up to the largest K, its rounds saved after every round
//!   ([`crate::fit::session::search_order`]). The first k blocks of the greedy order are what a search for k blocks
//!   chooses, so every smaller K takes the first rounds of this one search.
//! - `plans/<model>.json`, `<model>` = `<task>-<method>[-<objective>][-noscales]-k<K>`: the
//!   first K blocks of the order with their own final scalar training ([`crate::fit::session::write_plan`]).
//! - `models/<model>.gguf` (with its Ollama Modelfile), and `models/<model>.plan.sha256`, the
//!   hash of the plan it was exported from: a plan recomputed to the same bytes keeps its model.
//! - `evals/<model>__on__<task>.json` and `evals/original__on__<task>.json`: per-document
//!   scores ([`EvalRecord`]). The paired statistics are computed from these when the report is
//!   written, so the original is scored once per task.
//!
//! What is deduplicated: the baselines' block order does not depend on the objective or the
//! scalars (attn-cosine ranks by an importance measured without training, random is a seeded
//! shuffle), so it is computed once per (task, method) and shared by their configurations,
//! each of which still trains its own final scalars with its objective. Without scalar training
//! a baseline's model does not depend on the objective at all, so `--no-scales-too` adds one
//! configuration per (task, baseline), named without an objective (its plan records `ce`, whose
//! fit data needs no teacher). Hopscotch without scalars scores candidates by the untrained loss
//! of its objective, so it stays one configuration per objective.
//!
//! Held-out documents: every configuration uses the same `--seed` and `--fit-docs`, and the fit
//! split depends only on those and the document ids ([`crate::task::split`]), so every plan
//! fitted on a task shares one split; each plan is checked to hold it. A task's evaluation
//! documents are its documents less that split, the first `--limit` in file order: the same
//! documents for the original and for every model, whichever task it was fitted on.
//!
//! `sweep-config.json` records what the units depend on (the model's fingerprint, the tasks'
//! hashes, the fit settings, the type, the limit, the context); a folder holding a sweep of
//! another configuration is refused unless `force`, which removes its sweep files first. The
//! lists of K, methods, objectives and tasks may change between runs: units are named by what
//! they are, so a longer K list extends the searches and a new task adds its units.

mod config;
mod fit;
pub mod report;

pub use crate::task::task_name;
pub use config::{Config, EvalRecord, SweepConfig};

use config::{check_config, Layout, SweepTask, UNIT_DIRS};
use fit::fit_all;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::eval::task::{evaluate, TaskEvalError};
use crate::export::export;
use crate::fit::options::{model_defaults, FitError};
use crate::fit::session::check_memory;
use crate::gguf::consts::QuantType;
use crate::llamacpp::LoadedModel;
use crate::output::{file_bytes, write_text};
use crate::pipeline::PipelineError;
use crate::plan::{FitSettings, Method, ModelFingerprint, Objective, Plan};
use crate::progress::Progress;
use crate::task::{self, DocBody, TaskData};
use crate::write::WriteOptions;

use report::SweepReport;

/// What `hopscotch sweep` is asked to do.
#[derive(Debug, Clone)]
pub struct SweepRequest {
    /// HF folder or GGUF.
    pub model: PathBuf,
    /// The task files (multiple-choice log-likelihood requests): the first `fit_tasks` are
    /// fitted on, and every model is evaluated on all of them.
    pub tasks: Vec<PathBuf>,
    /// How many of `tasks`, from the first, are fitted on (the rest are only evaluated on).
    pub fit_tasks: usize,
    /// The K values (attention blocks skipped).
    pub skips: Vec<usize>,
    /// How blocks are chosen.
    pub methods: Vec<Method>,
    /// The training objectives.
    pub objectives: Vec<Objective>,
    /// Also every method without scalar training.
    pub no_scales_too: bool,
    /// Quant type of every evaluated file.
    pub qtype: QuantType,
    /// Held-out documents evaluated per task (all when `None`).
    pub limit: Option<usize>,
    /// Fit settings shared by every configuration (`method`, `objective`, `skip` and
    /// `train_scales` are set per configuration).
    pub fit: FitSettings,
    /// The output folder.
    pub out_dir: PathBuf,
    /// Remove a sweep of another configuration from the folder and start over.
    pub force: bool,
    /// Threads for llama.cpp's conversion, quantization and evaluation.
    pub threads: usize,
    /// Context of an evaluation decode.
    pub n_ctx: usize,
}

/// Work done and reused, by kind of unit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct UnitCounts {
    /// The original at the type (0 or 1).
    pub original: usize,
    /// Greedy search rounds.
    pub search_rounds: usize,
    /// Plans (a final scalar training each).
    pub plans: usize,
    /// Exported models.
    pub models: usize,
    /// Evaluations of a model on a task.
    pub evals: usize,
}

/// Units computed by this run and units found done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Units {
    /// Computed by this run.
    pub computed: UnitCounts,
    /// Found done in the folder and reused.
    pub reused: UnitCounts,
}

/// Wall time of this run per phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct SweepSeconds {
    /// Opening the model, reading and checking the tasks.
    pub prepare: f64,
    /// Searches and final trainings.
    pub fit: f64,
    /// Conversion of the original and exports.
    pub export: f64,
    /// Evaluations in llama.cpp.
    pub eval: f64,
    /// Everything.
    pub total: f64,
}

/// A slim model of the sweep: a configuration at one K.
pub struct Slim {
    /// Its configuration.
    pub config: Config,
    /// K.
    pub k: usize,
    /// `<config>-k<K>`.
    pub name: String,
    /// Its plan.
    pub plan: Plan,
    /// sha256 of the plan file.
    pub plan_sha256: String,
}

/// The checked request: K sorted, lists deduplicated.
struct Checked {
    skips: Vec<usize>,
    methods: Vec<Method>,
    objectives: Vec<Objective>,
}

fn check_lists(req: &SweepRequest) -> Result<Checked, PipelineError> {
    if req.skips.is_empty() {
        return Err(PipelineError::EmptyList { option: "skip" });
    }
    if req.skips.contains(&0) {
        return Err(PipelineError::ZeroSkip);
    }
    if req.methods.is_empty() {
        return Err(PipelineError::EmptyList { option: "method" });
    }
    if req.objectives.is_empty() {
        return Err(PipelineError::EmptyList {
            option: "objective",
        });
    }
    if req.tasks.is_empty() {
        return Err(PipelineError::EmptyList { option: "task" });
    }
    let mut skips = req.skips.clone();
    skips.sort_unstable();
    skips.dedup();
    let mut methods = Vec::new();
    for &m in &req.methods {
        if !methods.contains(&m) {
            methods.push(m);
        }
    }
    let mut objectives = Vec::new();
    for &o in &req.objectives {
        if !objectives.contains(&o) {
            objectives.push(o);
        }
    }
    Ok(Checked {
        skips,
        methods,
        objectives,
    })
}

/// Reads the tasks, each with its name, and refuses duplicates.
fn read_tasks(req: &SweepRequest) -> Result<Vec<(String, TaskData)>, PipelineError> {
    let mut tasks: Vec<(String, TaskData)> = Vec::new();
    for (i, path) in req.tasks.iter().enumerate() {
        let name = task_name(path);
        let data = task::load(path)?;
        for (j, (other, other_data)) in tasks.iter().enumerate() {
            let what = if *other == name {
                "the same name"
            } else if other_data.sha256 == data.sha256 {
                "the same content"
            } else {
                continue;
            };
            return Err(PipelineError::DuplicateTask {
                first: req.tasks[j].clone(),
                second: req.tasks[i].clone(),
                what,
            });
        }
        tasks.push((name, data));
    }
    Ok(tasks)
}

/// Splits the tasks as `req.fit` splits them, and refuses files that are not multiple-choice
/// requests, docs without a gold choice among those evaluated, and tasks with no document left
/// to evaluate.
fn split_tasks(
    req: &SweepRequest,
    read: Vec<(String, TaskData)>,
) -> Result<Vec<SweepTask>, PipelineError> {
    let mut tasks = Vec::with_capacity(read.len());
    for ((name, data), path) in read.into_iter().zip(&req.tasks) {
        let t = SweepTask::new(name, data, &req.fit);
        for doc in t.selection(req.limit)?.docs {
            if let DocBody::Choices(c) = &doc.body {
                if c.gold.is_none() {
                    return Err(TaskEvalError::NoGold {
                        path: path.clone(),
                        line: doc.line,
                        doc_id: doc.id.clone(),
                    }
                    .into());
                }
            }
        }
        tasks.push(t);
    }
    Ok(tasks)
}

/// Runs the sweep (see the module documentation) and returns its report, also written to the
/// folder.
pub fn sweep(req: &SweepRequest, progress: &Progress) -> Result<SweepReport, PipelineError> {
    let started = Instant::now();
    let lists = check_lists(req)?;
    let k_max = *lists.skips.last().expect("checked non-empty");
    FitSettings {
        skip: k_max,
        ..req.fit.clone()
    }
    .validate()
    .map_err(FitError::from)?;
    let read = read_tasks(req)?;
    let task_names: Vec<String> = read.iter().map(|(name, _)| name.clone()).collect();
    let ck = Checkpoint::open(&req.model)?;
    let n_layer = ck.arch.n_layer;
    if k_max >= n_layer {
        return Err(FitError::TooManyBlocks {
            model: ck.display_path(),
            skip: k_max,
            n_layer,
        }
        .into());
    }
    ck.validate_tensors()?;
    // each task is fitted on its own: the defaults that depend on the tasks follow the smallest
    let smallest = read.iter().map(|(_, d)| d.docs.len()).min().unwrap_or(0);
    let req = &SweepRequest {
        fit: model_defaults(&req.fit, &ck.arch, &[smallest]),
        ..req.clone()
    };
    let tasks = split_tasks(req, read)?;
    // the KL objective's teacher is the largest any configuration holds
    let heaviest = FitSettings {
        objective: Objective::Kl,
        ..req.fit.clone()
    };
    let memory = check_memory(&ck, &heaviest, progress)?;
    let fingerprint = ModelFingerprint::of(&ck);
    let layout = Layout {
        dir: req.out_dir.clone(),
    };
    for d in UNIT_DIRS {
        let dir = layout.dir.join(d);
        std::fs::create_dir_all(&dir).map_err(|source| PipelineError::Io { path: dir, source })?;
    }
    let config = SweepConfig {
        model: fingerprint.clone(),
        quant_type: req.qtype.name().to_string(),
        limit: req.limit,
        n_ctx: req.n_ctx,
        fit: FitSettings {
            method: Method::Hopscotch,
            objective: Objective::Kl,
            skip: 1,
            train_scales: true,
            ..req.fit.clone()
        }
        .recorded(0, 0),
        tasks: tasks
            .iter()
            .map(|t| (t.name.clone(), t.data.sha256.clone()))
            .collect(),
        skips: lists.skips.clone(),
        methods: lists.methods.iter().map(|m| m.name().to_string()).collect(),
        objectives: lists
            .objectives
            .iter()
            .map(|&o| o.name().to_string())
            .collect(),
        no_scales_too: req.no_scales_too,
    };
    check_config(&layout, &config, req.force)?;
    let configs = Config::all(
        req.fit_tasks.min(tasks.len()),
        &lists.methods,
        &lists.objectives,
        req.no_scales_too,
    );
    progress.note(&format!(
        "sweep: {} configurations x {} values of K = {} models, each evaluated on {} tasks",
        configs.len(),
        lists.skips.len(),
        configs.len() * lists.skips.len(),
        tasks.len()
    ));
    let mut units = Units::default();
    let mut seconds = SweepSeconds {
        prepare: started.elapsed().as_secs_f64(),
        ..SweepSeconds::default()
    };

    // The original at the type.
    let phase = Instant::now();
    let bar = indicatif::ProgressBar::hidden();
    if layout.original().is_file() {
        units.reused.original += 1;
    } else {
        progress.note(&format!("writing original.gguf as {}", req.qtype.name()));
        let opts = WriteOptions {
            qtype: req.qtype,
            force: false,
            threads: req.threads,
            imatrix: None,
        };
        crate::convert::to_gguf(&ck, &layout.original(), &opts, &bar)?;
        units.computed.original += 1;
    }
    seconds.export += phase.elapsed().as_secs_f64();

    // Searches and plans.
    let phase = Instant::now();
    let slims = fit_all(
        req,
        &ck,
        &lists.skips,
        &configs,
        &tasks,
        &task_names,
        &fingerprint,
        &layout,
        &mut units,
        memory.recompute,
        progress,
    )?;
    seconds.fit += phase.elapsed().as_secs_f64();

    // Exports.
    let phase = Instant::now();
    for s in &slims {
        let gguf = layout.model(&s.name);
        let source = layout.model_source(&s.name);
        let current = gguf.is_file()
            && std::fs::read_to_string(&source).is_ok_and(|t| t.trim() == s.plan_sha256);
        if current {
            units.reused.models += 1;
            continue;
        }
        progress.note(&format!("exporting {}", s.name));
        let opts = WriteOptions {
            qtype: req.qtype,
            force: true,
            threads: req.threads,
            imatrix: None,
        };
        export(&ck, &s.plan, &layout.plan(&s.name), &gguf, &opts, &bar)?;
        write_text(&source, &format!("{}\n", s.plan_sha256))?;
        units.computed.models += 1;
    }
    seconds.export += phase.elapsed().as_secs_f64();

    // Evaluations.
    let phase = Instant::now();
    let selections = tasks
        .iter()
        .map(|t| t.selection(req.limit))
        .collect::<Result<Vec<_>, _>>()?;
    let mut models: Vec<(String, Option<String>, PathBuf)> =
        vec![("original".to_string(), None, layout.original())];
    models.extend(slims.iter().map(|s| {
        (
            s.name.clone(),
            Some(s.plan_sha256.clone()),
            layout.model(&s.name),
        )
    }));
    let mut records: BTreeMap<(String, String), EvalRecord> = BTreeMap::new();
    for (name, plan_sha, gguf) in &models {
        let mut loaded: Option<LoadedModel> = None;
        for (t, sel) in tasks.iter().zip(&selections) {
            let path = layout.eval(name, &t.name);
            let ids: Vec<&str> = sel.docs.iter().map(|d| d.id.as_str()).collect();
            let existing = std::fs::read_to_string(&path)
                .ok()
                .and_then(|text| serde_json::from_str::<EvalRecord>(&text).ok())
                .filter(|r| {
                    r.model == *name
                        && r.task == t.name
                        && r.plan_sha256 == *plan_sha
                        && r.n_ctx == req.n_ctx
                        && r.docs
                            .iter()
                            .map(|d| d.doc_id.as_str())
                            .eq(ids.iter().copied())
                });
            let record = match existing {
                Some(r) => {
                    units.reused.evals += 1;
                    r
                }
                None => {
                    progress.note(&format!(
                        "evaluating {name} on {} ({} documents)",
                        t.name,
                        sel.docs.len()
                    ));
                    if loaded.is_none() {
                        loaded = Some(LoadedModel::load(gguf)?);
                    }
                    let m = loaded.as_ref().expect("loaded above");
                    let eval_bar = progress.bar(sel.docs.len(), "evaluate");
                    let rep = evaluate(m, None, &t.data, sel, req.n_ctx, req.threads, &eval_bar)?;
                    let r = EvalRecord {
                        model: name.clone(),
                        task: t.name.clone(),
                        plan_sha256: plan_sha.clone(),
                        n_ctx: req.n_ctx,
                        excluded_docs: rep.excluded_docs,
                        accuracy: rep.accuracy,
                        acc_norm: rep.acc_norm,
                        docs: rep.docs,
                    };
                    let text = serde_json::to_string(&r).expect("record serializes") + "\n";
                    write_text(&path, &text)?;
                    units.computed.evals += 1;
                    r
                }
            };
            records.insert((name.clone(), t.name.clone()), record);
        }
    }
    seconds.eval += phase.elapsed().as_secs_f64();
    seconds.total = started.elapsed().as_secs_f64();

    let report = report::build(&report::Inputs {
        model: req.model.display().to_string(),
        arch: &ck.arch,
        quant_type: req.qtype.name().to_string(),
        limit: req.limit,
        fit: config.fit.clone(),
        task_names: &task_names,
        task_paths: req.tasks.iter().map(|p| p.display().to_string()).collect(),
        skips: &lists.skips,
        slims: &slims,
        records: &records,
        original_bytes: file_bytes(&layout.original()),
        model_bytes: slims
            .iter()
            .map(|s| (s.name.clone(), file_bytes(&layout.model(&s.name))))
            .collect(),
        units,
        seconds,
    })?;
    write_text(
        &layout.dir.join("sweep.json"),
        &(serde_json::to_string_pretty(&report).expect("report serializes") + "\n"),
    )?;
    write_text(&layout.dir.join("sweep.md"), &report.markdown())?;
    for (file, svg) in report.svgs() {
        write_text(&layout.dir.join(file), &svg)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests;

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
//!   ([`search_order`]). The first k blocks of the greedy order are what a search for k blocks
//!   chooses, so every smaller K takes the first rounds of this one search.
//! - `plans/<model>.json`, `<model>` = `<task>-<method>[-<objective>][-noscales]-k<K>`: the
//!   first K blocks of the order with their own final scalar training ([`write_plan`]).
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

pub mod report;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::eval::task::{evaluate, select_docs, DocScore, Selection, TaskEvalError};
use crate::export::{export, ExportError, ExportOptions};
use crate::fit::options::FitError;
use crate::fit::search::Choice;
use crate::fit::session::{search_order, write_plan, FitModel, FitTask};
use crate::gguf::consts::QuantType;
use crate::llamacpp::{LlamaError, LoadedModel};
use crate::output::{AtomicFile, OutputError};
use crate::plan::{FitSettings, Method, ModelFingerprint, Objective, Plan, PlanError};
use crate::progress::Progress;
use crate::task::{self, DocBody, TaskData, TaskError};
use crate::write::WriteError;

use report::SweepReport;

/// Errors of a sweep, each naming the option, file or stage at fault.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
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
    Search(#[from] Box<FitError>),
    /// A plan could not be read.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The model could not be opened.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// An export failed.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// Writing the original at the type failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A task file could not be read.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// A task cannot be evaluated, or an evaluation failed.
    #[error(transparent)]
    Eval(#[from] TaskEvalError),
    /// llama.cpp could not load a model.
    #[error(transparent)]
    Llama(#[from] LlamaError),
    /// An output could not be written.
    #[error(transparent)]
    Output(#[from] OutputError),
}

impl From<FitError> for SweepError {
    fn from(e: FitError) -> Self {
        SweepError::Search(Box::new(e))
    }
}

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

/// One configuration: what is fitted, for every K.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Index of the fit task in the request.
    pub fit_task: usize,
    /// How blocks are chosen.
    pub method: Method,
    /// The objective; `None` for a baseline without scalar training, which no objective changes.
    pub objective: Option<Objective>,
    /// Whether scalars are trained (in the search and the final training).
    pub train_scales: bool,
}

impl Config {
    /// Every configuration of a request, in report order: per fit task, per method, scalars
    /// trained before not, per objective (see the module documentation for what is merged).
    pub fn all(
        n_tasks: usize,
        methods: &[Method],
        objectives: &[Objective],
        no_scales_too: bool,
    ) -> Vec<Config> {
        let mut out = Vec::new();
        for fit_task in 0..n_tasks {
            for &method in methods {
                for train_scales in [true, false] {
                    if !train_scales && !no_scales_too {
                        continue;
                    }
                    let objectives: Vec<Option<Objective>> =
                        if !train_scales && method != Method::Hopscotch {
                            vec![None]
                        } else {
                            objectives.iter().copied().map(Some).collect()
                        };
                    for objective in objectives {
                        out.push(Config {
                            fit_task,
                            method,
                            objective,
                            train_scales,
                        });
                    }
                }
            }
        }
        out
    }

    /// `<task>-<method>[-<objective>][-noscales]`.
    pub fn name(&self, task_names: &[String]) -> String {
        let mut s = format!("{}-{}", task_names[self.fit_task], self.method.name());
        if let Some(o) = self.objective {
            s += "-";
            s += o.name();
        }
        if !self.train_scales {
            s += "-noscales";
        }
        s
    }

    /// The objective the fit runs with (`ce` where none matters: no teacher needed).
    pub fn fit_objective(&self) -> Objective {
        self.objective.unwrap_or(Objective::Ce)
    }

    /// The fit settings of this configuration at K = `k`.
    pub fn options(&self, base: &FitSettings, k: usize) -> FitSettings {
        FitSettings {
            method: self.method,
            objective: self.fit_objective(),
            skip: k,
            train_scales: self.train_scales,
            ..base.clone()
        }
    }
}

/// A task's name: its file name less `.gz`, `.jsonl` and `.json`, characters other than
/// letters, digits, `_`, `.` and `-` replaced by `_` (it names files).
pub fn task_name(path: &Path) -> String {
    let mut name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for ext in [".gz", ".jsonl", ".json"] {
        if let Some(stem) = name.strip_suffix(ext) {
            name = stem.to_string();
        }
    }
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "task".into()
    } else {
        name
    }
}

/// What the sweep's units depend on, recorded in `sweep-config.json`: a folder whose record
/// differs in any of the compared fields is refused ([`SweepConfig::differences`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepConfig {
    /// The model's fingerprint.
    pub model: ModelFingerprint,
    /// Quant type of every evaluated file.
    pub quant_type: String,
    /// Held-out documents per task.
    pub limit: Option<usize>,
    /// Context of an evaluation decode.
    pub n_ctx: usize,
    /// The shared fit settings, as a plan records them for a Hopscotch KL fit of one block
    /// with 0 batches (so `candidate_steps` and `final_steps` of 0 mean "the default epochs").
    pub fit: FitSettings,
    /// Every task the folder has seen: name -> sha256 of the file.
    pub tasks: BTreeMap<String, String>,
    /// The K values of the latest run (not compared).
    pub skips: Vec<usize>,
    /// The methods of the latest run (not compared).
    pub methods: Vec<String>,
    /// The objectives of the latest run (not compared).
    pub objectives: Vec<String>,
    /// `--no-scales-too` of the latest run (not compared).
    pub no_scales_too: bool,
}

impl SweepConfig {
    /// What differs from `recorded` in the fields units depend on, one phrase each ("another
    /// --type (q8_0 recorded, f16 now)"); tasks only where both know the name.
    pub fn differences(&self, recorded: &SweepConfig) -> Vec<String> {
        let mut out = Vec::new();
        let mut differ = |what: &str, old: String, new: String| {
            if old != new {
                out.push(format!("another {what} ({old} recorded, {new} now)"));
            }
        };
        differ("model", recorded.model.to_string(), self.model.to_string());
        differ(
            "--type",
            recorded.quant_type.clone(),
            self.quant_type.clone(),
        );
        let limit = |l: Option<usize>| l.map_or("none".to_string(), |n| n.to_string());
        differ("--limit", limit(recorded.limit), limit(self.limit));
        differ("--ctx", recorded.n_ctx.to_string(), self.n_ctx.to_string());
        let settings = |s: &FitSettings| serde_json::to_value(s).unwrap_or_default();
        let (old, new) = (settings(&recorded.fit), settings(&self.fit));
        if let (Some(old), Some(new)) = (old.as_object(), new.as_object()) {
            for (key, value) in new {
                let before = old.get(key).cloned().unwrap_or_default();
                differ(
                    &format!("fit setting {key}"),
                    before.to_string(),
                    value.to_string(),
                );
            }
        }
        for (name, sha) in &self.tasks {
            if let Some(before) = recorded.tasks.get(name) {
                differ(
                    &format!("task file {name}"),
                    format!("sha256 {}", &before[..before.len().min(12)]),
                    format!("sha256 {}", &sha[..sha.len().min(12)]),
                );
            }
        }
        out
    }
}

/// One model's scores on one task's evaluation documents: `evals/<model>__on__<task>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalRecord {
    /// `original` or the slim model's name.
    pub model: String,
    /// The task's name.
    pub task: String,
    /// sha256 of the plan the model was exported from (`None` for the original).
    pub plan_sha256: Option<String>,
    /// Context of the decodes.
    pub n_ctx: usize,
    /// Documents held out of the file as fit documents.
    pub excluded_docs: usize,
    /// Fraction of documents answered correctly.
    pub accuracy: f64,
    /// The same with scores per character.
    pub acc_norm: f64,
    /// Per-document scores, in file order.
    pub docs: Vec<DocScore>,
}

/// The sweep's files under the output folder.
struct Layout {
    dir: PathBuf,
}

/// Sub-folders of the output folder holding units.
const UNIT_DIRS: [&str; 4] = ["searches", "plans", "models", "evals"];

impl Layout {
    fn config(&self) -> PathBuf {
        self.dir.join("sweep-config.json")
    }
    fn original(&self) -> PathBuf {
        self.dir.join("original.gguf")
    }
    fn search(&self, config: &str) -> PathBuf {
        self.dir.join("searches").join(format!("{config}.json"))
    }
    fn plan(&self, model: &str) -> PathBuf {
        self.dir.join("plans").join(format!("{model}.json"))
    }
    fn model(&self, model: &str) -> PathBuf {
        self.dir.join("models").join(format!("{model}.gguf"))
    }
    fn model_source(&self, model: &str) -> PathBuf {
        self.dir.join("models").join(format!("{model}.plan.sha256"))
    }
    fn eval(&self, model: &str, task: &str) -> PathBuf {
        self.dir
            .join("evals")
            .join(format!("{model}__on__{task}.json"))
    }

    /// Whether any file of a sweep is there.
    fn has_sweep_files(&self) -> bool {
        self.original().exists()
            || UNIT_DIRS
                .iter()
                .any(|d| std::fs::read_dir(self.dir.join(d)).is_ok_and(|mut e| e.next().is_some()))
    }

    /// Removes the sweep's files: the unit folders' files, the original, the report and the
    /// configuration (nothing else in the folder).
    fn clear(&self) -> Result<(), SweepError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SweepError::Io { path, source }
        };
        for d in UNIT_DIRS {
            let dir = self.dir.join(d);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries {
                let path = e.map_err(io(&dir))?.path();
                let ours = path.extension().is_some_and(|x| {
                    ["json", "gguf", "Modelfile", "sha256"].contains(&&*x.to_string_lossy())
                });
                if path.is_file() && ours {
                    std::fs::remove_file(&path).map_err(io(&path))?;
                }
            }
        }
        let mut files = vec![
            self.original(),
            self.config(),
            self.dir.join("sweep.json"),
            self.dir.join("sweep.md"),
        ];
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            files.extend(
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| {
                        p.extension().is_some_and(|x| x == "svg")
                            && p.file_name().is_some_and(|n| {
                                let n = n.to_string_lossy();
                                n.starts_with("accuracy-") || n == "agreement.svg"
                            })
                    }),
            );
        }
        for f in files {
            if f.is_file() {
                std::fs::remove_file(&f).map_err(io(&f))?;
            }
        }
        Ok(())
    }
}

/// Writes `text` to `path` whole or not at all, replacing it.
pub(crate) fn write_text(path: &Path, text: &str) -> Result<(), OutputError> {
    let mut f = AtomicFile::create(path, true)?;
    f.write_all(text.as_bytes())
        .map_err(|source| OutputError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    f.commit()
}

fn sha256_file(path: &Path) -> Result<String, SweepError> {
    let bytes = std::fs::read(path).map_err(|source| SweepError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// A task of the sweep: read, checked, split.
struct SweepTask {
    name: String,
    data: TaskData,
    /// Ids of the fit documents, in file order (as plans record them).
    fit_ids: Vec<String>,
    /// Ids of the documents only the final training uses (`--final-docs`), in file order.
    final_ids: Vec<String>,
}

impl SweepTask {
    /// A task split as `options` split it: its fit documents and the final training's.
    fn new(name: String, data: TaskData, options: &FitSettings) -> Self {
        let fit_ids = task::split_ids(&data.docs, options.fit_docs, options.seed);
        let final_ids = task::ids_besides(
            &task::split_ids(&data.docs, options.resolved_final_docs(), options.seed),
            &fit_ids,
        );
        Self {
            name,
            data,
            fit_ids,
            final_ids,
        }
    }

    /// The evaluation documents: the file's documents less those of the fit and the final
    /// training (the same for every configuration), the first `limit`.
    fn selection(&self, limit: Option<usize>) -> Result<Selection<'_>, TaskEvalError> {
        let all = select_docs(&self.data, None, None)?;
        let fit: std::collections::HashSet<&str> = self
            .fit_ids
            .iter()
            .chain(&self.final_ids)
            .map(String::as_str)
            .collect();
        let kept: Vec<_> = all
            .docs
            .into_iter()
            .filter(|d| !fit.contains(d.id.as_str()))
            .collect();
        let excluded = self.data.docs.len() - kept.len();
        let docs: Vec<_> = kept.into_iter().take(limit.unwrap_or(usize::MAX)).collect();
        if docs.is_empty() {
            return Err(TaskEvalError::NoDocs {
                path: self.data.path.clone(),
                docs: self.data.docs.len(),
                excluded,
            });
        }
        Ok(Selection { docs, excluded })
    }
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

fn check_lists(req: &SweepRequest) -> Result<Checked, SweepError> {
    if req.skips.is_empty() {
        return Err(SweepError::EmptyList { option: "skip" });
    }
    if req.skips.contains(&0) {
        return Err(SweepError::ZeroSkip);
    }
    if req.methods.is_empty() {
        return Err(SweepError::EmptyList { option: "method" });
    }
    if req.objectives.is_empty() {
        return Err(SweepError::EmptyList {
            option: "objective",
        });
    }
    if req.tasks.is_empty() {
        return Err(SweepError::EmptyList { option: "task" });
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

/// Reads the tasks and refuses duplicates, files that are not multiple-choice requests, docs
/// without a gold choice, and tasks with no document left to evaluate.
fn load_tasks(req: &SweepRequest) -> Result<Vec<SweepTask>, SweepError> {
    let mut tasks: Vec<SweepTask> = Vec::new();
    for (i, path) in req.tasks.iter().enumerate() {
        let name = task_name(path);
        let data = task::load(path)?;
        for (j, t) in tasks.iter().enumerate() {
            let what = if t.name == name {
                "the same name"
            } else if t.data.sha256 == data.sha256 {
                "the same content"
            } else {
                continue;
            };
            return Err(SweepError::DuplicateTask {
                first: req.tasks[j].clone(),
                second: req.tasks[i].clone(),
                what,
            });
        }
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

/// Checks the folder's recorded configuration against `config` (clearing the folder with
/// `force`) and records the new one, with every task either has seen.
fn check_config(layout: &Layout, config: &SweepConfig, force: bool) -> Result<(), SweepError> {
    let path = layout.config();
    let mut record = config.clone();
    if force {
        layout.clear()?;
    } else if path.is_file() {
        let text = std::fs::read_to_string(&path).map_err(|source| SweepError::Io {
            path: path.clone(),
            source,
        })?;
        let old: SweepConfig = serde_json::from_str(&text).map_err(|e| SweepError::BadConfig {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let differences = config.differences(&old);
        if !differences.is_empty() {
            return Err(SweepError::ConfigMismatch {
                path,
                what: differences.join(", "),
            });
        }
        for (name, sha) in old.tasks {
            record.tasks.entry(name).or_insert(sha);
        }
    } else if layout.has_sweep_files() {
        return Err(SweepError::Unrecorded {
            path: layout.dir.clone(),
        });
    }
    let text = serde_json::to_string_pretty(&record).expect("config serializes") + "\n";
    write_text(&path, &text)?;
    Ok(())
}

/// Whether an existing plan is the one `config` at `k` would write: same model, task, split,
/// settings (the resolved step counts aside), and `k` blocks.
fn plan_is_current(
    plan: &Plan,
    expected: &FitSettings,
    model: &ModelFingerprint,
    task: &SweepTask,
    k: usize,
) -> bool {
    plan.model == *model
        && plan.task.sha256 == task.data.sha256
        && plan.fit_doc_ids == task.fit_ids
        && (plan.final_doc_ids == task.final_ids || !plan.settings.uses_final_docs())
        && plan.skipped_blocks.len() == k
        && plan.settings
            == FitSettings {
                candidate_steps: plan.settings.candidate_steps,
                final_steps: plan.settings.final_steps,
                ..expected.clone()
            }
}

/// The first `k` blocks of an order, with their rounds.
fn prefix(choice: &Choice, k: usize) -> Choice {
    Choice {
        skipped: choice.skipped[..k.min(choice.skipped.len())].to_vec(),
        rounds: choice.rounds[..k.min(choice.rounds.len())].to_vec(),
        attn_importance: choice.attn_importance.clone(),
    }
}

/// What the fit phase keeps loaded: the candle model (loaded on first need), fit data per
/// (task, objective), baseline orders per (task, method).
struct Fitting<'a> {
    req: &'a SweepRequest,
    fingerprint: &'a ModelFingerprint,
    progress: &'a Progress,
    model: Option<FitModel>,
    data: Vec<((usize, Objective), FitTask)>,
    orders: Vec<((usize, Method), Choice)>,
}

impl Fitting<'_> {
    fn model(&mut self) -> Result<&FitModel, SweepError> {
        if self.model.is_none() {
            self.progress.note("loading the model for fitting");
            let ck = Checkpoint::open(&self.req.model)?;
            self.model = Some(FitModel::load(ck, self.fingerprint.clone())?);
        }
        Ok(self.model.as_ref().expect("loaded above"))
    }

    /// The fit data of a task for an objective, built on first need.
    fn task(
        &mut self,
        tasks: &[SweepTask],
        t: usize,
        options: &FitSettings,
    ) -> Result<usize, SweepError> {
        let key = (t, options.objective);
        if let Some(i) = self.data.iter().position(|(k, _)| *k == key) {
            return Ok(i);
        }
        self.model()?;
        let model = self.model.as_ref().expect("loaded above");
        self.progress.note(&format!(
            "building the fit data of {} ({})",
            tasks[t].name,
            options.objective.name()
        ));
        // The data is shared by configurations with and without scalars: build the final
        // training's too.
        let ft = FitTask::build(
            model,
            &self.req.tasks[t],
            &tasks[t].data,
            &FitSettings {
                train_scales: true,
                ..options.clone()
            },
            self.progress,
        )?;
        self.data.push((key, ft));
        Ok(self.data.len() - 1)
    }
}

/// Runs the sweep (see the module documentation) and returns its report, also written to the
/// folder.
pub fn sweep(req: &SweepRequest, progress: &Progress) -> Result<SweepReport, SweepError> {
    let started = Instant::now();
    let lists = check_lists(req)?;
    let k_max = *lists.skips.last().expect("checked non-empty");
    FitSettings {
        skip: k_max,
        ..req.fit.clone()
    }
    .validate()
    .map_err(FitError::from)?;
    let tasks = load_tasks(req)?;
    let task_names: Vec<String> = tasks.iter().map(|t| t.name.clone()).collect();
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
    let fingerprint = ModelFingerprint::of(&ck);
    let layout = Layout {
        dir: req.out_dir.clone(),
    };
    for d in UNIT_DIRS {
        let dir = layout.dir.join(d);
        std::fs::create_dir_all(&dir).map_err(|source| SweepError::Io { path: dir, source })?;
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
        crate::convert::to_gguf(
            &ck,
            &layout.original(),
            req.qtype,
            false,
            req.threads,
            None,
            &bar,
        )?;
        units.computed.original += 1;
    }
    seconds.export += phase.elapsed().as_secs_f64();

    // Searches and plans.
    let phase = Instant::now();
    let slims = fit_all(
        req,
        &lists.skips,
        &configs,
        &tasks,
        &task_names,
        &fingerprint,
        &layout,
        &mut units,
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
        let opts = ExportOptions {
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

fn file_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The plans of every configuration at every K: reused where current, otherwise from one
/// search per configuration up to the largest K needed and a final training per K.
#[allow(clippy::too_many_arguments)]
fn fit_all(
    req: &SweepRequest,
    skips: &[usize],
    configs: &[Config],
    tasks: &[SweepTask],
    task_names: &[String],
    fingerprint: &ModelFingerprint,
    layout: &Layout,
    units: &mut Units,
    progress: &Progress,
) -> Result<Vec<Slim>, SweepError> {
    let mut fitting = Fitting {
        req,
        fingerprint,
        progress,
        model: None,
        data: Vec::new(),
        orders: Vec::new(),
    };
    let mut slims = Vec::new();
    let k_max = *skips.last().expect("checked non-empty");
    for config in configs {
        let config_name = config.name(task_names);
        let task = &tasks[config.fit_task];
        let mut current: Vec<Option<Plan>> = skips
            .iter()
            .map(|&k| {
                let expected = config.options(&req.fit, k).recorded(0, 0);
                Plan::load(&layout.plan(&format!("{config_name}-k{k}")))
                    .ok()
                    .filter(|p| plan_is_current(p, &expected, fingerprint, task, k))
            })
            .collect();
        let mut written = 0;
        if current.iter().any(Option::is_none) {
            // The whole order, so that every plan kept is checked to be a prefix of it (a
            // search file makes this free; without one the search runs again).
            let options = config.options(&req.fit, k_max);
            let d = fitting.task(tasks, config.fit_task, &options)?;
            let key = (config.fit_task, config.method);
            let order = if let Some((_, c)) = fitting.orders.iter().find(|(k, _)| *k == key) {
                c.clone()
            } else {
                let rounds_file =
                    (config.method == Method::Hopscotch).then(|| layout.search(&config_name));
                progress.note(&format!(
                    "choosing the blocks of {config_name} up to K = {k_max}"
                ));
                let model = fitting.model.as_ref().expect("loaded with the data");
                let (choice, resumed) = search_order(
                    model,
                    &fitting.data[d].1,
                    &options,
                    rounds_file.as_deref(),
                    progress,
                )?;
                if config.method == Method::Hopscotch {
                    units.reused.search_rounds += resumed;
                    units.computed.search_rounds += choice.rounds.len() - resumed;
                } else {
                    // A baseline's order depends on neither the objective nor the scalars.
                    fitting.orders.push((key, choice.clone()));
                }
                choice
            };
            let model = fitting.model.as_ref().expect("loaded with the data");
            for (slot, &k) in current.iter_mut().zip(skips) {
                let choice = prefix(&order, k);
                if slot
                    .as_ref()
                    .is_some_and(|p| p.skipped_blocks == choice.skipped)
                {
                    continue;
                }
                let name = format!("{config_name}-k{k}");
                progress.note(&format!(
                    "training the final scalars of {name}: blocks {:?}",
                    choice.skipped
                ));
                let (plan, _, _) = write_plan(
                    model,
                    &fitting.data[d].1,
                    &config.options(&req.fit, k),
                    &choice,
                    &layout.plan(&name),
                    true,
                    progress,
                )?;
                *slot = Some(plan);
                written += 1;
            }
        }
        units.computed.plans += written;
        units.reused.plans += skips.len() - written;
        for (plan, &k) in current.into_iter().zip(skips) {
            let name = format!("{config_name}-k{k}");
            let path = layout.plan(&name);
            let plan = plan.expect("every plan is current or written above");
            if plan.fit_doc_ids != task.fit_ids {
                return Err(SweepError::SplitMismatch {
                    plan: path,
                    task: task.name.clone(),
                });
            }
            slims.push(Slim {
                config: *config,
                k,
                plan_sha256: sha256_file(&path)?,
                name,
                plan,
            });
        }
    }
    Ok(slims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_merge_what_no_objective_changes() {
        let configs = Config::all(
            2,
            &[Method::Hopscotch, Method::Random],
            &[Objective::Kl, Objective::Ce],
            true,
        );
        let names = ["a".to_string(), "b".to_string()];
        let a: Vec<String> = configs
            .iter()
            .filter(|c| c.fit_task == 0)
            .map(|c| c.name(&names))
            .collect();
        assert_eq!(
            a,
            [
                "a-hopscotch-kl",
                "a-hopscotch-ce",
                "a-hopscotch-kl-noscales",
                "a-hopscotch-ce-noscales",
                "a-random-kl",
                "a-random-ce",
                "a-random-noscales",
            ]
        );
        assert_eq!(configs.len(), 14);
        let random_bare = configs.iter().find(|c| c.objective.is_none()).unwrap();
        let o = random_bare.options(&FitSettings::default(), 3);
        assert_eq!(
            (o.skip, o.objective, o.train_scales),
            (3, Objective::Ce, false)
        );
        assert_eq!(
            Config::all(1, &[Method::AttnCosine], &[Objective::Kl], false).len(),
            1
        );
    }

    #[test]
    fn every_configuration_is_evaluated_without_the_fit_and_final_documents() {
        let lines: Vec<String> = (0..12)
            .map(|i| {
                serde_json::json!({
                    "request": {"context": format!("Question {i}?"), "continuation": " yes"},
                    "doc_id": i, "idx": 0, "label": 0,
                    "doc": {"query": format!("Question {i}?"), "choices": [" yes"], "gold": 0},
                })
                .to_string()
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        std::fs::write(&path, lines.join("\n")).unwrap();
        let options = FitSettings {
            fit_docs: 2,
            final_docs: Some(5),
            seed: 3,
            ..FitSettings::default()
        };
        let t = SweepTask::new("t".into(), task::load(&path).unwrap(), &options);
        let (five, _) = task::split(&t.data.docs, 5, 3);
        let mut trained: Vec<String> = t.fit_ids.iter().chain(&t.final_ids).cloned().collect();
        trained.sort();
        let mut expected: Vec<String> = five.iter().map(|&i| t.data.docs[i].id.clone()).collect();
        expected.sort();
        assert_eq!((t.fit_ids.len(), trained), (2, expected));
        let held: Vec<&str> = t
            .selection(None)
            .unwrap()
            .docs
            .iter()
            .map(|d| d.id.as_str())
            .collect();
        assert_eq!(held.len(), 7);
        assert!(held
            .iter()
            .all(|id| !t.fit_ids.iter().chain(&t.final_ids).any(|f| f == id)));
    }

    #[test]
    fn task_names_drop_the_extensions_and_odd_characters() {
        assert_eq!(task_name(Path::new("/x/arc_easy.jsonl.gz")), "arc_easy");
        assert_eq!(task_name(Path::new("my task.json")), "my_task");
        assert_eq!(task_name(Path::new("t.v2.jsonl")), "t.v2");
        assert_eq!(task_name(Path::new(".jsonl")), "task");
    }

    fn config() -> SweepConfig {
        SweepConfig {
            model: ModelFingerprint {
                architecture: "LlamaForCausalLM".into(),
                n_layer: 4,
                n_embd: 64,
                n_head: 4,
                n_head_kv: 2,
                n_ff: 128,
                vocab_size: 100,
                tensor_sha256: "ab".repeat(32),
            },
            quant_type: "q4_k_m".into(),
            limit: Some(100),
            n_ctx: 4096,
            fit: FitSettings::default().recorded(0, 0),
            tasks: [("a".to_string(), "11".repeat(32))].into(),
            skips: vec![1, 2],
            methods: vec!["hopscotch".into()],
            objectives: vec!["kl".into()],
            no_scales_too: false,
        }
    }

    #[test]
    fn a_configuration_differs_in_what_units_depend_on_only() {
        let old = config();
        let mut new = config();
        new.skips = vec![1, 2, 4];
        new.methods.push("random".into());
        new.tasks.insert("b".into(), "22".repeat(32));
        assert!(
            new.differences(&old).is_empty(),
            "{:?}",
            new.differences(&old)
        );

        new.fit.seed = 3;
        new.quant_type = "q8_0".into();
        new.tasks.insert("a".into(), "33".repeat(32));
        let d = new.differences(&old).join("; ");
        for needle in [
            "seed (0 recorded, 3 now)",
            "--type (q4_k_m recorded, q8_0 now)",
            "task file a",
        ] {
            assert!(d.contains(needle), "{d}");
        }
        assert_eq!(new.differences(&old).len(), 3);
    }
}

//! What a sweep is asked for and where it keeps its work: the configurations, the recorded
//! sweep configuration (which refuses a folder of another sweep), the folder's layout of units
//! and the evaluation records.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::eval::task::{select_docs, DocScore, Selection, TaskEvalError};
use crate::output::write_text;
use crate::pipeline::PipelineError;
use crate::plan::{FitSettings, Method, ModelFingerprint, Objective};
use crate::task::{self, TaskData};

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
pub(super) struct Layout {
    pub(super) dir: PathBuf,
}

/// Sub-folders of the output folder holding units.
pub(super) const UNIT_DIRS: [&str; 4] = ["searches", "plans", "models", "evals"];

impl Layout {
    pub(super) fn config(&self) -> PathBuf {
        self.dir.join("sweep-config.json")
    }
    pub(super) fn original(&self) -> PathBuf {
        self.dir.join("original.gguf")
    }
    pub(super) fn search(&self, config: &str) -> PathBuf {
        self.dir.join("searches").join(format!("{config}.json"))
    }
    pub(super) fn plan(&self, model: &str) -> PathBuf {
        self.dir.join("plans").join(format!("{model}.json"))
    }
    pub(super) fn model(&self, model: &str) -> PathBuf {
        self.dir.join("models").join(format!("{model}.gguf"))
    }
    pub(super) fn model_source(&self, model: &str) -> PathBuf {
        self.dir.join("models").join(format!("{model}.plan.sha256"))
    }
    pub(super) fn eval(&self, model: &str, task: &str) -> PathBuf {
        self.dir
            .join("evals")
            .join(format!("{model}__on__{task}.json"))
    }

    /// Whether any file of a sweep is there.
    pub(super) fn has_sweep_files(&self) -> bool {
        self.original().exists()
            || UNIT_DIRS
                .iter()
                .any(|d| std::fs::read_dir(self.dir.join(d)).is_ok_and(|mut e| e.next().is_some()))
    }

    /// Removes the sweep's files: the unit folders' files, the original, the report and the
    /// configuration (nothing else in the folder).
    pub(super) fn clear(&self) -> Result<(), PipelineError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PipelineError::Io { path, source }
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

pub(super) fn sha256_file(path: &Path) -> Result<String, PipelineError> {
    let bytes = std::fs::read(path).map_err(|source| PipelineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// A task of the sweep: read, checked, split.
pub(super) struct SweepTask {
    pub(super) name: String,
    pub(super) data: TaskData,
    /// Ids of the fit documents, in file order (as plans record them).
    pub(super) fit_ids: Vec<String>,
    /// Ids of the documents only the final training uses (`--final-docs`), in file order.
    pub(super) final_ids: Vec<String>,
}

impl SweepTask {
    /// A task split as `options` split it: its fit documents and the final training's.
    pub(super) fn new(name: String, data: TaskData, options: &FitSettings) -> Self {
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
    pub(super) fn selection(&self, limit: Option<usize>) -> Result<Selection<'_>, TaskEvalError> {
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

/// Checks the folder's recorded configuration against `config` (clearing the folder with
/// `force`) and records the new one, with every task either has seen.
pub(super) fn check_config(
    layout: &Layout,
    config: &SweepConfig,
    force: bool,
) -> Result<(), PipelineError> {
    let path = layout.config();
    let mut record = config.clone();
    if force {
        layout.clear()?;
    } else if path.is_file() {
        let text = std::fs::read_to_string(&path).map_err(|source| PipelineError::Io {
            path: path.clone(),
            source,
        })?;
        let old: SweepConfig =
            serde_json::from_str(&text).map_err(|e| PipelineError::BadConfig {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let differences = config.differences(&old);
        if !differences.is_empty() {
            return Err(PipelineError::ConfigMismatch {
                path,
                what: differences.join(", "),
            });
        }
        for (name, sha) in old.tasks {
            record.tasks.entry(name).or_insert(sha);
        }
    } else if layout.has_sweep_files() {
        return Err(PipelineError::Unrecorded {
            path: layout.dir.clone(),
        });
    }
    let text = serde_json::to_string_pretty(&record).expect("config serializes") + "\n";
    write_text(&path, &text)?;
    Ok(())
}

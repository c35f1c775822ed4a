//! The plan: what a fit produced, as JSON. Which attention blocks to skip, the four scalars per
//! layer, how every candidate scored in every round, the settings, and what model and task
//! data it was fitted on (so `export` can refuse another model and `eval` can hold out the
//! fitted documents). Plain data: the stages after the fit (`fold`, `export`, `eval`) read it
//! without the candle model.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod budget;
mod scales;
mod settings;

pub use budget::{BudgetError, QualityBudget, DEFAULT_VALIDATION_DOCS};

pub use scales::{LinearAttention, NoSuchLayer, ScaleValues, ScalesLength, SkipMask, StandInError};
pub use settings::{
    FitSettings, LossTokens, Method, Objective, Screen, SettingError, DEFAULT_FINAL_EPOCHS,
    DEFAULT_RESCREEN, DEFAULT_TEACHER_TOP_K,
};

use crate::checkpoint::Checkpoint;
use crate::output::{AtomicFile, OutputError};

/// Errors reading or writing a plan.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The plan file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a valid plan.
    #[error("{path}: not a valid plan: {message}")]
    Invalid {
        /// The plan file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The plan was fitted on another model.
    #[error("{plan}: fitted on {expected}, but {model} is {found}")]
    WrongModel {
        /// The plan file.
        plan: String,
        /// The model given.
        model: String,
        /// The fingerprint recorded in the plan.
        expected: String,
        /// The fingerprint of the model given.
        found: String,
    },
    /// The output could not be written.
    #[error(transparent)]
    Output(#[from] OutputError),
}

/// Identifies the model a plan was fitted on: its shape and a hash of its tensors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFingerprint {
    /// Hugging Face architecture class.
    pub architecture: String,
    /// Layers.
    pub n_layer: usize,
    /// Hidden width.
    pub n_embd: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_head_kv: usize,
    /// MLP width.
    pub n_ff: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// sha256 over every tensor's name, type, shape and stored bytes, in name order.
    pub tensor_sha256: String,
}

impl ModelFingerprint {
    /// Fingerprints a checkpoint (reads every tensor once).
    pub fn of(ck: &Checkpoint) -> ModelFingerprint {
        let mut entries: Vec<_> = ck.tensors.iter().collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let mut h = Sha256::new();
        for e in entries {
            h.update(e.name.as_bytes());
            h.update(e.dtype.name().as_bytes());
            for d in &e.shape {
                h.update((*d as u64).to_le_bytes());
            }
            h.update(ck.stored_bytes(e));
        }
        let a = &ck.arch;
        ModelFingerprint {
            architecture: a.hf_architecture.clone(),
            n_layer: a.n_layer,
            n_embd: a.n_embd,
            n_head: a.n_head,
            n_head_kv: a.n_head_kv,
            n_ff: a.n_ff,
            vocab_size: a.vocab_size,
            tensor_sha256: format!("{:x}", h.finalize()),
        }
    }
}

impl std::fmt::Display for ModelFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} layers, width {}, tensors sha256 {})",
            self.architecture,
            self.n_layer,
            self.n_embd,
            &self.tensor_sha256[..self.tensor_sha256.len().min(12)]
        )
    }
}

/// The task data a plan was fitted on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRef {
    /// The task file as given.
    pub path: String,
    /// sha256 of its bytes.
    pub sha256: String,
    /// Its detected format.
    pub format: String,
}

/// How one candidate block scored in one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateScore {
    /// Layer index of the attention block tried.
    pub layer: usize,
    /// Cheap screening score (fast mode): lower is a better block to skip.
    pub screen: Option<f32>,
    /// Mean training loss with the scalars trained (the paper's score), if trained.
    pub trained_loss: Option<f32>,
}

/// One greedy round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Round {
    /// Every candidate of the round.
    pub candidates: Vec<CandidateScore>,
    /// The layer skipped for good.
    pub chosen: usize,
    /// Its score.
    pub loss: f32,
}

/// The first key of `plan` that only a retired option wrote (channel gains, stand-ins trained
/// end to end or fitted one after another, another candidate score or screen).
fn retired_key(plan: &serde_json::Value) -> Option<String> {
    let settings = &plan["settings"];
    let set = |key: &str| !settings[key].is_null() && settings[key] != false;
    if !plan["scales"]["gains"].is_null() {
        return Some("scales.gains".into());
    }
    for key in [
        "channel_gains",
        "linear_lr",
        "linear_sequential",
        "candidate_score",
    ] {
        if set(key) {
            return Some(format!("settings.{key}"));
        }
    }
    match settings["screen"].as_str() {
        Some(s) if s != "skip-loss" => Some(format!("settings.screen {s:?}")),
        _ => None,
    }
}

/// One task a plan was fitted on, and which of its documents each stage read (ids are unique
/// within a task file, not across them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanTask {
    /// The task file.
    pub task: TaskRef,
    /// Documents used for fitting (held out of evaluation).
    pub fit_doc_ids: Vec<String>,
    /// Documents only the final training used, besides the fit documents (held out of
    /// evaluation too), in file order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub final_doc_ids: Vec<String>,
    /// Documents that chose K in a quality-budget run (`run --max-drop`), in file order: held
    /// out of the fit and, like the trained documents, of evaluation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub validation_doc_ids: Vec<String>,
    /// Documents a quality-budget run measured its final figures on, in file order: read by
    /// neither the fit nor the choice of K.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test_doc_ids: Vec<String>,
}

impl PlanTask {
    /// Every document the plan was trained on: the fit documents and those of the final
    /// training (what evaluation holds out).
    pub fn trained_doc_ids(&self) -> impl Iterator<Item = &str> {
        self.fit_doc_ids
            .iter()
            .chain(&self.final_doc_ids)
            .map(String::as_str)
    }

    /// Every document the plan has seen: those it was trained on and those that chose its K
    /// (what evaluation holds out).
    pub fn seen_doc_ids(&self) -> impl Iterator<Item = &str> {
        self.trained_doc_ids()
            .chain(self.validation_doc_ids.iter().map(String::as_str))
    }
}

/// A fitted plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Version of the tool that wrote it.
    pub tool_version: String,
    /// The model it was fitted on.
    pub model: ModelFingerprint,
    /// The (first) task it was fitted on and its documents: `task`, `fit_doc_ids`, ... at the
    /// plan's top level.
    #[serde(flatten)]
    pub first_task: PlanTask,
    /// The other tasks of a fit on several (`--task` given more than once), in the order given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_tasks: Vec<PlanTask>,
    /// Layers whose attention block is skipped, in the order chosen.
    pub skipped_blocks: Vec<usize>,
    /// The four scalars per layer.
    pub scales: ScaleValues,
    /// Every round of the search.
    pub rounds: Vec<Round>,
    /// Loss per step of the final training.
    pub final_loss_history: Vec<f32>,
    /// Mean loss of the final plan on the fit data with the trained scalars.
    pub final_loss: Option<f32>,
    /// Mean loss of the final plan's skipped blocks on the fit data with every scalar at 1.
    pub final_loss_untrained: Option<f32>,
    /// Attention importance per layer, `1 - mean cos(X, X + Attn(Norm(X)))` (the
    /// `attn-cosine` method only).
    pub attn_importance: Option<Vec<f32>>,
    /// The settings.
    pub settings: FitSettings,
}

impl Plan {
    /// Every task the plan was fitted on, the first first.
    pub fn tasks(&self) -> impl Iterator<Item = &PlanTask> {
        std::iter::once(&self.first_task).chain(&self.other_tasks)
    }

    /// Every task, mutably, the first first.
    pub fn tasks_mut(&mut self) -> impl Iterator<Item = &mut PlanTask> {
        std::iter::once(&mut self.first_task).chain(&mut self.other_tasks)
    }

    /// The task of the file whose bytes hash to `sha256`, if the plan was fitted on it.
    pub fn task_with_sha256(&self, sha256: &str) -> Option<&PlanTask> {
        self.tasks().find(|t| t.task.sha256 == sha256)
    }

    /// Reads and validates a plan file.
    pub fn load(path: &Path) -> Result<Plan, PlanError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Io {
            path: p.clone(),
            source,
        })?;
        let invalid = |message: String| PlanError::Invalid {
            path: p.clone(),
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if let Some(key) = retired_key(&value) {
            return Err(invalid(format!(
                "{key} comes from an option hopscotch no longer has (see docs/experiments.md; \
                 fit the plan again)"
            )));
        }
        let plan: Plan = serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
        plan.validate()
            .map_err(|message| PlanError::Invalid { path: p, message })?;
        Ok(plan)
    }

    /// Checks internal consistency: scale lengths, skipped layers in range and distinct, finite
    /// scalars, layer 0 kept (llama.cpp's `deci` takes the head size from layer 0).
    pub fn validate(&self) -> Result<(), String> {
        let n = self.model.n_layer;
        for (name, v) in self.scales.named() {
            if v.len() != n {
                return Err(format!(
                    "scales.{name} has {} values, expected {n}",
                    v.len()
                ));
            }
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(format!("scales.{name}[{i}] is not finite"));
            }
        }
        LinearAttention::check_all(&self.scales.linear, n, self.model.n_embd)
            .map_err(|e| format!("scales.linear: {e}"))?;
        if let Some(a) = self
            .scales
            .linear
            .iter()
            .find(|a| !self.skipped_blocks.contains(&a.layer))
        {
            return Err(format!(
                "scales.linear has a stand-in for layer {}, whose attention block is not skipped",
                a.layer
            ));
        }
        let mut seen = vec![false; n];
        for &l in &self.skipped_blocks {
            if l >= n {
                return Err(format!(
                    "skipped block {l} is out of range (model has {n} layers)"
                ));
            }
            if std::mem::replace(&mut seen[l], true) {
                return Err(format!("skipped block {l} is listed twice"));
            }
        }
        if self.skipped_blocks.len() >= n {
            return Err(format!(
                "the plan skips {} of {n} attention blocks; at least one must stay",
                self.skipped_blocks.len()
            ));
        }
        if seen.first() == Some(&true) {
            return Err("layer 0's attention block cannot be skipped (llama.cpp's deci takes the head size from layer 0)".into());
        }
        let tasks: Vec<&TaskRef> = self.tasks().map(|t| &t.task).collect();
        for (i, t) in tasks.iter().enumerate() {
            if let Some(first) = tasks[..i].iter().find(|f| f.sha256 == t.sha256) {
                return Err(format!(
                    "task {} has the same content (sha256) as task {}: a task is listed once",
                    t.path, first.path
                ));
            }
        }
        Ok(())
    }

    /// Refuses a checkpoint other than the one the plan was fitted on.
    pub fn check_model(&self, ck: &Checkpoint, plan_path: &Path) -> Result<(), PlanError> {
        let found = ModelFingerprint::of(ck);
        if found != self.model {
            return Err(PlanError::WrongModel {
                plan: plan_path.display().to_string(),
                model: ck.display_path(),
                expected: self.model.to_string(),
                found: found.to_string(),
            });
        }
        Ok(())
    }

    /// The skip mask per layer.
    pub fn skip_mask(&self) -> Vec<bool> {
        let mut m = vec![false; self.model.n_layer];
        for &l in &self.skipped_blocks {
            m[l] = true;
        }
        m
    }

    /// Writes the plan as pretty JSON, whole or not at all.
    pub fn save(&self, path: &Path, force: bool) -> Result<(), PlanError> {
        use std::io::Write;
        let mut f = AtomicFile::create(path, force)?;
        let text = serde_json::to_string_pretty(self).expect("plan serializes");
        f.write_all(text.as_bytes())
            .and_then(|_| f.write_all(b"\n"))
            .map_err(|source| OutputError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        f.commit()?;
        Ok(())
    }
}

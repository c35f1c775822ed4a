//! A `hopscotch fit` session: open the model and the task, build the fit data, choose the blocks
//! (keeping the rounds in `<plan>.partial.json` so that `--resume` continues), train the final
//! scalars and write the plan whole; and what it reports.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

use super::data;
use super::final_training::{train_final, Final};
use super::linear;
use super::memory::{bytes, peak_rss, Budget, MemoryEstimate};
use super::options::{model_defaults, FitError};
use super::search::{choose, runner_up, Choice, SearchInput, TrainStats};
use crate::checkpoint::Checkpoint;
use crate::model::{Model, WeightStorage};
use crate::output::check_overwrite;
use crate::plan::{
    FitSettings, LinearAttention, Method, ModelFingerprint, Plan, PlanError, PlanTask, Round,
    ScaleValues, TaskRef,
};
use crate::progress::Progress;
use crate::task;

/// The device a fit runs on: the first CUDA GPU when the `cuda` feature is built in and one
/// answers (candle's `cuda_if_available` only checks the feature), else the CPU, with a notice
/// on stderr when a CUDA build finds no GPU.
pub fn fit_device() -> Device {
    if !candle_core::utils::cuda_is_available() {
        return Device::Cpu;
    }
    match Device::new_cuda(0) {
        Ok(device) => device,
        Err(e) => {
            eprintln!("no usable CUDA device ({e}); fitting on the CPU");
            Device::Cpu
        }
    }
}

/// Estimates a fit's peak memory ([`MemoryEstimate`]), says it, and refuses a fit the budget
/// ([`Budget::current`]) cannot hold, before any work. When the fit fits only by recomputing
/// each layer's activations in the backward pass, the estimate says so
/// ([`MemoryEstimate::recompute`]) and the fit's model should recompute.
pub fn check_memory(
    ck: &Checkpoint,
    options: &FitSettings,
    progress: &Progress,
) -> Result<MemoryEstimate, FitError> {
    let storage = WeightStorage::for_device(&fit_device());
    let threads = rayon::current_num_threads();
    let budget = Budget::current().map_err(FitError::MemoryLimit)?;
    let mut estimate = MemoryEstimate::of(ck, options, threads, storage, false);
    if let Some(budget) = &budget {
        if estimate.total() > budget.bytes() {
            estimate = MemoryEstimate::of(ck, options, threads, storage, true);
        }
    }
    progress.note(&estimate.to_string());
    match budget {
        Some(budget) if estimate.total() > budget.bytes() => Err(FitError::Memory {
            model: ck.display_path(),
            estimate: estimate.to_string(),
            budget: budget.to_string(),
            remedy: if estimate.model_bytes() > budget.bytes() {
                format!(
                    "the model alone (its checkpoint and the weights it holds in f32) takes {}, \
                     so no setting brings it within reach; fit it on a machine with more memory",
                    bytes(estimate.model_bytes())
                )
            } else {
                "lower --threads, --batch-size or --max-seq-len".into()
            },
        }),
        _ => Ok(estimate),
    }
}

/// A `hopscotch fit` run: what to fit, on what, and where the plan goes.
#[derive(Debug, Clone)]
pub struct FitRequest {
    /// A Hugging Face folder or GGUF file.
    pub model: PathBuf,
    /// The task files: one, or several that the fit draws its documents from evenly.
    pub tasks: Vec<PathBuf>,
    /// Where the plan is written.
    pub output: PathBuf,
    /// Overwrite an existing plan.
    pub force: bool,
    /// Continue from `<output>.partial.json` when it exists.
    pub resume: bool,
    /// The settings.
    pub options: FitSettings,
}

/// Where a fit keeps its rounds while it runs: `<output>.partial.json`.
pub fn partial_path(output: &Path) -> PathBuf {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(".partial.json");
    output.with_file_name(name)
}

/// Seconds per phase of a fit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Timings {
    /// Opening the model and task, building the batches and the teacher.
    pub prepare: f64,
    /// Choosing the blocks.
    pub search: f64,
    /// The final training.
    pub final_training: f64,
    /// Everything.
    pub total: f64,
}

/// One round of the summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundSummary {
    /// 1-based round.
    pub round: usize,
    /// The layer skipped.
    pub chosen: usize,
    /// Its score.
    pub loss: f32,
    /// The second-best trained candidate and its score.
    pub runner_up: Option<(usize, f32)>,
    /// Candidates trained this round.
    pub trained: usize,
}

/// What `hopscotch fit` prints: the outcome, the data and the cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FitReport {
    /// The plan written.
    pub plan: PathBuf,
    /// The method.
    pub method: Method,
    /// `kl` or `ce`.
    pub objective: String,
    /// The blocks skipped, in the order chosen.
    pub skipped_blocks: Vec<usize>,
    /// The greedy rounds.
    pub rounds: Vec<RoundSummary>,
    /// Rounds taken over from a partial plan.
    pub resumed_rounds: usize,
    /// Loss of the final choice with every scalar at 1.
    pub final_loss_untrained: f32,
    /// Loss of the final choice with the trained scalars.
    pub final_loss: f32,
    /// Documents fitted on.
    pub fit_docs: usize,
    /// Batches per epoch.
    pub batches: usize,
    /// Real tokens in the fit data.
    pub fit_tokens: usize,
    /// Target positions in the fit data.
    pub fit_targets: usize,
    /// Whether the targets were generated by the original model.
    pub generated_targets: bool,
    /// Training throughput over the search and the final training.
    pub train: TrainStats,
    /// Training tokens per second.
    pub train_tokens_per_s: f64,
    /// Seconds per phase.
    pub seconds: Timings,
    /// The peak memory estimated before the fit ([`MemoryEstimate::total`]), in bytes.
    pub memory_estimate: u64,
    /// Whether training recomputed each layer's activations to stay within the memory budget.
    pub recomputed_activations: bool,
    /// The process's peak resident memory when the fit ended, in bytes, where it can be read.
    pub peak_rss: Option<u64>,
}

impl fmt::Display for FitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "method {}, objective {}, {} docs ({} tokens, {} targets, {} batches){}",
            self.method.name(),
            self.objective,
            self.fit_docs,
            self.fit_tokens,
            self.fit_targets,
            self.batches,
            if self.generated_targets {
                ", targets generated by the model"
            } else {
                ""
            }
        )?;
        if !self.rounds.is_empty() {
            writeln!(f, "round  skip  loss      trained  runner-up")?;
            for r in &self.rounds {
                let runner = r
                    .runner_up
                    .map(|(l, s)| format!("{l:>4}  {s:.4}"))
                    .unwrap_or_else(|| "-".into());
                writeln!(
                    f,
                    "{:>5}  {:>4}  {:<8.4}  {:>7}  {runner}",
                    r.round, r.chosen, r.loss, r.trained
                )?;
            }
        }
        writeln!(f, "skipped blocks   {:?}", self.skipped_blocks)?;
        writeln!(
            f,
            "final loss       {:.4} (scalars at 1: {:.4})",
            self.final_loss, self.final_loss_untrained
        )?;
        writeln!(
            f,
            "training         {} steps, {:.0} tokens/s",
            self.train.steps, self.train_tokens_per_s
        )?;
        if self.train.screened > 0 {
            writeln!(
                f,
                "screening        {} candidates in {:.1}s",
                self.train.screened, self.train.screen_seconds
            )?;
        }
        writeln!(
            f,
            "time             {:.1}s (prepare {:.1}s, search {:.1}s, final {:.1}s){}",
            self.seconds.total,
            self.seconds.prepare,
            self.seconds.search,
            self.seconds.final_training,
            if self.resumed_rounds > 0 {
                format!(", {} rounds resumed", self.resumed_rounds)
            } else {
                String::new()
            }
        )?;
        writeln!(
            f,
            "memory           {} estimated, {} peak",
            bytes(self.memory_estimate),
            self.peak_rss.map_or("unknown".into(), bytes)
        )?;
        write!(f, "plan             {}", self.plan.display())
    }
}

/// A model opened for fitting: the checkpoint (borrowed from the caller, who opened it once),
/// its fingerprint, and the candle model (on the GPU when there is one). Opened once, it serves
/// any number of tasks and fits (`hopscotch sweep` fits many configurations on one model).
pub struct FitModel<'ck> {
    /// The checkpoint.
    pub ck: &'ck Checkpoint,
    /// Its fingerprint, recorded in every plan.
    pub fingerprint: ModelFingerprint,
    /// The candle model.
    pub model: Model,
}

impl<'ck> FitModel<'ck> {
    /// Loads `ck`, whose tensors the caller has validated and whose `fingerprint`
    /// ([`ModelFingerprint::of`]) it has taken; training recomputes each layer's activations in
    /// the backward pass with `recompute` (as [`check_memory`] decides).
    pub fn load(
        ck: &'ck Checkpoint,
        fingerprint: ModelFingerprint,
        recompute: bool,
    ) -> Result<Self, FitError> {
        let device = fit_device();
        let model = Model::load(ck, &device)
            .map_err(|error| FitError::LoadModel {
                path: ck.display_path(),
                error,
            })?
            .with_recompute(recompute);
        Ok(Self {
            ck,
            fingerprint,
            model,
        })
    }
}

/// The fit data of one or more tasks for a model and a set of options, and the tasks as plans
/// record them.
pub struct FitTask {
    /// The task files, their hashes and formats, in the order given.
    pub tasks: Vec<TaskRef>,
    /// The batches (with the teacher under KL) and the fit documents of every task.
    pub data: data::FitData,
    /// The final training's data when scalars are trained on more documents than the fit
    /// (`--final-docs`).
    pub final_data: Option<data::FitData>,
    /// Unless `--no-linear-attention`, a linear stand-in for every block that can be skipped
    /// (layers 1 and up), fitted on the final training's documents.
    pub stand_ins: Vec<LinearAttention>,
}

impl FitTask {
    /// Builds the fit data of `tasks` for `model` with `options`' split, batching and
    /// objective, and the final training's when it takes more documents. With several tasks the
    /// documents are drawn evenly from them ([`task::even_shares`]), each task's from its own
    /// seeded split. Two tasks of the same content, or fewer fit documents than tasks, are
    /// refused.
    pub fn build(
        model: &FitModel<'_>,
        tasks: &[task::TaskData],
        options: &FitSettings,
        progress: &Progress,
    ) -> Result<Self, FitError> {
        check_tasks(tasks, options.fit_docs)?;
        let build = |n_docs| -> Result<data::FitData, FitError> {
            let parts = tasks
                .iter()
                .zip(task::even_shares(n_docs, tasks.len()))
                .map(|(task_data, n)| {
                    data::build(
                        model.ck,
                        &model.model,
                        task_data,
                        &model.fingerprint.tensor_sha256,
                        &data::Batching::of(options),
                        n,
                        progress,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(data::FitData::merge(parts))
        };
        let data = build(options.fit_docs)?;
        if tasks.len() > 1 {
            let drawn: Vec<String> = tasks
                .iter()
                .zip(&data.doc_ids)
                .map(|(t, ids)| format!("{} of {}", ids.len(), task::task_name(&t.path)))
                .collect();
            progress.note(&format!("fit documents: {}", drawn.join(", ")));
        }
        let final_docs = options.resolved_final_docs();
        let final_data = if options.uses_final_docs() && final_docs > options.fit_docs {
            Some(build(final_docs)?)
        } else {
            None
        };
        let stand_ins = if options.linear_attention {
            let started = Instant::now();
            let fitted = final_data.as_ref().unwrap_or(&data);
            let layers: Vec<usize> = (1..model.ck.arch.n_layer).collect();
            let fitted_ins = linear::fit(&model.model, &fitted.batches, &fitted.lengths, &layers)?;
            progress.note(&format!(
                "linear stand-ins for layers 1-{} fitted by least squares on {} documents in {:.1} s, \
                 ridges (relative to the stream's mean square, chosen on held-out documents) {}",
                layers.len(),
                fitted.n_docs(),
                started.elapsed().as_secs_f64(),
                fitted_ins.ridge_range()
            ));
            fitted_ins.stand_ins
        } else {
            Vec::new()
        };
        Ok(Self {
            tasks: tasks
                .iter()
                .map(|t| TaskRef {
                    path: t.path.display().to_string(),
                    sha256: t.sha256.clone(),
                    format: t.format.to_string(),
                })
                .collect(),
            data,
            final_data,
            stand_ins,
        })
    }

    /// What a search on this data runs on.
    pub fn input<'a>(&'a self, model: &'a FitModel<'_>) -> SearchInput<'a> {
        self.input_of(&self.data, model)
    }

    /// What the final training runs on: the final data, or the fit data.
    pub fn final_input<'a>(&'a self, model: &'a FitModel<'_>) -> SearchInput<'a> {
        self.input_of(self.final_data.as_ref().unwrap_or(&self.data), model)
    }

    fn input_of<'a>(&'a self, data: &'a data::FitData, model: &'a FitModel<'_>) -> SearchInput<'a> {
        SearchInput {
            model: &model.model,
            batches: &data.batches,
            lengths: &data.lengths,
            stand_ins: &self.stand_ins,
        }
    }

    /// Per task, the documents only the final training uses, in file order.
    pub fn final_only_doc_ids(&self) -> Vec<Vec<String>> {
        match &self.final_data {
            Some(f) => f
                .doc_ids
                .iter()
                .zip(&self.data.doc_ids)
                .map(|(more, fit)| task::ids_besides(more, fit))
                .collect(),
            None => vec![Vec::new(); self.tasks.len()],
        }
    }

    /// A plan of this model, these tasks and `options` with nothing chosen yet: no block
    /// skipped, every scalar 1, no rounds.
    pub fn empty_plan(&self, model: &FitModel<'_>, options: &FitSettings) -> Plan {
        let n_final_batches = self.final_data.as_ref().unwrap_or(&self.data).batches.len();
        let mut tasks = self
            .tasks
            .iter()
            .zip(&self.data.doc_ids)
            .zip(self.final_only_doc_ids())
            .map(|((task, fit), final_only)| PlanTask {
                task: task.clone(),
                fit_doc_ids: fit.clone(),
                final_doc_ids: if options.train_scales {
                    final_only
                } else {
                    Vec::new()
                },
                validation_doc_ids: Vec::new(),
                test_doc_ids: Vec::new(),
            });
        let first_task = tasks.next().expect("a fit has at least one task");
        Plan {
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            model: model.fingerprint.clone(),
            first_task,
            other_tasks: tasks.collect(),
            skipped_blocks: Vec::new(),
            scales: ScaleValues::ones(model.ck.arch.n_layer),
            rounds: Vec::new(),
            final_loss_history: Vec::new(),
            final_loss: None,
            final_loss_untrained: None,
            attn_importance: None,
            settings: options.recorded(self.data.batches.len(), n_final_batches),
        }
    }
}

/// Reads the task files of a fit on `fit_docs` documents, refusing what [`FitTask::build`]
/// would (two of the same content, fewer documents than tasks) before any work.
pub fn load_tasks(paths: &[PathBuf], fit_docs: usize) -> Result<Vec<task::TaskData>, FitError> {
    let tasks = paths
        .iter()
        .map(|p| task::load(p))
        .collect::<Result<Vec<_>, _>>()?;
    check_tasks(&tasks, fit_docs)?;
    Ok(tasks)
}

/// Refuses a list of tasks a fit cannot draw from: none, two of the same content (sha256), or
/// more tasks than `fit_docs` documents.
fn check_tasks(tasks: &[task::TaskData], fit_docs: usize) -> Result<(), FitError> {
    for (i, t) in tasks.iter().enumerate() {
        if let Some(first) = tasks[..i].iter().find(|f| f.sha256 == t.sha256) {
            return Err(FitError::DuplicateTask {
                first: first.path.clone(),
                second: t.path.clone(),
            });
        }
    }
    if tasks.is_empty() || fit_docs < tasks.len() {
        return Err(FitError::FewerDocsThanTasks {
            fit_docs,
            tasks: tasks.len(),
        });
    }
    Ok(())
}

/// Chooses up to `options.skip` blocks by `options.method`, in the order chosen; returns the
/// choice and how many of its rounds were taken over from `rounds_file`. With a `rounds_file`,
/// the greedy search keeps its rounds there (a plan with no final training) after every round,
/// and one left by an interrupted or shorter search of the same model, task, documents and
/// settings (`skip` aside) is continued; one with more rounds gives its first `skip`. The first
/// `k` blocks of the greedy order are what a search for `k` blocks chooses, as are the
/// baselines' (a seeded shuffle, an importance ranking), so one search serves every smaller `k`.
pub fn search_order(
    model: &FitModel<'_>,
    task: &FitTask,
    options: &FitSettings,
    rounds_file: Option<&Path>,
    progress: &Progress,
) -> Result<(Choice, usize), FitError> {
    let template = task.empty_plan(model, options);
    let mut done = Vec::new();
    if let Some(file) = rounds_file.filter(|f| options.method == Method::Hopscotch && f.is_file()) {
        done = resumed_rounds(&template, file, true)?;
    }
    let resumed = done.len();
    let mut save = |rounds: &[Round]| -> Result<(), FitError> {
        let Some(file) = rounds_file else {
            return Ok(());
        };
        let mut p = template.clone();
        p.rounds = rounds.to_vec();
        p.skipped_blocks = rounds.iter().map(|r| r.chosen).collect();
        p.save(file, true)?;
        Ok(())
    };
    let (choice, _) = choose(&task.input(model), options, done, &mut save, progress)?;
    Ok((choice, resumed))
}

/// Whether the rounds in `file` are a search of the same model, task, documents and settings as
/// `options` (`skip` aside), which [`search_order`] continues; the error says what differs.
pub fn search_continues(
    model: &FitModel<'_>,
    task: &FitTask,
    options: &FitSettings,
    file: &Path,
) -> Result<(), FitError> {
    resumed_rounds(&task.empty_plan(model, options), file, true).map(|_| ())
}

/// Trains the final scalars of `choice` (its blocks, rounds and importance kept) with `options`
/// and writes the plan to `output` (replacing one only with `force`), whole or not at all.
pub fn write_plan(
    model: &FitModel<'_>,
    task: &FitTask,
    options: &FitSettings,
    choice: &Choice,
    output: &Path,
    force: bool,
    progress: &Progress,
) -> Result<(Plan, Final, TrainStats), FitError> {
    let (last, stats) = train_final(&task.final_input(model), options, &choice.skipped, progress)?;
    let mut plan = task.empty_plan(model, options);
    plan.skipped_blocks = choice.skipped.clone();
    plan.rounds = choice.rounds.clone();
    plan.attn_importance = choice.attn_importance.clone();
    plan.scales = last.scales.clone();
    plan.final_loss_history = last.loss_history.clone();
    plan.final_loss = Some(last.loss);
    plan.final_loss_untrained = Some(last.loss_untrained);
    plan.validate().map_err(|message| PlanError::Invalid {
        path: output.display().to_string(),
        message,
    })?;
    plan.save(output, force)?;
    Ok((plan, last, stats))
}

/// Runs `hopscotch fit`: checks the settings, opens the model and task, builds the fit data,
/// chooses the blocks (saving `<output>.partial.json` after every round), trains the final
/// scalars and writes the plan whole. Nothing is written at `output` unless everything succeeds.
pub fn fit(request: &FitRequest, progress: &Progress) -> Result<FitReport, FitError> {
    let ck = Checkpoint::open(&request.model)?;
    Ok(fit_plan(&ck, request, progress)?.1)
}

/// [`fit`] on a checkpoint the caller has opened (`request.model` names it in messages):
/// returns the plan it wrote, to hand to the next stage, and the report.
pub fn fit_plan(
    ck: &Checkpoint,
    request: &FitRequest,
    progress: &Progress,
) -> Result<(Plan, FitReport), FitError> {
    let started = Instant::now();
    let options = &request.options;
    options.validate()?;
    check_overwrite(&request.output, request.force)?;
    let n_layer = ck.arch.n_layer;
    if options.skip >= n_layer {
        return Err(FitError::TooManyBlocks {
            model: ck.display_path(),
            skip: options.skip,
            n_layer,
        });
    }
    ck.validate_tensors()?;
    let tasks = load_tasks(&request.tasks, options.fit_docs)?;
    let task_docs: Vec<usize> = tasks.iter().map(|t| t.docs.len()).collect();
    let resolved = model_defaults(options, &ck.arch, &task_docs);
    let options = &resolved;
    let memory = check_memory(ck, options, progress)?;
    let fingerprint = ModelFingerprint::of(ck);
    let model = FitModel::load(ck, fingerprint, memory.recompute)?;
    let fit_task = FitTask::build(&model, &tasks, options, progress)?;
    let data = &fit_task.data;
    let input = fit_task.input(&model);
    let plan = fit_task.empty_plan(&model, options);
    let partial = partial_path(&request.output);
    let done = if request.resume && options.method == Method::Hopscotch && partial.is_file() {
        resumed_rounds(&plan, &partial, false)?
    } else {
        Vec::new()
    };
    let resumed = done.len();
    let prepared = started.elapsed().as_secs_f64();

    let mut save_partial = |rounds: &[Round]| -> Result<(), FitError> {
        let mut p = plan.clone();
        p.rounds = rounds.to_vec();
        p.skipped_blocks = rounds.iter().map(|r| r.chosen).collect();
        p.save(&partial, true)?;
        Ok(())
    };
    let (choice, search_stats) = choose(&input, options, done, &mut save_partial, progress)?;
    let searched = started.elapsed().as_secs_f64();
    let (plan, last, final_stats) = write_plan(
        &model,
        &fit_task,
        options,
        &choice,
        &request.output,
        request.force,
        progress,
    )?;
    let finished = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&partial);

    let train = TrainStats {
        steps: search_stats.steps + final_stats.steps,
        tokens: search_stats.tokens + final_stats.tokens,
        seconds: search_stats.seconds + final_stats.seconds,
        screened: search_stats.screened,
        screen_seconds: search_stats.screen_seconds,
    };
    let report = FitReport {
        plan: request.output.clone(),
        method: options.method,
        objective: plan.settings.objective.name().to_string(),
        skipped_blocks: choice.skipped,
        rounds: choice
            .rounds
            .iter()
            .enumerate()
            .map(|(i, r)| RoundSummary {
                round: i + 1,
                chosen: r.chosen,
                loss: r.loss,
                runner_up: runner_up(r),
                trained: r
                    .candidates
                    .iter()
                    .filter(|c| c.trained_loss.is_some())
                    .count(),
            })
            .collect(),
        resumed_rounds: resumed,
        final_loss_untrained: last.loss_untrained,
        final_loss: last.loss,
        fit_docs: data.n_docs(),
        batches: data.batches.len(),
        fit_tokens: data.n_tokens(),
        fit_targets: data.n_targets(),
        generated_targets: data.generated_targets,
        train_tokens_per_s: train.tokens_per_s(),
        train,
        seconds: Timings {
            prepare: prepared,
            search: searched - prepared,
            final_training: finished - searched,
            total: started.elapsed().as_secs_f64(),
        },
        memory_estimate: memory.total(),
        recomputed_activations: memory.recompute,
        peak_rss: peak_rss(),
    };
    Ok((plan, report))
}

/// The rounds of a partial plan, if it was made by the same model, task, documents and settings
/// as `plan` (those of the final training aside). With `any_skip`, a plan of another `skip` is
/// taken too, its rounds cut to `plan`'s.
fn resumed_rounds(plan: &Plan, partial: &Path, any_skip: bool) -> Result<Vec<Round>, FitError> {
    let old = Plan::load(partial)?;
    let mismatch = |what| FitError::ResumeMismatch {
        path: partial.to_path_buf(),
        what,
    };
    if old.model != plan.model {
        return Err(mismatch("the model"));
    }
    let hashes = |p: &Plan| p.tasks().map(|t| t.task.sha256.clone()).collect::<Vec<_>>();
    if hashes(&old) != hashes(plan) {
        return Err(mismatch("the task file"));
    }
    if !old
        .tasks()
        .zip(plan.tasks())
        .all(|(a, b)| a.fit_doc_ids == b.fit_doc_ids)
    {
        return Err(mismatch("the fit documents"));
    }
    let skip = if any_skip {
        plan.settings.skip
    } else {
        old.settings.skip
    };
    // The stand-ins the rounds were chosen with learn from the final documents: other ones
    // would make other rounds.
    if plan.settings.linear_attention && old.settings.final_docs != plan.settings.final_docs {
        return Err(mismatch("the stand-ins' documents (--final-docs)"));
    }
    // Otherwise the rounds do not depend on the final training: a search can be resumed to
    // train its choice longer or on more documents.
    if (FitSettings {
        skip,
        final_docs: plan.settings.final_docs,
        final_steps: plan.settings.final_steps,
        final_lr: plan.settings.final_lr,
        ..old.settings
    }) != plan.settings
    {
        return Err(mismatch("the settings"));
    }
    let mut rounds = old.rounds;
    if rounds.len() > plan.settings.skip {
        if !any_skip {
            return Err(mismatch("the number of rounds"));
        }
        rounds.truncate(plan.settings.skip);
    }
    Ok(rounds)
}

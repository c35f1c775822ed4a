//! A sweep's plans: one search per configuration up to the largest K, and a final training per
//! K, each reused from the folder when it is current.

use super::config::{sha256_file, Config, Layout, SweepTask};
use super::{Slim, SweepRequest, Units};
use crate::checkpoint::Checkpoint;
use crate::fit::search::Choice;
use crate::fit::session::{search_order, write_plan, FitModel, FitTask};
use crate::pipeline::PipelineError;
use crate::plan::{FitSettings, Method, ModelFingerprint, Objective, Plan};
use crate::progress::Progress;

/// Whether an existing plan is the one `config` at `k` would write: same model, task, split,
/// settings (the resolved step counts aside), and `k` blocks.
pub(super) fn plan_is_current(
    plan: &Plan,
    expected: &FitSettings,
    model: &ModelFingerprint,
    task: &SweepTask,
    k: usize,
) -> bool {
    plan.model == *model
        && plan.other_tasks.is_empty()
        && plan.first_task.task.sha256 == task.data.sha256
        && plan.first_task.fit_doc_ids == task.fit_ids
        && (plan.first_task.final_doc_ids == task.final_ids || !plan.settings.uses_final_docs())
        && plan.skipped_blocks.len() == k
        && plan.settings
            == FitSettings {
                candidate_steps: plan.settings.candidate_steps,
                final_steps: plan.settings.final_steps,
                ..expected.clone()
            }
}

/// What the fit phase keeps loaded: the candle model (loaded on first need), fit data per
/// (task, objective), baseline orders per (task, method).
pub(super) struct Fitting<'a> {
    pub(super) ck: &'a Checkpoint,
    pub(super) fingerprint: &'a ModelFingerprint,
    pub(super) progress: &'a Progress,
    pub(super) model: Option<FitModel<'a>>,
    /// Whether the model recomputes activations in training ([`check_memory`]).
    pub(super) recompute: bool,
    pub(super) data: Vec<((usize, Objective), FitTask)>,
    pub(super) orders: Vec<((usize, Method), Choice)>,
}

impl<'a> Fitting<'a> {
    pub(super) fn model(&mut self) -> Result<&FitModel<'a>, PipelineError> {
        if self.model.is_none() {
            self.progress.note("loading the model for fitting");
            self.model = Some(FitModel::load(
                self.ck,
                self.fingerprint.clone(),
                self.recompute,
            )?);
        }
        Ok(self.model.as_ref().expect("loaded above"))
    }

    /// The fit data of a task for an objective, built on first need.
    pub(super) fn task(
        &mut self,
        tasks: &[SweepTask],
        t: usize,
        options: &FitSettings,
    ) -> Result<usize, PipelineError> {
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
            std::slice::from_ref(&tasks[t].data),
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

/// The plans of every configuration at every K: reused where current, otherwise from one
/// search per configuration up to the largest K needed and a final training per K.
#[allow(clippy::too_many_arguments)]
pub(super) fn fit_all(
    req: &SweepRequest,
    ck: &Checkpoint,
    skips: &[usize],
    configs: &[Config],
    tasks: &[SweepTask],
    task_names: &[String],
    fingerprint: &ModelFingerprint,
    layout: &Layout,
    units: &mut Units,
    recompute: bool,
    progress: &Progress,
) -> Result<Vec<Slim>, PipelineError> {
    let mut fitting = Fitting {
        ck,
        fingerprint,
        progress,
        model: None,
        recompute,
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
                let choice = order.first(k);
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
            if plan.first_task.fit_doc_ids != task.fit_ids {
                return Err(PipelineError::SplitMismatch {
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

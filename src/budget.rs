//! `hopscotch run --max-drop` (or `--min-agreement`): K chosen by a quality budget instead of
//! given. K = 1, 2, ... in turn: the greedy search's next round (a baseline ranks every block
//! once), K's final training (the stages `sweep` uses), its slim model exported and evaluated in
//! llama.cpp on validation documents held out of the fit, until the first K past the budget (no
//! larger K can be chosen; `--full-curve` goes on to `--max-skip`). The largest K that stays
//! within the budget, with every smaller K, is exported as `slim.gguf`, and its final figures
//! are measured on test documents that neither the fit nor the choice of K read. The task's
//! three parts come from one seeded order ([`task::split_three`]); the plan records the
//! validation and test documents, the report the curve and which documents each stage read
//! ([`StageRead`]).
//!
//! Besides `run`'s files the folder holds `curve/`: the search's rounds (`search.json`) and
//! each K's plan and model scored (`plan-k<K>.json`, `slim-k<K>.gguf`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::checkpoint::Checkpoint;
use crate::eval::task::{
    evaluate, pair_with_reference, DocScore, PairedFigures, Selection, TaskReport,
};
use crate::export::export;
use crate::fit::options::{model_defaults, FitError};
use crate::fit::session::{
    check_memory, search_continues, search_order, write_plan, FitModel, FitTask,
};
use crate::llamacpp::LoadedModel;
use crate::output::file_bytes;
use crate::pipeline::{
    check_outputs, create_out_dir, load_choice_tasks, measure, outputs, prompt_speed_alone,
    run_report, speed_tokens, write_report, PipelineError, RunRequest,
};
use crate::plan::{BudgetError, FitSettings, Method, ModelFingerprint, QualityBudget};
use crate::progress::Progress;
use crate::report::{
    k_range, kv_bytes_per_token, noise_note, BudgetFigures, CurvePoint, RunReport, Seconds,
    StageRead, TaskValidation, ValidationFigures,
};
use crate::task::{self, TaskData};
use crate::write::WriteOptions;

/// The folder of a budget run's curve: the search's rounds and every K's plan and model.
pub fn curve_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("curve")
}

/// The ids of scored documents, in their order.
fn ids(docs: &[DocScore]) -> Vec<String> {
    docs.iter().map(|d| d.doc_id.clone()).collect()
}

/// The documents of `task` at `indices`, as a selection to score.
fn selection<'a>(task: &'a TaskData, indices: &[usize], limit: Option<usize>) -> Selection<'a> {
    let docs: Vec<_> = indices
        .iter()
        .take(limit.unwrap_or(usize::MAX))
        .map(|&i| &task.docs[i])
        .collect();
    Selection {
        excluded: task.docs.len() - docs.len(),
        docs,
    }
}

/// The three parts ([`task::split_three`]) of each task, by document index: the documents the
/// fit trains on (its even share of them), the validation documents, the test documents.
/// Refuses a task with no validation or no test document left.
fn task_parts(
    tasks: &[TaskData],
    options: &FitSettings,
    budget: &QualityBudget,
) -> Result<Vec<[Vec<usize>; 3]>, PipelineError> {
    let trained = options.resolved_final_docs();
    tasks
        .iter()
        .zip(task::even_shares(trained, tasks.len()))
        .map(|(task_data, share)| {
            let parts = task::split_three(
                &task_data.docs,
                share,
                budget.resolved_validation_docs(),
                options.seed,
            );
            let [_, validation, test] = &parts;
            if validation.is_empty() || test.is_empty() {
                return Err(PipelineError::TooFewDocs {
                    path: task_data.path.clone(),
                    docs: task_data.docs.len(),
                    trained: share.min(task_data.docs.len()),
                    validation: validation.len(),
                    test: test.len(),
                });
            }
            Ok(parts)
        })
        .collect()
}

/// A model's validation figures on one task, its drop in points and the drop's paired 95%
/// interval: its own report, paired against the original's (for the original itself,
/// `paired` is `None`).
fn validation_figures(
    rep: &TaskReport,
    paired: Option<&PairedFigures>,
) -> (ValidationFigures, f64, [f64; 2]) {
    let figures = ValidationFigures {
        accuracy: rep.accuracy,
        agreement: paired.map_or(1.0, |p| p.agreement),
        choice_kl: paired.map_or(0.0, |p| p.choice_kl_mean),
        n_docs: rep.n_docs,
    };
    let [lo, hi] = paired.map_or([0.0, 0.0], |p| p.accuracy_diff_ci95);
    // `+ 0.0` turns a negated 0 into 0, which the report prints as +0.00, not -0.00
    (
        figures,
        paired.map_or(0.0, |p| -p.accuracy_diff * 100.0 + 0.0),
        [-hi * 100.0 + 0.0, -lo * 100.0 + 0.0],
    )
}

/// Runs `hopscotch run` with a quality budget: K = 1, 2, ... in turn (a search round, final
/// training, export, evaluation on the validation documents of every task) until the first K
/// past the budget on some task (every K up to `--max-skip` with `--full-curve`); exports the
/// largest K within the budget on all of them, measures it on the test documents, and writes
/// the report. Bad input is refused before anything is written.
pub fn run(
    req: &RunRequest,
    budget: &QualityBudget,
    progress: &Progress,
) -> Result<RunReport, PipelineError> {
    let started = Instant::now();
    if req.imatrix {
        return Err(BudgetError::Imatrix.into());
    }
    let ck = Checkpoint::open(&req.model)?;
    let max_skip = budget.resolved_max_skip(ck.arch.n_layer)?;
    let curve = curve_dir(&req.out_dir);
    check_outputs(req, std::slice::from_ref(&curve))?;
    let options = FitSettings {
        skip: max_skip,
        ..req.fit.clone()
    };
    options.validate().map_err(FitError::from)?;
    let tasks = load_choice_tasks(&req.tasks, options.fit_docs)?;
    let task_docs: Vec<usize> = tasks.iter().map(|t| t.docs.len()).collect();
    let options = model_defaults(&options, &ck.arch, &task_docs);
    let parts = task_parts(&tasks, &options, budget)?;
    ck.validate_tensors()?;
    let memory = check_memory(&ck, &options, progress)?;
    create_out_dir(&curve)?;
    let [plan_path, slim_path, orig_path, ..] = outputs(&req.out_dir);
    let bar = indicatif::ProgressBar::hidden();
    let export_options = WriteOptions {
        qtype: req.qtype,
        force: true,
        threads: req.threads,
        imatrix: None,
    };
    let mut clock = StageClock::default();

    // The fit's model and documents, then the search: Hopscotch's greedy rounds run one per K
    // below (each continuing `search.json`), the baselines rank every block at once.
    let fit_model = FitModel::load(&ck, ModelFingerprint::of(&ck), memory.recompute)?;
    let fit_task = FitTask::build(&fit_model, &tasks, &options, progress)?;
    let search_file = curve.join("search.json");
    let ranked = match options.method {
        Method::Hopscotch => None,
        Method::Random | Method::AttnCosine => {
            Some(search_order(&fit_model, &fit_task, &options, None, progress)?.0)
        }
    };
    // A search left in the folder (a run again with --force) is continued when it is this
    // one's, and replaced when it is another's.
    if ranked.is_none() && search_file.is_file() {
        let why = match search_continues(&fit_model, &fit_task, &options, &search_file) {
            Ok(()) => None,
            Err(FitError::ResumeMismatch { what, .. }) => Some(format!("{what} differs")),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = why {
            progress.note(&format!(
                "{} holds another search ({why}): searching anew",
                search_file.display()
            ));
            std::fs::remove_file(&search_file).map_err(|e| PipelineError::OutDir {
                path: search_file.clone(),
                message: e.to_string(),
            })?;
        }
    }
    let mut reads = fit_reads(&tasks, &fit_task);
    clock.fit += started.elapsed().as_secs_f64();

    // The original on the validation documents of every task: K = 0 of the curve.
    let validations: Vec<Selection<'_>> = tasks
        .iter()
        .zip(&parts)
        .map(|(task_data, [_, v, _])| selection(task_data, v, None))
        .collect();
    let n_validation: usize = validations.iter().map(|v| v.docs.len()).sum();
    progress.note(&format!(
        "exporting the original as {} and scoring it on {n_validation} validation documents",
        req.qtype.name()
    ));
    clock.time(Stage::Export, || {
        crate::convert::to_gguf(&ck, &orig_path, &export_options, &bar)
    })?;
    let mut scorer = Scorer::new(req, &ck, &tasks, &validations);
    let original = clock.time(Stage::Eval, || scorer.score(&[], &orig_path, &mut reads))?;
    let mut points = vec![original];

    // K = 1, 2, ... in turn, until the first K past the budget.
    let names: Vec<String> = tasks.iter().map(|t| task::task_name(&t.path)).collect();
    let until = if budget.full_curve {
        "every K (--full-curve)"
    } else {
        "up to the first K past the budget"
    };
    progress.note(&format!(
        "K = 1 to {max_skip} in turn (a greedy round, the final training, export, validation), \
         {until}"
    ));
    let mut plans = Vec::new();
    for k in 1..=max_skip {
        let settings = FitSettings {
            skip: k,
            ..options.clone()
        };
        let choice = match &ranked {
            Some(order) => order.first(k),
            None => clock.time(Stage::Fit, || {
                search_order(
                    &fit_model,
                    &fit_task,
                    &settings,
                    Some(&search_file),
                    progress,
                )
                .map(|(choice, _)| choice)
            })?,
        };
        let plan_k = curve.join(format!("plan-k{k}.json"));
        let (plan, _, _) = clock.time(Stage::Fit, || {
            write_plan(
                &fit_model, &fit_task, &settings, &choice, &plan_k, true, progress,
            )
        })?;
        let slim_k = curve.join(format!("slim-k{k}.gguf"));
        clock.time(Stage::Export, || {
            export(&ck, &plan, &plan_k, &slim_k, &export_options, &bar)
        })?;
        let point = clock.time(Stage::Eval, || {
            scorer.score(&plan.skipped_blocks, &slim_k, &mut reads)
        })?;
        let (line, within) = k_line(&point, &names, budget);
        progress.note(&line);
        points.push(point);
        plans.push(plan);
        if !within && !budget.full_curve {
            if k < max_skip {
                progress.note(&format!(
                    "{} left unfitted: no K past the first one out of budget can be chosen \
                     (--full-curve fits and scores every K all the same)",
                    k_range(k + 1, max_skip)
                ));
            }
            break;
        }
    }
    drop(fit_task);
    drop(fit_model);

    let per_task: Vec<Vec<(usize, f64, f64)>> = (0..tasks.len())
        .map(|t| points[1..].iter().map(|p| p.on_task(t)).collect())
        .collect();
    let (chosen, limiting) = budget.choose_on_every_task(&per_task);
    for p in &mut points[1..=chosen] {
        p.within_budget = true;
    }
    if chosen == 0 {
        let (_, drop_points, agreement) = per_task[limiting][0];
        return Err(PipelineError::NothingWithinBudget {
            task: tasks[limiting].path.display().to_string(),
            n_docs: scorer.originals[limiting].n_docs,
            block: points[1].skipped_blocks[0],
            drop_points,
            agreement,
            drops: per_task[limiting].iter().map(|&(_, d, _)| d).collect(),
            cut_short: points.len() <= max_skip,
            curve_dir: curve,
        });
    }
    progress.note(&format!(
        "chosen: K = {chosen}, blocks {:?}",
        plans[chosen - 1].skipped_blocks
    ));
    if let Some(note) = noise_note(budget, &points[chosen]) {
        progress.note(&note);
    }

    // Only now, with K chosen, are the test documents read.
    let tests: Vec<Selection<'_>> = tasks
        .iter()
        .zip(&parts)
        .map(|(task_data, [_, _, test])| selection(task_data, test, req.limit))
        .collect();
    let mut plan = plans
        .into_iter()
        .nth(chosen - 1)
        .expect("chosen is one of the plans");
    for ((recorded, original), test) in plan.tasks_mut().zip(&scorer.originals).zip(&tests) {
        recorded.validation_doc_ids = ids(&original.docs);
        recorded.test_doc_ids = test.docs.iter().map(|d| d.id.clone()).collect();
    }
    clock.time(Stage::Export, || -> Result<(), PipelineError> {
        plan.save(&plan_path, true)?;
        export(&ck, &plan, &plan_path, &slim_path, &export_options, &bar)?;
        Ok(())
    })?;
    let n_test: usize = tests.iter().map(|t| t.docs.len()).sum();
    progress.note(&format!(
        "evaluating the original and K = {chosen} on {n_test} test documents"
    ));
    let final_figures = clock.time(Stage::Eval, || measure(req, &ck, &plan, &tasks, &tests))?;
    for (task_data, measured) in tasks.iter().zip(&final_figures) {
        reads.push(StageRead {
            stage: "test".into(),
            k: Some(chosen),
            task: task_data.path.display().to_string(),
            doc_ids: measured.doc_ids.clone(),
        });
    }
    let report = run_report(
        req,
        &plan,
        final_figures,
        Seconds {
            fit: clock.fit,
            export: clock.export,
            eval: clock.eval,
            total: started.elapsed().as_secs_f64(),
        },
        None,
        Some(BudgetFigures {
            budget: budget.clone(),
            max_skip,
            chosen_skip: chosen,
            curve: points,
            reads,
        }),
    );
    write_report(&req.out_dir, &report)?;
    Ok(report)
}

/// The line `run` prints for a K's curve point (`tasks`: the task names, in order): each task's
/// validation drop and agreement, and the tasks it is past the budget on; and whether it stays
/// within the budget on every task.
fn k_line(point: &CurvePoint, tasks: &[String], budget: &QualityBudget) -> (String, bool) {
    let mut figures = Vec::new();
    let mut past = Vec::new();
    for (t, name) in tasks.iter().enumerate() {
        let (_, drop_points, agreement) = point.on_task(t);
        figures.push(format!(
            "{name} {drop_points:+.2} points, agreement {:.2}%",
            agreement * 100.0
        ));
        if !budget.admits(drop_points, agreement) {
            past.push(name.as_str());
        }
    }
    let mut line = format!(
        "K = {}, blocks {:?}: validation drop {}",
        point.k,
        point.skipped_blocks,
        figures.join("; ")
    );
    if !past.is_empty() {
        line += &format!(", past the budget on {}", past.join(", "));
    }
    (line, past.is_empty())
}

/// A stage of a budget run, for its report's seconds.
#[derive(Debug, Clone, Copy)]
enum Stage {
    Fit,
    Export,
    Eval,
}

/// Seconds spent per stage of a budget run, whose stages take turns K by K.
#[derive(Debug, Default)]
struct StageClock {
    fit: f64,
    export: f64,
    eval: f64,
}

impl StageClock {
    /// Runs `work`, counting its time to `stage`.
    fn time<T, E>(&mut self, stage: Stage, work: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let started = Instant::now();
        let result = work();
        let seconds = started.elapsed().as_secs_f64();
        match stage {
            Stage::Fit => self.fit += seconds,
            Stage::Export => self.export += seconds,
            Stage::Eval => self.eval += seconds,
        }
        result
    }
}

/// Per task, the documents the fit read (the search's and the final training's).
fn fit_reads(tasks: &[TaskData], fit_task: &FitTask) -> Vec<StageRead> {
    tasks
        .iter()
        .zip(&fit_task.data.doc_ids)
        .zip(fit_task.final_only_doc_ids())
        .map(|((task_data, fit), final_only)| StageRead {
            stage: "fit".into(),
            k: None,
            task: task_data.path.display().to_string(),
            doc_ids: fit.iter().cloned().chain(final_only).collect(),
        })
        .collect()
}

/// Scores each K's file on every task's validation documents in llama.cpp, paired against the
/// original's scores (the first file scored), and measures its prompt speed on the first task's
/// documents.
struct Scorer<'a> {
    req: &'a RunRequest,
    ck: &'a Checkpoint,
    tasks: &'a [TaskData],
    validations: &'a [Selection<'a>],
    /// The prompt speed's text, tokenized by the original.
    speed_text: Vec<u32>,
    /// The original's reports, one per task, once scored.
    originals: Vec<TaskReport>,
}

impl<'a> Scorer<'a> {
    fn new(
        req: &'a RunRequest,
        ck: &'a Checkpoint,
        tasks: &'a [TaskData],
        validations: &'a [Selection<'a>],
    ) -> Self {
        Scorer {
            req,
            ck,
            tasks,
            validations,
            speed_text: Vec::new(),
            originals: Vec::new(),
        }
    }

    /// The curve point of the file at `path`, which skips `skipped_blocks` (none: the original,
    /// scored first); `reads` gets the documents each evaluation read.
    fn score(
        &mut self,
        skipped_blocks: &[usize],
        path: &Path,
        reads: &mut Vec<StageRead>,
    ) -> Result<CurvePoint, PipelineError> {
        let bar = indicatif::ProgressBar::hidden();
        let model = LoadedModel::load(path)?;
        let first = self.originals.is_empty();
        if first {
            self.speed_text = speed_tokens(&model, &self.validations[0]);
        }
        let k = skipped_blocks.len();
        let mut figures = Vec::new();
        let req = self.req;
        for (t, (task_data, v)) in self.tasks.iter().zip(self.validations).enumerate() {
            let mut rep = evaluate(&model, None, task_data, v, req.n_ctx, req.threads, &bar)?;
            let paired = match self.originals.get(t) {
                Some(original) => Some(pair_with_reference(&mut rep.docs, &original.docs)?),
                None => None,
            };
            reads.push(StageRead {
                stage: "validation".into(),
                k: Some(k),
                task: task_data.path.display().to_string(),
                doc_ids: ids(&rep.docs),
            });
            figures.push(validation_figures(&rep, paired.as_ref()));
            if first {
                self.originals.push(rep);
            }
        }
        let speed = prompt_speed_alone(&model, &self.speed_text, req.threads)?;
        let mut figures = self.tasks.iter().zip(figures);
        let (_, (validation, drop_points, drop_ci95)) = figures.next().expect("a run has a task");
        Ok(CurvePoint {
            k,
            skipped_blocks: skipped_blocks.to_vec(),
            validation,
            drop_points,
            drop_ci95,
            other_tasks: figures
                .map(
                    |(task_data, (validation, drop_points, drop_ci95))| TaskValidation {
                        task: task_data.path.display().to_string(),
                        validation,
                        drop_points,
                        drop_ci95,
                    },
                )
                .collect(),
            within_budget: first,
            file_bytes: file_bytes(path),
            kv_bytes_per_token: kv_bytes_per_token(&self.ck.arch, skipped_blocks),
            prompt_tokens_per_s: speed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(drops: &[(f64, f64)]) -> CurvePoint {
        let figures = |&(drop_points, agreement): &(f64, f64)| {
            (
                ValidationFigures {
                    accuracy: 0.5,
                    agreement,
                    choice_kl: 0.1,
                    n_docs: 200,
                },
                drop_points,
            )
        };
        let (validation, drop_points) = figures(&drops[0]);
        CurvePoint {
            k: 2,
            skipped_blocks: vec![6, 26],
            validation,
            drop_points,
            drop_ci95: [drop_points - 3.0, drop_points + 3.0],
            other_tasks: drops[1..]
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let (validation, drop_points) = figures(d);
                    TaskValidation {
                        task: format!("t{i}"),
                        validation,
                        drop_points,
                        drop_ci95: [drop_points - 3.0, drop_points + 3.0],
                    }
                })
                .collect(),
            within_budget: false,
            file_bytes: 1,
            kv_bytes_per_token: 1,
            prompt_tokens_per_s: 1.0,
        }
    }

    #[test]
    fn a_ks_line_gives_each_tasks_drop_and_names_those_past_the_budget() {
        let budget = QualityBudget {
            max_drop: Some(1.0),
            ..Default::default()
        };
        let names = ["arc_easy".to_string(), "winogrande".to_string()];
        let (line, within) = k_line(&point(&[(0.5, 0.9), (1.0, 0.8)]), &names, &budget);
        assert!(within, "{line}");
        assert_eq!(
            line,
            "K = 2, blocks [6, 26]: validation drop arc_easy +0.50 points, agreement 90.00%; \
             winogrande +1.00 points, agreement 80.00%"
        );
        let (line, within) = k_line(&point(&[(0.5, 0.9), (4.5, 0.8)]), &names, &budget);
        assert!(!within);
        assert!(line.ends_with(", past the budget on winogrande"), "{line}");
        let (line, within) = k_line(&point(&[(2.0, 0.9), (4.5, 0.8)]), &names, &budget);
        assert!(!within);
        assert!(
            line.ends_with(", past the budget on arc_easy, winogrande"),
            "{line}"
        );
    }
}

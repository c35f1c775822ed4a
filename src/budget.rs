//! `hopscotch run --max-drop` (or `--min-agreement`): K chosen by a quality budget instead of
//! given. One greedy search up to `--max-skip` and a final training per K (the stages `sweep`
//! uses), each K's slim model exported and evaluated in llama.cpp on validation documents held
//! out of the fit; the largest K that stays within the budget, with every smaller K, is
//! exported as `slim.gguf`, and its final figures are measured on test documents that neither the
//! fit nor the choice of K read. The task's three parts come from one seeded order
//! ([`task::split_three`]); the plan records the validation and test documents, the report the
//! curve and which documents each stage read ([`StageRead`]).
//!
//! Besides `run`'s files the folder holds `curve/`: the search's rounds (`search.json`) and
//! every K's plan and model (`plan-k<K>.json`, `slim-k<K>.gguf`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::checkpoint::Checkpoint;
use crate::eval::task::{evaluate, pair_with_reference, select_docs, DocScore, Selection};
use crate::export::export;
use crate::fit::options::FitError;
use crate::fit::session::{check_memory, search_order, write_plan, FitModel, FitTask};
use crate::llamacpp::LoadedModel;
use crate::output::file_bytes;
use crate::pipeline::{
    check_outputs, create_out_dir, measure, outputs, prompt_speeds, run_report, speed_tokens,
    write_report, PipelineError, RunRequest,
};
use crate::plan::{BudgetError, FitSettings, ModelFingerprint, Plan, QualityBudget};
use crate::progress::Progress;
use crate::report::{
    kv_bytes_per_token, BudgetFigures, CurvePoint, RunReport, Seconds, StageRead, ValidationFigures,
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

/// Runs `hopscotch run` with a quality budget: fit every K up to `--max-skip`, evaluate each on
/// the validation documents, export the largest K within `budget`, measure it on the test
/// documents, and write the report. Bad input is refused before anything is written.
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
    let task_data = task::load(&req.task)?;
    select_docs(&task_data, None, Some(1))?;
    let options = FitSettings {
        skip: max_skip,
        ..req.fit.clone()
    };
    options.validate().map_err(FitError::from)?;
    let trained = options.resolved_final_docs();
    let [_, validation_idx, test_idx] = task::split_three(
        &task_data.docs,
        trained,
        budget.resolved_validation_docs(),
        options.seed,
    );
    if validation_idx.is_empty() || test_idx.is_empty() {
        return Err(PipelineError::TooFewDocs {
            path: req.task.clone(),
            docs: task_data.docs.len(),
            trained: trained.min(task_data.docs.len()),
            validation: validation_idx.len(),
            test: test_idx.len(),
        });
    }
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

    // The fit: one search up to --max-skip, a final training and an export per K.
    let fit_model = FitModel::load(&ck, ModelFingerprint::of(&ck), memory.recompute)?;
    let fit_task = FitTask::build(&fit_model, &req.task, &task_data, &options, progress)?;
    progress.note(&format!(
        "choosing up to {max_skip} blocks to skip; K is then chosen on {} validation documents",
        validation_idx.len()
    ));
    let (order, _) = search_order(
        &fit_model,
        &fit_task,
        &options,
        Some(&curve.join("search.json")),
        progress,
    )?;
    let mut plans: Vec<Plan> = Vec::new();
    for k in 1..=order.skipped.len() {
        let choice = order.first(k);
        progress.note(&format!(
            "training the final scalars of K = {k}: blocks {:?}",
            choice.skipped
        ));
        let path = curve.join(format!("plan-k{k}.json"));
        let settings = FitSettings {
            skip: k,
            ..options.clone()
        };
        let (plan, _, _) = write_plan(
            &fit_model, &fit_task, &settings, &choice, &path, true, progress,
        )?;
        plans.push(plan);
    }
    let mut reads = vec![StageRead {
        stage: "fit".into(),
        k: None,
        doc_ids: fit_task
            .data
            .fit_doc_ids
            .iter()
            .cloned()
            .chain(fit_task.final_only_doc_ids())
            .collect(),
    }];
    drop(fit_task);
    drop(fit_model);
    let t_fit = started.elapsed().as_secs_f64();

    progress.note(&format!(
        "exporting the original and {} slim models as {}",
        plans.len(),
        req.qtype.name()
    ));
    crate::convert::to_gguf(&ck, &orig_path, &export_options, &bar)?;
    let mut slim_paths = Vec::new();
    for (plan, k) in plans.iter().zip(1..) {
        let path = curve.join(format!("slim-k{k}.gguf"));
        export(
            &ck,
            plan,
            &curve.join(format!("plan-k{k}.json")),
            &path,
            &export_options,
            &bar,
        )?;
        slim_paths.push(path);
    }
    let t_export = started.elapsed().as_secs_f64() - t_fit;

    // K chosen on the validation documents.
    progress.note(&format!(
        "evaluating the original and every K on {} validation documents",
        validation_idx.len()
    ));
    let validation = selection(&task_data, &validation_idx, None);
    let orig = LoadedModel::load(&orig_path)?;
    let speed_text = speed_tokens(&orig, &validation);
    let original = evaluate(
        &orig,
        None,
        &task_data,
        &validation,
        req.n_ctx,
        req.threads,
        &bar,
    )?;
    let original_speed = prompt_speeds(&[&orig], &speed_text, req.threads)?[0];
    drop(orig);
    reads.push(StageRead {
        stage: "validation".into(),
        k: Some(0),
        doc_ids: ids(&original.docs),
    });
    let mut points = vec![CurvePoint {
        k: 0,
        skipped_blocks: Vec::new(),
        validation: ValidationFigures {
            accuracy: original.accuracy,
            agreement: 1.0,
            choice_kl: 0.0,
            n_docs: original.n_docs,
        },
        drop_points: 0.0,
        within_budget: true,
        file_bytes: file_bytes(&orig_path),
        kv_bytes_per_token: kv_bytes_per_token(&ck.arch, &[]),
        prompt_tokens_per_s: original_speed,
    }];
    for ((plan, path), k) in plans.iter().zip(&slim_paths).zip(1..) {
        let slim = LoadedModel::load(path)?;
        let mut rep = evaluate(
            &slim,
            None,
            &task_data,
            &validation,
            req.n_ctx,
            req.threads,
            &bar,
        )?;
        let paired = pair_with_reference(&mut rep.docs, &original.docs)?;
        let speed = prompt_speeds(&[&slim], &speed_text, req.threads)?[0];
        reads.push(StageRead {
            stage: "validation".into(),
            k: Some(k),
            doc_ids: ids(&rep.docs),
        });
        points.push(CurvePoint {
            k,
            skipped_blocks: plan.skipped_blocks.clone(),
            validation: ValidationFigures {
                accuracy: rep.accuracy,
                agreement: paired.agreement,
                choice_kl: paired.choice_kl_mean,
                n_docs: rep.n_docs,
            },
            drop_points: -paired.accuracy_diff * 100.0,
            within_budget: false,
            file_bytes: file_bytes(path),
            kv_bytes_per_token: kv_bytes_per_token(&ck.arch, &plan.skipped_blocks),
            prompt_tokens_per_s: speed,
        });
    }
    let measured: Vec<(usize, f64, f64)> = points[1..]
        .iter()
        .map(|p| (p.k, p.drop_points, p.validation.agreement))
        .collect();
    let chosen = budget.choose(&measured);
    for p in &mut points[1..=chosen] {
        p.within_budget = true;
    }
    if chosen == 0 {
        let first = &points[1];
        return Err(PipelineError::NothingWithinBudget {
            n_docs: first.validation.n_docs,
            block: first.skipped_blocks[0],
            drop_points: first.drop_points,
            agreement: first.validation.agreement,
            curve_dir: curve,
        });
    }
    progress.note(&format!(
        "chosen: K = {chosen}, blocks {:?}",
        plans[chosen - 1].skipped_blocks
    ));

    // Only now, with K chosen, are the test documents read.
    let test = selection(&task_data, &test_idx, req.limit);
    let mut plan = plans.swap_remove(chosen - 1);
    plan.validation_doc_ids = ids(&original.docs);
    plan.test_doc_ids = test.docs.iter().map(|d| d.id.clone()).collect();
    plan.save(&plan_path, true)?;
    export(&ck, &plan, &plan_path, &slim_path, &export_options, &bar)?;
    progress.note(&format!(
        "evaluating the original and K = {chosen} on {} test documents",
        test.docs.len()
    ));
    let final_figures = measure(req, &ck, &plan, &task_data, &test)?;
    reads.push(StageRead {
        stage: "test".into(),
        k: Some(chosen),
        doc_ids: final_figures.doc_ids.clone(),
    });
    let t_eval = started.elapsed().as_secs_f64() - t_fit - t_export;
    let report = run_report(
        req,
        &plan,
        final_figures,
        Seconds {
            fit: t_fit,
            export: t_export,
            eval: t_eval,
            total: started.elapsed().as_secs_f64(),
        },
        None,
        Some(BudgetFigures {
            budget: budget.clone(),
            chosen_skip: chosen,
            curve: points,
            reads,
        }),
    );
    write_report(&req.out_dir, &report)?;
    Ok(report)
}

//! `hopscotch run --max-drop`: K chosen by a quality budget on validation documents, the final
//! figures on test documents; on a tiny random model with dead attention blocks.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{bin, dead_blocks_model, write_choice_task};
use hopscotch::eval::task::{evaluate, select_docs};
use hopscotch::llamacpp::LoadedModel;
use hopscotch::plan::Plan;
use serde_json::Value;

/// The layers whose attention adds nothing in [`model_and_task`]'s model (layer 3 is live).
const DEAD: [usize; 2] = [1, 2];

/// Documents of the task: 4 fitted on, 16 for validation, 20 for the test.
const DOCS: usize = 40;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Forty three-choice questions, `gold` giving each document's answer.
fn questions(gold: impl Fn(usize) -> usize) -> Vec<(String, Vec<String>, usize)> {
    let things = ["stone", "river", "teacher", "window", "song"];
    let words = [
        [" heavy.", " green.", " loud."],
        [" cold.", " old.", " bright."],
        [" kind.", " slow.", " empty."],
        [" tall.", " sweet.", " broken."],
    ];
    (0..DOCS)
        .map(|i| {
            (
                format!("The {} number {i} is", things[i % things.len()]),
                words[i % words.len()]
                    .iter()
                    .map(|w| w.to_string())
                    .collect(),
                gold(i),
            )
        })
        .collect()
}

/// The model with [`DEAD`] blocks, and a task whose gold answers are the original model's own
/// (scored in llama.cpp at f32), so that every answer a slim model changes costs accuracy; and
/// a second such task, the same questions in reverse order.
fn model_and_tasks(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    model_and_tasks_with(dir, &DEAD)
}

/// [`model_and_tasks`] with the attention of the `dead` layers adding nothing.
fn model_and_tasks_with(dir: &Path, dead: &[usize]) -> (PathBuf, PathBuf, PathBuf) {
    let model = dead_blocks_model(dir, dead);
    let gguf = dir.join("original-f32.gguf");
    let o = Command::new(bin())
        .args(["convert", s(&model), "-o", s(&gguf), "--type", "f32"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let draft = write_choice_task(dir, "draft", &questions(|_| 0));
    let data = hopscotch::task::load(&draft).unwrap();
    let report = evaluate(
        &LoadedModel::load(&gguf).unwrap(),
        None,
        &data,
        &select_docs(&data, None, None).unwrap(),
        4096,
        1,
        &indicatif::ProgressBar::hidden(),
    )
    .unwrap();
    let preds: Vec<usize> = report.docs.iter().map(|d| d.pred).collect();
    let task = write_choice_task(dir, "task", &questions(|i| preds[i]));
    let reversed: Vec<_> = questions(|i| preds[i]).into_iter().rev().collect();
    let other = write_choice_task(dir, "reversed", &reversed);
    (model, task, other)
}

/// `hopscotch run` on the tiny model at f32 with `extra` arguments (the budget): no scalars
/// trained, so a dead block skipped leaves every answer as it was.
fn budget_run(model: &Path, task: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        s(model),
        "--task",
        s(task),
        "--type",
        "f32",
        "--no-scales",
        "--fit-docs",
        "4",
        // the stand-ins on the fit documents alone, so that the parts are the fit's and the
        // budget's (a small model's default would add a quarter of the task)
        "--final-docs",
        "4",
        "--batch-size",
        "2",
        "--validation-docs",
        "16",
        "--threads",
        "1",
        "--json",
        "-o",
        s(out),
    ];
    args.extend(extra);
    Command::new(bin()).args(&args).output().unwrap()
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// A budget of no drop at all takes exactly the dead blocks and stops at the live one; the
/// three parts of the task are disjoint, the seeded split's, and the test part is read only
/// after K is chosen.
#[test]
fn a_zero_budget_takes_exactly_the_dead_blocks_and_reads_the_test_documents_last() {
    let dir = tempfile::tempdir().unwrap();
    let (model, task, _) = model_and_tasks(dir.path());
    let out = dir.path().join("out");
    let o = budget_run(&model, &task, &out, &["--max-drop", "0", "--max-skip", "3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report, written);

    // the curve: the original and K = 1..3; the dead blocks cost nothing, the live one costs
    assert_eq!(report["chosen_skip"], 2);
    let mut skipped: Vec<u64> = report["skipped_blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    skipped.sort_unstable();
    assert_eq!(skipped, vec![1, 2]);
    let curve = report["curve"].as_array().unwrap();
    assert_eq!(curve.len(), 4);
    for (k, p) in curve.iter().enumerate() {
        assert_eq!(p["k"], k);
        assert_eq!(p["validation"]["n_docs"], 16);
        for key in ["accuracy", "agreement", "choice_kl"] {
            assert!(p["validation"][key].is_number(), "curve[{k}].{key}");
        }
        assert!(p["file_bytes"].as_u64().unwrap() > 0);
        assert!(p["kv_bytes_per_token"].as_u64().unwrap() > 0);
        assert!(p["prompt_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert_eq!(p["within_budget"], k <= 2, "{p}");
    }
    assert_eq!(curve[0]["validation"]["accuracy"], 1.0);
    for p in &curve[1..3] {
        assert_eq!(p["validation"]["agreement"], 1.0, "{p}");
        assert_eq!(p["drop_points"], 0.0, "{p}");
        assert_eq!(p["drop_ci95"], serde_json::json!([0.0, 0.0]), "{p}");
    }
    let ci = |p: &Value, i: usize| p["drop_ci95"][i].as_f64().unwrap();
    let drop = curve[3]["drop_points"].as_f64().unwrap();
    assert!(
        ci(&curve[3], 0) <= drop && drop <= ci(&curve[3], 1),
        "{}",
        curve[3]
    );
    assert!(
        curve[3]["drop_points"].as_f64().unwrap() > 0.0,
        "{}",
        curve[3]
    );
    assert!(curve[3]["skipped_blocks"]
        .as_array()
        .unwrap()
        .contains(&3.into()));
    // KV cache per token falls by one layer's share per K
    let kv = |k: usize| curve[k]["kv_bytes_per_token"].as_u64().unwrap();
    assert_eq!(kv(2) * 4, kv(0) * 2);
    for m in ["original", "slim"] {
        assert_eq!(report[m]["n_docs"], 20, "{m}: the test documents");
    }
    assert_eq!(report["slim"]["kv_bytes_per_token"], kv(2));
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| **2** (chosen) |"), "{md}");
    assert!(md.contains("| +0.00 [+0.00, +0.00] |"), "{md}");
    assert!(!md.contains("-0.00 [") && !md.contains("[-0.00"), "{md}");
    assert!(md.contains("an accuracy drop of at most 0 points"), "{md}");
    let svg = std::fs::read_to_string(out.join("report.svg")).unwrap();
    assert!(svg.contains("validation accuracy per k"), "{svg}");
    assert_eq!(svg.matches("fill=\"red\"").count(), 1, "{svg}");
    for k in 1..=3 {
        assert!(out.join(format!("curve/slim-k{k}.gguf")).is_file());
    }

    // the stages' documents: fit, validation per K, then the test, once K is chosen
    let reads = report["reads"].as_array().unwrap();
    let stages: Vec<(&str, Option<u64>)> = reads
        .iter()
        .map(|r| (r["stage"].as_str().unwrap(), r["k"].as_u64()))
        .collect();
    assert_eq!(
        stages,
        vec![
            ("fit", None),
            ("validation", Some(0)),
            ("validation", Some(1)),
            ("validation", Some(2)),
            ("validation", Some(3)),
            ("test", Some(2)),
        ]
    );
    let fit = ids(&reads[0]["doc_ids"]);
    let validation = ids(&reads[1]["doc_ids"]);
    let test = ids(&reads[5]["doc_ids"]);
    for r in &reads[1..5] {
        assert_eq!(ids(&r["doc_ids"]), validation);
    }
    assert_eq!((fit.len(), validation.len(), test.len()), (4, 16, 20));
    let sets: Vec<HashSet<&String>> = [&fit, &validation, &test]
        .iter()
        .map(|v| v.iter().collect())
        .collect();
    assert!(sets[0].is_disjoint(&sets[1]));
    assert!(sets[0].is_disjoint(&sets[2]));
    assert!(sets[1].is_disjoint(&sets[2]));
    // they are the seeded split's parts, which another seed changes
    let data = hopscotch::task::load(&task).unwrap();
    let part = |seed, p: usize| -> Vec<String> {
        hopscotch::task::split_three(&data.docs, 4, 16, seed)[p]
            .iter()
            .map(|&i| data.docs[i].id.clone())
            .collect()
    };
    assert_eq!(
        (part(0, 0), part(0, 1), part(0, 2)),
        (fit, validation.clone(), test.clone())
    );
    assert_ne!(part(1, 1), validation);
    // and the plan records them
    let plan = Plan::load(&out.join("plan.json")).unwrap();
    assert_eq!(plan.first_task.validation_doc_ids, validation);
    assert_eq!(plan.first_task.test_doc_ids, test);
    assert_eq!(plan.skipped_blocks.len(), 2);
}

/// Two tasks: the fit draws 2 documents from each, every K is evaluated on each task's 16
/// validation documents and must stay within the budget on both, and each task's three parts
/// are disjoint, its test documents read last.
#[test]
fn a_budget_on_two_tasks_holds_on_each_and_reads_each_tasks_parts() {
    let dir = tempfile::tempdir().unwrap();
    let (model, task, other) = model_and_tasks(dir.path());
    let out = dir.path().join("out");
    let o = budget_run(
        &model,
        &task,
        &out,
        &["--task", s(&other), "--max-drop", "0", "--max-skip", "3"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["chosen_skip"], 2);
    for (k, p) in report["curve"].as_array().unwrap().iter().enumerate() {
        let others = p["other_tasks"].as_array().unwrap();
        assert_eq!(others.len(), 1, "{p}");
        assert_eq!(others[0]["task"], other.display().to_string());
        assert_eq!(others[0]["validation"]["n_docs"], 16);
        let within = |drop: &Value| drop.as_f64().unwrap() <= 0.0;
        assert_eq!(p["within_budget"], k <= 2, "{p}");
        if k <= 2 {
            assert!(
                within(&p["drop_points"]) && within(&others[0]["drop_points"]),
                "{p}"
            );
        }
    }
    // 40 documents per task: 2 trained on, 16 for validation, 22 for the test
    let others = report["other_tasks"].as_array().unwrap();
    assert_eq!(others.len(), 1);
    for figures in [&report, &others[0]] {
        assert_eq!(figures["slim"]["n_docs"], 22);
        assert_eq!(figures["original"]["n_docs"], 22);
    }
    let reads = report["reads"].as_array().unwrap();
    let plan = Plan::load(&out.join("plan.json")).unwrap();
    for (t, recorded) in [&task, &other].into_iter().zip(plan.tasks()) {
        let name = t.display().to_string();
        let of = |stage: &str| -> Vec<Vec<String>> {
            reads
                .iter()
                .filter(|r| r["stage"] == stage && r["task"] == name.as_str())
                .map(|r| ids(&r["doc_ids"]))
                .collect()
        };
        let (fit, validation, test) = (of("fit"), of("validation"), of("test"));
        assert_eq!(
            (fit.len(), validation.len(), test.len()),
            (1, 4, 1),
            "{name}"
        );
        assert!(validation.iter().all(|v| *v == validation[0]), "{name}");
        let parts = [&fit[0], &validation[0], &test[0]];
        assert_eq!(parts.map(Vec::len), [2, 16, 22], "{name}");
        let sets: Vec<HashSet<&String>> = parts.iter().map(|v| v.iter().collect()).collect();
        assert!(sets[0].is_disjoint(&sets[1]) && sets[0].is_disjoint(&sets[2]));
        assert!(sets[1].is_disjoint(&sets[2]), "{name}");
        assert_eq!(recorded.task.path, name);
        assert_eq!(recorded.fit_doc_ids, fit[0]);
        assert_eq!(&recorded.validation_doc_ids, &validation[0]);
        assert_eq!(&recorded.test_doc_ids, &test[0]);
    }
    let last_validation = reads.iter().rposition(|r| r["stage"] == "validation");
    let first_test = reads.iter().position(|r| r["stage"] == "test");
    assert!(
        last_validation < first_test,
        "the test documents are read last"
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| K | task | reversed |"), "{md}");
    assert!(md.contains("## Every task"), "{md}");
}

/// The run stops at the first K past the budget: no larger K is fitted, exported or scored,
/// and the report says where its curve stops. With `--full-curve` every K is, and the curve's
/// first points are the same.
#[test]
fn a_budget_run_stops_at_the_first_k_past_the_budget_unless_full_curve() {
    let dir = tempfile::tempdir().unwrap();
    let (model, task, _) = model_and_tasks_with(dir.path(), &[1]);
    let run = |name: &str, extra: &[&str]| -> (PathBuf, Value, String) {
        let out = dir.path().join(name);
        let mut args = vec!["--max-drop", "0", "--max-skip", "3"];
        args.extend(extra);
        let o = budget_run(&model, &task, &out, &args);
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{stderr}");
        (out, serde_json::from_slice(&o.stdout).unwrap(), stderr)
    };
    let (short, report, stderr) = run("short", &[]);
    assert!(stderr.contains("past the budget on task"), "{stderr}");
    assert!(stderr.contains("K = 3 was left unfitted"), "{stderr}");
    assert_eq!(report["chosen_skip"], 1);
    assert_eq!(report["max_skip"], 3);
    let curve = report["curve"].as_array().unwrap();
    assert_eq!(curve.len(), 3, "K = 0, 1 and the first past the budget");
    assert!(
        curve[2]["drop_points"].as_f64().unwrap() > 0.0,
        "{}",
        curve[2]
    );
    assert!(short.join("curve/slim-k2.gguf").is_file());
    assert!(!short.join("curve/plan-k3.json").exists());
    assert!(!short.join("curve/slim-k3.gguf").exists());
    let scored: Vec<u64> = report["reads"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["stage"] == "validation")
        .map(|r| r["k"].as_u64().unwrap())
        .collect();
    assert_eq!(scored, vec![0, 1, 2]);
    let md = std::fs::read_to_string(short.join("report.md")).unwrap();
    assert!(
        md.contains("The curve stops at K = 2, the first K past the budget: no larger K can be chosen, so K = 3 was not fitted"),
        "{md}"
    );
    // the greedy search stopped there too: one round per K scored
    let rounds = |out: &Path| -> Vec<Value> {
        let text = std::fs::read_to_string(out.join("curve/search.json")).unwrap();
        let search: Value = serde_json::from_str(&text).unwrap();
        search["rounds"].as_array().unwrap().clone()
    };
    assert_eq!(rounds(&short).len(), 2);

    let (full, report, _) = run("full", &["--full-curve"]);
    assert_eq!(report["chosen_skip"], 1);
    assert_eq!(report["budget"]["full_curve"], true);
    let full_curve = report["curve"].as_array().unwrap();
    assert_eq!(full_curve.len(), 4);
    for (a, b) in curve.iter().zip(full_curve) {
        for key in [
            "skipped_blocks",
            "validation",
            "drop_points",
            "within_budget",
        ] {
            assert_eq!(a[key], b[key], "{key}");
        }
    }
    assert!(full.join("curve/slim-k3.gguf").is_file());
    let full_rounds = rounds(&full);
    assert_eq!(full_rounds.len(), 3);
    assert_eq!(full_rounds[..2], rounds(&short)[..]);
    let md = std::fs::read_to_string(full.join("report.md")).unwrap();
    assert!(!md.contains("The curve stops"), "{md}");
}

/// A run again into the same folder with `--force` reuses the search's rounds when they are of
/// the same model, documents and settings (another budget), and starts the search over when
/// they are not.
#[test]
fn a_forced_rerun_reuses_a_matching_search_and_replaces_another() {
    let dir = tempfile::tempdir().unwrap();
    let (model, task, _) = model_and_tasks_with(dir.path(), &[1]);
    let out = dir.path().join("out");
    let run = |extra: &[&str]| -> String {
        let mut args = vec!["--max-skip", "3", "--force"];
        args.extend(extra);
        let o = budget_run(&model, &task, &out, &args);
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{extra:?}: {stderr}");
        stderr
    };
    // stops at K = 2 (the first live block) after two rounds
    let first = run(&["--max-drop", "0"]);
    assert!(first.contains("round 2: skip"), "{first}");
    assert!(!first.contains("round 3: skip"), "{first}");
    // another budget: the same search, its two rounds reused and the third run
    let again = run(&["--max-drop", "100"]);
    assert!(!again.contains("round 1: skip"), "{again}");
    assert!(again.contains("round 3: skip"), "{again}");
    // other fit settings: the old rounds are another search's, replaced
    let other = run(&["--max-drop", "0", "--seed", "7"]);
    assert!(other.contains("round 1: skip"), "{other}");
    assert!(other.contains("another search"), "{other}");
}

/// A baseline's ranking serves the budget as the greedy search does: each K takes its first K
/// blocks, nested, and a budget every K meets scores every K up to `--max-skip`.
#[test]
fn a_budget_with_a_baseline_takes_its_ranking_k_by_k() {
    let dir = tempfile::tempdir().unwrap();
    let (model, task, _) = model_and_tasks(dir.path());
    let out = dir.path().join("out");
    let args = [
        "--method",
        "attn-cosine",
        "--max-drop",
        "100",
        "--max-skip",
        "3",
    ];
    let o = budget_run(&model, &task, &out, &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["chosen_skip"], 3);
    let curve = report["curve"].as_array().unwrap();
    assert_eq!(curve.len(), 4);
    let blocks = |k: usize| curve[k]["skipped_blocks"].as_array().unwrap().clone();
    for k in 1..=3 {
        assert_eq!(blocks(k).len(), k);
        assert_eq!(
            blocks(k)[..k - 1],
            blocks(k - 1)[..],
            "K = {k} extends K = {}",
            k - 1
        );
    }
}

/// Bad budgets are refused with a clear error before anything is written.
#[test]
fn a_bad_budget_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let model = dead_blocks_model(dir.path(), &DEAD);
    let task = write_choice_task(dir.path(), "task", &questions(|_| 0));
    let out = dir.path().join("out");
    for (extra, message) in [
        (
            &["--max-drop", "1", "--skip", "2"][..],
            "--skip 2 and a quality budget",
        ),
        (&["--max-drop", "-1"][..], "--max-drop -1: give the points"),
        (
            &["--min-agreement", "1.5"][..],
            "--min-agreement 1.5: give a fraction",
        ),
        (
            &["--max-drop", "1", "--max-skip", "4"][..],
            "--max-skip 4: the model has 4 layers, so at most 3",
        ),
        (
            &["--max-skip", "2", "--skip", "1"][..],
            "--max-skip applies only with a quality budget",
        ),
        (
            &[][..],
            "--validation-docs applies only with a quality budget",
        ),
        (
            &["--full-curve", "--skip", "1"][..],
            "--full-curve applies only with a quality budget",
        ),
    ] {
        let o = budget_run(&model, &task, &out, extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(err.contains(message), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?} wrote {}", out.display());
    }
}

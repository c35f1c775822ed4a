//! `hopscotch sweep` end to end on a tiny random model and two tiny tasks: every configuration
//! fitted, exported and evaluated on both tasks against the original on the same held-out
//! documents; the greedy order reused across K; a rerun recomputing only what was removed, and
//! extending the searches for a longer K list; a folder of another configuration refused; bad
//! input refused with a clear error.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{bin, facts, write_choice_task, write_tiny, Tiny};
use serde_json::{json, Value};

/// Two tasks of 12 documents each: facts, and counting.
fn two_tasks(dir: &Path) -> [PathBuf; 2] {
    let facts = facts();
    let counting: Vec<_> = (0..12)
        .map(|i| {
            (
                format!("{i} plus one is"),
                vec![
                    format!(" {}.", i + 1),
                    format!(" {}.", i + 3),
                    format!(" {i}."),
                ],
                0,
            )
        })
        .collect();
    [
        write_choice_task(dir, "facts", &facts),
        write_choice_task(dir, "counting", &counting),
    ]
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `hopscotch sweep` with the tiny settings and `extra` arguments.
fn sweep(model: &Path, tasks: &[&Path], out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["sweep", s(model)];
    for t in tasks {
        args.extend(["--task", s(t)]);
    }
    args.extend([
        "--type",
        "f16",
        "--fit-docs",
        "4",
        "--batch-size",
        "2",
        "--max-seq-len",
        "32",
        "--limit",
        "6",
        "--threads",
        "1",
        "--json",
        "-o",
        s(out),
    ]);
    args.extend(extra);
    Command::new(bin()).args(&args).output().unwrap()
}

fn ok(o: &Output) -> Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// The figures of a report, without what differs from run to run (time, work done).
fn figures(report: &Value) -> Value {
    json!([
        report["tasks"],
        report["rows"],
        report["generalisation"],
        report["comparisons"]
    ])
}

#[test]
fn sweep_evaluates_every_model_on_every_task_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let hf = write_tiny(dir.path(), &Tiny::llama());
    let [facts, counting] = two_tasks(dir.path());
    let out = dir.path().join("out");
    let tasks = [facts.as_path(), counting.as_path()];
    let extra = ["--skip", "2,1", "--method", "hopscotch,random"];
    let report = ok(&sweep(&hf, &tasks, &out, &extra));
    assert_eq!(report, read_json(&out.join("sweep.json")));

    for f in [
        "sweep.json",
        "sweep.md",
        "sweep-config.json",
        "original.gguf",
        "agreement.svg",
        "accuracy-facts.svg",
        "accuracy-counting.svg",
        "searches/facts-hopscotch-kl.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    for svg in ["agreement.svg", "accuracy-facts.svg"] {
        let text = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(
            text.starts_with("<svg") && text.contains("<polyline"),
            "{svg}"
        );
    }
    let md = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    for needle in [
        "## facts",
        "## counting",
        "| original |",
        "## Generalisation",
        "| fit task | K | Hopscotch | against |",
    ] {
        assert!(md.contains(needle), "{needle} not in sweep.md");
    }

    // 2 fit tasks x 2 methods x 2 K = 8 models, each on 2 tasks
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 16);
    let units = &report["units"];
    assert_eq!(
        units["computed"],
        json!({"original": 1, "search_rounds": 4, "plans": 8, "models": 8, "evals": 18})
    );
    assert_eq!(
        units["reused"],
        json!({"original": 0, "search_rounds": 0, "plans": 0, "models": 0, "evals": 0})
    );

    // one order per configuration: K = 1 takes the first block of K = 2
    for config in [
        "facts-hopscotch-kl",
        "counting-hopscotch-kl",
        "facts-random-kl",
    ] {
        let plan = |k: usize| read_json(&out.join(format!("plans/{config}-k{k}.json")));
        let (k1, k2) = (plan(1), plan(2));
        assert_eq!(k1["skipped_blocks"].as_array().unwrap().len(), 1);
        assert_eq!(k1["skipped_blocks"][0], k2["skipped_blocks"][0], "{config}");
        assert_eq!(k1["settings"]["skip"], 1);
        if config.contains("hopscotch") {
            assert_eq!(k1["rounds"][0], k2["rounds"][0]);
            let search = read_json(&out.join(format!("searches/{config}.json")));
            assert_eq!(search["skipped_blocks"], k2["skipped_blocks"]);
        }
    }

    // every model of a task on the original's documents, none of them fitted on
    for task in ["facts", "counting"] {
        let original = read_json(&out.join(format!("evals/original__on__{task}.json")));
        let doc_ids: Vec<String> = original["docs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["doc_id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(doc_ids.len(), 6);
        let fit_ids =
            ids(&read_json(&out.join(format!("plans/{task}-hopscotch-kl-k1.json")))["fit_doc_ids"]);
        assert_eq!(fit_ids.len(), 4);
        for config in ["hopscotch-kl", "random-kl"] {
            for k in [1, 2] {
                let plan = read_json(&out.join(format!("plans/{task}-{config}-k{k}.json")));
                assert_eq!(ids(&plan["fit_doc_ids"]), fit_ids, "one split per task");
            }
        }
        let fit: BTreeSet<&String> = fit_ids.iter().collect();
        assert!(doc_ids.iter().all(|d| !fit.contains(d)), "{task}");
        for fit_task in ["facts", "counting"] {
            for config in ["hopscotch-kl", "random-kl"] {
                for k in [1, 2] {
                    let e = read_json(
                        &out.join(format!("evals/{fit_task}-{config}-k{k}__on__{task}.json")),
                    );
                    let e_ids: Vec<String> = e["docs"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|d| d["doc_id"].as_str().unwrap().to_string())
                        .collect();
                    assert_eq!(e_ids, doc_ids);
                }
            }
        }
    }
    for r in rows {
        let p = &r["paired"];
        let (diff, lo, hi) = (
            p["accuracy_diff"].as_f64().unwrap(),
            p["accuracy_diff_ci95"][0].as_f64().unwrap(),
            p["accuracy_diff_ci95"][1].as_f64().unwrap(),
        );
        assert!(lo <= diff && diff <= hi, "{r}");
        assert!((0.0..=1.0).contains(&p["agreement"].as_f64().unwrap()));
        assert!(p["choice_kl_mean"].as_f64().unwrap() >= 0.0);
        assert!(r["kv_bytes_per_token"].as_u64().unwrap() > 0);
    }
    let g = report["generalisation"].as_array().unwrap();
    assert_eq!(g.len(), 4);
    assert!(g.iter().all(|g| g["n_same"] == 2 && g["n_other"] == 2));

    // Hopscotch against random, per fit task, K and evaluation task: the difference of the
    // two rows' accuracies, paired on the same documents
    let versus = report["comparisons"].as_array().unwrap();
    assert_eq!(versus.len(), 8);
    let accuracy = |model: &Value, task: &Value| {
        rows.iter()
            .find(|r| r["model"] == *model && r["eval_task"] == *task)
            .unwrap()["accuracy"]
            .as_f64()
            .unwrap()
    };
    for c in versus {
        let k = c["k"].as_u64().unwrap();
        let fit = c["fit_task"].as_str().unwrap();
        assert_eq!(c["model"], format!("{fit}-hopscotch-kl-k{k}"));
        assert_eq!(c["against"], format!("{fit}-random-kl-k{k}"));
        assert_eq!(c["against_label"], "random kl");
        let diff = c["accuracy_diff"].as_f64().unwrap();
        let expected =
            accuracy(&c["model"], &c["eval_task"]) - accuracy(&c["against"], &c["eval_task"]);
        assert!((diff - expected).abs() < 1e-12, "{c}");
        let ci = &c["accuracy_diff_ci95"];
        assert!(ci[0].as_f64().unwrap() <= diff && diff <= ci[1].as_f64().unwrap());
    }

    // remove one evaluation and one plan: only those are computed again
    std::fs::remove_file(out.join("evals/facts-random-kl-k1__on__counting.json")).unwrap();
    std::fs::remove_file(out.join("plans/facts-hopscotch-kl-k2.json")).unwrap();
    let again = ok(&sweep(&hf, &tasks, &out, &extra));
    assert_eq!(
        again["units"]["computed"],
        json!({"original": 0, "search_rounds": 0, "plans": 1, "models": 0, "evals": 1})
    );
    assert_eq!(
        again["units"]["reused"],
        json!({"original": 1, "search_rounds": 2, "plans": 7, "models": 8, "evals": 17})
    );
    assert_eq!(figures(&again), figures(&report));

    // a longer K list continues each greedy search where it ended
    let longer = ok(&sweep(
        &hf,
        &tasks,
        &out,
        &["--skip", "1,2,3", "--method", "hopscotch,random"],
    ));
    assert_eq!(
        longer["units"]["computed"],
        json!({"original": 0, "search_rounds": 2, "plans": 4, "models": 4, "evals": 8})
    );
    assert_eq!(longer["units"]["reused"]["search_rounds"], 4);
    let k3 = read_json(&out.join("plans/facts-hopscotch-kl-k3.json"));
    let k2 = read_json(&out.join("plans/facts-hopscotch-kl-k2.json"));
    assert_eq!(
        k3["rounds"].as_array().unwrap()[..2],
        k2["rounds"].as_array().unwrap()[..]
    );
}

#[test]
fn an_eval_task_is_evaluated_on_but_not_fitted_on() {
    let dir = tempfile::tempdir().unwrap();
    let hf = write_tiny(dir.path(), &Tiny::llama());
    let [facts, counting] = two_tasks(dir.path());
    let out = dir.path().join("out");
    let report = ok(&sweep(
        &hf,
        &[facts.as_path()],
        &out,
        &[
            "--skip",
            "1",
            "--method",
            "random",
            "--eval-task",
            s(&counting),
        ],
    ));
    // one configuration, fitted on facts only, evaluated on both tasks
    let rows = report["rows"].as_array().unwrap();
    let pairs: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["fit_task"].as_str().unwrap().to_string(),
                r["eval_task"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [
            ("facts".to_string(), "facts".to_string()),
            ("facts".to_string(), "counting".to_string())
        ]
    );
    assert!(out.join("plans/facts-random-kl-k1.json").is_file());
    assert!(!out.join("plans/counting-random-kl-k1.json").exists());
    assert!(out
        .join("evals/facts-random-kl-k1__on__counting.json")
        .is_file());
}

#[test]
fn a_folder_of_another_configuration_is_refused_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let hf = write_tiny(dir.path(), &Tiny::llama());
    let [facts, _] = two_tasks(dir.path());
    let out = dir.path().join("out");
    let tasks = [facts.as_path()];
    let base = [
        "--skip",
        "1",
        "--method",
        "random",
        "--objective",
        "kl,ce",
        "--no-scales-too",
    ];
    let first = ok(&sweep(&hf, &tasks, &out, &base));
    // per objective with scalars; one configuration without, whatever the objective
    let configs: Vec<(Value, Value)> = first["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["objective"].clone(), r["train_scales"].clone()))
        .collect();
    assert_eq!(
        configs,
        [
            (json!("kl"), json!(true)),
            (json!("ce"), json!(true)),
            (Value::Null, json!(false)),
        ]
    );
    let bare = read_json(&out.join("plans/facts-random-noscales-k1.json"));
    assert_eq!(bare["settings"]["final_steps"], 0);
    assert_eq!(
        bare["skipped_blocks"],
        read_json(&out.join("plans/facts-random-kl-k1.json"))["skipped_blocks"]
    );

    let other = sweep(&hf, &tasks, &out, &[&base[..], &["--seed", "3"]].concat());
    assert!(!other.status.success());
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(err.contains("--force") && err.contains("seed"), "{err}");

    let forced = ok(&sweep(
        &hf,
        &tasks,
        &out,
        &[&base[..], &["--seed", "3", "--force"]].concat(),
    ));
    assert_eq!(forced["units"]["computed"]["original"], 1);
    assert_eq!(forced["units"]["reused"]["evals"], 0);
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let hf = write_tiny(dir.path(), &Tiny::llama());
    let [facts, counting] = two_tasks(dir.path());
    let text = dir.path().join("text.jsonl");
    std::fs::write(&text, "{\"text\": \"Some plain text to fit on.\"}\n").unwrap();
    // the facts task with no gold choice: neither a "label" nor a "doc.gold"
    let no_gold = dir.path().join("no_gold.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&facts)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("label");
            v["doc"].as_object_mut().unwrap().remove("gold");
            v.to_string()
        })
        .collect();
    std::fs::write(&no_gold, lines.join("\n") + "\n").unwrap();
    let out = dir.path().join("out");
    let cases: Vec<(Vec<&Path>, Vec<&str>, &str)> = vec![
        (vec![&facts], vec!["--skip", "0"], "at least 1"),
        (vec![&no_gold], vec!["--skip", "1"], "no gold choice"),
        (vec![&facts], vec!["--skip", "4"], "too many"),
        (
            vec![&facts, &facts],
            vec!["--skip", "1"],
            "give each task once",
        ),
        (vec![&facts, &text], vec!["--skip", "1"], "multiple-choice"),
        (
            vec![&counting],
            vec!["--skip", "1", "--method", "greedy"],
            "greedy",
        ),
        (
            vec![&counting],
            vec!["--skip", "1", "--objective", "mse"],
            "mse",
        ),
        (vec![&counting], vec!["--skip", ""], "--skip"),
    ];
    for (tasks, extra, needle) in cases {
        let o = sweep(&hf, &tasks, &out, &extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(!out.join("original.gguf").exists());
}

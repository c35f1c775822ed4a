//! `hopscotch fit` end to end on tiny random models: the search finds a block that adds
//! nothing, trained scalars lower the loss, runs repeat byte for byte (and resume to the same
//! plan), prompts-only tasks get generated targets, and bad input fails cleanly.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{bin, dead_blocks_model, facts, write_choice_task, write_tiny, Tiny};
use hopscotch::plan::{LossTokens, Plan};

/// The layer whose attention output projection is zeroed in [`dead_block_model`].
const DEAD: usize = 2;

/// A tiny 4-layer random Llama (real SmolLM2 tokenizer) whose layer [`DEAD`] attention adds
/// nothing: its output projection is all zeros.
fn dead_block_model(dir: &Path) -> PathBuf {
    dead_blocks_model(dir, &[DEAD])
}

/// Sixteen short English texts, one `{"text"}` line each.
fn text_task(dir: &Path) -> PathBuf {
    let subjects = [
        "The river",
        "A small dog",
        "My neighbour",
        "The old train",
        "Every student",
        "The bakery",
        "A quiet storm",
        "The city council",
    ];
    let endings = [
        "walked slowly along the bank while the sun went down behind the hills.",
        "answered every question about history, science and the long winter.",
    ];
    let lines: Vec<String> = (0..16)
        .map(|i| {
            let text = format!("{} {}", subjects[i % 8], endings[i / 8]);
            serde_json::json!({ "id": format!("doc-{i}"), "text": text }).to_string()
        })
        .collect();
    let path = dir.join("task.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// Runs `hopscotch fit MODEL --task TASK -o OUT <args>` with the target cache under `dir`, and
/// small defaults for the settings `args` does not give.
fn fit(dir: &Path, model: &Path, task: &Path, out: &Path, args: &[&str]) -> Output {
    let mut all: Vec<&str> = args.to_vec();
    for (flag, value) in [
        ("--fit-docs", "8"),
        ("--batch-size", "4"),
        ("--max-seq-len", "24"),
        ("--threads", "1"),
    ] {
        if !args.contains(&flag) {
            all.extend([flag, value]);
        }
    }
    Command::new(bin())
        .arg("fit")
        .arg(model)
        .arg("--task")
        .arg(task)
        .arg("-o")
        .arg(out)
        .args(all)
        .env("HOPSCOTCH_CACHE", dir.join("cache"))
        .output()
        .expect("run hopscotch")
}

/// Leaves `partial` where a fit to `out` checkpoints its rounds, runs `fit --resume --json`
/// with `args` and returns its report.
fn fit_resumed(
    dir: &Path,
    model: &Path,
    task: &Path,
    partial: &Plan,
    out: &Path,
    args: &[&str],
) -> serde_json::Value {
    partial
        .save(&hopscotch::fit::session::partial_path(out), false)
        .unwrap();
    let run = ok(fit(
        dir,
        model,
        task,
        out,
        &[args, &["--resume", "--json"]].concat(),
    ));
    serde_json::from_slice(&run.stdout).unwrap()
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "hopscotch fit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Expects exit code 1, an error naming `needle`, no panic and no plan written.
fn fails(out: Output, plan: &Path, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!plan.exists(), "{} was written", plan.display());
}

#[test]
fn the_search_skips_the_block_that_adds_nothing_first() {
    let dir = tempfile::tempdir().unwrap();
    let model = dead_block_model(dir.path());
    let task = text_task(dir.path());
    for (name, extra) in [
        ("fast", &["--shortlist", "1"][..]),
        ("exhaustive", &["--exhaustive"][..]),
        ("cosine", &["--method", "attn-cosine"][..]),
    ] {
        let out = dir.path().join(format!("{name}.json"));
        ok(fit(
            dir.path(),
            &model,
            &task,
            &out,
            &[&["--skip", "2", "--final-steps", "2"][..], extra].concat(),
        ));
        let plan = Plan::load(&out).unwrap();
        assert_eq!(plan.skipped_blocks.len(), 2, "{name}");
        assert_eq!(plan.skipped_blocks[0], DEAD, "{name}: {:?}", plan.rounds);
        assert!(!plan.skipped_blocks.contains(&0), "{name}");
        assert_eq!(plan.first_task.fit_doc_ids.len(), 8);
        match name {
            "cosine" => {
                let importance = plan.attn_importance.unwrap();
                assert!(importance[DEAD].abs() < 1e-6, "{importance:?}");
            }
            _ => {
                let trained = plan.rounds[0]
                    .candidates
                    .iter()
                    .filter(|c| c.trained_loss.is_some())
                    .count();
                assert_eq!(trained, if name == "fast" { 1 } else { 3 }, "{name}");
                // not quite 0: Adam moves every scalar by about the learning rate
                assert!(
                    plan.rounds[0].loss < 1e-2,
                    "{name}: {}",
                    plan.rounds[0].loss
                );
            }
        }
    }
}

#[test]
fn the_choice_objective_skips_the_block_that_adds_nothing_first() {
    let dir = tempfile::tempdir().unwrap();
    let model = dead_block_model(dir.path());
    let task = write_choice_task(dir.path(), "facts", &facts());
    let out = dir.path().join("choice.json");
    ok(fit(
        dir.path(),
        &model,
        &task,
        &out,
        &["--skip", "2", "--objective", "choice", "--final-steps", "4"],
    ));
    let plan = Plan::load(&out).unwrap();
    assert_eq!(plan.settings.objective.name(), "choice");
    assert_eq!(plan.settings.loss_tokens, LossTokens::Targets);
    assert_eq!(plan.skipped_blocks.len(), 2);
    assert_eq!(plan.skipped_blocks[0], DEAD, "{:?}", plan.rounds);
    // not quite 0: Adam moves every scalar by about the learning rate
    assert!(plan.rounds[0].loss < 1e-2, "{}", plan.rounds[0].loss);
    // the second block costs something, which the final training lowers
    assert!(plan.rounds[1].loss > plan.rounds[0].loss);
    assert_eq!(plan.final_loss_history.len(), 4);
    assert!(plan.final_loss.unwrap() <= plan.final_loss_untrained.unwrap());

    // a task without choices is refused, naming the file and the doc
    let text = text_task(dir.path());
    fails(
        fit(
            dir.path(),
            &model,
            &text,
            &dir.path().join("text.json"),
            &["--skip", "1", "--objective", "choice"],
        ),
        &dir.path().join("text.json"),
        "task.jsonl: doc doc-0 (line 1) is not a multiple-choice request",
    );
}

#[test]
fn trained_scales_lower_the_loss_of_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny(dir.path(), &Tiny::llama());
    let task = text_task(dir.path());
    let out = dir.path().join("plan.json");
    let trained_fit = |out: &Path, more: &[&str]| {
        let args = "--skip 2 --method random --final-steps 40 --final-lr 5e-2";
        let args: Vec<&str> = args.split(' ').chain(more.iter().copied()).collect();
        ok(fit(dir.path(), &model, &task, out, &args))
    };
    trained_fit(&out, &[]);
    let plan = Plan::load(&out).unwrap();
    let (trained, untrained) = (plan.final_loss.unwrap(), plan.final_loss_untrained.unwrap());
    assert!(
        trained < 0.99 * untrained,
        "trained {trained}, untrained {untrained}"
    );
    assert_ne!(plan.scales, hopscotch::plan::ScaleValues::ones(4));
    assert_eq!(plan.final_loss_history.len(), 40);

    // a plan with trained scalars exports
    let slim = dir.path().join("trained.gguf");
    let o = Command::new(bin())
        .args(["export".as_ref(), model.as_os_str(), "--plan".as_ref()])
        .args([out.as_os_str(), "-o".as_ref(), slim.as_os_str()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let none = dir.path().join("none.json");
    ok(fit(
        dir.path(),
        &model,
        &task,
        &none,
        &[
            "--skip",
            "2",
            "--method",
            "random",
            "--no-scales",
            "--no-linear-attention",
        ],
    ));
    let plan = Plan::load(&none).unwrap();
    assert_eq!(plan.scales, hopscotch::plan::ScaleValues::ones(4));
    assert_eq!(plan.final_loss, plan.final_loss_untrained);
    assert!(plan.final_loss_history.is_empty());
}

#[test]
fn the_final_training_takes_more_documents_and_a_search_resumes_into_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny(dir.path(), &Tiny::llama());
    let task = text_task(dir.path());
    // the plain skip: the search does not read the final documents
    let base: Vec<&str> =
        "--skip 2 --fit-docs 4 --batch-size 2 --shortlist 2 --no-linear-attention"
            .split(' ')
            .collect();
    let run = |out: &Path, args: &[&str]| fit(dir.path(), &model, &task, out, args);
    let short = dir.path().join("short.json");
    ok(run(&short, &base));
    let short = Plan::load(&short).unwrap();
    assert!(short.first_task.final_doc_ids.is_empty());
    assert_eq!(short.settings.final_docs, None);
    assert_eq!(
        short.settings.final_steps,
        Some(4 * 2),
        "4 epochs of the 2 fit batches"
    );

    // The same search, resumed from the first plan, then trained on 12 documents.
    let long = dir.path().join("long.json");
    let report = fit_resumed(
        dir.path(),
        &model,
        &task,
        &short,
        &long,
        &[&base[..], &["--final-docs", "12"]].concat(),
    );
    assert_eq!(report["resumed_rounds"], 2);
    let long = Plan::load(&long).unwrap();
    assert_eq!(long.skipped_blocks, short.skipped_blocks);
    assert_eq!(long.rounds, short.rounds);
    assert_eq!(long.first_task.fit_doc_ids, short.first_task.fit_doc_ids);
    let data = hopscotch::task::load(&task).unwrap();
    let ids = |n| -> Vec<String> {
        let (idx, _) = hopscotch::task::split(&data.docs, n, 0);
        idx.iter().map(|&i| data.docs[i].id.clone()).collect()
    };
    let expected: Vec<String> = ids(12)
        .into_iter()
        .filter(|id| !short.first_task.fit_doc_ids.contains(id))
        .collect();
    assert_eq!(
        expected.len(),
        8,
        "the 4 fit documents are among the first 12"
    );
    assert_eq!(long.first_task.final_doc_ids, expected);
    assert_eq!(long.first_task.trained_doc_ids().count(), 12);
    assert_eq!(long.settings.final_docs, Some(12));
    assert_eq!(
        long.settings.final_steps,
        Some(4 * 6),
        "4 epochs of the 6 final batches"
    );
    assert_eq!(long.final_loss_history.len(), 24);
    assert_ne!(
        long.final_loss_untrained, short.final_loss_untrained,
        "the loss is measured on the final documents"
    );

    // The stand-ins learn from the final documents, and the search's rounds from the
    // stand-ins: a search with them does not resume into other final documents.
    let with_stand_ins: Vec<&str> = base[..base.len() - 1].to_vec();
    let first = dir.path().join("stand-ins.json");
    ok(run(&first, &with_stand_ins));
    Plan::load(&first)
        .unwrap()
        .save(&hopscotch::fit::session::partial_path(&first), false)
        .unwrap();
    std::fs::remove_file(&first).unwrap();
    fails(
        run(
            &first,
            &[&with_stand_ins[..], &["--final-docs", "12", "--resume"]].concat(),
        ),
        &first,
        "the stand-ins' documents (--final-docs)",
    );

    // Without scalars or stand-ins there is no final training and no final documents.
    let none = dir.path().join("none.json");
    ok(run(
        &none,
        &[&base[..], &["--final-docs", "12", "--no-scales"]].concat(),
    ));
    let none = Plan::load(&none).unwrap();
    assert!(none.first_task.final_doc_ids.is_empty());
    assert_eq!(none.settings.final_docs, None);

    let bad = dir.path().join("bad.json");
    fails(
        run(&bad, &[&base[..], &["--final-docs", "3"]].concat()),
        &bad,
        "final-docs",
    );
}

#[test]
fn the_same_inputs_give_the_same_plan_and_resume_reaches_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny(dir.path(), &Tiny::llama());
    let task = text_task(dir.path());
    let args = [
        "--skip",
        "3",
        "--shortlist",
        "2",
        "--final-steps",
        "3",
        "--seed",
        "5",
    ];
    let a = dir.path().join("a.json");
    let b = dir.path().join("b.json");
    let summary = ok(fit(
        dir.path(),
        &model,
        &task,
        &a,
        &[&args[..], &["--json"]].concat(),
    ));
    ok(fit(dir.path(), &model, &task, &b, &args));
    let first = std::fs::read(&a).unwrap();
    assert_eq!(first, std::fs::read(&b).unwrap());
    assert!(!hopscotch::fit::session::partial_path(&a).exists());
    let report: serde_json::Value = serde_json::from_slice(&summary.stdout).unwrap();
    assert_eq!(report["rounds"].as_array().unwrap().len(), 3);

    // A run stopped after its first round left this partial plan behind.
    let c = dir.path().join("c.json");
    let mut partial = Plan::load(&a).unwrap();
    partial.rounds.truncate(1);
    partial.skipped_blocks.truncate(1);
    partial.scales = hopscotch::plan::ScaleValues::ones(4);
    partial.final_loss_history.clear();
    partial.final_loss = None;
    partial.final_loss_untrained = None;
    let report = fit_resumed(dir.path(), &model, &task, &partial, &c, &args);
    assert_eq!(report["resumed_rounds"], 1);
    assert_eq!(first, std::fs::read(&c).unwrap());

    // A partial plan from other settings is refused.
    let d = dir.path().join("d.json");
    partial
        .save(&hopscotch::fit::session::partial_path(&d), false)
        .unwrap();
    fails(
        fit(
            dir.path(),
            &model,
            &task,
            &d,
            &["--skip", "3", "--seed", "5", "--shortlist", "1", "--resume"],
        ),
        &d,
        "cannot resume: the settings differ",
    );
}

/// The pieces a fit runs side by side (candidates, batches) are combined in their order, so the
/// thread count changes nothing in the plan, with every screening and with stand-ins.
#[test]
fn a_fit_gives_the_same_plan_at_any_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny(dir.path(), &Tiny::llama());
    let task = text_task(dir.path());
    let runs: [&[&str]; 3] = [
        &[
            "--shortlist",
            "2",
            "--final-steps",
            "3",
            "--no-linear-attention",
        ],
        &[
            "--shortlist",
            "2",
            "--screen-batches",
            "3",
            "--no-linear-attention",
        ],
        &[
            "--shortlist",
            "2",
            "--final-docs",
            "12",
            "--final-steps",
            "2",
        ],
    ];
    for (i, args) in runs.iter().enumerate() {
        let mut plans = Vec::new();
        for threads in ["1", "3"] {
            let out = dir.path().join(format!("run{i}-threads{threads}.json"));
            let all = [
                &["--skip", "2", "--batch-size", "2", "--threads", threads],
                *args,
            ]
            .concat();
            ok(fit(dir.path(), &model, &task, &out, &all));
            plans.push(std::fs::read(&out).unwrap());
        }
        assert!(
            plans[0] == plans[1],
            "{args:?}: the plans differ at 1 and 3 threads"
        );
    }
}

#[test]
fn prompts_only_tasks_train_on_generated_answers() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny(dir.path(), &Tiny::llama());
    let task = dir.path().join("prompts.jsonl");
    let lines: Vec<String> = ["What is two plus two?", "Name a colour.", "Say hello."]
        .iter()
        .map(|p| serde_json::json!({ "prompt": p }).to_string())
        .collect();
    std::fs::write(&task, lines.join("\n")).unwrap();
    let out = dir.path().join("plan.json");
    let args = [
        "--skip",
        "1",
        "--max-seq-len",
        "96",
        "--final-steps",
        "1",
        "--json",
    ];
    let summary = ok(fit(dir.path(), &model, &task, &out, &args));
    let report: serde_json::Value = serde_json::from_slice(&summary.stdout).unwrap();
    assert_eq!(report["generated_targets"], true);
    let cached: Vec<_> = std::fs::read_dir(dir.path().join("cache/targets"))
        .unwrap()
        .collect();
    assert_eq!(cached.len(), 1);
    // the second run takes the answers from the cache and fits the same plan
    let again = dir.path().join("again.json");
    ok(fit(dir.path(), &model, &task, &again, &args));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
}

/// Two tasks in one fit: the fit documents (and the final training's) are drawn evenly from
/// both, each task's from its own seeded split, and the plan records every task with its
/// documents (ids are per task: both files number theirs alike). The same task twice, as the
/// same file or as a copy, and fewer documents than tasks are refused before anything is
/// written.
#[test]
fn a_fit_on_two_tasks_draws_its_documents_evenly() {
    let dir = tempfile::tempdir().unwrap();
    let model = dead_block_model(dir.path());
    let task = text_task(dir.path());
    let other = dir.path().join("other.jsonl");
    let text = std::fs::read_to_string(&task).unwrap();
    std::fs::write(&other, text.replace("The ", "One ")).unwrap();
    let arg = |p: &Path| p.to_str().unwrap().to_string();
    let out = dir.path().join("two.json");
    let other_arg = arg(&other);
    let run = ok(fit(
        dir.path(),
        &model,
        &task,
        &out,
        &[
            "--task",
            &other_arg,
            "--skip",
            "1",
            "--fit-docs",
            "7",
            "--final-docs",
            "10",
            "--final-steps",
            "1",
        ],
    ));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("fit documents: 4 of task, 3 of other"),
        "{stderr}"
    );
    let plan = Plan::load(&out).unwrap();
    let tasks: Vec<_> = plan.tasks().collect();
    assert_eq!(tasks.len(), 2);
    let first_ids = |path: &Path, n: usize| {
        let data = hopscotch::task::load(path).unwrap();
        hopscotch::task::split_ids(&data.docs, n, 0)
    };
    for (t, path, fit_share) in [(tasks[0], &task, 4), (tasks[1], &other, 3)] {
        assert_eq!(t.task.path, path.display().to_string());
        assert_eq!(t.fit_doc_ids, first_ids(path, fit_share), "{}", t.task.path);
        let trained: Vec<&str> = t.trained_doc_ids().collect();
        let mut expected = first_ids(path, 5);
        expected.sort();
        let mut trained: Vec<String> = trained.into_iter().map(String::from).collect();
        trained.sort();
        assert_eq!(
            trained, expected,
            "{}: 10 final documents, 5 each",
            t.task.path
        );
    }
    assert_eq!(plan.skipped_blocks, vec![DEAD]);

    let copy = dir.path().join("copy.jsonl");
    std::fs::copy(&task, &copy).unwrap();
    let dup = dir.path().join("dup.json");
    for second in [&task, &copy] {
        fails(
            fit(
                dir.path(),
                &model,
                &task,
                &dup,
                &["--task", &arg(second), "--skip", "1"],
            ),
            &dup,
            "the same content (sha256) as --task",
        );
    }
    fails(
        fit(
            dir.path(),
            &model,
            &task,
            &dup,
            &["--task", &other_arg, "--skip", "1", "--fit-docs", "1"],
        ),
        &dup,
        "--fit-docs 1 with 2 --task files",
    );
}

#[test]
fn bad_input_fails_with_a_clear_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny(dir.path(), &Tiny::llama());
    let task = text_task(dir.path());
    let out = dir.path().join("plan.json");

    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    fails(
        fit(dir.path(), &model, &empty, &out, &["--skip", "1"]),
        &out,
        "empty.jsonl: the file is empty",
    );

    let malformed = dir.path().join("malformed.jsonl");
    std::fs::write(&malformed, "{\"text\": \"fine\"}\n{\"text\": \"broken\n").unwrap();
    fails(
        fit(dir.path(), &model, &malformed, &out, &["--skip", "1"]),
        &out,
        "malformed.jsonl:2: not valid JSON",
    );

    fails(
        fit(dir.path(), &model, &task, &out, &["--skip", "4"]),
        &out,
        "--skip 4 is too many: the model has 4 layers",
    );
    fails(
        fit(dir.path(), &model, &task, &out, &["--skip", "0"]),
        &out,
        "--skip 0: expected at least 1 block",
    );
    fails(
        fit(dir.path(), &model, &task, &out, &["--skip", "1", "--lr=-1"]),
        &out,
        "--lr -1: expected a positive number",
    );

    let gpt2 = dir.path().join("gpt2");
    std::fs::create_dir_all(&gpt2).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        std::fs::copy(model.join(f), gpt2.join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    config["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    config["model_type"] = serde_json::json!("gpt2");
    std::fs::write(gpt2.join("config.json"), config.to_string()).unwrap();
    fails(
        fit(dir.path(), &gpt2, &task, &out, &["--skip", "1"]),
        &out,
        "GPT2LMHeadModel is not supported",
    );

    fails(
        fit(
            dir.path(),
            &dir.path().join("missing.gguf"),
            &task,
            &out,
            &["--skip", "1"],
        ),
        &out,
        "missing.gguf",
    );

    // --linear-attention (the default, still accepted) and --no-linear-attention contradict
    let both = ["--skip", "1", "--linear-attention", "--no-linear-attention"];
    let o = fit(dir.path(), &model, &task, &out, &both);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot be used with"), "{stderr}");
    assert!(!out.exists());

    // an existing plan is kept unless --force
    std::fs::write(&out, "keep").unwrap();
    let o = fit(dir.path(), &model, &task, &out, &["--skip", "1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "keep");
}

/// The fit estimates its peak memory before it starts and reports it beside the peak it reached:
/// on the tiny model the estimate bounds the peak within a factor of 3 (the process's fixed
/// footprint dominates there, and varies with the machine's libraries). A limit below the estimate stops the fit before any work, naming
/// the estimate, the limit and what lowers it (or that nothing does); a malformed limit is
/// refused by name.
#[test]
fn the_memory_estimate_bounds_the_peak_and_a_limit_below_it_stops_the_fit() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny(dir.path(), &Tiny::llama());
    let task = text_task(dir.path());
    let out = dir.path().join("plan.json");
    let run = ok(fit(
        dir.path(),
        &model,
        &task,
        &out,
        &["--skip", "1", "--json"],
    ));
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let estimate = report["memory_estimate"].as_u64().unwrap();
    let peak = report["peak_rss"]
        .as_u64()
        .expect("peak RSS read from /proc");
    eprintln!("tiny fit: estimate {estimate} bytes, peak {peak} bytes");
    assert!(
        peak <= estimate && 3 * peak >= estimate,
        "peak {peak} against estimate {estimate}"
    );

    let limited = |limit: &str, name: &str| {
        let plan = dir.path().join(name);
        let output = Command::new(bin())
            .arg("fit")
            .arg(&model)
            .arg("--task")
            .arg(&task)
            .arg("-o")
            .arg(&plan)
            .args(["--skip", "1", "--threads", "1"])
            .env("HOPSCOTCH_CACHE", dir.path().join("cache"))
            .env("HOPSCOTCH_MEMORY_LIMIT", limit)
            .output()
            .unwrap();
        (output, plan)
    };
    // between what the model alone takes (185 MiB) and the whole estimate (240 MiB): the
    // settings can bring it within reach; below the model alone, none can
    let (output, plan) = limited("200M", "within-reach.json");
    fails(
        output,
        &plan,
        "that is more than the 200 MiB HOPSCOTCH_MEMORY_LIMIT allows: lower --threads, --batch-size or --max-seq-len",
    );
    let (output, plan) = limited("64M", "out-of-reach.json");
    fails(
        output,
        &plan,
        "that is more than the 64 MiB HOPSCOTCH_MEMORY_LIMIT allows: the model alone",
    );
    let (output, plan) = limited("lots", "lots.json");
    fails(
        output,
        &plan,
        "HOPSCOTCH_MEMORY_LIMIT=\"lots\": expected bytes",
    );
}

/// A memory limit that the fit keeping every activation exceeds, but one recomputing them does
/// not, makes the fit recompute: it says so and chooses as the unlimited fit does, with the
/// same loss up to the order of floating-point sums.
#[test]
fn a_limit_only_recomputation_meets_makes_the_fit_recompute_and_choose_alike() {
    let dir = tempfile::tempdir().unwrap();
    let model = dead_block_model(dir.path());
    let task = text_task(dir.path());
    let report =
        |out: &Output| -> serde_json::Value { serde_json::from_slice(&out.stdout).unwrap() };
    let free = ok(fit(
        dir.path(),
        &model,
        &task,
        &dir.path().join("free.json"),
        &["--skip", "2", "--json"],
    ));
    let free = report(&free);
    assert_eq!(free["recomputed_activations"], false);
    let estimate = free["memory_estimate"].as_u64().unwrap();
    let mut all = vec![
        "--skip",
        "2",
        "--json",
        "--fit-docs",
        "8",
        "--batch-size",
        "4",
    ];
    all.extend(["--max-seq-len", "24", "--threads", "1", "--task"]);
    let limited = Command::new(bin())
        .arg("fit")
        .arg(&model)
        .args(&all)
        .arg(&task)
        .arg("-o")
        .arg(dir.path().join("limited.json"))
        .env("HOPSCOTCH_CACHE", dir.path().join("cache"))
        .env("HOPSCOTCH_MEMORY_LIMIT", (estimate - 1).to_string())
        .output()
        .unwrap();
    let limited = ok(limited);
    assert!(String::from_utf8_lossy(&limited.stderr).contains("recomputed in training to fit"));
    let limited = report(&limited);
    assert_eq!(limited["recomputed_activations"], true);
    assert!(limited["memory_estimate"].as_u64().unwrap() < estimate);
    assert_eq!(limited["skipped_blocks"], free["skipped_blocks"]);
    let (a, b) = (
        free["final_loss"].as_f64().unwrap(),
        limited["final_loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{a} against {b}");
}

/// The same model fitted from its f32 folder and from a q8_0 GGUF of it chooses the same blocks:
/// the stored form changes only what its dequantized values change.
#[test]
fn a_model_fitted_from_f32_and_from_its_q8_0_gguf_chooses_the_same_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let model = dead_block_model(dir.path());
    let task = text_task(dir.path());
    let gguf = dir.path().join("model.q8_0.gguf");
    let converted = Command::new(bin())
        .arg("convert")
        .arg(&model)
        .args(["--type", "q8_0", "-o"])
        .arg(&gguf)
        .output()
        .unwrap();
    assert!(
        converted.status.success(),
        "{}",
        String::from_utf8_lossy(&converted.stderr)
    );
    let blocks = |source: &Path, name: &str| {
        let out = dir.path().join(name);
        ok(fit(dir.path(), source, &task, &out, &["--skip", "2"]));
        Plan::load(&out).unwrap().skipped_blocks
    };
    let from_f32 = blocks(&model, "f32.json");
    assert_eq!(from_f32[0], DEAD);
    assert_eq!(blocks(&gguf, "q8_0.json"), from_f32);
}

/// On a model small enough to sum its stand-ins in one pass, the stand-ins learn from more
/// documents than the search by default (a quarter of a small task's), and no final training
/// follows; the plain skip and an explicit `--final-docs` keep the fit documents' defaults.
#[test]
fn a_small_models_stand_ins_take_more_documents_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny(dir.path(), &Tiny::llama());
    let lines: Vec<String> = (0..64)
        .map(|i| {
            let text = format!(
                "Text number {i} walks along the river past {} trees.",
                i * 7
            );
            serde_json::json!({ "id": format!("doc-{i}"), "text": text }).to_string()
        })
        .collect();
    let task = dir.path().join("task64.jsonl");
    std::fs::write(&task, lines.join("\n") + "\n").unwrap();
    let base = ["--skip", "1", "--fit-docs", "4", "--shortlist", "1"];
    let plan = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        ok(fit(
            dir.path(),
            &model,
            &task,
            &out,
            &[&base[..], extra].concat(),
        ));
        Plan::load(&out).unwrap()
    };

    let stand_ins = plan("stand-ins.json", &[]);
    assert_eq!(stand_ins.settings.final_docs, Some(16), "a quarter of 64");
    assert_eq!(stand_ins.settings.final_steps, Some(0));
    assert_eq!(stand_ins.first_task.final_doc_ids.len(), 12);
    assert_eq!(stand_ins.scales.linear.len(), 1);

    let plain = plan("plain.json", &["--no-linear-attention"]);
    assert_eq!(plain.settings.final_docs, None);
    assert_eq!(plain.settings.final_steps, Some(4), "4 epochs of 1 batch");

    let given = plan("given.json", &["--final-docs", "8"]);
    assert_eq!(given.settings.final_docs, Some(8));
    assert_eq!(
        given.settings.final_steps,
        Some(4 * 2),
        "4 epochs of 2 batches"
    );
}

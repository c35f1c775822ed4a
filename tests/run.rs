//! `hopscotch run` end to end on a tiny random model: fit, export, evaluate, report.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{bin, facts, write_choice_task, write_tiny, Tiny};
use hopscotch::gguf::reader::GgufFile;
use serde_json::Value;

fn write_task(dir: &Path) -> std::path::PathBuf {
    write_choice_task(dir, "task", &facts())
}

/// `hopscotch run` on a tiny model: skip 1 block, fit on 4 documents in batches of 2, evaluate
/// 8, as `--type ty` with `extra` arguments; JSON on stdout.
fn tiny_run(hf: &Path, task: &Path, out: &Path, ty: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        hf.to_str().unwrap(),
        "--task",
        task.to_str().unwrap(),
        "--skip",
        "1",
        "--type",
        ty,
        "--fit-docs",
        "4",
        "--batch-size",
        "2",
        "--limit",
        "8",
        "--threads",
        "1",
        "--json",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    Command::new(bin()).args(&args).output().unwrap()
}

#[test]
fn run_fits_exports_evaluates_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let hf = write_tiny(dir.path(), &Tiny::llama());
    let task = write_task(dir.path());
    let out = dir.path().join("out");
    // the plain skip (the stand-ins' export is its own test below)
    let o = tiny_run(&hf, &task, &out, "f16", &["--no-linear-attention"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "plan.json",
        "slim.gguf",
        "slim.Modelfile",
        "original.gguf",
        "report.md",
        "report.json",
        "report.svg",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let printed: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report, printed);
    let skipped = report["skipped_blocks"].as_array().unwrap();
    assert_eq!(skipped.len(), 1);
    let layer = skipped[0].as_u64().unwrap() as usize;
    assert_ne!(layer, 0);
    for m in ["original", "slim"] {
        for k in [
            "accuracy",
            "acc_norm",
            "n_docs",
            "file_bytes",
            "kv_bytes_per_token",
            "prompt_tokens_per_s",
        ] {
            assert!(report[m][k].is_number(), "{m}.{k} missing");
        }
        // 12 docs, 4 fitted on, all 8 others evaluated
        assert_eq!(report[m]["n_docs"], 8);
    }
    // KV cache per token falls by one layer's share (1 of 4 layers)
    let kv = |m: &str| report[m]["kv_bytes_per_token"].as_u64().unwrap();
    assert_eq!(kv("slim") * 4, kv("original") * 3);
    // the slim file is deci with the chosen layer attention-free
    let f = GgufFile::open(out.join("slim.gguf")).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), "deci");
    let heads: Vec<u64> = f
        .get_arr("deci.attention.head_count")
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(heads.len(), 4);
    assert_eq!(heads[layer], 0);
    assert!(f.tensor(&format!("blk.{layer}.attn_q.weight")).is_none());
    // the plan's fitted documents were held out of the evaluation
    let plan: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("plan.json")).unwrap()).unwrap();
    assert_eq!(plan["fit_doc_ids"].as_array().unwrap().len(), 4);
    // a single-task plan keeps its task at the top level, as before several tasks were possible
    assert_eq!(plan["task"]["path"], task.display().to_string());
    assert!(plan.get("other_tasks").is_none(), "{plan}");
    assert!(std::fs::read_to_string(out.join("report.svg"))
        .unwrap()
        .starts_with("<svg"));

    // an existing run folder is kept without --force
    let again = Command::new(bin())
        .args([
            "run",
            hf.to_str().unwrap(),
            "--task",
            task.to_str().unwrap(),
            "--skip",
            "1",
            "-o",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
}

/// `run` with two tasks: one plan fitted on both (2 documents of each), each evaluated on its
/// own held-out documents, a column per task in the report.
#[test]
fn run_on_two_tasks_fits_one_plan_and_reports_each() {
    let dir = tempfile::tempdir().unwrap();
    let hf = write_tiny(dir.path(), &Tiny::llama());
    let task = write_task(dir.path());
    let reversed: Vec<_> = facts().into_iter().rev().collect();
    let other = write_choice_task(dir.path(), "other", &reversed);
    let out = dir.path().join("out");
    let o = tiny_run(
        &hf,
        &task,
        &out,
        "f16",
        &["--task", other.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["task"], task.display().to_string());
    let others = report["other_tasks"].as_array().unwrap();
    assert_eq!(others.len(), 1);
    assert_eq!(others[0]["task"], other.display().to_string());
    for figures in [&report, &others[0]] {
        for m in ["original", "slim"] {
            assert_eq!(figures[m]["n_docs"], 8, "{m}");
        }
        assert!(figures["paired"]["agreement"].is_number());
    }
    // the same task twice is refused before anything is written, no empty folder left
    let refused = dir.path().join("refused");
    let o = tiny_run(
        &hf,
        &task,
        &refused,
        "f16",
        &["--task", task.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("the same content (sha256) as --task"), "{err}");
    assert!(!refused.exists(), "{err}");
    let plan = hopscotch::plan::Plan::load(&out.join("plan.json")).unwrap();
    let fitted: Vec<usize> = plan.tasks().map(|t| t.fit_doc_ids.len()).collect();
    assert_eq!(fitted, vec![2, 2]);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Every task\n\n| | task | other |"), "{md}");
    let heading = format!(
        "tasks `{}`, `{}` (fitted on together; held-out documents of each",
        task.display(),
        other.display()
    );
    assert!(md.contains(&heading), "{md}");
    // `eval --exclude-fit` holds out each task's own fit documents, and the stand-ins' more
    // (a small model's default: a quarter of each task)
    let trained: Vec<usize> = plan.tasks().map(|t| t.trained_doc_ids().count()).collect();
    assert_eq!(trained, vec![3, 3]);
    for (t, trained) in [&task, &other].into_iter().zip(trained) {
        let e = Command::new(bin())
            .arg("eval")
            .arg(out.join("slim.gguf"))
            .arg("--task")
            .arg(t)
            .arg("--exclude-fit")
            .arg(out.join("plan.json"))
            .args(["--threads", "1", "--json"])
            .output()
            .unwrap();
        assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
        let e: Value = serde_json::from_slice(&e.stdout).unwrap();
        assert_eq!(e["excluded_docs"], trained, "{}", t.display());
    }
}

/// `run --imatrix`: each file quantized with its own importance matrix from the fit documents,
/// both written beside them; a type that needs one is refused before the fit without it.
#[test]
fn run_with_importance_matrices_quantizes_a_type_that_needs_them() {
    let dir = tempfile::tempdir().unwrap();
    let hf = write_tiny(dir.path(), &Tiny::llama());
    let task = write_task(dir.path());
    let out = dir.path().join("out");
    // the plain skip: the skipped layer has no attention weights left to measure
    let run = |extra: &[&str]| {
        let plain = [extra, &["--no-linear-attention"]].concat();
        tiny_run(&hf, &task, &out, "iq2_xxs", &plain)
    };
    let o = run(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("iq2_xxs needs an importance matrix"), "{err}");
    assert!(!out.join("plan.json").exists(), "the fit ran: {err}");

    let o = run(&["--imatrix"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["imatrix_docs"], 4);
    assert_eq!(report["quant_type"], "iq2_xxs");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("its own importance matrix from the 4 fit documents"),
        "{md}"
    );
    let slim = hopscotch::gguf::imatrix::Imatrix::read(&out.join("slim.imatrix.gguf")).unwrap();
    let orig = hopscotch::gguf::imatrix::Imatrix::read(&out.join("original.imatrix.gguf")).unwrap();
    let layer = report["skipped_blocks"][0].as_u64().unwrap();
    let q = format!("blk.{layer}.attn_q.weight");
    assert!(orig.entries.contains_key(&q) && !slim.entries.contains_key(&q));
    assert_eq!(orig.entries.len(), slim.entries.len() + 4);
    // same documents for both: the same token count
    assert_eq!(
        orig.entries["blk.0.ffn_up.weight"].counts,
        slim.entries["blk.0.ffn_up.weight"].counts
    );
    for m in ["original", "slim"] {
        assert_eq!(report[m]["n_docs"], 8);
    }
}

/// `run` (stand-ins by default; `--linear-attention`, which asked for them before they were the
/// default, still accepted): the skipped block gets a linear stand-in, exported as a deci
/// "linear attention" layer (heads, no KV heads, only `attn_norm` and `attn_output`), which
/// saves the same KV cache as skipping; the slim model's importance matrix covers the
/// stand-in's `attn_output`.
#[test]
fn run_with_linear_stand_ins_exports_linear_attention_layers() {
    let dir = tempfile::tempdir().unwrap();
    let hf = write_tiny(dir.path(), &Tiny::llama());
    let task = write_task(dir.path());
    let out = dir.path().join("out");
    let o = tiny_run(
        &hf,
        &task,
        &out,
        "q4_k_m",
        &["--linear-attention", "--imatrix"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    let layer = report["skipped_blocks"][0].as_u64().unwrap() as usize;
    let plan = hopscotch::plan::Plan::load(&out.join("plan.json")).unwrap();
    assert!(plan.settings.linear_attention);
    let stand_ins: Vec<usize> = plan.scales.linear.iter().map(|a| a.layer).collect();
    assert_eq!(stand_ins, vec![layer]);
    let kv = |m: &str| report[m]["kv_bytes_per_token"].as_u64().unwrap();
    assert_eq!(kv("slim") * 4, kv("original") * 3);
    assert_eq!(report["linear_stand_ins"], true);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("each skipped block replaced by a linear stand-in"),
        "{md}"
    );

    let f = GgufFile::open(out.join("slim.gguf")).unwrap();
    let per_layer = |key: &str| -> Vec<u64> {
        f.get_arr(key)
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    let heads = per_layer("deci.attention.head_count");
    let kv_heads = per_layer("deci.attention.head_count_kv");
    assert!(
        heads[layer] > 0 && kv_heads[layer] == 0,
        "{heads:?} {kv_heads:?}"
    );
    assert!(f
        .tensor(&format!("blk.{layer}.attn_output.weight"))
        .is_some());
    assert!(f.tensor(&format!("blk.{layer}.attn_q.weight")).is_none());
    let slim = hopscotch::gguf::imatrix::Imatrix::read(&out.join("slim.imatrix.gguf")).unwrap();
    assert!(slim
        .entries
        .contains_key(&format!("blk.{layer}.attn_output.weight")));
    assert!(!slim
        .entries
        .contains_key(&format!("blk.{layer}.attn_q.weight")));
    for m in ["original", "slim"] {
        assert_eq!(report[m]["n_docs"], 8);
    }
}

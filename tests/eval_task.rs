//! Task evaluation in llama.cpp: continuation log-likelihoods against an independent candle
//! computation on a tiny model (whole and truncated), accuracy and acc_norm from them,
//! `--exclude-fit`, a reference against itself, and bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor, D};
use common::{bin, write_tiny, Tiny};
use hopscotch::checkpoint::Checkpoint;
use hopscotch::eval::task::{
    choice_chars, evaluate, evaluate_with, pair_with_reference, select_docs, wilson_ci95,
    DecodeOptions, Selection, TaskReport, MIN_CACHED_PREFIX,
};
use hopscotch::llamacpp::{LoadedModel, SharedPrefix};
use hopscotch::model::Model;
use hopscotch::plan::Plan;
use hopscotch::plan::ScaleValues;
use serde_json::{json, Value};

/// Largest difference allowed between llama.cpp's and candle's summed log-likelihoods of an f32
/// model, relative to the larger of 1 and the value (the measured maximum is printed).
const LL_TOLERANCE: f64 = 1e-3;

/// Largest difference allowed between a choice's log-likelihood decoded after the cached prefix
/// all docs share and decoded whole, for an f32 model with an f32 KV cache, in nats (the measured
/// maximum is printed).
const CACHED_TOLERANCE: f64 = 5e-5;

/// A test doc: contexts, one per choice; continuations; gold.
type TestDoc = (Vec<String>, Vec<String>, u64);

/// (contexts, one per choice; continuations; gold) of the three test docs: a shared context,
/// a context with trailing whitespace and a non-ASCII choice, and per-choice contexts with one
/// continuation (winogrande's partial scoring).
fn test_docs() -> Vec<TestDoc> {
    let sky = "Question: What color is the sky on a clear day?\nAnswer:";
    let city = "The largest city in Switzerland is ";
    vec![
        (
            vec![sky; 3],
            vec![" blue", " green", " the color of a ripe banana"],
            0,
        ),
        (
            vec![city; 3],
            vec!["Zürich.", "Geneva.", "Bern, of course."],
            0,
        ),
        (
            vec![
                "The trophy would not fit in the suitcase because the trophy",
                "The trophy would not fit in the suitcase because the suitcase",
                "The trophy would not fit in the suitcase because the box",
            ],
            vec![" was too big."; 3],
            0,
        ),
    ]
    .into_iter()
    .map(|(contexts, continuations, gold)| (owned(&contexts), owned(&continuations), gold))
    .collect()
}

fn owned(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn write_task(dir: &Path) -> PathBuf {
    write_docs(dir, "task.jsonl", &test_docs())
}

/// Writes `docs` as a requests-format task file `name` in `dir`.
fn write_docs(dir: &Path, name: &str, docs: &[TestDoc]) -> PathBuf {
    let mut lines = String::new();
    for (d, (contexts, continuations, gold)) in docs.iter().enumerate() {
        for (i, (context, continuation)) in contexts.iter().zip(continuations).enumerate() {
            let line = json!({
                "request": {"context": context, "continuation": continuation},
                "doc_id": d,
                "idx": i,
                "label": gold,
                "native_id": format!("native-{d}"),
            });
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
    }
    let path = dir.join(name);
    std::fs::write(&path, lines).unwrap();
    path
}

/// A tiny random model as a Hugging Face folder and as an f32 GGUF.
fn tiny(dir: &Path) -> (PathBuf, PathBuf) {
    let hf = write_tiny(dir, &Tiny::llama());
    let gguf = dir.join("tiny.gguf");
    let out = hopscotch(&["convert", s(&hf), "-o", s(&gguf), "--type", "f32"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (hf, gguf)
}

fn hopscotch(args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run hopscotch")
}

fn json_of(args: &[&str]) -> Value {
    let out = hopscotch(args);
    assert!(
        out.status.success(),
        "hopscotch {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn eval_lib(gguf: &Path, task: &Path, n_ctx: usize) -> TaskReport {
    let model = LoadedModel::load(gguf).unwrap();
    let data = hopscotch::task::load(task).unwrap();
    let selection = select_docs(&data, None, None).unwrap();
    evaluate(
        &model,
        None,
        &data,
        &selection,
        n_ctx,
        2,
        &indicatif::ProgressBar::hidden(),
    )
    .unwrap()
}

/// Summed log-probabilities of each doc's continuations computed in candle from the Hugging
/// Face folder, tokenized with the `tokenizers` crate as lm-evaluation-harness does, decoding
/// at most `n_ctx` tokens (cut from the left).
fn candle_loglikelihoods(
    hf: &Path,
    add_bos: Option<u32>,
    n_ctx: usize,
    docs: &[TestDoc],
) -> Vec<Vec<f64>> {
    let ck = Checkpoint::open(hf).unwrap();
    let model = Model::load(&ck, &Device::Cpu).unwrap();
    let n_layer = model.arch().n_layer;
    let scales = model.scales(&ScaleValues::ones(n_layer)).unwrap();
    let skip = vec![false; n_layer];
    let tok = tokenizers::Tokenizer::from_file(hf.join("tokenizer.json")).unwrap();
    let encode = |t: &str| tok.encode(t, false).unwrap().get_ids().to_vec();
    docs.iter()
        .map(|(contexts, continuations, _)| {
            contexts
                .iter()
                .zip(continuations)
                .map(|(context, continuation)| {
                    let kept = context.trim_end();
                    let moved = format!("{}{continuation}", &context[kept.len()..]);
                    let mut full: Vec<u32> = add_bos.into_iter().collect();
                    full.extend(encode(kept));
                    let targets = encode(&moved);
                    full.extend(&targets);
                    let mut input = full[..full.len() - 1].to_vec();
                    if input.len() > n_ctx {
                        input.drain(..input.len() - n_ctx);
                    }
                    let t = input.len();
                    let ids = Tensor::from_vec(input, (1, t), &Device::Cpu).unwrap();
                    let hidden = model.forward_hidden_no_grad(&ids, &scales, &skip).unwrap();
                    let positions: Vec<u32> = (t - targets.len()..t).map(|p| p as u32).collect();
                    let positions = Tensor::new(positions, &Device::Cpu).unwrap();
                    let logits = model.logits_at(&hidden, &positions).unwrap();
                    let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)
                        .unwrap()
                        .to_vec2::<f32>()
                        .unwrap();
                    targets
                        .iter()
                        .zip(&lp)
                        .map(|(&tgt, row)| row[tgt as usize] as f64)
                        .sum()
                })
                .collect()
        })
        .collect()
}

#[test]
fn loglikelihoods_match_candle_and_accuracy_follows_from_them() {
    let dir = tempfile::tempdir().unwrap();
    let (hf, gguf) = tiny(dir.path());
    let task = write_task(dir.path());
    let model = LoadedModel::load(&gguf).unwrap();
    let vocab = model.model.vocab();
    let bos = vocab.should_add_bos().then(|| vocab.bos().0 as u32);

    // 4096: every doc in one decode, nothing cut; 12: several decodes, contexts cut from the left.
    for n_ctx in [4096, 12] {
        let report = eval_lib(&gguf, &task, n_ctx);
        let expected = candle_loglikelihoods(&hf, bos, n_ctx, &test_docs());
        assert_eq!(report.n_docs, 3);
        assert_eq!(report.n_requests, 9);
        if n_ctx == 4096 {
            assert_eq!(report.truncated_requests, 0);
        } else {
            assert!(report.truncated_requests > 0);
        }
        let (mut max_abs, mut max_rel) = (0f64, 0f64);
        for (doc, want) in report.docs.iter().zip(&expected) {
            assert_eq!(doc.loglikelihoods.len(), 3);
            for (&got, &want) in doc.loglikelihoods.iter().zip(want) {
                let abs = (got - want).abs();
                max_abs = max_abs.max(abs);
                max_rel = max_rel.max(abs / want.abs().max(1.0));
                assert!(
                    abs <= LL_TOLERANCE * want.abs().max(1.0),
                    "doc {}: llama.cpp {got} vs candle {want} (n_ctx {n_ctx})",
                    doc.doc_id
                );
            }
        }
        eprintln!(
            "n_ctx {n_ctx}: max |llama.cpp - candle| = {max_abs:.2e} nats, relative {max_rel:.2e}"
        );

        // accuracy and acc_norm from the log-likelihoods, lm-evaluation-harness's way
        let docs = test_docs();
        let (mut correct, mut correct_norm) = (0, 0);
        for (doc, (_, continuations, gold)) in report.docs.iter().zip(&docs) {
            let chars: Vec<usize> = continuations.iter().map(|c| choice_chars(c)).collect();
            assert_eq!(doc.choice_chars, chars);
            let best = |v: &[f64]| (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b });
            let per_char: Vec<f64> = doc
                .loglikelihoods
                .iter()
                .zip(&chars)
                .map(|(l, &c)| l / c as f64)
                .collect();
            assert_eq!(doc.pred, best(&doc.loglikelihoods));
            assert_eq!(doc.pred_norm, best(&per_char));
            assert_eq!(doc.gold, *gold as usize);
            correct += usize::from(doc.pred == doc.gold);
            correct_norm += usize::from(doc.pred_norm == doc.gold);
        }
        assert_eq!(report.accuracy, correct as f64 / 3.0);
        assert_eq!(report.acc_norm, correct_norm as f64 / 3.0);
        assert_eq!(report.accuracy_ci95, wilson_ci95(correct, 3));
        assert_eq!(report.acc_norm_ci95, wilson_ci95(correct_norm, 3));
        assert!(report.prompt_tokens > 0 && report.prompt_tokens_per_s > 0.0);
        // the three docs share no prefix worth caching: all decode whole
        assert_eq!(report.cached_prefix_tokens, 0);
        assert_eq!(report.cached_prefix_docs, 0);
    }
}

/// Few-shot docs: the same five worked examples begin every context, then the doc's own question
/// (one doc with per-choice contexts, one whose context ends in a space, one long enough to be
/// cut in a small context).
fn few_shot_docs() -> Vec<TestDoc> {
    let shots = "Question: What do cows drink?\nAnswer: water\n\n\
                 Question: Which season comes after winter?\nAnswer: spring\n\n\
                 Question: How many legs does a spider have?\nAnswer: eight\n\n\
                 Question: What color are ripe tomatoes?\nAnswer: red\n\n\
                 Question: What do you call a baby cat?\nAnswer: a kitten\n\n";
    let ask = |q: &str| format!("{shots}Question: {q}\nAnswer:");
    let long = format!(
        "What does this long story end with? {}",
        "The road went on past the river and the mill and the old stone bridge. ".repeat(8)
    );
    let doc = |context: String, choices: &[&str], gold| {
        (vec![context; choices.len()], owned(choices), gold)
    };
    vec![
        doc(ask("What do bees make?"), &[" honey", " milk", " steel"], 0),
        doc(
            ask("Which planet is closest to the sun?"),
            &[" Mercury", " Venus", " Mars", " Jupiter"],
            0,
        ),
        (
            vec![
                format!("{shots}The cup fell off the table because the cup"),
                format!("{shots}The cup fell off the table because the table"),
            ],
            owned(&[" was slippery.", " was slippery."]),
            1,
        ),
        doc(ask(&long), &[" a bridge", " the sea"], 1),
        doc(
            format!("{shots}Question: Name a primary color.\nAnswer: "),
            &["blue", "green as grass"],
            0,
        ),
        doc(
            ask("What is frozen water called?"),
            &[" ice", " steam", " sand"],
            0,
        ),
    ]
}

#[test]
fn shared_few_shot_prefix_is_decoded_once_and_scores_as_decoded_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (hf, gguf) = tiny(dir.path());
    let docs = few_shot_docs();
    let task = write_docs(dir.path(), "fewshot.jsonl", &docs);
    let model = LoadedModel::load(&gguf).unwrap();
    let vocab = model.model.vocab();
    let bos = vocab.should_add_bos().then(|| vocab.bos().0 as u32);
    let data = hopscotch::task::load(&task).unwrap();
    let selection = select_docs(&data, None, None).unwrap();
    let run = |n_ctx: usize, reuse_prefix: bool, f32_kv: bool| {
        let options = DecodeOptions {
            reuse_prefix,
            f32_kv,
        };
        let hidden = indicatif::ProgressBar::hidden();
        evaluate_with(&model, None, &data, &selection, n_ctx, 2, options, &hidden).unwrap()
    };

    // The prefix expected, from the `tokenizers` crate: the longest common prefix of every
    // choice's context tokens, less the last (whose logits are scored).
    let tok = tokenizers::Tokenizer::from_file(hf.join("tokenizer.json")).unwrap();
    let contexts: Vec<Vec<u32>> = docs
        .iter()
        .flat_map(|(contexts, _, _)| contexts)
        .map(|c| {
            let mut ids: Vec<u32> = bos.into_iter().collect();
            ids.extend(tok.encode(c.trim_end(), false).unwrap().get_ids());
            ids.pop();
            ids
        })
        .collect();
    let prefix = contexts.iter().fold(contexts[0].len(), |n, c| {
        contexts[0][..n]
            .iter()
            .zip(c)
            .take_while(|(a, b)| a == b)
            .count()
    });
    let longest = contexts.iter().map(Vec::len).max().unwrap();
    eprintln!("shared prefix {prefix} tokens, longest context {longest}");
    assert!(prefix >= MIN_CACHED_PREFIX && prefix + 40 < 160 && longest > 160);

    // 4096: every doc in one decode; 160: several decodes after the prefix, docs split across
    // them, and the long doc cut to fit and decoded whole.
    for n_ctx in [4096, 160] {
        let cached = run(n_ctx, true, true);
        let whole = run(n_ctx, false, true);
        assert_eq!(cached.cached_prefix_tokens, prefix, "n_ctx {n_ctx}");
        assert_eq!(
            (whole.cached_prefix_tokens, whole.cached_prefix_docs),
            (0, 0)
        );
        let n_docs = docs.len();
        if n_ctx == 4096 {
            assert_eq!(cached.truncated_requests, 0);
            assert_eq!(cached.cached_prefix_docs, n_docs);
            // decoded once instead of once per doc
            assert_eq!(
                whole.prompt_tokens - cached.prompt_tokens,
                (n_docs - 1) * prefix
            );
        } else {
            assert_eq!(cached.truncated_requests, 2);
            assert_eq!(cached.cached_prefix_docs, n_docs - 1);
            assert!(
                cached.prompt_tokens + (n_docs - 3) * prefix <= whole.prompt_tokens,
                "{} vs {} tokens",
                cached.prompt_tokens,
                whole.prompt_tokens
            );
        }
        let mut max_abs = 0f64;
        for (c, w) in cached.docs.iter().zip(&whole.docs) {
            assert_eq!(c.doc_id, w.doc_id);
            for (&a, &b) in c.loglikelihoods.iter().zip(&w.loglikelihoods) {
                max_abs = max_abs.max((a - b).abs());
                assert!(
                    (a - b).abs() <= CACHED_TOLERANCE,
                    "doc {}: after the cached prefix {a}, whole {b} (n_ctx {n_ctx})",
                    c.doc_id
                );
            }
        }
        eprintln!(
            "n_ctx {n_ctx}: {} tokens decoded after a cached prefix of {prefix}, {} whole; \
             max |cached - whole| = {max_abs:.2e} nats",
            cached.prompt_tokens, whole.prompt_tokens
        );

        // the default path (prefix reused, f16 KV cache) against candle
        let default = eval_lib(&gguf, &task, n_ctx);
        assert_eq!(default.prompt_tokens, cached.prompt_tokens);
        let expected = candle_loglikelihoods(&hf, bos, n_ctx, &docs);
        let mut max_rel = 0f64;
        for (doc, want) in default.docs.iter().zip(&expected) {
            for (&got, &want) in doc.loglikelihoods.iter().zip(want) {
                max_rel = max_rel.max((got - want).abs() / want.abs().max(1.0));
                assert!(
                    (got - want).abs() <= LL_TOLERANCE * want.abs().max(1.0),
                    "doc {}: llama.cpp {got} vs candle {want} (n_ctx {n_ctx})",
                    doc.doc_id
                );
            }
        }
        eprintln!(
            "n_ctx {n_ctx}, prefix reused, f16 KV: max relative |llama.cpp - candle| = {max_rel:.2e}"
        );
    }
}

#[test]
fn cached_prefix_continues_like_a_whole_decode_and_bad_requests_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny(dir.path());
    let model = LoadedModel::load(&gguf).unwrap();
    let tokens = common::sample_tokens();
    let (prefix, a, b) = (&tokens[..12], &tokens[12..20], &tokens[20..26]);
    let mut ctx = model.context_with(64, 2, true).unwrap();
    fn collect(rows: &mut [Vec<Vec<f32>>]) -> impl FnMut(usize, usize, &[f32]) + '_ {
        |seq, _k, logits| rows[seq].push(logits.to_vec())
    }

    // both continuations decoded whole, after their shared prefix
    let mut whole = vec![Vec::new(); 2];
    let groups = [SharedPrefix {
        prefix,
        suffixes: vec![(a, (12..20).collect()), (b, (12..18).collect())],
    }];
    ctx.logits_shared(&groups, collect(&mut whole)).unwrap();

    // nothing cached yet: refused
    assert!(ctx.logits_after_prefix(&[], |_, _, _| {}).is_err());
    assert!(ctx.cache_prefix(&[1; 65]).is_err());
    assert_eq!(ctx.cached_prefix(), 0);

    // the prefix decoded once, each continuation after it in its own call: the prefix stays
    ctx.cache_prefix(prefix).unwrap();
    assert_eq!(ctx.cached_prefix(), 12);
    let mut max_abs = 0f32;
    for (suffix, want) in [(a, &whole[0]), (b, &whole[1])] {
        let mut rows = vec![Vec::new(); 1];
        let groups = [SharedPrefix {
            prefix: &[],
            suffixes: vec![(suffix, (0..suffix.len()).collect())],
        }];
        ctx.logits_after_prefix(&groups, collect(&mut rows))
            .unwrap();
        assert_eq!(rows[0].len(), want.len());
        for (got, want) in rows[0].iter().zip(want) {
            for (x, y) in got.iter().zip(want) {
                max_abs = max_abs.max((x - y).abs());
            }
        }
    }
    eprintln!("max |logit after cached prefix - whole| = {max_abs:.2e}");
    assert!(max_abs < 1e-4, "{max_abs}");

    // too many sequences (the prefix holds one of the 64) or tokens: refused, the prefix kept
    let one: &[u32] = &tokens[12..13];
    let many = [SharedPrefix {
        prefix: &[],
        suffixes: vec![(one, vec![0]); 64],
    }];
    assert!(ctx.logits_after_prefix(&many, |_, _, _| {}).is_err());
    let long = [SharedPrefix {
        prefix: &[],
        suffixes: vec![(&[1; 53][..], vec![0])],
    }];
    assert!(ctx.logits_after_prefix(&long, |_, _, _| {}).is_err());
    assert_eq!(ctx.cached_prefix(), 12);
    let mut rows = vec![Vec::new(); 1];
    let again = [SharedPrefix {
        prefix: &[],
        suffixes: vec![(a, vec![0])],
    }];
    ctx.logits_after_prefix(&again, collect(&mut rows)).unwrap();
    let diff = rows[0][0]
        .iter()
        .zip(&whole[0][0])
        .map(|(x, y)| (x - y).abs());
    assert!(diff.fold(0f32, f32::max) < 1e-4);

    // any other decode drops the prefix
    ctx.logits(prefix, &[0]).unwrap();
    assert_eq!(ctx.cached_prefix(), 0);
    assert!(ctx.logits_after_prefix(&again, |_, _, _| {}).is_err());
}

#[test]
fn choice_length_and_wilson_interval() {
    // the target delimiter (one leading space) is not counted; characters, not bytes
    assert_eq!(choice_chars(" blue"), 4);
    assert_eq!(choice_chars("Zürich."), 7);
    assert_eq!(choice_chars("  two"), 4);
    assert_eq!(choice_chars(""), 1);
    // textbook values of the 95% Wilson interval
    let close = |a: [f64; 2], b: [f64; 2]| (a[0] - b[0]).abs() < 1e-4 && (a[1] - b[1]).abs() < 1e-4;
    assert!(close(wilson_ci95(0, 10), [0.0, 0.2775]));
    assert!(close(wilson_ci95(5, 10), [0.2366, 0.7634]));
    assert!(close(wilson_ci95(10, 10), [0.7225, 1.0]));
}

/// A minimal plan file (fields that are options left out) recording `sha256` as its task's.
fn write_plan(path: &Path, task: &Path, sha256: &str, fit_doc_ids: &[&str]) {
    let t = Tiny::llama();
    let ones = vec![1.0; t.n_layer];
    let plan = json!({
        "tool_version": "test",
        "model": {
            "architecture": t.arch, "n_layer": t.n_layer, "n_embd": t.n_embd,
            "n_head": t.n_head, "n_head_kv": t.n_head_kv, "n_ff": t.n_ff,
            "vocab_size": common::VOCAB, "tensor_sha256": "0".repeat(64),
        },
        "task": {"path": task.display().to_string(), "sha256": sha256, "format": "requests"},
        "fit_doc_ids": fit_doc_ids,
        "skipped_blocks": [],
        "scales": {"b_att": ones, "s_att": ones, "b_mlp": ones, "s_mlp": ones},
        "rounds": [],
        "final_loss_history": [],
        "settings": {
            "method": "hopscotch", "objective": "kl", "skip": 0,
            "fit_docs": fit_doc_ids.len(), "candidate_steps": 0, "final_steps": 0,
            "lr": 0.0, "final_lr": 0.0, "batch_size": 1, "max_seq_len": 2, "seed": 0,
            "exhaustive": false, "shortlist": 0, "train_scales": false,
            "screen_batches": 0, "teacher_top_k": 0,
        },
    });
    std::fs::write(path, serde_json::to_string_pretty(&plan).unwrap()).unwrap();
}

#[test]
fn exclude_fit_drops_exactly_the_plans_docs_and_limit_takes_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny(dir.path());
    let task = write_task(dir.path());
    let data = hopscotch::task::load(&task).unwrap();
    let plan_path = dir.path().join("plan.json");
    write_plan(&plan_path, &task, &data.sha256, &["1"]);
    let plan = Plan::load(&plan_path).unwrap();

    fn ids(sel: &Selection<'_>) -> Vec<String> {
        sel.docs.iter().map(|d| d.id.clone()).collect()
    }
    let sel = select_docs(&data, Some((&plan_path, &plan)), None).unwrap();
    assert_eq!(ids(&sel), ["0", "2"]);
    assert_eq!(sel.excluded, 1);
    let sel = select_docs(&data, Some((&plan_path, &plan)), Some(1)).unwrap();
    assert_eq!(ids(&sel), ["0"]);
    // the documents only the final training used are held out too
    let mut more = plan.clone();
    more.first_task.final_doc_ids = vec!["2".into()];
    let sel = select_docs(&data, Some((&plan_path, &more)), None).unwrap();
    assert_eq!(ids(&sel), ["0"]);
    assert_eq!(sel.excluded, 2);
    assert_eq!(ids(&select_docs(&data, None, Some(2)).unwrap()), ["0", "1"]);

    let all = json_of(&["eval", s(&gguf), "--task", s(&task), "--json"]);
    let held = json_of(&[
        "eval",
        s(&gguf),
        "--task",
        s(&task),
        "--exclude-fit",
        s(&plan_path),
        "--json",
    ]);
    assert_eq!(all["n_docs"], 3);
    assert_eq!(held["n_docs"], 2);
    assert_eq!(held["excluded_docs"], 1);
    assert_eq!(held["n_requests"], 6);

    // the kept docs score as they do in the full run
    let full = eval_lib(&gguf, &task, 4096);
    let model = LoadedModel::load(&gguf).unwrap();
    let kept = evaluate(
        &model,
        None,
        &data,
        &select_docs(&data, Some((&plan_path, &plan)), None).unwrap(),
        4096,
        2,
        &indicatif::ProgressBar::hidden(),
    )
    .unwrap();
    let by_id = |id: &str| full.docs.iter().find(|d| d.doc_id == id).unwrap();
    for doc in &kept.docs {
        for (a, b) in doc
            .loglikelihoods
            .iter()
            .zip(&by_id(&doc.doc_id).loglikelihoods)
        {
            assert!((a - b).abs() < 1e-4, "doc {}: {a} vs {b}", doc.doc_id);
        }
    }

    // a plan fitted on other task data is refused
    let other = dir.path().join("other-plan.json");
    write_plan(&other, &task, &"f".repeat(64), &["1"]);
    let out = hopscotch(&[
        "eval",
        s(&gguf),
        "--task",
        s(&task),
        "--exclude-fit",
        s(&other),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("sha256") && err.contains("other-plan.json"),
        "{err}"
    );
}

#[test]
fn reference_against_itself_agrees_fully() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny(dir.path());
    let task = write_task(dir.path());
    let v = json_of(&[
        "eval",
        s(&gguf),
        "--task",
        s(&task),
        "--reference",
        s(&gguf),
        "--json",
    ]);
    assert_eq!(v["agreement"], 1.0);
    assert_eq!(v["accuracy_diff"], 0.0);
    assert_eq!(v["accuracy_diff_ci95"], json!([0.0, 0.0]));
    assert!(v["choice_kl_mean"].as_f64().unwrap().abs() < 1e-12, "{v}");
    assert_eq!(v["reference"]["accuracy"], v["accuracy"]);
    assert_eq!(v["reference"]["acc_norm"], v["acc_norm"]);
    for key in [
        "accuracy",
        "acc_norm",
        "accuracy_ci95",
        "acc_norm_ci95",
        "n_docs",
        "prompt_tokens",
        "prompt_tokens_per_s",
    ] {
        assert!(!v[key].is_null(), "{key} missing: {v}");
    }

    // the text summary names the paired statistics
    let out = hopscotch(&[
        "eval",
        s(&gguf),
        "--task",
        s(&task),
        "--reference",
        s(&gguf),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for needle in [
        "accuracy",
        "acc_norm",
        "agreement        100.00%",
        "choice KL mean",
    ] {
        assert!(text.contains(needle), "{text}");
    }
}

#[test]
fn a_reference_scored_apart_pairs_as_one_scored_together() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny(dir.path());
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other_hf = write_tiny(
        &other_dir,
        &Tiny {
            seed: 99,
            ..Tiny::llama()
        },
    );
    let other = dir.path().join("other.gguf");
    let out = hopscotch(&["convert", s(&other_hf), "-o", s(&other), "--type", "f32"]);
    assert!(out.status.success());
    let task = write_task(dir.path());
    let data = hopscotch::task::load(&task).unwrap();
    let selection = select_docs(&data, None, None).unwrap();
    let (m, r) = (
        LoadedModel::load(&gguf).unwrap(),
        LoadedModel::load(&other).unwrap(),
    );
    let bar = indicatif::ProgressBar::hidden();
    let together = evaluate(&m, Some(&r), &data, &selection, 2048, 2, &bar).unwrap();
    let mut alone = evaluate(&m, None, &data, &selection, 2048, 2, &bar).unwrap();
    let reference = evaluate(&r, None, &data, &selection, 2048, 2, &bar).unwrap();
    let p = pair_with_reference(&mut alone.docs, &reference.docs).unwrap();
    assert_eq!(Some(p.agreement), together.agreement);
    assert_eq!(Some(p.accuracy_diff), together.accuracy_diff);
    assert_eq!(Some(p.accuracy_diff_ci95), together.accuracy_diff_ci95);
    assert_eq!(Some(p.choice_kl_mean), together.choice_kl_mean);
    assert!(p.choice_kl_mean > 0.0, "two different models");
    let reference_acc = together.reference.unwrap();
    assert_eq!(p.reference.accuracy, reference_acc.accuracy);
    assert_eq!(p.reference.acc_norm, reference_acc.acc_norm);
    for (a, t) in alone.docs.iter().zip(&together.docs) {
        assert_eq!(a.reference_loglikelihoods, t.reference_loglikelihoods);
        assert_eq!(a.reference_pred, t.reference_pred);
    }
    // other documents cannot be paired
    let fewer = &reference.docs[1..];
    assert!(pair_with_reference(&mut alone.docs, fewer).is_err());
}

#[test]
fn log_samples_writes_each_docs_scores_and_keeps_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny(dir.path());
    let task = write_task(dir.path());
    let samples = dir.path().join("samples.jsonl");
    let args = [
        "eval",
        s(&gguf),
        "--task",
        s(&task),
        "--reference",
        s(&gguf),
        "--json",
        "--log-samples",
        s(&samples),
    ];
    let summary = json_of(&args);
    let text = std::fs::read_to_string(&samples).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let lib = eval_lib(&gguf, &task, 2048);
    assert_eq!(lines.len(), lib.docs.len());
    assert_eq!(summary["n_docs"], lines.len());
    let mut correct = 0;
    for (line, doc) in lines.iter().zip(&lib.docs) {
        assert_eq!(line["doc_id"], doc.doc_id.as_str());
        assert_eq!(line["gold"], doc.gold);
        assert_eq!(line["pred"], doc.pred);
        assert_eq!(line["pred_norm"], doc.pred_norm);
        assert_eq!(line["choice_chars"], json!(doc.choice_chars));
        let lls: Vec<f64> = serde_json::from_value(line["loglikelihoods"].clone()).unwrap();
        assert_eq!(
            lls, doc.loglikelihoods,
            "the scores eval computed, unrounded"
        );
        // the reference is the same file: the same scores and pick
        assert_eq!(line["reference_loglikelihoods"], line["loglikelihoods"]);
        assert_eq!(line["reference_pred"], line["pred"]);
        correct += usize::from(doc.pred == doc.gold);
    }
    let accuracy = correct as f64 / lines.len() as f64;
    assert_eq!(summary["accuracy"].as_f64().unwrap(), accuracy);

    // without a reference the reference's fields are left out
    let alone = dir.path().join("alone.jsonl");
    json_of(&[
        "eval",
        s(&gguf),
        "--task",
        s(&task),
        "--json",
        "--log-samples",
        s(&alone),
    ]);
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(&alone)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(first.get("reference_pred").is_none(), "{first}");
    assert!(first.get("reference_loglikelihoods").is_none(), "{first}");

    // an existing file is kept without --force, before any scoring; --force replaces it
    std::fs::write(&samples, "keep me").unwrap();
    let out = hopscotch(&args);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(s(&samples)) && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&samples).unwrap(), "keep me");
    let mut forced = args.to_vec();
    forced.push("--force");
    json_of(&forced);
    assert_eq!(std::fs::read_to_string(&samples).unwrap(), text);
    // samples are per document of a task, not of a text
    let out = hopscotch(&[
        "eval",
        s(&gguf),
        "--text",
        s(&task),
        "--log-samples",
        s(&alone),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--task"));
}

#[test]
fn bad_input_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny(dir.path());
    let check = |args: &[&str], code: i32, needles: &[&str]| {
        let out = hopscotch(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        for needle in needles {
            assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
        }
    };
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    };

    let unknown = write("unknown.jsonl", "{\"question\": \"why?\"}\n");
    check(
        &["eval", s(&gguf), "--task", s(&unknown)],
        1,
        &["unknown.jsonl:1", "\"request\""],
    );
    let text = write("text.jsonl", "{\"text\": \"Once upon a time.\"}\n");
    check(
        &["eval", s(&gguf), "--task", s(&text)],
        1,
        &["text.jsonl", "text-format", "--text"],
    );
    let missing = dir.path().join("missing.jsonl");
    check(
        &["eval", s(&gguf), "--task", s(&missing)],
        1,
        &["missing.jsonl"],
    );
    let no_gold = write(
        "nogold.jsonl",
        &[0, 1]
            .map(|i| {
                json!({"request": {"context": "Q:", "continuation": format!(" {i}")},
                       "doc_id": 7, "idx": i})
                .to_string()
            })
            .join("\n"),
    );
    check(
        &["eval", s(&gguf), "--task", s(&no_gold)],
        1,
        &["nogold.jsonl:1", "doc 7", "gold"],
    );
    let task = write_task(dir.path());
    check(
        &["eval", s(&gguf), "--task", s(&task), "--limit", "0"],
        1,
        &["no docs left"],
    );
    check(
        &[
            "eval",
            s(&gguf),
            "--task",
            s(&task),
            "--reference",
            s(&missing),
        ],
        1,
        &["missing.jsonl"],
    );
    // --text and --task are exclusive, and one is required (usage errors)
    check(&["eval", s(&gguf)], 2, &["--text", "--task"]);
    check(
        &["eval", s(&gguf), "--task", s(&task), "--text", s(&text)],
        2,
        &["--text", "--task"],
    );
    // each mode's options are refused with the other mode
    for (option, value) in [("--limit", "3"), ("--exclude-fit", s(&task))] {
        check(
            &["eval", s(&gguf), "--text", s(&text), option, value],
            2,
            &[option, "--text"],
        );
    }
    check(
        &["eval", s(&gguf), "--task", s(&task), "--chunks", "3"],
        2,
        &["--chunks", "--task"],
    );
}

//! Tests of batches, losses and the training loop.

use std::time::Instant;

use super::*;
use crate::arch::Arch;
use crate::fit::batch::*;
use crate::fit::loss::*;
use crate::model::tests::{random_ids, random_source, tiny_arch};
use crate::plan::SkipMask;
use candle_core::{Device, D};

/// Batches whose targets are the full model's own greedy next tokens (the paper's data).
fn self_generated_batches(model: &Model, n: usize, b: usize, t: usize) -> Vec<TrainBatch> {
    let arch = model.arch();
    let ones = model.scales(&ScaleValues::ones(arch.n_layer)).unwrap();
    (0..n)
        .map(|i| {
            let ids = random_ids(arch, b, t, 100 + i as u64);
            let hidden = model
                .forward_hidden_no_grad(&ids, &ones, &vec![false; arch.n_layer])
                .unwrap();
            // targets at every position but the first two of each row
            let positions: Vec<u32> = (0..b * t)
                .filter(|p| p % t >= 2)
                .map(|p| p as u32)
                .collect();
            let positions = Tensor::new(positions.as_slice(), &Device::Cpu).unwrap();
            let greedy = model
                .logits_at(&hidden, &positions)
                .unwrap()
                .argmax(D::Minus1)
                .unwrap();
            TrainBatch::new(ids, positions, greedy).unwrap()
        })
        .collect()
}

#[test]
fn training_lowers_the_loss_of_a_skipped_model() {
    let arch = tiny_arch();
    let model = Model::load(&random_source(&arch, 21), &Device::Cpu).unwrap();
    let batches: Vec<TrainBatch> = self_generated_batches(&model, 2, 4, 12)
        .into_iter()
        .map(|b| b.with_teacher(&model, 16).unwrap())
        .collect();
    let skip = SkipMask::from_layers(arch.n_layer, &[1]).unwrap();
    let ones = ScaleValues::ones(arch.n_layer);
    for objective in [Objective::Ce, Objective::Kl] {
        let before = eval_loss(&model, &batches, skip.as_slice(), &ones, objective).unwrap();
        let result =
            train_scales(&model, &batches, skip.as_slice(), objective, 60, 5e-2, 7).unwrap();
        let after =
            eval_loss(&model, &batches, skip.as_slice(), &result.scales, objective).unwrap();
        let full = eval_loss(&model, &batches, &[false; 3], &ones, objective).unwrap();
        assert_eq!(result.loss_history.len(), 60);
        // a random model cannot get all of the loss back, but a clear part of it
        assert!(
            before > full && after < before - 0.1 * (before - full),
            "{objective:?}: loss {full} unskipped, {before} skipped, {after} trained"
        );
        assert_ne!(result.scales, ones);
        // the skipped attention's scalars get no gradient and stay at 1
        assert_eq!(result.scales.b_att[1], 1.0);
        assert_eq!(result.scales.s_att[1], 1.0);
    }
    // nothing skipped and all scalars 1: the KL to the original is zero
    let none = SkipMask::none(arch.n_layer);
    let kl = eval_loss(&model, &batches, none.as_slice(), &ones, Objective::Kl).unwrap();
    assert!(kl.abs() < 1e-5, "KL of the original to itself is {kl}");
}

#[test]
fn top_k_teacher_equals_full_teacher_at_full_width() {
    let arch = tiny_arch();
    let model = Model::load(&random_source(&arch, 22), &Device::Cpu).unwrap();
    let batch = self_generated_batches(&model, 1, 2, 8).remove(0);
    let full = vec![batch.clone().with_teacher(&model, arch.vocab_size).unwrap()];
    let nearly = vec![batch.with_teacher(&model, arch.vocab_size - 1).unwrap()];
    assert!(matches!(full[0].teacher, Some(Teacher::Full { .. })));
    assert!(matches!(nearly[0].teacher, Some(Teacher::TopK { .. })));
    let skip = SkipMask::from_layers(arch.n_layer, &[0, 2]).unwrap();
    let values = ScaleValues {
        b_mlp: vec![0.8, 1.1, 0.9],
        ..ScaleValues::ones(arch.n_layer)
    };
    let a = eval_loss(&model, &full, skip.as_slice(), &values, Objective::Kl).unwrap();
    let b = eval_loss(&model, &nearly, skip.as_slice(), &values, Objective::Kl).unwrap();
    assert!(
        a > 1e-3 && (a - b).abs() < 1e-3 * a,
        "full {a}, top-(vocab-1) {b}"
    );
}

/// The losses and the teacher are taken over runs of at most `LOGIT_ROWS` target positions;
/// on a batch of more, they equal what all its positions' logits at once give, bit for bit.
#[test]
fn losses_and_teachers_over_runs_of_positions_equal_the_whole_batchs() {
    let model = Model::load(&random_source(&tiny_arch(), 41), &Device::Cpu).unwrap();
    let batch = self_generated_batches(&model, 1, 5, 256).remove(0);
    let n = batch.n_targets();
    assert!(n > 2 * LOGIT_ROWS, "{n} targets make one run");
    let n_layer = model.arch().n_layer;
    let skip = SkipMask::from_layers(n_layer, &[1]).unwrap();
    let ones = model.scales(&ScaleValues::ones(n_layer)).unwrap();
    let whole_log_probs = |scales: &Scales, skip: &[bool]| {
        let hidden = model
            .forward_hidden_no_grad(&batch.input_ids, scales, skip)
            .unwrap();
        let logits = model.logits_at(&hidden, &batch.target_positions).unwrap();
        candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap()
    };
    // the teacher: its top 8 of every position, as from the whole batch's log-probabilities
    let taught = batch.clone().with_teacher(&model, 8).unwrap();
    let Some(Teacher::TopK { ids, log_probs, .. }) = &taught.teacher else {
        panic!("a top-k teacher");
    };
    let p = whole_log_probs(&ones, &vec![false; n_layer]);
    let expected = p.gather(ids, 1).unwrap();
    assert_eq!(ids.dims(), [n, 8]);
    assert_eq!(
        log_probs.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        expected.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    // the losses: cross-entropy and KL to the full teacher, against the whole batch's
    let full = batch.clone().with_teacher(&model, usize::MAX).unwrap();
    let hidden = model
        .forward_hidden_no_grad(&batch.input_ids, &ones, skip.as_slice())
        .unwrap();
    let log_q = whole_log_probs(&ones, skip.as_slice());
    let ce = hidden_loss(&model, &batch, 0, &hidden, Objective::Ce).unwrap();
    let ce_whole = log_q
        .gather(&batch.targets.unsqueeze(1).unwrap(), 1)
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap();
    assert_eq!(
        ce.to_scalar::<f32>().unwrap(),
        ce_whole.to_scalar::<f32>().unwrap()
    );
    let Some(Teacher::Full { log_probs: p }) = &full.teacher else {
        panic!("a full teacher");
    };
    assert_eq!(p.dims(), [n, model.arch().vocab_size]);
    let kl = hidden_loss(&model, &full, 0, &hidden, Objective::Kl).unwrap();
    let kl_whole = (p.exp().unwrap() * (p - &log_q).unwrap())
        .unwrap()
        .sum(D::Minus1)
        .unwrap()
        .mean_all()
        .unwrap();
    assert_eq!(
        kl.to_scalar::<f32>().unwrap(),
        kl_whole.to_scalar::<f32>().unwrap()
    );
}

#[test]
fn from_sequences_pads_right_and_shifts_targets() {
    let batch = TrainBatch::from_sequences(
        &[vec![5, 6, 7], vec![8, 9]],
        &[vec![false, true, true], vec![false, true]],
        0,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        batch.input_ids.to_vec2::<u32>().unwrap(),
        vec![vec![5, 6, 7], vec![8, 9, 0]]
    );
    assert_eq!(
        batch.target_positions.to_vec1::<u32>().unwrap(),
        vec![0, 1, 3]
    );
    assert_eq!(batch.targets.to_vec1::<u32>().unwrap(), vec![6, 7, 9]);
    assert!(matches!(
        TrainBatch::from_sequences(&[vec![1, 2]], &[vec![true, true]], 0, &Device::Cpu),
        Err(TrainError::FirstTokenTarget { sequence: 0 })
    ));
    assert!(matches!(
        TrainBatch::from_sequences(&[vec![1, 2]], &[vec![false]], 0, &Device::Cpu),
        Err(TrainError::MaskLength {
            sequence: 0,
            tokens: 2,
            mask: 1
        })
    ));
    assert!(matches!(
        TrainBatch::from_sequences(&[vec![1, 2]], &[vec![false, false]], 0, &Device::Cpu),
        Err(TrainError::NoTargets)
    ));
}

#[test]
fn bad_training_requests_are_errors() {
    let arch = tiny_arch();
    let model = Model::load(&random_source(&arch, 23), &Device::Cpu).unwrap();
    let batches = self_generated_batches(&model, 1, 2, 6);
    let skip = vec![false; arch.n_layer];
    assert!(matches!(
        train_scales(&model, &batches, &skip, Objective::Kl, 1, 1e-2, 0),
        Err(TrainError::MissingTeacher { batch: 0 })
    ));
    assert!(matches!(
        train_scales(&model, &[], &skip, Objective::Ce, 1, 1e-2, 0),
        Err(TrainError::NoBatches)
    ));
    assert!(matches!(
        train_scales(&model, &batches, &skip, Objective::Ce, 1, f64::NAN, 0),
        Err(TrainError::LearningRate { .. })
    ));
    // a learning rate this large sends the scalars to infinity within a few steps
    match train_scales(&model, &batches, &skip, Objective::Ce, 50, 1e30, 0) {
        Err(TrainError::NonFiniteLoss { step, .. }) => assert!(step > 0 && step < 50),
        other => panic!("expected a non-finite loss, got {other:?}"),
    }
}

/// Two multiple-choice docs (3 and 2 choices) of random tokens: a shared context per doc,
/// then each choice's continuation of 1 to 3 tokens (the targets).
fn choice_data(arch: &Arch, seed: u64) -> (Vec<Vec<u32>>, Vec<Vec<bool>>, Vec<usize>) {
    let ids = random_ids(arch, 1, 40, seed)
        .to_vec2::<u32>()
        .unwrap()
        .remove(0);
    let mut take = ids.into_iter();
    let mut seqs = Vec::new();
    let mut masks = Vec::new();
    let choices = vec![3, 2];
    for (doc, &n) in choices.iter().enumerate() {
        let context: Vec<u32> = take.by_ref().take(5 + doc).collect();
        for c in 0..n {
            let continuation: Vec<u32> = take.by_ref().take(1 + (c + doc) % 3).collect();
            masks.push(
                std::iter::repeat_n(false, context.len())
                    .chain(std::iter::repeat_n(true, continuation.len()))
                    .collect(),
            );
            seqs.push([context.clone(), continuation].concat());
        }
    }
    (seqs, masks, choices)
}

#[test]
fn choice_teacher_is_each_docs_softmax_of_its_choices_summed_log_probs() {
    let arch = tiny_arch();
    let model = Model::load(&random_source(&arch, 24), &Device::Cpu).unwrap();
    let (seqs, masks, choices) = choice_data(&arch, 5);
    let batch = TrainBatch::from_choice_sequences(&seqs, &masks, &choices, 0, &Device::Cpu)
        .unwrap()
        .with_choice_teacher(&model)
        .unwrap();
    let teacher = batch.choices.as_ref().unwrap().teacher_log_probs.as_ref();
    let teacher = teacher.unwrap().to_vec1::<f32>().unwrap();
    // independently: each sequence alone (no padding), its targets' log-probs summed in
    // f64, then a log-softmax per doc
    let ones = model.scales(&ScaleValues::ones(arch.n_layer)).unwrap();
    let sums: Vec<f64> = seqs
        .iter()
        .zip(&masks)
        .map(|(seq, mask)| {
            let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0);
            let hidden = model
                .forward_hidden_no_grad(&ids.unwrap(), &ones, &[false; 3])
                .unwrap();
            let all: Vec<u32> = (0..seq.len() as u32).collect();
            let all = Tensor::new(all.as_slice(), &Device::Cpu).unwrap();
            let logits = model.logits_at(&hidden, &all).unwrap();
            let log_p = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
            let log_p = log_p.to_vec2::<f32>().unwrap();
            (1..seq.len())
                .filter(|&j| mask[j])
                .map(|j| log_p[j - 1][seq[j] as usize] as f64)
                .sum()
        })
        .collect();
    let mut expected = Vec::new();
    let mut row = 0;
    for &n in &choices {
        let doc = &sums[row..row + n];
        let lse = doc.iter().map(|x| x.exp()).sum::<f64>().ln();
        expected.extend(doc.iter().map(|x| x - lse));
        row += n;
    }
    assert_eq!(teacher.len(), expected.len());
    for (t, e) in teacher.iter().zip(&expected) {
        assert!(
            (*t as f64 - e).abs() < 1e-4,
            "teacher {teacher:?}, expected {expected:?}"
        );
    }
    // each doc's choice probabilities add up to 1, and they are not all alike
    let p: Vec<f64> = teacher.iter().map(|&t| (t as f64).exp()).collect();
    assert!((p[..3].iter().sum::<f64>() - 1.0).abs() < 1e-5);
    assert!((p[3..].iter().sum::<f64>() - 1.0).abs() < 1e-5);
    assert!((p[0] - p[1]).abs() > 1e-3);
}

#[test]
fn training_lowers_the_choice_loss_of_a_skipped_model() {
    let arch = tiny_arch();
    let model = Model::load(&random_source(&arch, 25), &Device::Cpu).unwrap();
    let batches: Vec<TrainBatch> = [6, 7]
        .iter()
        .map(|&seed| {
            let (seqs, masks, choices) = choice_data(&arch, seed);
            TrainBatch::from_choice_sequences(&seqs, &masks, &choices, 0, &Device::Cpu)
                .unwrap()
                .with_choice_teacher(&model)
                .unwrap()
        })
        .collect();
    let ones = ScaleValues::ones(arch.n_layer);
    let none = SkipMask::none(arch.n_layer);
    let full = eval_loss(&model, &batches, none.as_slice(), &ones, Objective::Choice).unwrap();
    assert!(
        full.abs() < 1e-5,
        "choice KL of the original to itself is {full}"
    );
    let skip = SkipMask::from_layers(arch.n_layer, &[1]).unwrap();
    let before = eval_loss(&model, &batches, skip.as_slice(), &ones, Objective::Choice).unwrap();
    let result = train_scales(
        &model,
        &batches,
        skip.as_slice(),
        Objective::Choice,
        40,
        5e-2,
        3,
    )
    .unwrap();
    let after = eval_loss(
        &model,
        &batches,
        skip.as_slice(),
        &result.scales,
        Objective::Choice,
    )
    .unwrap();
    assert!(
        before > 1e-4 && after < 0.5 * before,
        "choice KL {before} skipped, {after} trained"
    );
    assert_eq!(result.scales.b_att[1], 1.0);
}

/// The gradients of `vars` after a backward pass from `loss`.
fn grads_of(loss: &Tensor, vars: &[Var]) -> Vec<Vec<f32>> {
    let grads = loss.backward().unwrap();
    vars.iter()
        .map(|v| {
            let g = grads.get(v).expect("every variable gets a gradient");
            g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        })
        .collect()
}

#[test]
fn a_batch_trained_in_parts_has_the_whole_batchs_loss_and_gradients() {
    let arch = tiny_arch();
    let model = Model::load(&random_source(&arch, 26), &Device::Cpu).unwrap();
    let ids = random_ids(&arch, 1, 80, 9)
        .to_vec2::<u32>()
        .unwrap()
        .remove(0);
    // rows that begin with the same 3 tokens (each part computes them once), of different
    // lengths (padding), one whose targets stop before its end (the part is cut after its last
    // target), one without targets in a part with others, and a last part of one row without
    // targets (no part)
    let lengths = [7, 12, 4, 9, 6, 10, 5, 8, 6];
    let mut take = ids.into_iter();
    let prefix: Vec<u32> = take.by_ref().take(3).collect();
    let seqs: Vec<Vec<u32>> = lengths
        .iter()
        .map(|&n| [&prefix[..], &take.by_ref().take(n - 3).collect::<Vec<_>>()].concat())
        .collect();
    let masks: Vec<Vec<bool>> = lengths
        .iter()
        .enumerate()
        .map(|(i, &n)| match i {
            1 => (0..n).map(|j| (3..8).contains(&j)).collect(),
            2 | 8 => vec![false; n],
            3 => (0..n).map(|j| j % 2 == 1).collect(),
            _ => (0..n).map(|j| j >= 2).collect(),
        })
        .collect();
    assert_eq!(lengths.len().div_ceil(PART_ROWS), 3);
    let plain = TrainBatch::from_sequences(&seqs, &masks, 0, &Device::Cpu).unwrap();
    let (cseqs, cmasks, choices) = choice_data(&arch, 8);
    let choice = TrainBatch::from_choice_sequences(&cseqs, &cmasks, &choices, 0, &Device::Cpu)
        .unwrap()
        .with_choice_teacher(&model)
        .unwrap();
    let cases = [
        (
            "kl top-k",
            plain.clone().with_teacher(&model, 5).unwrap(),
            Objective::Kl,
        ),
        (
            "kl full",
            plain.clone().with_teacher(&model, usize::MAX).unwrap(),
            Objective::Kl,
        ),
        ("ce", plain, Objective::Ce),
        ("choice", choice, Objective::Choice),
    ];
    let skip = SkipMask::from_layers(arch.n_layer, &[1]).unwrap();
    let mut values = ScaleValues::ones(arch.n_layer);
    values.b_att[2] = 1.3;
    values.s_mlp[0] = 0.8;
    let scales = model.scales(&values).unwrap();
    let vars = scales.vars();
    for (name, batch, objective) in cases {
        let parts = batch.parts(objective).unwrap();
        let expected_parts = match objective {
            Objective::Choice => choices.len(),
            _ => 2,
        };
        assert_eq!(parts.len(), expected_parts, "{name}");
        let hidden = model
            .forward_hidden(&batch.input_ids, &scales, skip.as_slice())
            .unwrap();
        let loss = hidden_loss(&model, &batch, 0, &hidden, objective).unwrap();
        let whole = loss.to_scalar::<f32>().unwrap() as f64;
        let whole_grads = grads_of(&loss, &vars);
        let (value, store) = part_gradients(
            &model,
            &parts,
            0,
            &scales,
            skip.as_slice(),
            objective,
            &vars,
        )
        .unwrap();
        assert!(whole > 1e-3, "{name}: a loss to compare ({whole})");
        assert!(
            (value - whole).abs() < 1e-5 * whole.max(1.0),
            "{name}: {value} against {whole}"
        );
        for (v, expected) in vars.iter().zip(&whole_grads) {
            let got = store
                .get(v)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(got.len(), expected.len());
            let scale = expected.iter().fold(1e-3f32, |m, g| m.max(g.abs()));
            for (g, e) in got.iter().zip(expected) {
                assert!(
                    (g - e).abs() < 1e-4 * scale,
                    "{name}: gradient {g} against {e}"
                );
            }
        }
    }
}

#[test]
fn bad_choice_batches_are_errors() {
    let arch = tiny_arch();
    let model = Model::load(&random_source(&arch, 26), &Device::Cpu).unwrap();
    let (seqs, masks, _) = choice_data(&arch, 8);
    let build = |choices: &[usize]| {
        TrainBatch::from_choice_sequences(&seqs, &masks, choices, 0, &Device::Cpu)
    };
    assert!(matches!(
        build(&[3, 3]),
        Err(TrainError::ChoiceRows {
            rows: 5,
            choices: 6
        })
    ));
    assert!(matches!(build(&[5, 0]), Err(TrainError::ChoiceRows { .. })));
    let mut no_target = masks.clone();
    no_target[1] = vec![false; no_target[1].len()];
    assert!(matches!(
        TrainBatch::from_choice_sequences(&seqs, &no_target, &[3, 2], 0, &Device::Cpu),
        Err(TrainError::ChoiceWithoutTargets { row: 1 })
    ));
    let skip = vec![false; arch.n_layer];
    // groups without a teacher, and a batch without groups
    let untaught = vec![build(&[3, 2]).unwrap()];
    let plain = self_generated_batches(&model, 1, 2, 6);
    for batches in [untaught, plain] {
        assert!(matches!(
            train_scales(&model, &batches, &skip, Objective::Choice, 1, 1e-2, 0),
            Err(TrainError::MissingChoices { batch: 0 })
        ));
    }
    assert!(matches!(
        TrainBatch::from_sequences(&seqs, &masks, 0, &Device::Cpu)
            .unwrap()
            .with_choice_teacher(&model),
        Err(TrainError::MissingChoices { .. })
    ));
}

/// One training step (forward, backward, Adam) at batch 8 x 128 on the tiny model, or on a
/// SmolLM-135M-shaped random model with `HOPSCOTCH_BENCH_SMOLLM=1`.
#[test]
#[ignore = "benchmark: cargo test --release --lib bench_train_step -- --ignored --nocapture"]
fn bench_train_step() {
    let arch = if std::env::var_os("HOPSCOTCH_BENCH_SMOLLM").is_some() {
        Arch {
            n_layer: 30,
            n_embd: 576,
            n_ff: 1536,
            n_head: 9,
            n_head_kv: 3,
            head_dim: 64,
            vocab_size: 49152,
            tie_word_embeddings: true,
            ..tiny_arch()
        }
    } else {
        tiny_arch()
    };
    let model = Model::load(&random_source(&arch, 24), &Device::Cpu).unwrap();
    let (b, t) = (8, 128);
    let ids = random_ids(&arch, b, t, 25);
    let positions: Vec<u32> = (0..(b * t) as u32).filter(|p| p % t as u32 >= 64).collect();
    let n = positions.len();
    let targets = random_ids(&arch, 1, n, 26).flatten_all().unwrap();
    let batch =
        TrainBatch::new(ids, Tensor::new(positions, &Device::Cpu).unwrap(), targets).unwrap();
    let skip = SkipMask::from_layers(arch.n_layer, &[1]).unwrap();
    let batches = [batch];
    let _ = train_scales(&model, &batches, skip.as_slice(), Objective::Ce, 1, 1e-2, 0);
    let steps = 3;
    let start = Instant::now();
    train_scales(
        &model,
        &batches,
        skip.as_slice(),
        Objective::Ce,
        steps,
        1e-2,
        0,
    )
    .unwrap();
    let per_step = start.elapsed().as_secs_f64() / steps as f64;
    let start = Instant::now();
    eval_loss(
        &model,
        &batches,
        skip.as_slice(),
        &ScaleValues::ones(arch.n_layer),
        Objective::Ce,
    )
    .unwrap();
    let forward = start.elapsed().as_secs_f64();
    eprintln!(
        "{} layers x {} wide, batch {b} x {t}: train step {:.1} ms ({:.0} tokens/s), forward only {:.1} ms",
        arch.n_layer,
        arch.n_embd,
        per_step * 1e3,
        (b * t) as f64 / per_step,
        forward * 1e3
    );
}

//! Tests of the search, the final training and the stand-ins in them.

use candle_core::Device;
use rand::Rng;

use super::*;
use crate::arch::Arch;
use crate::fit::final_training::train_final;
use crate::fit::linear;
use crate::model::tests::{random_source, tiny_arch};
use crate::plan::DEFAULT_FINAL_EPOCHS;
use crate::progress::Progress;

/// A 5-layer random model whose layer `dead` has a zero attention output projection (its
/// attention block adds nothing), batches of random tokens with their teacher, the final
/// norm's weight.
fn dead_block_setup(dead: usize) -> (Model, Vec<TrainBatch>, Vec<Vec<usize>>, Vec<f32>) {
    layered_setup(5, dead)
}

/// [`dead_block_setup`] with `n_layer` layers.
fn layered_setup(
    n_layer: usize,
    dead: usize,
) -> (Model, Vec<TrainBatch>, Vec<Vec<usize>>, Vec<f32>) {
    let arch = Arch {
        n_layer,
        ..tiny_arch()
    };
    let mut source = random_source(&arch, 31);
    if let Some((_, w)) = source
        .tensors
        .get_mut(&format!("blk.{dead}.attn_output.weight"))
    {
        w.iter_mut().for_each(|x| *x = 0.0);
    }
    let model = Model::load(&source, &Device::Cpu).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let mut batches = Vec::new();
    let mut lengths = Vec::new();
    for _ in 0..3 {
        let lens: Vec<usize> = (0..4).map(|_| rng.gen_range(6..12)).collect();
        let seqs: Vec<Vec<u32>> = lens
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|_| rng.gen_range(0..arch.vocab_size as u32))
                    .collect()
            })
            .collect();
        let masks: Vec<Vec<bool>> = lens
            .iter()
            .map(|&n| (0..n).map(|j| j >= 2).collect())
            .collect();
        let b = TrainBatch::from_sequences(&seqs, &masks, 0, &Device::Cpu)
            .unwrap()
            .with_teacher(&model, 16)
            .unwrap();
        batches.push(b);
        lengths.push(lens);
    }
    let norm = source.tensors["output_norm.weight"].1.clone();
    (model, batches, lengths, norm)
}

/// The search input of a test's model and batches, without stand-ins.
fn search_input<'a>(
    model: &'a Model,
    batches: &'a [TrainBatch],
    lengths: &'a [Vec<usize>],
) -> SearchInput<'a> {
    SearchInput {
        model,
        batches,
        lengths,
        stand_ins: &[],
    }
}

/// The search's settings for `skip` blocks, the plain skip (the stand-ins' tests ask for them).
fn options(skip: usize) -> FitSettings {
    FitSettings {
        skip,
        shortlist: 2,
        teacher_top_k: 16,
        linear_attention: false,
        ..FitSettings::default()
    }
}

#[test]
fn cached_skip_loss_screening_equals_the_full_forward_loss() {
    let (model, batches, _, _) = dead_block_setup(3);
    let n_layer = model.arch().n_layer;
    let chosen = [2];
    let candidates = [1, 3, 4];
    let start = ScaleValues::ones(n_layer);
    let scores = screen_candidates(
        &model,
        &batches,
        &chosen,
        &candidates,
        Objective::Kl,
        &start,
        &mut || {},
    )
    .unwrap();
    for (&layer, &score) in candidates.iter().zip(&scores) {
        let skip = SkipMask::from_layers(n_layer, &[2, layer]).unwrap();
        let full = eval_loss(&model, &batches, skip.as_slice(), &start, Objective::Kl).unwrap();
        assert_eq!(score, full, "candidate {layer}");
    }
}

#[test]
fn the_search_skips_a_block_that_adds_nothing_first() {
    let (model, batches, lengths, _) = dead_block_setup(3);
    let input = search_input(&model, &batches, &lengths);
    for exhaustive in [true, false] {
        let o = FitSettings {
            exhaustive,
            ..options(2)
        };
        let (choice, stats) =
            choose(&input, &o, Vec::new(), &mut |_| Ok(()), &Progress::hidden()).unwrap();
        assert_eq!(choice.skipped[0], 3, "exhaustive {exhaustive}");
        assert_eq!(choice.rounds.len(), 2);
        let r0 = &choice.rounds[0];
        assert!(
            r0.loss.abs() < 1e-3,
            "KL after skipping a dead block: {}",
            r0.loss
        );
        assert!(r0.candidates.iter().all(|c| c.layer != 0));
        let trained = r0
            .candidates
            .iter()
            .filter(|c| c.trained_loss.is_some())
            .count();
        assert_eq!(trained, if exhaustive { 4 } else { 2 });
        assert!(stats.steps > 0);
    }
    let cos = FitSettings {
        method: Method::AttnCosine,
        screen_batches: 3,
        ..options(1)
    };
    let (choice, _) = choose(
        &input,
        &cos,
        Vec::new(),
        &mut |_| Ok(()),
        &Progress::hidden(),
    )
    .unwrap();
    assert_eq!(choice.skipped, vec![3]);
    let importance = choice.attn_importance.unwrap();
    assert!(importance[3].abs() < 1e-6, "{importance:?}");
    assert!(
        importance
            .iter()
            .enumerate()
            .all(|(l, &v)| l == 3 || v > 1e-4),
        "{importance:?}"
    );
}

/// LLM-Drop's importance as the model's normed output shows it: every layer from `l` on made
/// the identity but for `l`'s attention, the final norm's weight divided out (two full
/// passes per layer), the way it was computed before the model exposed its residuals.
fn importance_through_the_final_norm(input: &SearchInput<'_>, norm: &[f32]) -> Vec<f64> {
    let model = input.model;
    let (n_layer, d) = (model.arch().n_layer, model.arch().n_embd);
    let inv_w: Vec<f32> = norm.iter().map(|&w| 1.0 / w).collect();
    let inv_w = Tensor::from_vec(inv_w, d, &Device::Cpu).unwrap();
    let mut sums = vec![0f64; n_layer];
    let mut count = 0;
    for (batch, lengths) in input.batches.iter().zip(input.lengths) {
        let t = batch.input_ids.dims2().unwrap().1;
        let real: Vec<u32> = lengths
            .iter()
            .enumerate()
            .flat_map(|(row, &len)| (0..len).map(move |j| (row * t + j) as u32))
            .collect();
        let real = Tensor::new(real.as_slice(), &Device::Cpu).unwrap();
        let residual = |layer: usize, with_attention: bool| {
            let mut values = ScaleValues::ones(n_layer);
            values.b_mlp[layer..].fill(0.0);
            let mut skip = vec![false; n_layer];
            skip[layer..].fill(true);
            skip[layer] = !with_attention;
            let scales = model.scales(&values).unwrap();
            let h = model
                .forward_hidden_no_grad(&batch.input_ids, &scales, &skip)
                .unwrap();
            let h = h.reshape(((), d)).unwrap().index_select(&real, 0).unwrap();
            let h = h.broadcast_mul(&inv_w).unwrap();
            h.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
        };
        for (layer, sum) in sums.iter_mut().enumerate() {
            let (x, y) = (residual(layer, false), residual(layer, true));
            for (a, b) in x.iter().zip(&y) {
                let dot: f64 = a.iter().zip(b).map(|(p, q)| p * q).sum();
                let na: f64 = a.iter().map(|p| p * p).sum();
                let nb: f64 = b.iter().map(|q| q * q).sum();
                *sum += dot / (na * nb).sqrt();
            }
        }
        count += lengths.iter().sum::<usize>();
    }
    sums.iter().map(|s| 1.0 - s / count as f64).collect()
}

#[test]
fn attention_importance_in_one_pass_equals_the_definition_through_the_final_norm() {
    let (model, batches, lengths, norm) = layered_setup(6, 4);
    let input = search_input(&model, &batches, &lengths);
    let all: Vec<usize> = (0..batches.len()).collect();
    let ours = attn_importance(&input, &all).unwrap();
    let reference = importance_through_the_final_norm(&input, &norm);
    assert_eq!(ours.len(), reference.len());
    for (l, (&a, &b)) in ours.iter().zip(&reference).enumerate() {
        assert!(
            (f64::from(a) - b).abs() < 1e-6,
            "layer {l}: {a} against {b}"
        );
    }
    // the layers differ, so the comparison says something
    assert!(ours.iter().any(|&v| v > 1e-3), "{ours:?}");
}

#[test]
fn rescreening_screens_the_best_of_the_latest_screening_only() {
    let (model, batches, lengths, _) = layered_setup(8, 5);
    let input = search_input(&model, &batches, &lengths);
    let hidden = Progress::hidden();
    let run = |rescreen| {
        let o = FitSettings {
            rescreen,
            ..options(3)
        };
        choose(&input, &o, Vec::new(), &mut |_| Ok(()), &hidden).unwrap()
    };
    let (all, all_stats) = run(0);
    let (re, re_stats) = run(3);
    assert_eq!(all_stats.screened, 7 + 6 + 5);
    assert_eq!(re_stats.screened, 7 + 3 + 3);
    let screened = |r: &Round| -> Vec<(usize, f32)> {
        r.candidates
            .iter()
            .filter_map(|c| c.screen.map(|s| (c.layer, s)))
            .collect()
    };
    assert_eq!(screened(&re.rounds[0]).len(), 7);
    for round in 1..3 {
        let now = screened(&re.rounds[round]);
        assert_eq!(now.len(), 3, "round {}", round + 1);
        // The three are the best of the previous round's screening, the winners aside,
        // topped up by the best of the round before.
        let chosen = &re.skipped[..round];
        let mut best: Vec<usize> = Vec::new();
        for earlier in (0..round).rev() {
            let mut before = screened(&re.rounds[earlier]);
            before.retain(|(l, _)| !chosen.contains(l) && !best.contains(l));
            before.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
            best.extend(before.iter().map(|&(l, _)| l).take(3 - best.len()));
        }
        best.sort_unstable();
        let layers: Vec<usize> = now.iter().map(|&(l, _)| l).collect();
        assert_eq!(layers, best, "round {}", round + 1);
        // While both searches have chosen alike, a rescreened candidate scores as in the
        // search that screens every candidate.
        if re.skipped[..round] == all.skipped[..round] {
            let full = screened(&all.rounds[round]);
            for (layer, score) in now {
                assert!(
                    full.contains(&(layer, score)),
                    "round {}, layer {layer}",
                    round + 1
                );
            }
        }
    }
    assert_eq!(re.skipped[0], all.skipped[0]);
    let refused = FitSettings {
        rescreen: 1,
        ..options(3)
    };
    assert!(refused.validate().is_err());
}

#[test]
fn a_resumed_search_ends_where_the_whole_one_does() {
    let (model, batches, lengths, _) = dead_block_setup(3);
    let input = search_input(&model, &batches, &lengths);
    let o = FitSettings {
        shortlist: 1,
        ..options(3)
    };
    let hidden = Progress::hidden();
    let mut saved = Vec::new();
    let (whole, _) = choose(
        &input,
        &o,
        Vec::new(),
        &mut |r| {
            saved.push(r.to_vec());
            Ok(())
        },
        &hidden,
    )
    .unwrap();
    assert_eq!(saved.len(), 3);
    let (resumed, _) = choose(&input, &o, saved[0].clone(), &mut |_| Ok(()), &hidden).unwrap();
    assert_eq!(whole, resumed);
}

#[test]
fn random_and_untrained_fits_are_seeded_and_keep_layer_0() {
    let (model, batches, lengths, _) = dead_block_setup(3);
    let input = search_input(&model, &batches, &lengths);
    let random = FitSettings {
        method: Method::Random,
        seed: 9,
        ..options(4)
    };
    let (a, _) = choose(
        &input,
        &random,
        Vec::new(),
        &mut |_| Ok(()),
        &Progress::hidden(),
    )
    .unwrap();
    let (b, _) = choose(
        &input,
        &random,
        Vec::new(),
        &mut |_| Ok(()),
        &Progress::hidden(),
    )
    .unwrap();
    assert_eq!(a, b);
    let mut sorted = a.skipped.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![1, 2, 3, 4]);
    let untrained = FitSettings {
        train_scales: false,
        ..options(1)
    };
    let (choice, stats) = choose(
        &input,
        &untrained,
        Vec::new(),
        &mut |_| Ok(()),
        &Progress::hidden(),
    )
    .unwrap();
    assert_eq!(choice.skipped, vec![3]);
    assert_eq!(stats.steps, 0);
    let (last, _) = train_final(&input, &untrained, &choice.skipped, &Progress::hidden()).unwrap();
    assert_eq!(last.scales, ScaleValues::ones(5));
    assert!(last.loss_history.is_empty());
}

#[test]
fn the_screen_replaces_each_candidate_by_its_stand_in() {
    let (model, batches, lengths, _) = dead_block_setup(3);
    let layers = [1, 2, 3, 4];
    let stand_ins = linear::fit(&model, &batches, &lengths, &layers)
        .unwrap()
        .stand_ins;
    // the dead block adds nothing, so its stand-in is zero
    assert!(stand_ins[2].weight.iter().all(|&x| x == 0.0));
    assert!(stand_ins[0].weight.iter().any(|&x| x != 0.0));
    let ones = ScaleValues::ones(5);
    let base = ScaleValues {
        linear: stand_ins,
        ..ones.clone()
    };
    let o = options(2);
    let screen = |start: &ScaleValues| {
        screen_candidates(
            &model,
            &batches,
            &[],
            &layers,
            o.objective,
            start,
            &mut || {},
        )
        .unwrap()
    };
    let (with, without) = (screen(&base), screen(&ones));
    for (i, &l) in layers.iter().enumerate() {
        let skip = SkipMask::from_layers(5, &[l]).unwrap();
        let full = eval_loss(&model, &batches, skip.as_slice(), &base, o.objective).unwrap();
        assert!(
            (with[i] - full).abs() <= 1e-5,
            "layer {l}: {} != {full}",
            with[i]
        );
    }
    assert_eq!(with[2], without[2]);
    let live = |v: &[f32]| v[0] + v[1] + v[3];
    assert!(live(&with) < live(&without), "{with:?} vs {without:?}");
}

#[test]
fn linear_stand_ins_are_fitted_for_the_chosen_blocks_and_lower_the_loss() {
    let (model, batches, lengths, _) = dead_block_setup(3);
    let input = search_input(&model, &batches, &lengths);
    let n_embd = model.arch().n_embd;
    let skip_only = FitSettings {
        final_steps: Some(0),
        linear_attention: false,
        ..options(2)
    };
    let stand_ins = FitSettings {
        linear_attention: true,
        ..skip_only.clone()
    };
    let skipped = [2, 1];
    let (a, _) = train_final(&input, &skip_only, &skipped, &Progress::hidden()).unwrap();
    let (b, _) = train_final(&input, &stand_ins, &skipped, &Progress::hidden()).unwrap();
    assert!(a.scales.linear.is_empty());
    let layers: Vec<usize> = b.scales.linear.iter().map(|s| s.layer).collect();
    assert_eq!(layers, vec![2, 1]);
    assert!(b
        .scales
        .linear
        .iter()
        .all(|s| s.weight.len() == n_embd * n_embd));
    assert!(
        b.loss_untrained < a.loss_untrained,
        "{} !< {}",
        b.loss_untrained,
        a.loss_untrained
    );
    // trained on top of the stand-ins, the scalars lower the loss further and keep them
    let trained = FitSettings {
        final_steps: Some(24),
        final_lr: 1e-2,
        ..stand_ins.clone()
    };
    let (c, _) = train_final(&input, &trained, &skipped, &Progress::hidden()).unwrap();
    assert_eq!(c.scales.linear, b.scales.linear);
    assert!(c.loss < b.loss, "{} !< {}", c.loss, b.loss);
    assert!(stand_ins.recorded(2, 2).linear_attention);
}

#[test]
fn derived_seeds_differ_by_stream_and_repeat() {
    assert_eq!(derive_seed(1, 2), derive_seed(1, 2));
    assert_ne!(derive_seed(1, 2), derive_seed(1, 3));
    assert_ne!(derive_seed(1, 2), derive_seed(2, 2));
}

#[test]
fn ranking_breaks_ties_by_layer() {
    assert_eq!(ranked(&[5, 3, 9], &[0.5, 0.5, 0.1]), vec![9, 3, 5]);
}

#[test]
fn screen_subset_is_seeded_and_sorted() {
    let a = screen_subset(10, 3, 4);
    assert_eq!(a, screen_subset(10, 3, 4));
    assert_eq!(a.len(), 3);
    assert!(a.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(screen_subset(2, 5, 4), vec![0, 1]);
}

#[test]
fn bad_settings_are_refused() {
    let ok = FitSettings::default();
    assert!(ok.validate().is_ok());
    for bad in [
        FitSettings {
            skip: 0,
            ..ok.clone()
        },
        FitSettings {
            lr: -1.0,
            ..ok.clone()
        },
        FitSettings {
            final_lr: f64::NAN,
            ..ok.clone()
        },
        FitSettings {
            batch_size: 0,
            ..ok.clone()
        },
        FitSettings {
            max_seq_len: 1,
            ..ok.clone()
        },
        FitSettings {
            shortlist: 0,
            ..ok.clone()
        },
        FitSettings {
            final_docs: Some(ok.fit_docs - 1),
            ..ok.clone()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    let more = FitSettings {
        final_docs: Some(ok.fit_docs * 4),
        ..ok.clone()
    };
    assert!(more.validate().is_ok());
    assert_eq!(more.resolved_final_docs(), ok.fit_docs * 4);
    assert_eq!(ok.resolved_final_docs(), ok.fit_docs);
    // steps of the final training count its own batches; without scalars there is none
    assert_eq!(
        more.recorded(2, 8).final_steps,
        Some(DEFAULT_FINAL_EPOCHS * 8)
    );
    assert_eq!(more.recorded(2, 8).final_docs, Some(ok.fit_docs * 4));
    let none = FitSettings {
        train_scales: false,
        linear_attention: false,
        ..more.clone()
    };
    assert_eq!(none.recorded(2, 8).final_docs, None);
    assert_eq!(none.recorded(2, 8).final_steps, Some(0));
    // untrained scalars, but stand-ins fitted on the final documents, which are recorded
    let stand_ins = FitSettings {
        linear_attention: true,
        ..none
    };
    assert_eq!(stand_ins.recorded(2, 8).final_docs, Some(ok.fit_docs * 4));
    assert_eq!(stand_ins.recorded(2, 8).final_steps, Some(0));
}

#[test]
fn stand_ins_do_not_depend_on_how_the_layers_are_grouped() {
    // one layer per pass over the documents (each pass going on from the stream the last one
    // left), two per pass, or all in one with the batches side by side: the same sums in the
    // same order, so the same stand-ins bit for bit, in the order the layers were asked for
    let (model, batches, lengths, _) = dead_block_setup(3);
    let layers = [4, 1, 2];
    let fitted = |side_by_side: usize, per_pass: usize| {
        let sizing = linear::Sizing {
            batches: side_by_side,
            layers: per_pass,
        };
        linear::fit_sized(&model, &batches, &lengths, &layers, sizing).unwrap()
    };
    let whole = fitted(3, 3);
    let asked: Vec<usize> = whole.stand_ins.iter().map(|s| s.layer).collect();
    assert_eq!(asked, layers);
    for (side_by_side, per_pass) in [(1, 1), (1, 2), (2, 1)] {
        let grouped = fitted(side_by_side, per_pass);
        assert_eq!(grouped.ridges, whole.ridges, "{per_pass} a pass");
        for (a, b) in grouped.stand_ins.iter().zip(&whole.stand_ins) {
            assert_eq!(a.layer, b.layer);
            assert!(a.weight == b.weight, "layer {}, {per_pass} a pass", a.layer);
        }
    }
    // a layer asked for twice is refused, naming it
    let twice = linear::fit(&model, &batches, &lengths, &[1, 2, 1]).unwrap_err();
    assert_eq!(twice.to_string(), "layer 1 is asked for more than once");
}

#[test]
fn stand_ins_do_not_depend_on_how_the_documents_are_batched() {
    // twelve documents sharing a 5-token prefix, in 3 batches of 4, 4 of 3 and 12 of 1 (the
    // same order): the halves go by document and a batch's shared prefix counts once per row,
    // so the sums, the ridge and the stand-ins are the same
    let (model, _, _, _) = dead_block_setup(3);
    let mut rng = StdRng::seed_from_u64(8);
    let vocab = model.arch().vocab_size as u32;
    let prefix: Vec<u32> = (0..5).map(|_| rng.gen_range(0..vocab)).collect();
    let docs: Vec<Vec<u32>> = (0..12)
        .map(|_| {
            let own = rng.gen_range(3..7);
            let mut seq = prefix.clone();
            seq.extend((0..own).map(|_| rng.gen_range(0..vocab)));
            seq
        })
        .collect();
    let batched = |per: usize| {
        let (mut batches, mut lengths) = (Vec::new(), Vec::new());
        for chunk in docs.chunks(per) {
            let masks: Vec<Vec<bool>> = chunk
                .iter()
                .map(|s| (0..s.len()).map(|j| j > 0).collect())
                .collect();
            batches.push(TrainBatch::from_sequences(chunk, &masks, 0, &Device::Cpu).unwrap());
            lengths.push(chunk.iter().map(Vec::len).collect::<Vec<_>>());
        }
        linear::fit(&model, &batches, &lengths, &[1, 2, 4])
            .unwrap()
            .stand_ins
    };
    // batches of one row hold their prefix as their own rows; the others share it once
    let (fours, threes, ones) = (batched(4), batched(3), batched(1));
    for (a, b) in fours.iter().zip(&threes).chain(fours.iter().zip(&ones)) {
        assert_eq!(a.layer, b.layer);
        let worst = a
            .weight
            .iter()
            .zip(b.weight.iter())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1e-4, "layer {}: {worst}", a.layer);
    }
}

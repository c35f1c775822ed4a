//! Importance matrices computed by the model: the statistics against sums computed
//! independently of the model's forward.

use candle_core::{Device, Tensor};

use super::compute;
use crate::checkpoint::TensorSource;
use crate::fit::batch::TrainBatch;
use crate::gguf::imatrix::Imatrix;
use crate::model::tests::{random_source, tiny_arch};
use crate::model::Model;
use crate::plan::ScaleValues;

/// Sums of squares of every weight input, `sums[name]`, and the token count, for one batch.
fn stats(model: &Model, scales: &ScaleValues, skip: &[bool], rows: &[Vec<u32>]) -> Imatrix {
    // every token but the first is a target (the first predicts nothing)
    let masks: Vec<Vec<bool>> = rows
        .iter()
        .map(|r| (0..r.len()).map(|i| i > 0).collect())
        .collect();
    let batch = TrainBatch::from_sequences(rows, &masks, 0, &Device::Cpu).unwrap();
    let lengths = vec![rows.iter().map(Vec::len).collect()];
    compute(model, scales, skip, &[batch], &lengths).unwrap()
}

#[test]
fn statistics_sum_the_squared_inputs_over_real_tokens_only() {
    let arch = tiny_arch(); // untied: output.weight gets an entry
    let source = random_source(&arch, 21);
    let model = Model::load(&source, &Device::Cpu).unwrap();
    let n = arch.n_layer;
    let mut scales = ScaleValues::ones(n);
    scales.b_att = vec![1.1, 0.9, 1.2];
    scales.s_mlp = vec![0.8, 1.05, 1.3];
    let skip = vec![false, true, false];
    let a: Vec<u32> = (0..9).map(|i| (i * 7 + 3) % 97).collect();
    let b: Vec<u32> = (0..5).map(|i| (i * 11 + 5) % 97).collect();

    let both = stats(&model, &scales, &skip, &[a.clone(), b.clone()]);
    let (only_a, only_b) = (
        stats(&model, &scales, &skip, std::slice::from_ref(&a)),
        stats(&model, &scales, &skip, std::slice::from_ref(&b)),
    );
    // 3 layers x 7 matrices, no attention in the skipped layer 1, plus the LM head
    assert_eq!(both.entries.len(), 3 * 7 - 4 + 1);
    assert!(!both.entries.contains_key("blk.1.attn_q.weight"));
    assert!(both.entries.contains_key("blk.1.ffn_down.weight"));
    for (name, e) in &both.entries {
        assert_eq!(e.counts, vec![14.0], "{name}");
        // padding (b is 4 tokens short) adds nothing: the batch is the sum of its rows
        let sep = &only_a.entries[name].sums;
        for ((x, ya), yb) in e.sums.iter().zip(sep).zip(&only_b.entries[name].sums) {
            assert!((x - (ya + yb)).abs() <= 1e-4 * x.abs().max(1.0), "{name}");
        }
    }

    // layer 0's q/k/v input by hand: RMSNorm of the embeddings times the norm weight
    let (_, embd) = source.tensor_f32("token_embd.weight").unwrap();
    let (_, norm) = source.tensor_f32("blk.0.attn_norm.weight").unwrap();
    let d = arch.n_embd;
    let mut want = vec![0f64; d];
    for &tok in a.iter().chain(&b) {
        let row = &embd[tok as usize * d..(tok as usize + 1) * d];
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
        let r = 1.0 / (ms + arch.rms_norm_eps).sqrt();
        for j in 0..d {
            want[j] += (row[j] as f64 * r * norm[j] as f64).powi(2);
        }
    }
    for name in ["attn_q", "attn_k", "attn_v"] {
        let got = &both.entries[&format!("blk.0.{name}.weight")].sums;
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (*g as f64 - w).abs() <= 1e-4 * w.max(1.0),
                "{name}: {g} vs {w}"
            );
        }
    }

    // the LM head's input is the hidden state the model returns
    let ids = Tensor::new(a.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let sc = model.scales(&scales).unwrap();
    let hidden = model.forward_hidden_no_grad(&ids, &sc, &skip).unwrap();
    let want: Vec<f32> = hidden
        .squeeze(0)
        .unwrap()
        .sqr()
        .unwrap()
        .sum(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let got = &only_a.entries["output.weight"].sums;
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-5 * w.max(1.0), "{g} vs {w}");
    }

    // other scalars change the statistics downstream of layer 0's attention
    let plain = stats(
        &model,
        &ScaleValues::ones(n),
        &skip,
        std::slice::from_ref(&a),
    );
    assert_eq!(
        plain.entries["blk.0.attn_q.weight"],
        only_a.entries["blk.0.attn_q.weight"]
    );
    assert_ne!(
        plain.entries["blk.2.attn_q.weight"],
        only_a.entries["blk.2.attn_q.weight"]
    );
}

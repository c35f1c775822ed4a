//! Linear stand-ins for skipped attention blocks, fitted by least squares (beyond the paper).
//!
//! llama.cpp's `deci` runs a layer with heads but no KV heads as "linear attention":
//! `x1 = x + W · RMSNorm(x)`, one `n_embd x n_embd` matrix applied to each token alone, with no
//! KV cache (Nemotron-51B replaces some attention blocks so). A skipped block can have such a
//! stand-in instead of nothing: the part of what the block computed that depends on the token
//! itself (attention to the current token, the near-constant output of heads that rest on the
//! first token) survives, the mixing of other positions is gone, and the KV cache falls as
//! much as when the block is skipped.
//!
//! For every layer asked for, `W` minimises `Σ ||W h - a||² + λ ||W||²` over the task's tokens,
//! `h` the normed stream entering the layer's attention and `a` the block's output, both taken
//! from the original model (nothing skipped, every scalar 1) in one forward pass: the normal
//! equations `W (HᵀH + λI) = AᵀH`, with `AᵀH = Wo · (heads)ᵀH` accumulated through the input of
//! `attn_output`, solved by a Cholesky factorisation in f64. `λ` is [`RIDGE`] times the mean
//! diagonal of `HᵀH`. The scalars trained afterwards adapt the rest of the model to them.

use candle_core::{DType, Tensor};

use crate::fit::batch::TrainBatch;
use crate::fit::parallel;
use crate::model::ops::runs;
use crate::model::{Model, ModelError, WeightInput};
use crate::plan::{LinearAttention, ScaleValues};

/// The ridge of the least-squares fit, relative to the mean diagonal of `HᵀH` (the mean
/// squared entry of the normed stream): small enough not to bias well-determined directions,
/// enough to keep rarely excited ones near zero.
pub const RIDGE: f64 = 1e-3;

/// One set of running sums (every layer's `HᵀH` and `(heads)ᵀH`, f32) above which the batches
/// are summed one at a time instead of side by side, so that a big model holds two sets (the
/// total and one batch's) rather than one more per thread: at Llama-3.1-8B's width a set is
/// 4.3 GB.
pub const SIDE_BY_SIDE_BYTES: u64 = 512 << 20;

/// Bytes of one set of sums over `layers` layers of width `d` and query width `q_dim`.
pub fn sums_bytes(d: usize, q_dim: usize, layers: usize) -> u64 {
    4 * ((d * d + q_dim * d) * layers) as u64
}

/// Batches whose sums are taken side by side: one per thread when a set of sums is at most
/// [`SIDE_BY_SIDE_BYTES`], else one.
pub fn side_by_side(set_bytes: u64, threads: usize) -> usize {
    if set_bytes <= SIDE_BY_SIDE_BYTES {
        threads.max(1)
    } else {
        1
    }
}

/// The most the stand-ins' fit holds at once for `layers` layers of width `d` (query width
/// `q_dim`) on `threads` threads: the total sums and one set per batch summed side by side,
/// then per thread a layer's solve in f64 (`HᵀH`, `AᵀH`, the factor and the result); and the
/// stand-ins themselves (f32), kept for the search.
pub fn peak_bytes(d: usize, q_dim: usize, layers: usize, threads: usize) -> u64 {
    let set = sums_bytes(d, q_dim, layers);
    let sums = (1 + side_by_side(set, threads) as u64) * set;
    let solves = (threads.max(1) * 4 * 8 * d * d) as u64;
    let kept = (4 * d * d * layers) as u64;
    sums.max(solves) + kept
}

/// Errors fitting the stand-ins.
#[derive(Debug, thiserror::Error)]
pub enum LinearError {
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A candle operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The normal equations could not be solved (no tokens, or a degenerate stream).
    #[error("layer {layer}: the least-squares system is not positive definite (at row {row})")]
    Singular {
        /// The layer.
        layer: usize,
        /// The pivot that failed.
        row: usize,
    },
    /// A layer asked for does not exist.
    #[error("layer {layer} does not exist (the model has {n_layer} layers)")]
    NoSuchLayer {
        /// The layer.
        layer: usize,
        /// The number of layers.
        n_layer: usize,
    },
}

/// Per layer, the running sums `HᵀH` (`d x d`) and `(heads)ᵀH` (`q_dim x d`).
#[derive(Default)]
struct Sums {
    gram: Option<Tensor>,
    cross: Option<Tensor>,
}

impl Sums {
    /// One empty pair per layer.
    fn per_layer(n_layer: usize) -> Vec<Sums> {
        std::iter::repeat_with(Sums::default)
            .take(n_layer)
            .collect()
    }

    /// Adds another batch's sums, where it has them.
    fn add(&mut self, other: Sums) -> candle_core::Result<()> {
        if let Some(g) = other.gram {
            add(&mut self.gram, g)?;
        }
        if let Some(c) = other.cross {
            add(&mut self.cross, c)?;
        }
        Ok(())
    }
}

fn add(slot: &mut Option<Tensor>, x: Tensor) -> candle_core::Result<()> {
    *slot = Some(match slot.take() {
        Some(s) => (s + x)?,
        None => x,
    });
    Ok(())
}

/// Fits a stand-in for each of `layers` (ascending or not; each once) on the real tokens of
/// `batches` (`lengths`: each row's real length), from the original model `model`.
pub fn fit(
    model: &Model,
    batches: &[TrainBatch],
    lengths: &[Vec<usize>],
    layers: &[usize],
) -> Result<Vec<LinearAttention>, LinearError> {
    let (n_layer, d) = model_size(model, layers)?;
    let mut sums = Sums::per_layer(n_layer);
    let wanted: Vec<bool> = (0..n_layer).map(|l| layers.contains(&l)).collect();
    let scales = model.scales(&ScaleValues::ones(n_layer))?;
    let skip = vec![false; n_layer];
    // One batch's `HᵀH` and `(heads)ᵀH` per wanted layer.
    let batch_sums = |j: usize| -> Result<Vec<Sums>, LinearError> {
        let mask = batches[j].real_token_mask(&lengths[j], model.dtype())?;
        let mut out = Sums::per_layer(n_layer);
        let mut h_of_layer: Option<Tensor> = None;
        model.weight_inputs_no_grad(&batches[j].input_ids, &scales, &skip, &mut |input, x| {
            match input {
                WeightInput::Qkv(l) if wanted[l] => {
                    let h = x.broadcast_mul(&mask)?.to_dtype(DType::F32)?;
                    out[l].gram = Some(h.t()?.matmul(&h)?);
                    h_of_layer = Some(h);
                }
                WeightInput::AttnOutput(l) if wanted[l] => {
                    // q/k/v's input came just before the heads
                    if let Some(h) = h_of_layer.take() {
                        let heads = x.to_dtype(DType::F32)?;
                        out[l].cross = Some(heads.t()?.matmul(&h)?);
                    }
                }
                _ => {}
            }
            Ok(())
        })?;
        Ok(out)
    };
    // a few batches side by side (one at a time for a big model), their sums added in batch
    // order
    let n_batches = batches.len().min(lengths.len());
    let q_dim = model.arch().q_dim();
    let width = side_by_side(
        sums_bytes(d, q_dim, layers.len()),
        rayon::current_num_threads(),
    );
    for (start, n) in runs(n_batches, width) {
        for batch in parallel::map(model.device(), n, |i| batch_sums(start + i))? {
            for (sum, b) in sums.iter_mut().zip(batch) {
                sum.add(b)?;
            }
        }
    }
    parallel::map(model.device(), layers.len(), |i| {
        let l = layers[i];
        let Sums { gram, cross } = &sums[l];
        let (Some(gram), Some(cross)) = (gram, cross) else {
            return Err(LinearError::Singular { layer: l, row: 0 });
        };
        let wo = model
            .attn_output_weight(l)
            .ok_or(LinearError::NoSuchLayer { layer: l, n_layer })??
            .to_dtype(DType::F32)?;
        // AᵀH = Wo (heads)ᵀH: (d x q_dim) (q_dim x d)
        solve_layer(l, gram, &wo.matmul(cross)?, d)
    })
}

/// Layer `l`'s stand-in from `HᵀH` (`d x d`) and `AᵀH` (`d x d`).
fn solve_layer(
    l: usize,
    gram: &Tensor,
    target: &Tensor,
    d: usize,
) -> Result<LinearAttention, LinearError> {
    let weight = solve_ridge(&to_f64(gram)?, &to_f64(target)?, d, RIDGE)
        .map_err(|row| LinearError::Singular { layer: l, row })?;
    Ok(LinearAttention {
        layer: l,
        weight: weight.into_iter().map(|v| v as f32).collect(),
    })
}

/// The model's layer count and width, once every layer asked for is one of its layers.
fn model_size(model: &Model, layers: &[usize]) -> Result<(usize, usize), LinearError> {
    let n_layer = model.arch().n_layer;
    match layers.iter().find(|&&l| l >= n_layer) {
        Some(&layer) => Err(LinearError::NoSuchLayer { layer, n_layer }),
        None => Ok((n_layer, model.arch().n_embd)),
    }
}

fn to_f64(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect())
}

/// `W = B (G + λI)⁻¹` for a symmetric positive semi-definite `G` (`d x d`, row-major) and `B`
/// (`m x d`, row-major, `m = B.len() / d`), `λ = ridge * mean(diag G)`; row-major `m x d`.
/// Fails with the pivot row where `G + λI` is not positive definite.
pub fn solve_ridge(gram: &[f64], b: &[f64], d: usize, ridge: f64) -> Result<Vec<f64>, usize> {
    let mean_diag = (0..d).map(|i| gram[i * d + i]).sum::<f64>() / d as f64;
    let lambda = ridge * mean_diag;
    // Cholesky: G + λI = L Lᵀ, L lower triangular
    let mut l = vec![0.0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let mut s = gram[i * d + j] + if i == j { lambda } else { 0.0 };
            for k in 0..j {
                s -= l[i * d + k] * l[j * d + k];
            }
            if i == j {
                if s.is_nan() || s <= 0.0 {
                    return Err(i);
                }
                l[i * d + i] = s.sqrt();
            } else {
                l[i * d + j] = s / l[j * d + j];
            }
        }
    }
    // Each row w of W solves (G + λI) wᵀ = bᵀ (G symmetric): L y = b, then Lᵀ w = y.
    let m = b.len() / d;
    let mut w = vec![0.0f64; m * d];
    for r in 0..m {
        let row = &b[r * d..(r + 1) * d];
        let mut y = vec![0.0f64; d];
        for i in 0..d {
            let mut s = row[i];
            for k in 0..i {
                s -= l[i * d + k] * y[k];
            }
            y[i] = s / l[i * d + i];
        }
        let out = &mut w[r * d..(r + 1) * d];
        for i in (0..d).rev() {
            let mut s = y[i];
            for k in i + 1..d {
                s -= l[k * d + i] * out[k];
            }
            out[i] = s / l[i * d + i];
        }
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn the_ridge_solution_recovers_a_linear_map_from_its_inputs_and_outputs() {
        // a = W h for 200 random h in 6 dimensions: the normal equations give W back
        let (d, m, n) = (6, 4, 200);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let w_true: Vec<f64> = (0..m * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut gram = vec![0.0; d * d];
        let mut b = vec![0.0; m * d];
        for _ in 0..n {
            let h: Vec<f64> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let a: Vec<f64> = (0..m)
                .map(|r| (0..d).map(|c| w_true[r * d + c] * h[c]).sum())
                .collect();
            for i in 0..d {
                for j in 0..d {
                    gram[i * d + j] += h[i] * h[j];
                }
                for r in 0..m {
                    b[r * d + i] += a[r] * h[i];
                }
            }
        }
        let w = solve_ridge(&gram, &b, d, 0.0).unwrap();
        let worst = w
            .iter()
            .zip(&w_true)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-9, "largest error {worst}");
        // a ridge shrinks the solution towards zero
        let shrunk = solve_ridge(&gram, &b, d, 0.5).unwrap();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>();
        assert!(norm(&shrunk) < norm(&w));
    }

    #[test]
    fn a_big_model_sums_its_batches_one_at_a_time() {
        // SmolLM2-135M: 29 skippable layers of 576, a set of sums is 77 MB: side by side
        let small = sums_bytes(576, 576, 29);
        assert_eq!(small, 4 * 2 * 576 * 576 * 29);
        assert_eq!(side_by_side(small, 2), 2);
        assert_eq!(side_by_side(small, 0), 1);
        // Llama-3.1-8B: 31 of 4096, 4.2 GB a set: one batch at a time, two sets held
        let big = sums_bytes(4096, 4096, 31);
        assert_eq!(side_by_side(big, 2), 1);
        let kept = 4 * 4096 * 4096 * 31;
        assert_eq!(peak_bytes(4096, 4096, 31, 2), 2 * big + kept);
        assert_eq!(peak_bytes(576, 576, 29, 2), 3 * small + 4 * 576 * 576 * 29);
    }

    #[test]
    fn a_degenerate_system_is_refused() {
        // G = 0 with no ridge: the first pivot fails
        assert_eq!(solve_ridge(&[0.0; 4], &[1.0, 2.0], 2, 0.0), Err(0));
    }
}

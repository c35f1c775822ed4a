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
//! `attn_output`, solved by a Cholesky factorisation in f64.
//!
//! `λ` is chosen per layer by two-fold cross-validation over the documents: the sums are kept
//! for the even and the odd documents apart, each of [`RIDGES`] fits one half and is scored by
//! how well it predicts the other half's block outputs (both ways round, on a sample of output
//! rows), and the best is applied, as the same absolute `λ`, to the sums of all documents. Few
//! documents (or a wide model) get a strong ridge that keeps the stand-in near zero, where the
//! plain skip is; many documents a weak one. The scalars trained afterwards adapt the rest of
//! the model to the stand-ins.

use candle_core::{DType, Tensor};

use crate::fit::batch::TrainBatch;
use crate::fit::parallel;
use crate::model::ops::runs;
use crate::model::{Model, ModelError, WeightInput};
use crate::plan::{LinearAttention, ScaleValues};
use crate::task;

/// The ridge when the documents cannot be split in two (a single document), relative to the
/// mean diagonal of `HᵀH` (the mean squared entry of the normed stream).
pub const RIDGE: f64 = 1e-3;

/// The ridges the cross-validation tries, relative to the mean diagonal of `HᵀH` over half the
/// documents: half a decade apart, from almost none to one that leaves little of the stand-in.
pub const RIDGES: [f64; 11] = [
    1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0,
];

/// Output rows of `W` on which the cross-validation scores each ridge (every `d / CV_ROWS`-th):
/// the ridge is one per layer, and a sample of its rows ranks the ridges as all of them would.
const CV_ROWS: usize = 64;

/// The sums of both halves of the documents (two sets of every layer's `HᵀH` and `(heads)ᵀH`,
/// f32) above which the batches are added into them one at a time instead of summed side by
/// side, so that a big model holds the two halves' sets alone rather than two more per thread:
/// at Llama-3.1-8B's width a set is 4.3 GB.
pub const SIDE_BY_SIDE_BYTES: u64 = 512 << 20;

/// Bytes of one set of sums over `layers` layers of width `d` and query width `q_dim`.
pub fn sums_bytes(d: usize, q_dim: usize, layers: usize) -> u64 {
    4 * ((d * d + q_dim * d) * layers) as u64
}

/// Batches whose sums are taken side by side: one per thread when the two halves' sets are at
/// most [`SIDE_BY_SIDE_BYTES`], else one, added straight into the halves.
pub fn side_by_side(set_bytes: u64, threads: usize) -> usize {
    if 2 * set_bytes <= SIDE_BY_SIDE_BYTES {
        threads.max(1)
    } else {
        1
    }
}

/// The most the stand-ins' fit holds at once for `layers` layers of width `d` (query width
/// `q_dim`) on `threads` threads: the two halves' sums and, when batches are summed side by
/// side, two sets per batch; with them, per thread, a layer's solve in f64 (each half's `HᵀH`
/// and `AᵀH`, their totals, the factor and the result); and the stand-ins themselves (f32),
/// kept for the search.
pub fn peak_bytes(d: usize, q_dim: usize, layers: usize, threads: usize) -> u64 {
    let set = sums_bytes(d, q_dim, layers);
    let width = side_by_side(set, threads) as u64;
    let sums = 2 * set + if width > 1 { 2 * width * set } else { 0 };
    let solves = (threads.max(1) * 8 * 8 * d * d) as u64;
    let kept = (4 * d * d * layers) as u64;
    sums + solves + kept
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

/// Per layer, the running sums `HᵀH` (`d x d`) and `(heads)ᵀH` (`q_dim x d`) of one half of the
/// documents.
#[derive(Default)]
struct Sums {
    gram: Option<Tensor>,
    cross: Option<Tensor>,
}

/// A layer's sums for the even documents and for the odd ones.
type Halves = [Sums; 2];

/// One empty pair of halves per layer.
fn halves_per_layer(n_layer: usize) -> Vec<Halves> {
    std::iter::repeat_with(Halves::default)
        .take(n_layer)
        .collect()
}

impl Sums {
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

/// The stand-ins of [`fit`], with the ridge each was solved with.
#[derive(Debug, Clone)]
pub struct Fitted {
    /// One per layer asked for, in that order.
    pub stand_ins: Vec<LinearAttention>,
    /// Each one's `λ` relative to the mean diagonal of `HᵀH` over all the documents.
    pub ridges: Vec<f64>,
}

impl Fitted {
    /// "0.05 to 1.5, median 0.15": the range of the ridges and their median.
    pub fn ridge_range(&self) -> String {
        let mut r = self.ridges.clone();
        r.sort_by(f64::total_cmp);
        let show = |x: f64| {
            if x >= 0.01 {
                let s = format!("{x:.3}");
                s.trim_end_matches('0').trim_end_matches('.').to_string()
            } else {
                format!("{x:.0e}")
            }
        };
        match (r.first(), r.last()) {
            (Some(&lo), Some(&hi)) => {
                format!(
                    "{} to {}, median {}",
                    show(lo),
                    show(hi),
                    show(r[r.len() / 2])
                )
            }
            _ => "none".to_string(),
        }
    }
}

/// Fits a stand-in for each of `layers` (ascending or not; each once) on the real tokens of
/// `batches` (`lengths`: each row's real length), from the original model `model`.
pub fn fit(
    model: &Model,
    batches: &[TrainBatch],
    lengths: &[Vec<usize>],
    layers: &[usize],
) -> Result<Fitted, LinearError> {
    let (n_layer, d) = model_size(model, layers)?;
    let n_batches = batches.len().min(lengths.len());
    let mut sums = halves_per_layer(n_layer);
    let wanted: Vec<bool> = (0..n_layer).map(|l| layers.contains(&l)).collect();
    let scales = model.scales(&ScaleValues::ones(n_layer))?;
    let skip = vec![false; n_layer];
    // each row's document, counted over all batches: its parity picks the half
    let mut docs_before = 0;
    let row_docs: Vec<Vec<usize>> = batches[..n_batches]
        .iter()
        .zip(lengths)
        .map(|(batch, lengths)| {
            let docs = batch_docs(batch, lengths.len(), docs_before);
            docs_before = docs.last().map_or(docs_before, |&d| d + 1);
            docs
        })
        .collect();
    // Adds batch `j`'s `HᵀH` and `(heads)ᵀH` per wanted layer and half into `out`.
    let batch_sums = |j: usize, out: &mut [Halves]| -> Result<(), LinearError> {
        let rows = half_rows(&batches[j], &lengths[j], &row_docs[j])?;
        let mut h_of_layer: [Option<Tensor>; 2] = [None, None];
        model.weight_inputs_no_grad(&batches[j].input_ids, &scales, &skip, &mut |input, x| {
            match input {
                WeightInput::Qkv(l) if wanted[l] => {
                    for (half, idx) in rows.iter().enumerate() {
                        if let Some(idx) = idx {
                            let h = x.index_select(idx, 0)?.to_dtype(DType::F32)?;
                            add(&mut out[l][half].gram, h.t()?.matmul(&h)?)?;
                            h_of_layer[half] = Some(h);
                        }
                    }
                }
                WeightInput::AttnOutput(l) if wanted[l] => {
                    // q/k/v's input came just before the heads
                    for (half, idx) in rows.iter().enumerate() {
                        if let (Some(idx), Some(h)) = (idx, h_of_layer[half].take()) {
                            let heads = x.index_select(idx, 0)?.to_dtype(DType::F32)?;
                            add(&mut out[l][half].cross, heads.t()?.matmul(&h)?)?;
                        }
                    }
                }
                _ => {}
            }
            Ok(())
        })?;
        Ok(())
    };
    // a few batches side by side, their sums added in batch order; a big model's batches one at
    // a time, straight into the halves
    let q_dim = model.arch().q_dim();
    let width = side_by_side(
        sums_bytes(d, q_dim, layers.len()),
        rayon::current_num_threads(),
    );
    if width == 1 {
        for j in 0..n_batches {
            batch_sums(j, &mut sums)?;
        }
    } else {
        for (start, n) in runs(n_batches, width) {
            let done = parallel::map(model.device(), n, |i| {
                let mut out = halves_per_layer(n_layer);
                batch_sums(start + i, &mut out).map(|()| out)
            })?;
            for batch in done {
                for (sum, b) in sums.iter_mut().zip(batch) {
                    let [even, odd] = b;
                    sum[0].add(even)?;
                    sum[1].add(odd)?;
                }
            }
        }
    }
    // the tokens the documents of each task start with, and how many of each half's rows hold
    // them
    let groups = prefix_groups(&batches[..n_batches], &lengths[..n_batches])?;
    let mut prefixes = Vec::with_capacity(groups.len());
    for group in &groups {
        let mut rows_per_half = [0usize; 2];
        for &doc in row_docs[group.batches.clone()].iter().flatten() {
            rows_per_half[doc % 2] += 1;
        }
        let inputs = prefix_inputs(model, &batches[group.batches.start], group.shared, &wanted)?;
        prefixes.push((inputs, rows_per_half));
    }
    let solved = parallel::map(model.device(), layers.len(), |i| {
        let l = layers[i];
        let wo = model
            .attn_output_weight(l)
            .ok_or(LinearError::NoSuchLayer { layer: l, n_layer })??
            .to_dtype(DType::F32)?;
        // each task's shared rows once, with how many times each half holds them
        let mut shared = Vec::with_capacity(prefixes.len());
        let mut times = Vec::with_capacity(prefixes.len());
        for (inputs, rows_per_half) in &prefixes {
            if let Some((h, heads)) = &inputs[l] {
                shared.push(SharedRows {
                    inputs: to_f64(h)?,
                    outputs: to_f64(&heads.matmul(&wo.t()?)?)?,
                });
                times.push(*rows_per_half);
            }
        }
        // per half: HᵀH, and AᵀH = Wo (heads)ᵀH: (d x q_dim) (q_dim x d)
        let mut halves = Vec::with_capacity(2);
        for (k, half) in sums[l].iter().enumerate() {
            if let (Some(gram), Some(cross)) = (&half.gram, &half.cross) {
                halves.push(Half {
                    gram: to_f64(gram)?,
                    target: to_f64(&wo.matmul(cross)?)?,
                    shared_times: times.iter().map(|t| t[k]).collect(),
                });
            }
        }
        solve_layer(l, &halves, &shared, d)
    })?;
    let (stand_ins, ridges) = solved.into_iter().unzip();
    Ok(Fitted { stand_ins, ridges })
}

/// Per row of `batch` (`rows` of them), its document, numbered on from `first`: one row per
/// document, or a document's choices on consecutive rows when the batch groups them.
fn batch_docs(batch: &TrainBatch, rows: usize, first: usize) -> Vec<usize> {
    match &batch.choices {
        Some(groups) => groups
            .choices_per_doc
            .iter()
            .enumerate()
            .flat_map(|(k, &n)| std::iter::repeat_n(first + k, n))
            .take(rows)
            .collect(),
        None => (first..first + rows).collect(),
    }
}

/// Consecutive batches whose rows all start with the same `shared` tokens (a task's few-shot
/// examples): their positions compute the same values in every row.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PrefixGroup {
    batches: std::ops::Range<usize>,
    shared: usize,
}

/// The batches cut into runs that share a prefix: a batch joins the run before it while that
/// keeps at least half the run's shared tokens, so that a fit over several tasks (each task's
/// batches in a run) gets one run per task.
fn prefix_groups(
    batches: &[TrainBatch],
    lengths: &[Vec<usize>],
) -> candle_core::Result<Vec<PrefixGroup>> {
    let mut groups: Vec<(PrefixGroup, Vec<u32>)> = Vec::new();
    for (j, (batch, lengths)) in batches.iter().zip(lengths).enumerate() {
        let ids = batch.input_ids.to_vec2::<u32>()?;
        let rows: Vec<&[u32]> = ids
            .iter()
            .zip(lengths)
            .map(|(row, &len)| &row[..len.min(row.len())])
            .collect();
        let Some(first) = rows.first() else { continue };
        // how much of `prefix` every row begins with
        let common = |prefix: &[u32]| {
            task::shared_prefix(std::iter::once(prefix).chain(rows.iter().copied()))
        };
        if let Some((group, prefix)) = groups.last_mut() {
            let kept = common(&prefix[..group.shared]);
            if 2 * kept >= group.shared && kept > 0 {
                group.shared = kept;
                group.batches.end = j + 1;
                prefix.truncate(kept);
                continue;
            }
        }
        let shared = common(first);
        groups.push((
            PrefixGroup {
                batches: j..j + 1,
                shared,
            },
            first.to_vec(),
        ));
    }
    Ok(groups.into_iter().map(|(g, _)| g).collect())
}

/// Per layer, for the wanted ones, the first `shared` positions' normed stream `(shared, d)`
/// and heads `(shared, q_dim)` (f32), from `batch`'s first row alone; `None` for every layer
/// when nothing is shared.
fn prefix_inputs(
    model: &Model,
    batch: &TrainBatch,
    shared: usize,
    wanted: &[bool],
) -> Result<Vec<Option<(Tensor, Tensor)>>, LinearError> {
    let n_layer = wanted.len();
    let mut out: Vec<Option<(Tensor, Tensor)>> = vec![None; n_layer];
    if shared == 0 {
        return Ok(out);
    }
    let ids = batch.input_ids.narrow(0, 0, 1)?.narrow(1, 0, shared)?;
    let scales = model.scales(&ScaleValues::ones(n_layer))?;
    let mut h_of_layer: Option<Tensor> = None;
    model.weight_inputs_no_grad(&ids, &scales, &vec![false; n_layer], &mut |input, x| {
        match input {
            WeightInput::Qkv(l) if wanted[l] => h_of_layer = Some(x.to_dtype(DType::F32)?),
            WeightInput::AttnOutput(l) if wanted[l] => {
                if let Some(h) = h_of_layer.take() {
                    out[l] = Some((h, x.to_dtype(DType::F32)?));
                }
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(out)
}

/// The flat row indices (into `(b * t, ·)`) of the batch's real tokens in the even and in the
/// odd documents (`docs`: each row's document, counted over all batches); `None` for a half with
/// no tokens here.
fn half_rows(
    batch: &TrainBatch,
    lengths: &[usize],
    docs: &[usize],
) -> candle_core::Result<[Option<Tensor>; 2]> {
    let (_, t) = batch.input_ids.dims2()?;
    let mut rows: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
    for (r, (&len, &doc)) in lengths.iter().zip(docs).enumerate() {
        let half = &mut rows[doc % 2];
        half.extend((r * t..r * t + len.min(t)).map(|i| i as u32));
    }
    let device = batch.input_ids.device();
    let [even, odd] = rows;
    let tensor = |v: Vec<u32>| {
        (!v.is_empty())
            .then(|| {
                let n = v.len();
                Tensor::from_vec(v, n, device)
            })
            .transpose()
    };
    Ok([tensor(even)?, tensor(odd)?])
}

/// One half of the documents' sums for a layer, in f64.
struct Half {
    /// `HᵀH` (`d x d`, row-major).
    gram: Vec<f64>,
    /// `AᵀH` (`d x d`, row-major).
    target: Vec<f64>,
    /// Per task (as the layer's [`SharedRows`]), how many times these sums hold the rows its
    /// documents start with: once per row of the half.
    shared_times: Vec<usize>,
}

/// The positions every document of a task shares (its few-shot examples), once.
struct SharedRows {
    /// Their normed stream `h`, `(p, d)` row-major.
    inputs: Vec<f64>,
    /// The block's outputs `a` there, `(p, d)` row-major.
    outputs: Vec<f64>,
}

/// Layer `l`'s stand-in from each half's sums (and the rows each task's documents share), and
/// its ridge relative to the mean diagonal of the whole `HᵀH`: the ridge chosen by
/// [`choose_ridge`] when there are two halves, else [`RIDGE`].
fn solve_layer(
    l: usize,
    halves: &[Half],
    shared: &[SharedRows],
    d: usize,
) -> Result<(LinearAttention, f64), LinearError> {
    let singular = |row| LinearError::Singular { layer: l, row };
    let (gram, target) = match halves {
        [] => return Err(singular(0)),
        [h] => (h.gram.clone(), h.target.clone()),
        [h0, h1, ..] => (
            h0.gram.iter().zip(&h1.gram).map(|(a, b)| a + b).collect(),
            h0.target
                .iter()
                .zip(&h1.target)
                .map(|(a, b)| a + b)
                .collect(),
        ),
    };
    let scale = mean_diag(&gram, d);
    let lambda = match halves {
        [a, b, ..] => choose_ridge(a, b, shared, d).map_err(singular)?,
        _ => RIDGE * scale,
    };
    let weight = solve(&gram, &target, d, lambda).map_err(singular)?;
    let stand_in = LinearAttention {
        layer: l,
        weight: weight.into_iter().map(|v| v as f32).collect(),
    };
    Ok((stand_in, lambda / scale))
}

/// The absolute ridge `λ` among [`RIDGES`] (each times the halves' mean `HᵀH` diagonal) whose
/// fit on one half predicts the other half's block outputs best, summed both ways round over
/// every `d / CV_ROWS`-th output row and scored on the documents' own tokens: the positions
/// every document shares are in both halves, so they would reward a ridge that learns them by
/// heart. Fails with the pivot row where a half's `G + λI` is not positive definite.
fn choose_ridge(a: &Half, b: &Half, shared: &[SharedRows], d: usize) -> Result<f64, usize> {
    let scale = (mean_diag(&a.gram, d) + mean_diag(&b.gram, d)) / 2.0;
    let rows: Vec<usize> = (0..d).step_by((d / CV_ROWS).max(1)).collect();
    let sampled = |t: &[f64]| -> Vec<f64> {
        rows.iter()
            .flat_map(|&r| t[r * d..(r + 1) * d].iter().copied())
            .collect()
    };
    let error = |fitted: &Half, scored: &Half, lambda: f64| -> Result<f64, usize> {
        let w = solve(&fitted.gram, &sampled(&fitted.target), d, lambda)?;
        Ok(rows
            .iter()
            .zip(w.chunks_exact(d))
            .map(|(&r, w)| own_tokens_error(scored, shared, r, w, d))
            .sum())
    };
    let mut best = (f64::INFINITY, RIDGES[0] * scale);
    for r in RIDGES {
        let lambda = r * scale;
        let e = error(a, b, lambda)? + error(b, a, lambda)?;
        if e < best.0 {
            best = (e, lambda);
        }
    }
    Ok(best.1)
}

/// `Σ (w·h - a_r)²` over the half's tokens other than the `shared` ones, less `Σ a_r²`
/// (the same for every `w`): `w G wᵀ - 2 w·t_r` from the half's sums (`t_r` row `r` of `AᵀH`),
/// less each task's shared rows' part, `times · Σ ((w·h)² - 2 a_r (w·h))` over those rows.
fn own_tokens_error(half: &Half, shared: &[SharedRows], r: usize, w: &[f64], d: usize) -> f64 {
    let g = &half.gram;
    let g_w: Vec<f64> = (0..d).map(|i| dot(&g[i * d..(i + 1) * d], w)).collect();
    let all = dot(w, &g_w) - 2.0 * dot(w, &half.target[r * d..(r + 1) * d]);
    let held: f64 = shared
        .iter()
        .zip(&half.shared_times)
        .map(|(rows, &times)| {
            let once: f64 = rows
                .inputs
                .chunks_exact(d)
                .zip(rows.outputs.chunks_exact(d))
                .map(|(h, a)| {
                    let p = dot(w, h);
                    p * p - 2.0 * a[r] * p
                })
                .sum();
            times as f64 * once
        })
        .sum();
    all - held
}

/// The mean diagonal entry of `G` (`d x d`, row-major).
fn mean_diag(gram: &[f64], d: usize) -> f64 {
    (0..d).map(|i| gram[i * d + i]).sum::<f64>() / d as f64
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

/// `W = B (G + λI)⁻¹` for a symmetric positive semi-definite `G` (`d x d`, row-major), `B`
/// (`m x d`, row-major, `m = B.len() / d`) and an absolute ridge `λ`; row-major `m x d`. Fails
/// with the pivot row where `G + λI` is not positive definite.
fn solve(gram: &[f64], b: &[f64], d: usize, lambda: f64) -> Result<Vec<f64>, usize> {
    // Cholesky: G + λI = L Lᵀ, L lower triangular
    let mut l = vec![0.0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let s = gram[i * d + j] + if i == j { lambda } else { 0.0 }
                - dot(&l[i * d..i * d + j], &l[j * d..j * d + j]);
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
    // Each row w of W solves (G + λI) wᵀ = bᵀ (G symmetric): L y = b, then Lᵀ w = y, the
    // latter a row of L at a time (row i of L is column i of Lᵀ).
    let m = b.len() / d;
    let mut w = vec![0.0f64; m * d];
    for (row, out) in b.chunks_exact(d).zip(w.chunks_exact_mut(d)) {
        let mut y = vec![0.0f64; d];
        for i in 0..d {
            y[i] = (row[i] - dot(&l[i * d..i * d + i], &y[..i])) / l[i * d + i];
        }
        for i in (0..d).rev() {
            let wi = y[i] / l[i * d + i];
            out[i] = wi;
            for (yk, lk) in y[..i].iter_mut().zip(&l[i * d..i * d + i]) {
                *yk -= wi * lk;
            }
        }
    }
    Ok(w)
}

/// `Σ a_i b_i`, in four running sums so that it vectorises.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut acc = [0.0f64; 4];
    for (x, y) in ca.zip(cb) {
        for k in 0..4 {
            acc[k] += x[k] * y[k];
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
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
        let w = solve(&gram, &b, d, 0.0).unwrap();
        let worst = w
            .iter()
            .zip(&w_true)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-9, "largest error {worst}");
        // a ridge shrinks the solution towards zero
        let shrunk = solve(&gram, &b, d, 0.5 * mean_diag(&gram, d)).unwrap();
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
        // Llama-3.2-1B: 15 of 2048, 0.5 GB a set, two halves over 512 MiB: one at a time
        assert_eq!(side_by_side(sums_bytes(2048, 2048, 15), 2), 1);
        // Llama-3.1-8B: 31 of 4096, 4.2 GB a set: one batch at a time, the two halves held
        let big = sums_bytes(4096, 4096, 31);
        assert_eq!(side_by_side(big, 2), 1);
        let kept = 4 * 4096 * 4096 * 31;
        let solves = 2 * 8 * 8 * 4096 * 4096;
        assert_eq!(peak_bytes(4096, 4096, 31, 2), 2 * big + solves + kept);
        // side by side: the halves and two sets per batch
        assert_eq!(
            peak_bytes(576, 576, 29, 2),
            6 * small + 2 * 8 * 8 * 576 * 576 + 4 * 576 * 576 * 29
        );
    }

    /// Adds `a hᵀ` to `target` and `h hᵀ` to `gram` (`d x d`).
    fn add_row(gram: &mut [f64], target: &mut [f64], h: &[f64], a: &[f64]) {
        let d = h.len();
        for i in 0..d {
            for j in 0..d {
                gram[i * d + j] += h[i] * h[j];
                target[i * d + j] += a[i] * h[j];
            }
        }
    }

    /// A random `d x d` map, and `n` inputs `h` (uniform in [-1, 1]) with their outputs
    /// `a = W h + noise`, from `rng`.
    fn rows(rng: &mut StdRng, w: &[f64], n: usize, noise: f64) -> Vec<(Vec<f64>, Vec<f64>)> {
        let d = (w.len() as f64).sqrt() as usize;
        (0..n)
            .map(|_| {
                let h: Vec<f64> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let a = (0..d)
                    .map(|r| dot(&w[r * d..(r + 1) * d], &h) + noise * rng.gen_range(-1.0..1.0))
                    .collect();
                (h, a)
            })
            .collect()
    }

    /// Two halves of `n` rows of a random map in `d` dimensions, alternating.
    fn halves(d: usize, n: usize, noise: f64, seed: u64) -> [Half; 2] {
        let mut rng = StdRng::seed_from_u64(seed);
        let w: Vec<f64> = (0..d * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut out = [empty_half(d), empty_half(d)];
        for (k, (h, a)) in rows(&mut rng, &w, n, noise).iter().enumerate() {
            let half = &mut out[k % 2];
            add_row(&mut half.gram, &mut half.target, h, a);
        }
        out
    }

    fn empty_half(d: usize) -> Half {
        Half {
            gram: vec![0.0; d * d],
            target: vec![0.0; d * d],
            shared_times: Vec::new(),
        }
    }

    fn relative_ridge([a, b]: &[Half; 2], d: usize) -> f64 {
        choose_ridge(a, b, &[], d).unwrap()
            / ((mean_diag(&a.gram, d) + mean_diag(&b.gram, d)) / 2.0)
    }

    #[test]
    fn the_cross_validation_picks_a_weak_ridge_for_many_rows_and_a_strong_one_for_few() {
        let d = 16;
        // 4,000 rows, little noise: the smallest ridge tried
        assert_eq!(relative_ridge(&halves(d, 4000, 0.01, 1), d), RIDGES[0]);
        // 24 rows for 16 inputs and noise as large as the signal: a strong ridge
        let few = relative_ridge(&halves(d, 24, 3.0, 2), d);
        assert!(few >= 0.3, "ridge {few}");
    }

    #[test]
    fn the_chosen_ridge_predicts_held_out_rows_better_than_the_weakest() {
        // fit on 24 noisy rows (two halves), score on 8,000 fresh rows of the same map
        let d = 16;
        let [a, b] = halves(d, 24, 3.0, 5);
        let [fresh, _] = halves(d, 8000, 0.0, 5);
        let gram: Vec<f64> = a.gram.iter().zip(&b.gram).map(|(x, y)| x + y).collect();
        let target: Vec<f64> = a.target.iter().zip(&b.target).map(|(x, y)| x + y).collect();
        let error = |lambda: f64| {
            let w = solve(&gram, &target, d, lambda).unwrap();
            (0..d)
                .map(|r| own_tokens_error(&fresh, &[], r, &w[r * d..(r + 1) * d], d))
                .sum::<f64>()
        };
        let chosen = choose_ridge(&a, &b, &[], d).unwrap();
        let weakest = RIDGES[0] * (mean_diag(&a.gram, d) + mean_diag(&b.gram, d)) / 2.0;
        assert!(
            error(chosen) < error(weakest),
            "{} vs {}",
            error(chosen),
            error(weakest)
        );
    }

    #[test]
    fn rows_every_document_shares_are_left_out_of_the_score() {
        // each half: 30 rows of its own and, 10 times over, 6 rows every document starts with
        let d = 8;
        let mut rng = StdRng::seed_from_u64(9);
        let w: Vec<f64> = (0..d * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let shared = rows(&mut rng, &w, 6, 0.5);
        let own = rows(&mut rng, &w, 30, 0.5);
        let (mut with, mut without) = (empty_half(d), empty_half(d));
        for (h, a) in &own {
            add_row(&mut with.gram, &mut with.target, h, a);
            add_row(&mut without.gram, &mut without.target, h, a);
        }
        for _ in 0..10 {
            for (h, a) in &shared {
                add_row(&mut with.gram, &mut with.target, h, a);
            }
        }
        let rows = [SharedRows {
            inputs: shared.iter().flat_map(|(h, _)| h.clone()).collect(),
            outputs: shared.iter().flat_map(|(_, a)| a.clone()).collect(),
        }];
        with.shared_times = vec![10];
        let probe: Vec<f64> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        for r in 0..d {
            let (x, y) = (
                own_tokens_error(&with, &rows, r, &probe, d),
                own_tokens_error(&without, &rows, r, &probe, d),
            );
            assert!(
                (x - y).abs() <= 1e-9 * y.abs().max(1.0),
                "row {r}: {x} != {y}"
            );
        }
        // and the shared rows count when they are not named
        with.shared_times = vec![0];
        assert!(
            (own_tokens_error(&with, &rows, 0, &probe, d)
                - own_tokens_error(&without, &rows, 0, &probe, d))
            .abs()
                > 1e-3
        );
    }

    #[test]
    fn each_tasks_batches_are_a_group_with_the_prefix_they_share() {
        let batch = |rows: &[&[u32]]| {
            let seqs: Vec<Vec<u32>> = rows.iter().map(|r| r.to_vec()).collect();
            let masks: Vec<Vec<bool>> = seqs
                .iter()
                .map(|s| (0..s.len()).map(|j| j > 0).collect())
                .collect();
            let lengths = seqs.iter().map(Vec::len).collect::<Vec<_>>();
            let device = candle_core::Device::Cpu;
            (
                TrainBatch::from_sequences(&seqs, &masks, 0, &device).unwrap(),
                lengths,
            )
        };
        let group = |batches: std::ops::Range<usize>, shared| PrefixGroup { batches, shared };
        // one task: 1 2 3 4 shared by the first batch, 1 2 3 by both
        let (a, la) = batch(&[&[1, 2, 3, 4, 5], &[1, 2, 3, 4, 9]]);
        let (b, lb) = batch(&[&[1, 2, 3, 7, 7], &[1, 2, 3, 8]]);
        // another task: 1 6 6 6 (BOS alone shared with the first)
        let (c, lc) = batch(&[&[1, 6, 6, 6, 2], &[1, 6, 6, 6]]);
        let groups = |bs: &[TrainBatch], ls: &[Vec<usize>]| prefix_groups(bs, ls).unwrap();
        assert_eq!(
            groups(std::slice::from_ref(&a), std::slice::from_ref(&la)),
            vec![group(0..1, 4)]
        );
        let (ab, lab) = ([a.clone(), b.clone()], [la.clone(), lb.clone()]);
        assert_eq!(groups(&ab, &lab), vec![group(0..2, 3)]);
        let (abc, labc) = ([a, b, c], [la, lb, lc]);
        assert_eq!(groups(&abc, &labc), vec![group(0..2, 3), group(2..3, 4)]);
        // padding is not a shared token
        let (d, ld) = batch(&[&[1, 2, 3, 4, 5], &[1, 2]]);
        assert_eq!(groups(&[d], &[ld]), vec![group(0..1, 2)]);
        assert!(groups(&[], &[]).is_empty());
    }

    #[test]
    fn the_ridges_are_told_as_a_range_and_a_median() {
        let fitted = |ridges: Vec<f64>| Fitted {
            stand_ins: Vec::new(),
            ridges,
        };
        assert_eq!(
            fitted(vec![0.15, 0.05, 1.5, 0.15]).ridge_range(),
            "0.05 to 1.5, median 0.15"
        );
        assert_eq!(
            fitted(vec![5e-4, 0.0125]).ridge_range(),
            "5e-4 to 0.013, median 0.013"
        );
        assert_eq!(fitted(Vec::new()).ridge_range(), "none");
    }

    #[test]
    fn a_degenerate_system_is_refused() {
        // G = 0 with no ridge: the first pivot fails
        assert_eq!(solve(&[0.0; 4], &[1.0, 2.0], 2, 0.0), Err(0));
    }
}

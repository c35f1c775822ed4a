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
//! from the original model (nothing skipped, every scalar 1) in one forward pass, which computes
//! the tokens all of a batch's sequences begin with once and counts their products once per
//! sequence: the normal equations `W (HᵀH + λI) = AᵀH`, with `AᵀH = Wo · (heads)ᵀH` accumulated
//! through the input of `attn_output`, solved by a Cholesky factorisation in f64.
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
use crate::model::{Model, ModelError, Scales, WeightInput, WeightStorage};
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

/// The two halves' sums of every layer (two sets of each layer's `HᵀH` and `(heads)ᵀH`, f32)
/// up to which the batches are summed side by side, one per thread, in one pass over the
/// documents; above it the batches are added one at a time and the layers summed a group at a
/// time ([`GROUP_BYTES`]).
pub const SIDE_BY_SIDE_BYTES: u64 = 512 << 20;

/// The two halves' sums of one group of layers, at most, where they are summed a group at a
/// time: each group in its own pass over the documents, which goes on from the residual stream
/// the last group's pass left. At Llama-3.1-8B's width a layer's two halves take 256 MiB, so a
/// group is 4 layers; at Llama-3.2-1B's all 15 fit in one.
pub const GROUP_BYTES: u64 = 1 << 30;

/// Bytes of one set of sums over `layers` layers of width `d` and query width `q_dim`.
pub fn sums_bytes(d: usize, q_dim: usize, layers: usize) -> u64 {
    4 * ((d * d + q_dim * d) * layers) as u64
}

/// Whether the stand-ins of `layers` layers of width `d` (query width `q_dim`) are summed in one
/// pass over the documents, every layer at once ([`SIDE_BY_SIDE_BYTES`]): then no residual
/// stream is kept between passes, and more documents cost only their forward pass.
pub fn one_pass(d: usize, q_dim: usize, layers: usize) -> bool {
    2 * sums_bytes(d, q_dim, layers) <= SIDE_BY_SIDE_BYTES
}

/// How the stand-ins' sums are taken: how many batches side by side, and how many layers per
/// pass over the documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    /// Batches whose sums are taken side by side (each its own sets of sums).
    pub batches: usize,
    /// Layers summed in one pass over the documents.
    pub layers: usize,
}

impl Sizing {
    /// For `layers` layers of width `d` (query width `q_dim`) on `threads` threads: every layer
    /// in one pass, a batch per thread, when the two halves' sums are at most
    /// [`SIDE_BY_SIDE_BYTES`]; else one batch at a time, in groups of as many layers as keep
    /// the halves within [`GROUP_BYTES`] (at least one).
    pub fn of(d: usize, q_dim: usize, layers: usize, threads: usize) -> Self {
        if one_pass(d, q_dim, layers) {
            return Sizing {
                batches: threads.max(1),
                layers: layers.max(1),
            };
        }
        let per_layer = 2 * sums_bytes(d, q_dim, 1);
        Sizing {
            batches: 1,
            layers: ((GROUP_BYTES / per_layer.max(1)) as usize).clamp(1, layers.max(1)),
        }
    }
}

/// `f64` matrices of `d x d` a layer's solve holds at once: each half's `HᵀH` and `AᵀH`, the
/// factor the cross-validation works in, and the f32 copies the sums are converted from.
const SOLVE_MATRICES: u64 = 6;

/// The most the stand-ins' fit holds at once, besides the stand-ins it has made
/// ([`kept_bytes`]), for `layers` layers of width `d` (query width `q_dim`) on `threads`
/// threads, with `stream_rows` sequences of `seq_len` tokens to fit on: the halves' sums of a
/// group of layers, with two sets per batch when batches are summed side by side, or the
/// residual stream each sequence's pass stops at when the layers are summed a group at a time;
/// and the solves of the group's layers, a thread each ([`SOLVE_MATRICES`]).
pub fn fit_bytes(
    d: usize,
    q_dim: usize,
    layers: usize,
    threads: usize,
    stream_rows: usize,
    seq_len: usize,
) -> u64 {
    let sizing = Sizing::of(d, q_dim, layers, threads);
    let group = sizing.layers.min(layers);
    let set = sums_bytes(d, q_dim, group);
    let sums = if sizing.batches > 1 {
        2 * set + 2 * sizing.batches as u64 * set
    } else if group < layers {
        2 * set + 4 * (stream_rows * seq_len * d) as u64
    } else {
        2 * set
    };
    let solves = threads.clamp(1, group.max(1)) as u64 * SOLVE_MATRICES * 8 * (d * d) as u64;
    sums + solves
}

/// The stand-ins of `layers` layers of width `d`, f32, kept for the search once fitted: their
/// values, shared by every copy of the scales and, where the model's weights are stored as the
/// checkpoint holds them (the CPU), read by the graphs where they lie; where weights are dense
/// (a GPU), also the device's copy a graph reads.
pub fn kept_bytes(d: usize, layers: usize, storage: WeightStorage) -> u64 {
    let copies = match storage {
        WeightStorage::Stored => 1,
        WeightStorage::Dense => 2,
    };
    (copies * 4 * d * d * layers) as u64
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
    /// A layer was asked for more than once.
    #[error("layer {layer} is asked for more than once")]
    Repeated {
        /// The layer.
        layer: usize,
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
/// `batches` (`lengths`: each row's real length), from the original model `model`, its sums
/// taken as [`Sizing::of`] says for the model's width and rayon's threads.
pub fn fit(
    model: &Model,
    batches: &[TrainBatch],
    lengths: &[Vec<usize>],
    layers: &[usize],
) -> Result<Fitted, LinearError> {
    let (_, d) = model_size(model, layers)?;
    let sizing = Sizing::of(
        d,
        model.arch().q_dim(),
        layers.len(),
        rayon::current_num_threads(),
    );
    fit_sized(model, batches, lengths, layers, sizing)
}

/// [`fit`] with the sums taken as `sizing` says: the layers in ascending order, a group of
/// `sizing.layers` per pass over the documents, each pass going on from the residual stream
/// the last one stopped at, and each group solved before the next is summed.
pub fn fit_sized(
    model: &Model,
    batches: &[TrainBatch],
    lengths: &[Vec<usize>],
    layers: &[usize],
    sizing: Sizing,
) -> Result<Fitted, LinearError> {
    let (n_layer, d) = model_size(model, layers)?;
    let n_batches = batches.len().min(lengths.len());
    let scales = model.scales(&ScaleValues::ones(n_layer))?;
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
    // the tokens the documents of each task start with, and how many of each half's rows hold
    // them; their inputs and heads are taken from the first row of the task's first batch
    let groups = prefix_groups(&batches[..n_batches], &lengths[..n_batches])?;
    let mut prefixes = Vec::with_capacity(groups.len());
    // per batch, the task whose shared rows its pass keeps (the task's first batch)
    let mut prefix_of_batch: Vec<Option<usize>> = vec![None; n_batches];
    for (g, group) in groups.iter().enumerate() {
        let mut rows_per_half = [0usize; 2];
        for &doc in row_docs[group.batches.clone()].iter().flatten() {
            rows_per_half[doc % 2] += 1;
        }
        if group.shared > 0 {
            prefix_of_batch[group.batches.start] = Some(g);
        }
        let inputs: Vec<Option<(Tensor, Tensor)>> = vec![None; n_layer];
        prefixes.push((inputs, rows_per_half));
    }
    let mut ascending = layers.to_vec();
    ascending.sort_unstable();
    let mut solved: Vec<Option<(LinearAttention, f64)>> = vec![None; n_layer];
    // per batch, the residual stream entering layer `entering` (`None`: not started)
    let mut streams: Vec<Option<Tensor>> = vec![None; n_batches];
    let mut entering = 0;
    for group in ascending.chunks(sizing.layers.max(1)) {
        let last = group[group.len() - 1];
        let more = last < ascending[ascending.len() - 1];
        let mut sums = halves_per_layer(n_layer);
        let pass = GroupPass {
            model,
            scales: &scales,
            batches,
            lengths,
            row_docs: &row_docs,
            group,
            entering,
        };
        let task_prefix = |j: usize| prefix_of_batch[j].map_or(0, |g| groups[g].shared);
        // keeps a batch's stream for the next group, and its task's shared rows
        let mut keep = |streams: &mut [Option<Tensor>], j: usize, batch: Batch| {
            if let Some(g) = prefix_of_batch[j] {
                for (slot, rows) in prefixes[g].0.iter_mut().zip(batch.task_rows) {
                    if rows.is_some() {
                        *slot = rows;
                    }
                }
            }
            streams[j] = more.then_some(batch.stream);
        };
        if sizing.batches <= 1 {
            // one batch at a time, straight into the halves
            for j in 0..n_batches {
                let batch = pass.run(j, streams[j].take(), task_prefix(j), &mut sums)?;
                keep(&mut streams, j, batch);
            }
        } else {
            // a few batches side by side, their sums added in batch order
            for (start, n) in runs(n_batches, sizing.batches) {
                let done = parallel::map(model.device(), n, |i| {
                    let mut out = halves_per_layer(n_layer);
                    let j = start + i;
                    pass.run(j, streams[j].clone(), task_prefix(j), &mut out)
                        .map(|batch| (out, batch))
                })?;
                for (i, (halves, batch)) in done.into_iter().enumerate() {
                    for (sum, b) in sums.iter_mut().zip(halves) {
                        let [even, odd] = b;
                        sum[0].add(even)?;
                        sum[1].add(odd)?;
                    }
                    keep(&mut streams, start + i, batch);
                }
            }
        }
        entering = last + 1;
        let group_solved = parallel::map(model.device(), group.len(), |i| {
            let l = group[i];
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
            solve_layer(l, halves, &shared, d)
        })?;
        for (&l, s) in group.iter().zip(group_solved) {
            solved[l] = Some(s);
        }
    }
    // each layer asked for once (model_size), so each solved
    let (stand_ins, ridges) = layers.iter().filter_map(|&l| solved[l].take()).unzip();
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

/// What every batch's pass over a group of layers reads.
struct GroupPass<'a> {
    model: &'a Model,
    /// Every scalar 1, no stand-in.
    scales: &'a Scales,
    batches: &'a [TrainBatch],
    lengths: &'a [Vec<usize>],
    /// Per batch, each row's document.
    row_docs: &'a [Vec<usize>],
    /// The group's layers, ascending.
    group: &'a [usize],
    /// The layer the streams handed to [`GroupPass::run`] enter.
    entering: usize,
}

impl GroupPass<'_> {
    /// Runs batch `j` from `stream` (the stream entering `entering`, or the embedding) through
    /// the group's last layer, adding `HᵀH` and `(heads)ᵀH` of the group's layers per half
    /// into `out`; the stream leaving that layer, and the group's layers' inputs and heads at
    /// the first `task_prefix` positions of the batch's first row (none for 0).
    fn run(
        &self,
        j: usize,
        stream: Option<Tensor>,
        task_prefix: usize,
        out: &mut [Halves],
    ) -> Result<Batch, LinearError> {
        let n_layer = self.model.arch().n_layer;
        let last = self.group[self.group.len() - 1];
        let skip = vec![false; n_layer];
        // the rows every sequence begins with computed once, unless a row's real tokens
        // are fewer
        let ids = &self.batches[j].input_ids;
        let shared = self
            .model
            .pass_sharing_prefix(ids, self.scales, &skip, false)?;
        let pass = if self.lengths[j]
            .iter()
            .all(|&len| len >= shared.shared_prefix())
        {
            shared
        } else {
            self.model.pass(ids, self.scales, &skip, false)?
        };
        let prefix = pass.shared_prefix();
        let rows = half_rows(
            &self.batches[j],
            &self.lengths[j],
            &self.row_docs[j],
            prefix,
        )?;
        let mut x = match stream {
            Some(x) => x,
            None => pass.embed()?,
        };
        // the task's shared positions are the first row's first ones, whether the pass holds
        // a prefix once or not
        let mut task_rows: Vec<Option<(Tensor, Tensor)>> = vec![None; n_layer];
        let mut h_of_layer: Option<Tensor> = None;
        let mut tap = |input: WeightInput, x: &Tensor| -> Result<(), ModelError> {
            match input {
                WeightInput::Qkv(l) if self.group.contains(&l) => {
                    let h = x.to_dtype(DType::F32)?;
                    let p = prefix_product(&h, &h, prefix)?;
                    for (half, r) in rows.iter().enumerate() {
                        if let Some(g) = half_product(&h, &h, r, p.as_ref())? {
                            add(&mut out[l][half].gram, g)?;
                        }
                    }
                    h_of_layer = Some(h);
                }
                WeightInput::AttnOutput(l) if self.group.contains(&l) => {
                    // q/k/v's input came just before the heads
                    if let Some(h) = h_of_layer.take() {
                        let heads = x.to_dtype(DType::F32)?;
                        let p = prefix_product(&heads, &h, prefix)?;
                        for (half, r) in rows.iter().enumerate() {
                            if let Some(c) = half_product(&heads, &h, r, p.as_ref())? {
                                add(&mut out[l][half].cross, c)?;
                            }
                        }
                        if task_prefix > 0 {
                            // copies, so as not to hold the whole batch's rows
                            let first = |t: &Tensor| t.narrow(0, 0, task_prefix)?.copy();
                            task_rows[l] = Some((first(&h)?, first(&heads)?));
                        }
                    }
                }
                _ => {}
            }
            Ok(())
        };
        for l in self.entering..=last {
            x = pass.layer(l, &x, Some(&mut tap))?.out;
        }
        Ok(Batch {
            stream: x,
            task_rows,
        })
    }
}

/// What a batch's pass over a group of layers leaves.
struct Batch {
    /// The residual stream leaving the group's last layer.
    stream: Tensor,
    /// Per layer of the group, where the batch is the first of its task's: the normed stream
    /// `(shared, d)` and heads `(shared, q_dim)` (f32) at the positions the task's documents
    /// share.
    task_rows: Vec<Option<(Tensor, Tensor)>>,
}

/// One half's rows of a batch in a pass's stream.
struct HalfRows {
    /// The flat indices of its sequences' own real tokens (those after the shared prefix);
    /// `None` when it has none here.
    own: Option<Tensor>,
    /// Its sequences in the batch: each holds the shared prefix once more.
    sequences: usize,
}

/// The even and the odd documents' rows (`docs`: each row's document, counted over all
/// batches) of a batch of `lengths` real tokens per row, in the stream of a pass that holds
/// the first `prefix` positions once (`(prefix + b * (t - prefix), ·)`; `prefix` 0: one row per
/// token, `(b * t, ·)`). Every row holds at least `prefix` real tokens.
fn half_rows(
    batch: &TrainBatch,
    lengths: &[usize],
    docs: &[usize],
    prefix: usize,
) -> candle_core::Result<[HalfRows; 2]> {
    let (_, t) = batch.input_ids.dims2()?;
    let own_len = t - prefix;
    let mut rows: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
    let mut sequences = [0usize; 2];
    for (r, (&len, &doc)) in lengths.iter().zip(docs).enumerate() {
        let start = prefix + r * own_len;
        rows[doc % 2].extend((start..start + len.min(t) - prefix).map(|i| i as u32));
        sequences[doc % 2] += 1;
    }
    let device = batch.input_ids.device();
    let [even, odd] = rows;
    let half = |v: Vec<u32>, sequences: usize| -> candle_core::Result<HalfRows> {
        let own = if v.is_empty() {
            None
        } else {
            let n = v.len();
            Some(Tensor::from_vec(v, n, device)?)
        };
        Ok(HalfRows { own, sequences })
    };
    Ok([half(even, sequences[0])?, half(odd, sequences[1])?])
}

/// `aᵀb` over one half's rows of a stream (`a` and `b` two tapped inputs, stream rows):
/// `prefixed`, the product over the shared prefix's rows, once per sequence of the half, and the
/// product over the half's own rows.
fn half_product(
    a: &Tensor,
    b: &Tensor,
    half: &HalfRows,
    prefixed: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    let mut sum = match prefixed {
        Some(p) if half.sequences == 1 => Some(p.clone()),
        Some(p) if half.sequences > 1 => Some((p * half.sequences as f64)?),
        _ => None,
    };
    if let Some(idx) = &half.own {
        let own = a
            .index_select(idx, 0)?
            .t()?
            .matmul(&b.index_select(idx, 0)?)?;
        add(&mut sum, own)?;
    }
    Ok(sum)
}

/// `aᵀb` over the first `prefix` rows of `a` and `b`; `None` when `prefix` is 0.
fn prefix_product(a: &Tensor, b: &Tensor, prefix: usize) -> candle_core::Result<Option<Tensor>> {
    if prefix == 0 {
        return Ok(None);
    }
    Ok(Some(
        a.narrow(0, 0, prefix)?
            .t()?
            .matmul(&b.narrow(0, 0, prefix)?)?,
    ))
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
/// [`choose_ridge`] when there are two halves, else [`RIDGE`]. The halves are added into the
/// first one's matrices, which the solve then works in.
fn solve_layer(
    l: usize,
    halves: Vec<Half>,
    shared: &[SharedRows],
    d: usize,
) -> Result<(LinearAttention, f64), LinearError> {
    let failed = |e| match e {
        SolveError::Pivot(row) => LinearError::Singular { layer: l, row },
        SolveError::Candle(e) => LinearError::Candle(e),
    };
    let chosen = match halves.as_slice() {
        [a, b] => Some(choose_ridge(a, b, shared, d).map_err(failed)?),
        _ => None,
    };
    let mut halves = halves.into_iter();
    let Some(mut total) = halves.next() else {
        return Err(LinearError::Singular { layer: l, row: 0 });
    };
    for half in halves {
        for (t, h) in total.gram.iter_mut().zip(&half.gram) {
            *t += h;
        }
        for (t, h) in total.target.iter_mut().zip(&half.target) {
            *t += h;
        }
    }
    let scale = mean_diag(&total.gram, d);
    let lambda = chosen.unwrap_or(RIDGE * scale);
    let Half {
        mut gram,
        mut target,
        ..
    } = total;
    factor(&mut gram, d, lambda).map_err(failed)?;
    substitute(&gram, &mut target, d)?;
    let stand_in = LinearAttention {
        layer: l,
        weight: target
            .into_iter()
            .map(|v| v as f32)
            .collect::<Vec<_>>()
            .into(),
    };
    Ok((stand_in, lambda / scale))
}

/// The absolute ridge `λ` among [`RIDGES`] (each times the halves' mean `HᵀH` diagonal) whose
/// fit on one half predicts the other half's block outputs best, summed both ways round over
/// every `d / CV_ROWS`-th output row and scored on the documents' own tokens: the positions
/// every document shares are in both halves, so they would reward a ridge that learns them by
/// heart. Fails with the pivot row where a half's `G + λI` is not positive definite.
fn choose_ridge(a: &Half, b: &Half, shared: &[SharedRows], d: usize) -> Result<f64, SolveError> {
    let scale = (mean_diag(&a.gram, d) + mean_diag(&b.gram, d)) / 2.0;
    let rows: Vec<usize> = (0..d).step_by((d / CV_ROWS).max(1)).collect();
    let sampled = |t: &[f64]| -> Vec<f64> {
        rows.iter()
            .flat_map(|&r| t[r * d..(r + 1) * d].iter().copied())
            .collect()
    };
    let error = |fitted: &Half, scored: &Half, lambda: f64| -> Result<f64, SolveError> {
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

/// The model's layer count and width, once every layer asked for is one of its layers, and
/// asked for once.
fn model_size(model: &Model, layers: &[usize]) -> Result<(usize, usize), LinearError> {
    let n_layer = model.arch().n_layer;
    if let Some(&layer) = layers.iter().find(|&&l| l >= n_layer) {
        return Err(LinearError::NoSuchLayer { layer, n_layer });
    }
    let mut seen = vec![false; n_layer];
    for &layer in layers {
        if std::mem::replace(&mut seen[layer], true) {
            return Err(LinearError::Repeated { layer });
        }
    }
    Ok((n_layer, model.arch().n_embd))
}

fn to_f64(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect())
}

/// Why a system could not be solved.
#[derive(Debug)]
enum SolveError {
    /// `G + λI` is not positive definite: the pivot row that failed.
    Pivot(usize),
    /// A matrix product of the factorisation failed.
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for SolveError {
    fn from(e: candle_core::Error) -> Self {
        SolveError::Candle(e)
    }
}

/// `W = B (G + λI)⁻¹` for a symmetric positive semi-definite `G` (`d x d`, row-major), `B`
/// (`m x d`, row-major, `m = B.len() / d`) and an absolute ridge `λ`; row-major `m x d`.
fn solve(gram: &[f64], b: &[f64], d: usize, lambda: f64) -> Result<Vec<f64>, SolveError> {
    let mut l = gram.to_vec();
    factor(&mut l, d, lambda)?;
    let mut w = b.to_vec();
    substitute(&l, &mut w, d)?;
    Ok(w)
}

/// Columns per block of [`factor`]: each block's update of the rows below it is a matrix
/// product, where the factorisation does nearly all its work.
const BLOCK: usize = 128;

/// Rows of the trailing matrix updated per matrix product in [`factor`], bounding the product
/// it holds to `PANEL_ROWS x d`.
const PANEL_ROWS: usize = 512;

/// Cholesky factorisation in place: `G + λI = L Lᵀ` with `L` lower triangular, written over the
/// lower triangle of `G` (`d x d`, row-major; the upper triangle is left as it was), a block of
/// [`BLOCK`] columns at a time: the block's diagonal part and the rows below it are factored
/// entry by entry, then every later row takes the block's part of its products at once. Fails
/// with [`SolveError::Pivot`] where `G + λI` is not positive definite.
fn factor(g: &mut [f64], d: usize, lambda: f64) -> Result<(), SolveError> {
    for k0 in (0..d).step_by(BLOCK) {
        let k1 = (k0 + BLOCK).min(d);
        // the rows of L from k0 on, in columns k0..k1: every earlier block's part is already
        // subtracted from them
        for i in k0..d {
            for j in k0..(i + 1).min(k1) {
                let s = g[i * d + j] + if i == j { lambda } else { 0.0 }
                    - dot(&g[i * d + k0..i * d + j], &g[j * d + k0..j * d + j]);
                if i == j {
                    if s.is_nan() || s <= 0.0 {
                        return Err(SolveError::Pivot(i));
                    }
                    g[i * d + i] = s.sqrt();
                } else {
                    g[i * d + j] = s / g[j * d + j];
                }
            }
        }
        subtract_block(g, d, k0, k1)?;
    }
    Ok(())
}

/// For every row `i >= k1` of `g` (`d x d`, row-major), subtracts from its columns `k1..=i` the
/// products of its `L` entries in columns `k0..k1` with those of each earlier row:
/// `G[i, j] -= L[i, k0..k1] · L[j, k0..k1]`, [`PANEL_ROWS`] rows per matrix product.
fn subtract_block(g: &mut [f64], d: usize, k0: usize, k1: usize) -> candle_core::Result<()> {
    let (kb, n) = (k1 - k0, d - k1);
    if n == 0 {
        return Ok(());
    }
    let panel: Vec<f64> = (k1..d)
        .flat_map(|i| g[i * d + k0..i * d + k1].iter().copied())
        .collect();
    let panel = Tensor::from_vec(panel, (n, kb), &candle_core::Device::Cpu)?;
    for r0 in (0..n).step_by(PANEL_ROWS) {
        let r1 = (r0 + PANEL_ROWS).min(n);
        // rows r0..r1 against rows 0..r1: (r1 - r0) x r1, the lower triangle's part of them
        let products = panel
            .narrow(0, r0, r1 - r0)?
            .matmul(&panel.narrow(0, 0, r1)?.t()?)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        for (r, row) in (r0..r1).zip(products.chunks_exact(r1)) {
            let i = k1 + r;
            for (x, p) in g[i * d + k1..=i * d + i].iter_mut().zip(row) {
                *x -= p;
            }
        }
    }
    Ok(())
}

/// Replaces each row `b` of `rows` (`m x d`, row-major) by `w` solving `L Lᵀ wᵀ = bᵀ`, `L` the
/// lower triangle [`factor`] left in `l`: `L y = b`, then `Lᵀ w = y`. All rows at once, on
/// their transpose (each coordinate's values in every row, contiguous), a block of [`BLOCK`]
/// coordinates at a time: what the coordinates already solved give a block is one matrix
/// product, and the block itself is solved coordinate by coordinate.
fn substitute(l: &[f64], rows: &mut [f64], d: usize) -> candle_core::Result<()> {
    let m = rows.len() / d;
    if m == 0 {
        return Ok(());
    }
    let cpu = &candle_core::Device::Cpu;
    let mut t = vec![0.0f64; d * m];
    for (r, row) in rows.chunks_exact(d).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            t[i * m + r] = v;
        }
    }
    // less `part · solved` from the block's coordinates, `part` (block x solved) row-major
    let subtract = |t: &mut [f64], part: Tensor, solved: Tensor| -> candle_core::Result<()> {
        let less = part.matmul(&solved)?.flatten_all()?.to_vec1::<f64>()?;
        for (x, y) in t.iter_mut().zip(&less) {
            *x -= y;
        }
        Ok(())
    };
    // L y = b, from the first block on
    for j0 in (0..d).step_by(BLOCK) {
        let j1 = (j0 + BLOCK).min(d);
        if j0 > 0 {
            let part: Vec<f64> = (j0..j1)
                .flat_map(|i| l[i * d..i * d + j0].iter().copied())
                .collect();
            let part = Tensor::from_vec(part, (j1 - j0, j0), cpu)?;
            let solved = Tensor::from_slice(&t[..j0 * m], (j0, m), cpu)?;
            subtract(&mut t[j0 * m..j1 * m], part, solved)?;
        }
        for i in j0..j1 {
            let (solved, rest) = t.split_at_mut(i * m);
            let ti = &mut rest[..m];
            for k in j0..i {
                let lik = l[i * d + k];
                for (x, y) in ti.iter_mut().zip(&solved[k * m..(k + 1) * m]) {
                    *x -= lik * y;
                }
            }
            for x in ti.iter_mut() {
                *x /= l[i * d + i];
            }
        }
    }
    // Lᵀ w = y, from the last block back
    let starts: Vec<usize> = (0..d).step_by(BLOCK).collect();
    for &j0 in starts.iter().rev() {
        let j1 = (j0 + BLOCK).min(d);
        if j1 < d {
            // L[j1.., j0..j1], transposed
            let part: Vec<f64> = (j1..d)
                .flat_map(|k| l[k * d + j0..k * d + j1].iter().copied())
                .collect();
            let part = Tensor::from_vec(part, (d - j1, j1 - j0), cpu)?.t()?;
            let solved = Tensor::from_slice(&t[j1 * m..], (d - j1, m), cpu)?;
            subtract(&mut t[j0 * m..j1 * m], part, solved)?;
        }
        for i in (j0..j1).rev() {
            let (head, solved) = t.split_at_mut((i + 1) * m);
            let ti = &mut head[i * m..];
            for k in i + 1..j1 {
                let lki = l[k * d + i];
                for (x, y) in ti.iter_mut().zip(&solved[(k - i - 1) * m..(k - i) * m]) {
                    *x -= lki * y;
                }
            }
            for x in ti.iter_mut() {
                *x /= l[i * d + i];
            }
        }
    }
    for (r, row) in rows.chunks_exact_mut(d).enumerate() {
        for (i, v) in row.iter_mut().enumerate() {
            *v = t[i * m + r];
        }
    }
    Ok(())
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
    fn the_blocked_factorisation_solves_systems_wider_than_its_blocks() {
        // d = 700: five whole blocks and a part, two panels of rows in the first updates;
        // (G + λI) wᵀ = bᵀ for each of 3 rows to within rounding, G = XᵀX of 900 random rows
        let (d, n, m) = (700, 900, 3);
        let mut rng = StdRng::seed_from_u64(11);
        let x: Vec<f64> = (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut gram = vec![0.0; d * d];
        for row in x.chunks_exact(d) {
            for i in 0..d {
                for j in 0..d {
                    gram[i * d + j] += row[i] * row[j];
                }
            }
        }
        let b: Vec<f64> = (0..m * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let lambda = 0.1;
        let w = solve(&gram, &b, d, lambda).unwrap();
        for (w, b) in w.chunks_exact(d).zip(b.chunks_exact(d)) {
            for i in 0..d {
                let back = dot(&gram[i * d..(i + 1) * d], w) + lambda * w[i];
                assert!(
                    (back - b[i]).abs() < 1e-8,
                    "row {i}: {back} against {}",
                    b[i]
                );
            }
        }
        // the pivot that fails is named wherever it falls: an input that is always zero, past
        // the first block, leaves G singular there
        let mut singular = gram.clone();
        for j in 0..d {
            singular[300 * d + j] = 0.0;
            singular[j * d + 300] = 0.0;
        }
        assert!(matches!(
            solve(&singular, &b, d, 0.0),
            Err(SolveError::Pivot(300))
        ));
    }

    #[test]
    fn a_big_model_sums_a_group_of_layers_at_a_time() {
        let solve = |d: u64| SOLVE_MATRICES * 8 * d * d;
        // SmolLM2-135M: 29 skippable layers of 576, a set of sums is 77 MB: every layer in one
        // pass, a batch per thread, each with its own two sets
        let small = sums_bytes(576, 576, 29);
        assert_eq!(small, 4 * 2 * 576 * 576 * 29);
        let sizing = Sizing::of(576, 576, 29, 2);
        assert_eq!(
            sizing,
            Sizing {
                batches: 2,
                layers: 29
            }
        );
        assert_eq!(Sizing::of(576, 576, 29, 0).batches, 1);
        assert_eq!(
            fit_bytes(576, 576, 29, 2, 64, 256),
            6 * small + 2 * solve(576)
        );
        // Llama-3.2-1B: 15 of 2048, two halves of 0.5 GB: one batch at a time, all 15 layers
        // within a group's 1 GiB, so no stream kept between passes
        assert_eq!(
            Sizing::of(2048, 2048, 15, 2),
            Sizing {
                batches: 1,
                layers: 15
            }
        );
        assert_eq!(
            fit_bytes(2048, 2048, 15, 2, 64, 256),
            2 * sums_bytes(2048, 2048, 15) + 2 * solve(2048)
        );
        // Llama-3.1-8B: 31 of 4096, 256 MiB a layer's two halves: groups of 4 layers, the
        // streams of 64 sequences of 256 tokens kept between the 8 passes
        assert_eq!(
            Sizing::of(4096, 4096, 31, 2),
            Sizing {
                batches: 1,
                layers: 4
            }
        );
        let streams = 4 * 64 * 256 * 4096;
        assert_eq!(
            fit_bytes(4096, 4096, 31, 2, 64, 256),
            GROUP_BYTES + streams + 2 * solve(4096)
        );
        assert_eq!(
            kept_bytes(4096, 31, WeightStorage::Stored),
            4 * 4096 * 4096 * 31
        );
        assert_eq!(
            kept_bytes(4096, 31, WeightStorage::Dense),
            2 * 4 * 4096 * 4096 * 31
        );
        // wider than a group can hold: one layer a group
        assert_eq!(Sizing::of(16384, 16384, 8, 2).layers, 1);
        // one thread solves one layer at a time
        assert_eq!(
            fit_bytes(4096, 4096, 31, 1, 64, 256),
            GROUP_BYTES + streams + solve(4096)
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
    fn a_tasks_shared_rows_are_taken_from_its_first_batch_as_if_computed_alone() {
        // the rows the ridge's score leaves out are taken from the pass of the task's first
        // batch: the same as a pass over those positions alone, whether that pass holds the
        // batch's prefix once (several rows), not at all (one row), or is the plain pass (a
        // row ends before the prefix its padding shares with the others)
        use crate::arch::Arch;
        use crate::model::tests::{random_source, tiny_arch};
        use candle_core::Device;
        let arch = Arch {
            n_layer: 4,
            ..tiny_arch()
        };
        let model = Model::load(&random_source(&arch, 3), &Device::Cpu).unwrap();
        let scales = model.scales(&ScaleValues::ones(arch.n_layer)).unwrap();
        let mut rng = StdRng::seed_from_u64(4);
        let mut token = || rng.gen_range(1..arch.vocab_size as u32);
        let prefix: Vec<u32> = (0..6).map(|_| token()).collect();
        let with = |own: Vec<u32>| [prefix.clone(), own].concat();
        let shared = 4;
        let cases = [
            vec![
                with(vec![token(), token()]),
                with(vec![token()]),
                with(vec![token(); 3]),
            ],
            vec![with(vec![token(), token()])],
            vec![prefix.clone(), with(vec![0, 0, token()])],
        ];
        // the positions alone, as a pass of their own
        let ids = Tensor::from_vec(prefix[..shared].to_vec(), (1, shared), &Device::Cpu).unwrap();
        let mut alone: Vec<Option<(Tensor, Tensor)>> = vec![None; arch.n_layer];
        let mut h_of_layer = None;
        let skip = vec![false; arch.n_layer];
        model
            .weight_inputs_no_grad(&ids, &scales, &skip, &mut |input, x| {
                match input {
                    WeightInput::Qkv(_) => h_of_layer = Some(x.clone()),
                    WeightInput::AttnOutput(l) => {
                        alone[l] = h_of_layer.take().map(|h| (h, x.clone()));
                    }
                    _ => {}
                }
                Ok(())
            })
            .unwrap();
        let group = [1, 3];
        for (c, docs) in cases.iter().enumerate() {
            let masks: Vec<Vec<bool>> = docs
                .iter()
                .map(|s| (0..s.len()).map(|j| j > 0).collect())
                .collect();
            let batch = TrainBatch::from_sequences(docs, &masks, 0, &Device::Cpu).unwrap();
            let lengths = vec![docs.iter().map(Vec::len).collect::<Vec<_>>()];
            let row_docs = vec![batch_docs(&batch, docs.len(), 0)];
            let pass = GroupPass {
                model: &model,
                scales: &scales,
                batches: std::slice::from_ref(&batch),
                lengths: &lengths,
                row_docs: &row_docs,
                group: &group,
                entering: 0,
            };
            let mut out = halves_per_layer(arch.n_layer);
            let kept = pass.run(0, None, shared, &mut out).unwrap().task_rows;
            for (l, kept) in kept.iter().enumerate() {
                let Some((h, heads)) = kept else {
                    assert!(!group.contains(&l), "case {c}: layer {l} has no rows");
                    continue;
                };
                assert!(
                    group.contains(&l),
                    "case {c}: layer {l} is not in the group"
                );
                let (h_alone, heads_alone) = alone[l].as_ref().unwrap();
                for (got, want) in [(h, h_alone), (heads, heads_alone)] {
                    assert_eq!(got.dims(), want.dims(), "case {c}, layer {l}");
                    let worst = (got - want)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert!(worst <= 1e-5, "case {c}, layer {l}: {worst}");
                }
            }
            let none = pass.run(0, None, 0, &mut out).unwrap().task_rows;
            assert!(none.iter().all(Option::is_none), "case {c}");
        }
    }

    #[test]
    fn a_degenerate_system_is_refused() {
        // G = 0 with no ridge: the first pivot fails
        assert!(matches!(
            solve(&[0.0; 4], &[1.0, 2.0], 2, 0.0),
            Err(SolveError::Pivot(0))
        ));
    }
}

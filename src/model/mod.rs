//! The candle forward pass with the Hopscotch scalars and the attention skip mask.
//!
//! For every layer `l`, with frozen weights and four trainable scalars that start at 1.0
//! (Eyceoz et al. 2025, <https://arxiv.org/abs/2506.03303>):
//!
//! ```text
//! x1  = b_att[l] * Attn(RMSNorm(x)) + s_att[l] * x      (skipped: x1 = x, no attention computed)
//! out = b_mlp[l] * MLP(RMSNorm(x1)) + s_mlp[l] * x1
//! ```
//!
//! A skipped block may have a linear stand-in (beyond the paper, [`LinearAttention`]):
//! `x1 = b_att[l] * (W[l] · RMSNorm(x)) + s_att[l] * x`, still without a KV cache.
//!
//! The MLP is SwiGLU, attention is causal with grouped-query heads and rotate-half (NEOX) rope as
//! Hugging Face computes it on unpermuted q/k weights. The backward pass reaches only the scalars:
//! see [`ops`] for the operations that keep it from computing weight gradients.
//!
//! Batches are right-padded: with causal attention a real token never sees the padding after
//! it, so no attention mask is needed; the outputs at padding positions are meaningless and the
//! loss must never gather them.

mod layer;
pub mod ops;
mod pass;
mod scales;
#[cfg(test)]
pub(crate) mod tests;
mod vocab;
mod weight;

pub use layer::{WeightInput, WeightInputTap};
pub use pass::{LayerOutput, Pass};
pub use scales::Scales;
pub use vocab::chunk_tokens as logit_chunk_tokens;
pub use weight::WeightStorage;

use candle_core::{DType, Device, Tensor};

use crate::arch::{Arch, RopeScaling};
use crate::checkpoint::{CheckpointError, StoredTensor, TensorSource};
use crate::plan::{LinearAttention, NoSuchLayer, ScaleValues, ScalesLength, StandInError};
use layer::{Layer, Projection};
use weight::Weight;

/// What [`CheckpointError::Shape`] names as the path: a [`TensorSource`] does not say where its
/// tensors come from.
const SOURCE_LABEL: &str = "tensor source";

/// Errors building or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading a tensor failed, or a tensor has a shape other than the architecture implies.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The architecture cannot describe a working model (zero sizes, heads that do not group).
    #[error("invalid architecture: {message}")]
    InvalidArch {
        /// What is wrong.
        message: String,
    },
    /// A skip mask's length differs from the number of layers.
    #[error("skip mask has {found} entries, the model has {expected} layers")]
    SkipMaskLength {
        /// The number of layers.
        expected: usize,
        /// The mask's length.
        found: usize,
    },
    /// A skip mask names a layer the model does not have.
    #[error("layer {layer} does not exist (the model has {n_layer} layers)")]
    NoSuchLayer {
        /// The layer named.
        layer: usize,
        /// The number of layers.
        n_layer: usize,
    },
    /// A vector of scalars has a length other than the number of layers.
    #[error("scalar vector {name} has {found} entries, the model has {expected} layers")]
    ScalesLength {
        /// Which vector (`b_att`, `s_att`, `b_mlp`, `s_mlp`).
        name: &'static str,
        /// The number of layers.
        expected: usize,
        /// The vector's length.
        found: usize,
    },
    /// An input tensor has the wrong rank, shape or dtype, or is empty.
    #[error("input {name}: expected {expected}, found shape {found:?} of {dtype:?}")]
    Input {
        /// Which input.
        name: &'static str,
        /// What was expected, in words.
        expected: &'static str,
        /// The shape given.
        found: Vec<usize>,
        /// The dtype given.
        dtype: DType,
    },
    /// A token id is not below the vocabulary size.
    #[error("token id {token} is out of the vocabulary (size {vocab_size})")]
    TokenOutOfRange {
        /// The largest token id in the input.
        token: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// A position to gather is not below `batch * seq_len`.
    #[error("position {position} is out of range for {len} hidden states")]
    PositionOutOfRange {
        /// The largest position asked for.
        position: u32,
        /// The number of hidden states (`batch * seq_len`).
        len: usize,
    },
    /// A linear stand-in is for a layer the model does not have, is listed twice, or is not
    /// `n_embd x n_embd` finite numbers.
    #[error(transparent)]
    LinearAttention(#[from] StandInError),
    /// A candle operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl From<NoSuchLayer> for ModelError {
    fn from(NoSuchLayer { layer, n_layer }: NoSuchLayer) -> Self {
        ModelError::NoSuchLayer { layer, n_layer }
    }
}

impl From<ScalesLength> for ModelError {
    fn from(e: ScalesLength) -> Self {
        ModelError::ScalesLength {
            name: e.name,
            expected: e.expected,
            found: e.found,
        }
    }
}

/// A Llama / Qwen2 decoder with frozen weights, run with the Hopscotch scalars.
pub struct Model {
    arch: Arch,
    device: Device,
    dtype: DType,
    token_embd: Weight,
    layers: Vec<Layer>,
    output_norm: Tensor,
    /// `output.weight`, or `token_embd.weight` when the embeddings are tied.
    lm_head: Weight,
    /// Rope inverse frequencies per rotated pair, scaling included.
    inv_freq: Vec<f64>,
    /// Positions are multiplied by this before rotation (linear scaling: `1 / factor`).
    position_scale: f64,
    /// Whether a pass with gradients recomputes each layer in the backward pass.
    recompute: bool,
}

impl Model {
    /// Loads `source` onto `device`, checking each tensor's shape against the architecture and
    /// its values for non-finite numbers: on the CPU the weight matrices and embeddings stay in
    /// their stored precision, elsewhere they are dequantized to f32 ([`WeightStorage`]); norms
    /// and biases are f32.
    pub fn load(source: &dyn TensorSource, device: &Device) -> Result<Self, ModelError> {
        Self::load_as(
            source,
            device,
            DType::F32,
            WeightStorage::for_device(device),
        )
    }

    /// Loads in `dtype` (f64 lets tests compare gradients with finite differences), with the
    /// weight matrices held as `storage` says (stored ones only on the CPU).
    pub fn load_as(
        source: &dyn TensorSource,
        device: &Device,
        dtype: DType,
        storage: WeightStorage,
    ) -> Result<Self, ModelError> {
        let arch = source.arch().clone();
        validate_arch(&arch)?;
        let storage = if device.is_cpu() {
            storage
        } else {
            WeightStorage::Dense
        };
        let stored = |name: String, shape: &[usize]| -> Result<StoredTensor, ModelError> {
            let t = source.tensor_stored(&name)?;
            if t.shape() != shape {
                return Err(CheckpointError::Shape {
                    path: SOURCE_LABEL.to_string(),
                    name,
                    found: t.shape().to_vec(),
                    expected: shape.to_vec(),
                }
                .into());
            }
            check_finite(&t)?;
            Ok(t)
        };
        let load = |name: String, shape: &[usize]| -> Result<Tensor, ModelError> {
            let t = stored(name, shape)?;
            let values = t.to_f32().map_err(|message| invalid(t.name(), message))?;
            Ok(Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
        };
        let matrix = |name: String, shape: &[usize]| -> Result<Weight, ModelError> {
            Ok(match storage {
                WeightStorage::Stored => Weight::Stored(std::sync::Arc::new(stored(name, shape)?)),
                WeightStorage::Dense => Weight::Dense(load(name, shape)?),
            })
        };
        let (d, q_dim, kv_dim, ff) = (arch.n_embd, arch.q_dim(), arch.kv_dim(), arch.n_ff);
        let proj = |name: String, out: usize, inp: usize, bias: bool| {
            let weight = matrix(format!("{name}.weight"), &[out, inp])?;
            let bias = if bias {
                Some(load(format!("{name}.bias"), &[out])?)
            } else {
                None
            };
            Ok::<_, ModelError>(Projection { weight, bias })
        };
        let token_embd = matrix("token_embd.weight".into(), &[arch.vocab_size, d])?;
        let mut layers = Vec::with_capacity(arch.n_layer);
        for i in 0..arch.n_layer {
            let blk = format!("blk.{i}");
            layers.push(Layer {
                attn_norm: load(format!("{blk}.attn_norm.weight"), &[d])?,
                q: proj(format!("{blk}.attn_q"), q_dim, d, arch.attn_bias)?,
                k: proj(format!("{blk}.attn_k"), kv_dim, d, arch.attn_bias)?,
                v: proj(format!("{blk}.attn_v"), kv_dim, d, arch.attn_bias)?,
                o: proj(format!("{blk}.attn_output"), d, q_dim, false)?,
                ffn_norm: load(format!("{blk}.ffn_norm.weight"), &[d])?,
                gate: proj(format!("{blk}.ffn_gate"), ff, d, false)?,
                up: proj(format!("{blk}.ffn_up"), ff, d, false)?,
                down: proj(format!("{blk}.ffn_down"), d, ff, false)?,
            });
        }
        let output_norm = load("output_norm.weight".into(), &[d])?;
        let lm_head = if arch.tie_word_embeddings {
            token_embd.clone()
        } else {
            matrix("output.weight".into(), &[arch.vocab_size, d])?
        };
        let (inv_freq, position_scale) = rope_frequencies(&arch);
        Ok(Self {
            arch,
            device: device.clone(),
            dtype,
            token_embd,
            layers,
            output_norm,
            lm_head,
            inv_freq,
            position_scale,
            recompute: false,
        })
    }

    /// The model whose passes with gradients keep only each layer's input and output and run
    /// the layer again in the backward pass (`on`), or keep every activation (the default):
    /// the same gradients, the activations of one layer in memory instead of all, for one more
    /// forward pass per training step.
    pub fn with_recompute(mut self, on: bool) -> Self {
        self.recompute = on;
        self
    }

    /// Whether passes with gradients recompute each layer ([`Model::with_recompute`]).
    pub fn recomputes(&self) -> bool {
        self.recompute
    }

    /// Layer `l`'s `attn_output` weight `(n_embd, n_head * head_dim)`, whole in the model's
    /// dtype; `None` past the last layer.
    pub fn attn_output_weight(&self, l: usize) -> Option<Result<Tensor, ModelError>> {
        self.layers
            .get(l)
            .map(|layer| layer.o.weight.to_dense(&self.device, self.dtype))
    }

    /// How the weight matrices are held.
    pub fn weight_storage(&self) -> WeightStorage {
        match self.lm_head {
            Weight::Stored(_) => WeightStorage::Stored,
            Weight::Dense(_) => WeightStorage::Dense,
        }
    }

    /// `RMSNorm` with layer `l`'s `attn_norm` of a residual stream `x` `(n, n_embd)`: what the
    /// layer's attention (or its linear stand-in) reads.
    pub fn attn_norm_no_grad(&self, l: usize, x: &Tensor) -> Result<Tensor, ModelError> {
        let layer = self.layers.get(l).ok_or(ModelError::NoSuchLayer {
            layer: l,
            n_layer: self.arch.n_layer,
        })?;
        Ok(ops::rms_norm(x, &layer.attn_norm, self.arch.rms_norm_eps)?)
    }

    /// The architecture.
    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Trainable scalars holding `values`, in this model's dtype on its device.
    pub fn scales(&self, values: &ScaleValues) -> Result<Scales, ModelError> {
        values.check_len(self.arch.n_layer)?;
        LinearAttention::check_all(&values.linear, self.arch.n_layer, self.arch.n_embd)?;
        Scales::new(values, self.dtype, &self.device)
    }

    /// The hidden states after the final norm, `(b, t, n_embd)`, for right-padded token ids
    /// `(b, t)` of dtype u32. Gradients flow to `scales`; `skip[l]` bypasses layer `l`'s
    /// attention. A prefix all rows share is computed once ([`Model::pass_sharing_prefix`]).
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        scales: &Scales,
        skip: &[bool],
    ) -> Result<Tensor, ModelError> {
        self.pass_sharing_prefix(input_ids, scales, skip, true)?
            .whole(None)
    }

    /// [`Model::forward_hidden`] without recording a graph: for evaluation and teacher outputs.
    pub fn forward_hidden_no_grad(
        &self,
        input_ids: &Tensor,
        scales: &Scales,
        skip: &[bool],
    ) -> Result<Tensor, ModelError> {
        self.pass_sharing_prefix(input_ids, scales, skip, false)?
            .whole(None)
    }

    /// The residual stream entering every layer, `n_layer` tensors of shape `(rows, n_embd)`
    /// (a prefix all rows share held once, [`Pass::rows`]), without a graph: the shared start of
    /// many forward passes that differ only from some layer on
    /// ([`Model::forward_hidden_from_no_grad`]).
    pub fn residuals_no_grad(
        &self,
        input_ids: &Tensor,
        scales: &Scales,
        skip: &[bool],
    ) -> Result<Vec<Tensor>, ModelError> {
        let pass = self.pass_sharing_prefix(input_ids, scales, skip, false)?;
        let mut x = pass.embed()?;
        let mut residuals = Vec::with_capacity(self.arch.n_layer);
        for l in 0..self.arch.n_layer {
            let out = pass.layer(l, &x, None)?.out;
            residuals.push(std::mem::replace(&mut x, out));
        }
        Ok(residuals)
    }

    /// The residual stream around every layer's attention block with nothing skipped and every
    /// scalar 1, without a graph: per layer, `(X, X + Attn(Norm(X)))`, `X` the stream entering
    /// it, each `(b * t, n_embd)`. One forward pass; LLM-Drop's attention importance compares
    /// the two.
    pub fn attention_residuals_no_grad(
        &self,
        input_ids: &Tensor,
    ) -> Result<Vec<(Tensor, Tensor)>, ModelError> {
        let n_layer = self.arch.n_layer;
        let ones = self.scales(&ScaleValues::ones(n_layer))?;
        let skip = vec![false; n_layer];
        let pass = self.pass(input_ids, &ones, &skip, false)?;
        let mut x = pass.embed()?;
        let mut out = Vec::with_capacity(n_layer);
        for l in 0..n_layer {
            let step = pass.layer(l, &x, None)?;
            out.push((std::mem::replace(&mut x, step.out), step.attn));
        }
        Ok(out)
    }

    /// The hidden states after the final norm, `(b, t, n_embd)`, running layers `from..` on
    /// `residual`, the stream entering layer `from` as [`Model::residuals_no_grad`] gives it for
    /// the same token ids `(b, t)`. Equals [`Model::forward_hidden_no_grad`] bit for bit when
    /// the layers before `from` ran with the same scalars and skip mask.
    pub fn forward_hidden_from_no_grad(
        &self,
        input_ids: &Tensor,
        residual: &Tensor,
        from: usize,
        scales: &Scales,
        skip: &[bool],
    ) -> Result<Tensor, ModelError> {
        let pass = self.pass_sharing_prefix(input_ids, scales, skip, false)?;
        if from >= self.arch.n_layer || residual.dims() != [pass.rows(), self.arch.n_embd] {
            return Err(input_error(
                "residual",
                residual,
                "(rows, n_embd), entering a layer of the model",
            ));
        }
        let mut x = residual.clone();
        for l in from..self.arch.n_layer {
            x = pass.layer(l, &x, None)?.out;
        }
        pass.final_norm(&x, None)
    }

    /// Runs the forward pass on token ids `(b, t)` without a graph and calls `tap` with the input
    /// of every weight matrix, `(b * t, in_features)`, in the order the pass reaches them
    /// (skipped attention blocks have none; `output.weight`'s input comes last). Rows at padding
    /// positions are included: the caller masks them.
    pub fn weight_inputs_no_grad(
        &self,
        input_ids: &Tensor,
        scales: &Scales,
        skip: &[bool],
        tap: &mut WeightInputTap<'_>,
    ) -> Result<(), ModelError> {
        self.pass(input_ids, scales, skip, false)?
            .whole(Some(tap))?;
        Ok(())
    }

    /// Logits `(n, vocab)` at `positions` (u32, `(n)`, flat indices `batch_index * t + token`
    /// into `hidden` of shape `(b, t, n_embd)`). Only the gathered rows go through the LM head.
    pub fn logits_at(&self, hidden: &Tensor, positions: &Tensor) -> Result<Tensor, ModelError> {
        let rows = self.rows_at(hidden, positions)?;
        Ok(self.lm_head.linear(&rows, None)?)
    }

    /// Next-token log-probabilities at `positions` (as [`Model::logits_at`]) of the tokens `ids`
    /// `(n, k)` u32, `k` distinct ids per position: `(n, k)`. The logits are computed a chunk of
    /// the vocabulary at a time and none are kept for the backward pass, which computes them
    /// again: training memory does not grow with the vocabulary.
    pub fn log_probs_at(
        &self,
        hidden: &Tensor,
        positions: &Tensor,
        ids: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let rows = self.rows_at(hidden, positions)?;
        let n = positions.dim(0)?;
        if ids.rank() != 2 || ids.dtype() != DType::U32 || ids.dim(0)? != n {
            return Err(input_error("ids", ids, "(n, k) of u32, a row per position"));
        }
        Ok(vocab::log_softmax_at(&rows, &self.lm_head, ids)?)
    }

    /// The rows of `hidden` `(b, t, n_embd)` at `positions`, `(n, n_embd)`.
    fn rows_at(&self, hidden: &Tensor, positions: &Tensor) -> Result<Tensor, ModelError> {
        let (b, t, d) = hidden
            .dims3()
            .map_err(|_| input_error("hidden", hidden, "(b, t, n_embd)"))?;
        if d != self.arch.n_embd {
            return Err(input_error("hidden", hidden, "(b, t, n_embd)"));
        }
        if positions.rank() != 1 || positions.dtype() != DType::U32 || positions.dim(0)? == 0 {
            return Err(input_error("positions", positions, "non-empty (n) of u32"));
        }
        let max = positions.max(0)?.to_scalar::<u32>()?;
        if max as usize >= b * t {
            return Err(ModelError::PositionOutOfRange {
                position: max,
                len: b * t,
            });
        }
        Ok(hidden.reshape((b * t, d))?.index_select(positions, 0)?)
    }
}

/// A tensor whose bytes are not what its type and shape say.
fn invalid(name: &str, message: String) -> ModelError {
    CheckpointError::Invalid {
        path: SOURCE_LABEL.to_string(),
        message: format!("tensor {name}: {message}"),
    }
    .into()
}

/// Dequantizes `t` a panel at a time, the panels side by side on rayon's pool, and refuses it
/// at its first non-finite value.
fn check_finite(t: &StoredTensor) -> Result<(), ModelError> {
    use rayon::prelude::*;
    let cols = t.cols().max(1);
    let panels: Vec<(usize, usize)> = ops::panels(t).collect();
    let found = panels
        .par_iter()
        .map_init(Vec::new, |values: &mut Vec<f32>, &(first, n)| {
            values.resize(n * cols, 0.0);
            t.rows_into(first, values)
                .map_err(|message| invalid(t.name(), message))?;
            match values.iter().position(|v| !v.is_finite()) {
                Some(i) => Err(invalid(
                    t.name(),
                    format!(
                        "holds a non-finite value ({}) at flat index {}",
                        values[i],
                        first * cols + i
                    ),
                )),
                None => Ok(()),
            }
        })
        .collect::<Vec<_>>();
    found.into_iter().collect()
}

/// An [`ModelError::Input`] describing `tensor`.
fn input_error(name: &'static str, tensor: &Tensor, expected: &'static str) -> ModelError {
    ModelError::Input {
        name,
        expected,
        found: tensor.dims().to_vec(),
        dtype: tensor.dtype(),
    }
}

/// Refuses architectures the forward pass cannot run.
fn validate_arch(arch: &Arch) -> Result<(), ModelError> {
    arch.validate()
        .map_err(|message| ModelError::InvalidArch { message })?;
    match &arch.rope_scaling {
        Some(RopeScaling::Linear { factor }) | Some(RopeScaling::Llama3 { factor, .. })
            if !(factor.is_finite() && *factor > 0.0) =>
        {
            Err(ModelError::InvalidArch {
                message: format!("rope scaling factor {factor} must be positive"),
            })
        }
        _ => Ok(()),
    }
}

/// Rope inverse frequencies per rotated pair (llama3 factors applied) and the position scale
/// (linear scaling), as Hugging Face's rotary embedding computes them.
fn rope_frequencies(arch: &Arch) -> (Vec<f64>, f64) {
    let dim = arch.head_dim;
    let mut inv_freq: Vec<f64> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / arch.rope_theta.powf(i as f64 / dim as f64))
        .collect();
    if let Some(factors) = arch.llama3_rope_factors() {
        for (f, factor) in inv_freq.iter_mut().zip(factors) {
            *f /= factor as f64;
        }
    }
    let position_scale = match arch.rope_scaling {
        Some(RopeScaling::Linear { factor }) => 1.0 / factor,
        _ => 1.0,
    };
    (inv_freq, position_scale)
}

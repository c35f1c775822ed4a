//! Differentiable building blocks for training only the Hopscotch scalars.
//!
//! candle's fused `rms_norm`, `rope` and `softmax_last_dim` kernels have no backward, and its
//! matmul backward also computes the gradient of the (frozen) weight: about 2.5x the forward time
//! and gigabytes of gradients nobody reads. Each op here is a [`CustomOp1`] on the activation
//! only, so the backward pass yields the activation's gradient and nothing else:
//!
//! - [`linear`]: `x @ W^T + b` computed in the op's forward through the backend's own matmul
//!   (CPU, CUDA and Metal alike); backward is `grad @ W`.
//! - [`stored_linear`]: the same for a weight kept in its stored precision ([`StoredTensor`]):
//!   a panel of its rows at a time is dequantized to f32 and multiplied, in the forward pass and
//!   in the backward pass alike, so the f32 weight never exists whole.
//! - [`rms_norm`], [`rope`], [`causal_softmax`]: the value comes from candle's fused kernel on the
//!   detached input and is handed to the op, whose forward returns a copy of it; the backward is
//!   the analytic one, written with primitive ops.
//!
//! When the input does not depend on a trainable variable (the first attention block, or a
//! forward pass without gradients) every op returns the plain value and records nothing.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, MetalStorage, Result, Shape,
    Storage, Tensor, Var, D,
};

use crate::checkpoint::StoredTensor;

/// The f32 values of a stored weight dequantized at a time: a panel of whole rows of about
/// 1 MiB, small enough to stay in a core's cache while it is multiplied.
const PANEL_VALUES: usize = 1 << 18;

/// `x @ weight^T (+ bias)` for `x` of shape `(m, in)`, `weight` `(out, in)`, `bias` `(out)`;
/// the backward pass gives `x` its gradient and never computes one for the weight or the bias.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if !x.track_op() {
        let y = x.matmul(&weight.t()?)?;
        return match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let (_, k) = x.dims2()?;
    let (_, k_w) = weight.dims2()?;
    if k != k_w {
        candle_core::bail!(
            "frozen linear: input {:?} does not match weight {:?}",
            x.shape(),
            weight.shape()
        );
    }
    let x = x.contiguous()?;
    x.apply_op1(FrozenLinear {
        weight: weight.contiguous()?,
        bias: bias.map(Tensor::contiguous).transpose()?,
    })
}

/// A linear map whose weight and bias are constants of the graph.
struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl FrozenLinear {
    /// The forward pass on any backend's storage; `x` is `(m, in)` and contiguous.
    fn forward<S: BackendStorage>(
        x: &S,
        x_layout: &Layout,
        weight: &S,
        weight_layout: &Layout,
        bias: Option<(&S, &Layout)>,
    ) -> Result<(S, Shape)> {
        let (m, k) = x_layout.shape().dims2()?;
        let (n, _) = weight_layout.shape().dims2()?;
        let weight_t = weight_layout.transpose(0, 1)?;
        let y = x.matmul(weight, (1, m, n, k), x_layout, &weight_t)?;
        let y = match bias {
            Some((b, b_layout)) => y.binary_impl::<candle_core::op::Add>(
                b,
                &Layout::contiguous((m, n)),
                &b_layout.broadcast_as((m, n))?,
            )?,
            None => y,
        };
        Ok((y, Shape::from((m, n))))
    }
}

/// The body of a backend's forward pass: borrow the constants' storage on that backend.
macro_rules! frozen_linear_forward {
    ($op:expr, $x:expr, $layout:expr, $variant:ident) => {{
        let (w_guard, w_layout) = $op.weight.storage_and_layout();
        let Storage::$variant(w) = &*w_guard else {
            candle_core::bail!("frozen-linear: weight is on another device than the input")
        };
        let b_guard = $op.bias.as_ref().map(Tensor::storage_and_layout);
        let bias = match &b_guard {
            Some((guard, b_layout)) => match &**guard {
                Storage::$variant(b) => Some((b, *b_layout)),
                _ => candle_core::bail!("frozen-linear: bias is on another device than the input"),
            },
            None => None,
        };
        Self::forward($x, $layout, w, w_layout, bias)
    }};
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        frozen_linear_forward!(self, x, layout, Cpu)
    }

    fn cuda_fwd(&self, x: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        frozen_linear_forward!(self, x, layout, Cuda)
    }

    fn metal_fwd(&self, x: &MetalStorage, layout: &Layout) -> Result<(MetalStorage, Shape)> {
        frozen_linear_forward!(self, x, layout, Metal)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight)?))
    }
}

/// `x @ weight^T (+ bias)` for `x` of shape `(m, in)` and a stored `weight` `(out, in)`,
/// dequantized a panel of rows at a time; the backward pass gives `x` its gradient, `grad @
/// weight`, dequantizing the same panels again, and never computes one for the weight.
pub fn stored_linear(
    x: &Tensor,
    weight: &Arc<StoredTensor>,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let mut value = stored_matmul(&x.detach(), weight)?;
    if let Some(b) = bias {
        value = value.broadcast_add(b)?;
    }
    let weight = Arc::clone(weight);
    with_backward(&x, value, "stored-linear", move |_x, _y, grad| {
        stored_matmul_grad(grad, &weight)
    })
}

/// `0..total` in consecutive runs of `step` (at least 1), the last one shorter:
/// `(first, len)`.
pub fn runs(total: usize, step: usize) -> impl Iterator<Item = (usize, usize)> {
    let step = step.max(1);
    (0..total)
        .step_by(step)
        .map(move |first| (first, step.min(total - first)))
}

/// The panels of `weight`'s rows: `(first row, rows)`.
pub(super) fn panels(weight: &StoredTensor) -> impl Iterator<Item = (usize, usize)> {
    runs(weight.rows(), PANEL_VALUES / weight.cols().max(1))
}

/// Rows `first..first + n` of `weight` as an `(n, cols)` tensor like `like`.
pub(super) fn panel(
    weight: &StoredTensor,
    first: usize,
    n: usize,
    like: &Tensor,
) -> Result<Tensor> {
    let cols = weight.cols();
    let mut values = vec![0f32; n * cols];
    weight
        .rows_into(first, &mut values)
        .map_err(candle_core::Error::Msg)?;
    Tensor::from_vec(values, (n, cols), like.device())?.to_dtype(like.dtype())
}

/// `x @ weight^T`: `(m, cols)` to `(m, rows)`.
fn stored_matmul(x: &Tensor, weight: &StoredTensor) -> Result<Tensor> {
    let (_, k) = x.dims2()?;
    if k != weight.cols() || weight.shape().len() != 2 {
        candle_core::bail!(
            "stored linear: input {:?} does not match weight {} {:?}",
            x.shape(),
            weight.name(),
            weight.shape()
        );
    }
    let mut parts = panels(weight)
        .map(|(first, n)| x.matmul(&panel(weight, first, n, x)?.t()?))
        .collect::<Result<Vec<_>>>()?;
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    Tensor::cat(&parts, 1)
}

/// `grad @ weight`: `(m, rows)` to `(m, cols)`, summed over the panels in order.
fn stored_matmul_grad(grad: &Tensor, weight: &StoredTensor) -> Result<Tensor> {
    let mut sum: Option<Tensor> = None;
    for (first, n) in panels(weight) {
        let part = grad
            .narrow(1, first, n)?
            .contiguous()?
            .matmul(&panel(weight, first, n, grad)?)?;
        sum = Some(match sum {
            Some(s) => (s + part)?,
            None => part,
        });
    }
    sum.ok_or_else(|| {
        candle_core::Error::Msg(format!("stored linear: {} has no rows", weight.name()))
    })
}

/// An op whose value was computed beforehand (by a fused kernel without backward) and whose
/// backward is given as a function of `(input, output, output gradient)`.
struct Precomputed<F> {
    name: &'static str,
    /// Taken by the forward pass, so the graph does not keep a second copy alive.
    value: Mutex<Option<Tensor>>,
    backward: F,
}

/// Attaches `backward` to `value`, the freshly computed result of a kernel applied to
/// `x.detach()`. `value` must own its storage (offset 0, contiguous, nothing else in it), as a
/// kernel's output does.
pub(super) fn with_backward<F>(
    x: &Tensor,
    value: Tensor,
    name: &'static str,
    backward: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    if !x.track_op() {
        return Ok(value);
    }
    if !value.is_contiguous() || value.layout().start_offset() != 0 {
        candle_core::bail!("{name}: precomputed value does not own its storage");
    }
    x.apply_op1(Precomputed {
        name,
        value: Mutex::new(Some(value)),
        backward,
    })
}

/// The body of a [`Precomputed`] forward pass on one backend: a copy of the value's storage.
macro_rules! precomputed_forward {
    ($op:expr, $variant:ident, $device:literal) => {{
        let value = $op.take()?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::$variant(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("{}: value is not on the {}", $op.name, $device),
        }
    }};
}

impl<F> Precomputed<F> {
    fn take(&self) -> Result<Tensor> {
        let mut slot = self
            .value
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: poisoned value", self.name)))?;
        slot.take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward run twice", self.name)))
    }
}

impl<F> CustomOp1 for Precomputed<F>
where
    F: Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _x: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        precomputed_forward!(self, Cpu, "cpu")
    }

    fn cuda_fwd(&self, _x: &CudaStorage, _layout: &Layout) -> Result<(CudaStorage, Shape)> {
        precomputed_forward!(self, Cuda, "cuda device")
    }

    fn metal_fwd(&self, _x: &MetalStorage, _layout: &Layout) -> Result<(MetalStorage, Shape)> {
        precomputed_forward!(self, Metal, "metal device")
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        (self.backward)(x, y, grad).map(Some)
    }
}

/// `value`, the freshly computed `f(x.detach(), p.detach())`, in a graph that keeps only `x`,
/// `p` and the value: the backward pass runs `f` again on `x` and `p` to get their gradients
/// (activation recomputation: a layer's intermediate tensors live only while its gradient is
/// computed). `value` must own its storage, as with [`with_backward`].
pub fn recomputed<F>(x: &Tensor, p: &Tensor, value: Tensor, f: F) -> Result<Tensor>
where
    F: Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    if !value.is_contiguous() || value.layout().start_offset() != 0 {
        candle_core::bail!("recomputed: the value does not own its storage");
    }
    x.apply_op2(
        p,
        Precomputed {
            name: "recomputed",
            value: Mutex::new(Some(value)),
            backward: move |x: &Tensor, p: &Tensor, grad: &Tensor| {
                let (x, p) = (Var::from_tensor(x)?, Var::from_tensor(p)?);
                let y = f(x.as_tensor(), p.as_tensor())?;
                let grads = (y * grad.detach())?.sum_all()?.backward()?;
                Ok((
                    grads.get(x.as_tensor()).cloned(),
                    grads.get(p.as_tensor()).cloned(),
                ))
            },
        },
    )
}

impl<F> CustomOp2 for Precomputed<F>
where
    F: Fn(&Tensor, &Tensor, &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        precomputed_forward!(self, Cpu, "cpu")
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        precomputed_forward!(self, Cuda, "cuda device")
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        precomputed_forward!(self, Metal, "metal device")
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        (self.backward)(x, p, grad)
    }
}

/// RMSNorm over the last dimension, `x / sqrt(mean(x^2) + eps) * weight`, with a backward pass.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let value = if x.dtype() == DType::F64 {
        // the fused kernel has no f64 path
        candle_nn::ops::rms_norm_slow(&x.detach(), weight, eps as f32)?
    } else {
        candle_nn::ops::rms_norm(&x.detach(), weight, eps as f32)?
    };
    let weight = weight.clone();
    with_backward(&x, value, "rms-norm", move |x, _y, grad| {
        // dx = r * (g*w - xhat * mean(g*w*xhat)), r = 1/sqrt(mean(x^2)+eps), xhat = x*r
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        let x_hat = x.broadcast_mul(&r)?;
        let gw = grad.broadcast_mul(&weight)?;
        let proj = (&gw * &x_hat)?.mean_keepdim(D::Minus1)?;
        (gw - x_hat.broadcast_mul(&proj)?)?.broadcast_mul(&r)
    })
}

/// Rotary position embedding in the rotate-half (NEOX) layout, with a backward pass.
///
/// `x` is `(b, heads, t, head_dim)`; `cos` and `sin` are `(t, head_dim / 2)`. The backward pass
/// rotates the gradient back by the same angles.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let value = candle_nn::rotary_emb::rope(&x.detach(), cos, sin)?;
    let cos = cos.clone();
    let sin_back = sin.neg()?;
    with_backward(&x, value, "rope", move |_x, _y, grad| {
        candle_nn::rotary_emb::rope(&grad.contiguous()?, &cos, &sin_back)
    })
}

/// `softmax(scale * scores + causal_mask)` over the last dimension, with a backward pass.
///
/// `scores` is `(.., t, t)` and `causal_mask` is `(t, t)`, 0 on and below the diagonal and
/// `-inf` above it.
pub fn causal_softmax(scores: &Tensor, scale: f64, causal_mask: &Tensor) -> Result<Tensor> {
    let value =
        candle_nn::ops::softmax_last_dim(&(scores.detach() * scale)?.broadcast_add(causal_mask)?)?;
    with_backward(scores, value, "causal-softmax", move |_x, y, grad| {
        // dx = scale * y * (g - sum(g * y))
        let dot = (grad * y)?.sum_keepdim(D::Minus1)?;
        (grad.broadcast_sub(&dot)? * y)? * scale
    })
}

//! The log-probabilities of a few tokens per row under the softmax over the whole vocabulary,
//! with the logits computed a chunk of the vocabulary at a time: in the forward pass a running
//! log-sum-exp and the picked logits, in the backward pass the chunk's logits again, so no
//! `(rows, vocab)` tensor is ever kept for the backward pass (a 128k vocabulary makes that 0.5 MB
//! per target position, and training keeps every position of a part).

use candle_core::{Result, Tensor, D};

use super::ops;
use super::weight::Weight;

/// The f32 values of the LM head's rows taken at a time: a chunk of the vocabulary of about
/// 16 MiB (7,281 tokens of a 576-wide model, 1,024 of a 4,096-wide one).
const CHUNK_VALUES: usize = 1 << 22;

/// `log_softmax(x @ head^T)` at `ids`: `(n, k)` for `x` `(n, cols)` and `ids` `(n, k)` u32
/// token ids, with a backward pass for `x` only. The ids of a row must be distinct.
pub(super) fn log_softmax_at(x: &Tensor, head: &Weight, ids: &Tensor) -> Result<Tensor> {
    let (_, cols) = head.dims();
    log_softmax_at_in_chunks(x, head, ids, chunk_tokens(cols))
}

/// The tokens of a chunk of the vocabulary for a model `n_embd` wide.
pub fn chunk_tokens(n_embd: usize) -> usize {
    (CHUNK_VALUES / n_embd.max(1)).max(1)
}

/// [`log_softmax_at`] with chunks of `chunk` tokens.
fn log_softmax_at_in_chunks(
    x: &Tensor,
    head: &Weight,
    ids: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (n, k) = ids.dims2()?;
    let (rows, cols) = head.dims();
    if x.dims2()? != (n, cols) {
        candle_core::bail!(
            "log_softmax_at: input {:?} and ids {:?} do not match a head of {rows}x{cols}",
            x.shape(),
            ids.shape()
        );
    }
    let id_values = ids.flatten_all()?.to_vec1::<u32>()?;
    if let Some(&bad) = id_values.iter().find(|&&i| i as usize >= rows) {
        candle_core::bail!("log_softmax_at: token id {bad} is outside the vocabulary of {rows}");
    }
    let chunks: Vec<Chunk> = ops::runs(rows, chunk)
        .map(|(first, len)| Chunk::new(first, len, &id_values, (n, k), &x))
        .collect::<Result<_>>()?;

    let detached = x.detach();
    let mut picked = Tensor::zeros((n, k), x.dtype(), x.device())?;
    let mut running: Option<(Tensor, Tensor)> = None; // (max, sum of exp(z - max)), (n, 1)
    for chunk in &chunks {
        let z = detached.matmul(&head.rows(chunk.first, chunk.len, &x)?.t()?)?;
        picked = (picked + chunk.pick(&z)?)?;
        let chunk_max = z.max_keepdim(D::Minus1)?;
        running = Some(match running {
            None => {
                let sum = z.broadcast_sub(&chunk_max)?.exp()?.sum_keepdim(D::Minus1)?;
                (chunk_max, sum)
            }
            Some((max, sum)) => {
                let new_max = max.maximum(&chunk_max)?;
                let kept = (sum * (max - &new_max)?.exp()?)?;
                let added = z.broadcast_sub(&new_max)?.exp()?.sum_keepdim(D::Minus1)?;
                (new_max, (kept + added)?)
            }
        });
    }
    let (max, sum) = running.ok_or_else(|| candle_core::Error::Msg("empty head".into()))?;
    let lse = (max + sum.log()?)?;
    let value = picked.broadcast_sub(&lse)?.contiguous()?;

    let head = head.clone();
    ops::with_backward(&x, value, "log-softmax-at", move |x, _y, grad| {
        // d/dz_v = sum_j grad_j [v = id_j] - (sum_j grad_j) q_v, then d/dx = (d/dz) @ head
        let grad_sum = grad.sum_keepdim(D::Minus1)?;
        let mut dx: Option<Tensor> = None;
        for chunk in &chunks {
            let w = head.rows(chunk.first, chunk.len, x)?;
            let q = x.matmul(&w.t()?)?.broadcast_sub(&lse)?.exp()?;
            let dz = (chunk.scatter(grad)? - q.broadcast_mul(&grad_sum)?)?;
            let part = dz.matmul(&w)?;
            dx = Some(match dx {
                Some(sum) => (sum + part)?,
                None => part,
            });
        }
        dx.ok_or_else(|| candle_core::Error::Msg("empty head".into()))
    })
}

/// A chunk of the vocabulary and where the picked ids fall in it.
struct Chunk {
    first: usize,
    len: usize,
    /// Each id's column within the chunk, 0 where it lies outside, `(n, k)` u32.
    local: Tensor,
    /// 1 where the id lies in the chunk, 0 elsewhere, `(n, k)` in the input's dtype.
    inside: Tensor,
}

impl Chunk {
    fn new(
        first: usize,
        len: usize,
        ids: &[u32],
        shape: (usize, usize),
        like: &Tensor,
    ) -> Result<Self> {
        let within = |i: u32| (first..first + len).contains(&(i as usize));
        let local: Vec<u32> = ids
            .iter()
            .map(|&i| if within(i) { i - first as u32 } else { 0 })
            .collect();
        let inside: Vec<f32> = ids
            .iter()
            .map(|&i| f32::from(u8::from(within(i))))
            .collect();
        Ok(Chunk {
            first,
            len,
            local: Tensor::from_vec(local, shape, like.device())?,
            inside: Tensor::from_vec(inside, shape, like.device())?.to_dtype(like.dtype())?,
        })
    }

    /// The chunk's logits `z` `(n, len)` at the ids inside it, 0 elsewhere: `(n, k)`.
    fn pick(&self, z: &Tensor) -> Result<Tensor> {
        z.contiguous()?.gather(&self.local, 1)? * &self.inside
    }

    /// `grad` `(n, k)` added at the ids inside the chunk: `(n, len)`.
    fn scatter(&self, grad: &Tensor) -> Result<Tensor> {
        let (n, _) = grad.dims2()?;
        Tensor::zeros((n, self.len), grad.dtype(), grad.device())?.scatter_add(
            &self.local,
            &(grad * &self.inside)?,
            1,
        )
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, D};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::gguf::GgmlType;
    use crate::model::tests::{grad_through, max_abs_diff, stored_as};

    /// `log_softmax(x @ w^T)` at `ids` with candle's whole-row ops.
    fn whole(x: &Tensor, w: &Tensor, ids: &Tensor) -> Result<Tensor> {
        candle_nn::ops::log_softmax(&x.matmul(&w.t()?)?, D::Minus1)?.gather(ids, 1)
    }

    /// Values drawn uniformly from `-scale..scale` with `seed`, shaped `(rows, cols)`, in `dtype`.
    fn seeded(rows: usize, cols: usize, scale: f32, seed: u64, dtype: DType) -> Tensor {
        let mut rng = StdRng::seed_from_u64(seed);
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| rng.gen_range(-scale..scale))
            .collect();
        Tensor::from_vec(values, (rows, cols), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// A random head: a vocabulary of 50 (in chunks of 7, the last one is short), 32 wide.
    fn random_head(dtype: DType) -> Tensor {
        seeded(50, 32, 1.7, 1, dtype)
    }

    /// 5 random rows `x`, 3 distinct ids each, and the weights `r` of the loss `sum(r * y)`.
    fn inputs(dtype: DType) -> (Tensor, Tensor, Tensor) {
        let dev = Device::Cpu;
        let x = seeded(5, 32, 5.0, 2, dtype);
        let ids = Tensor::new(
            &[
                [0u32, 49, 7],
                [6, 13, 14],
                [20, 21, 22],
                [48, 1, 35],
                [9, 42, 28],
            ],
            &dev,
        )
        .unwrap();
        (x, ids, seeded(5, 3, 1.7, 3, dtype))
    }

    /// Asserts that `head` in chunks of `chunk` gives the values and input gradient (of
    /// `sum(r * y)`) that the whole rows of `dense` give, within `bound`.
    fn assert_equals_whole(head: &Weight, dense: &Tensor, chunk: usize, bound: f32, what: &str) {
        let (x, ids, r) = inputs(dense.dtype());
        let (y1, g1, _, _) =
            grad_through(&x, &r, |x| log_softmax_at_in_chunks(x, head, &ids, chunk));
        let (y2, g2, _, _) = grad_through(&x, &r, |x| whole(x, dense, &ids));
        let (dy, dg) = (max_abs_diff(&y1, &y2), max_abs_diff(&g1, &g2));
        assert!(dy < bound, "{what}: values differ by {dy:e}");
        assert!(dg < bound, "{what}: gradients differ by {dg:e}");
    }

    #[test]
    fn chunked_log_probs_and_gradient_equal_the_whole_rows() {
        let w = random_head(DType::F64);
        let head = Weight::Dense(w.clone());
        for chunk in [1, 7, 50, 64] {
            assert_equals_whole(&head, &w, chunk, 1e-12, &format!("chunk {chunk}"));
        }
    }

    #[test]
    fn chunked_log_probs_of_a_stored_head_equal_its_dequantized_rows() {
        let w = random_head(DType::F32);
        let values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for dtype in [GgmlType::BF16, GgmlType::Q8_0] {
            let stored = stored_as(dtype, &values, 50, 32);
            let dense = Tensor::from_vec(stored.to_f32().unwrap(), (50, 32), &Device::Cpu).unwrap();
            let head = Weight::Stored(std::sync::Arc::new(stored));
            assert_equals_whole(&head, &dense, 7, 1e-5, &format!("{dtype:?}"));
        }
    }

    #[test]
    fn ids_outside_the_vocabulary_or_of_another_shape_are_refused() {
        let (x, _, _) = inputs(DType::F32);
        let head = Weight::Dense(random_head(DType::F32));
        let out = Tensor::new(&[[50u32]; 5], &Device::Cpu).unwrap();
        let err = log_softmax_at(&x, &head, &out).unwrap_err().to_string();
        assert!(
            err.contains("token id 50 is outside the vocabulary of 50"),
            "{err}"
        );
        let short = Tensor::new(&[[1u32]; 4], &Device::Cpu).unwrap();
        let err = log_softmax_at(&x, &head, &short).unwrap_err().to_string();
        assert!(err.contains("do not match"), "{err}");
    }
}

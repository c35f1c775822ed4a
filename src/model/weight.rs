//! A frozen weight matrix as the model holds it: in the precision its checkpoint stores it in
//! (on the CPU), or dequantized on the device (on a GPU, whose memory holds f32 weights and whose
//! matmuls want them whole).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::{ops, ModelError};
use crate::checkpoint::StoredTensor;

/// How [`super::Model`] holds its weight matrices and embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightStorage {
    /// As stored (f32, f16, bf16 or quantized blocks), a panel dequantized at a time per use.
    Stored,
    /// Dequantized whole to the model's dtype on its device.
    Dense,
}

impl WeightStorage {
    /// Stored on the CPU, dense elsewhere.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            WeightStorage::Stored
        } else {
            WeightStorage::Dense
        }
    }
}

/// A frozen matrix `(rows, cols)`.
#[derive(Debug, Clone)]
pub(super) enum Weight {
    /// Whole, in the model's dtype.
    Dense(Tensor),
    /// As stored.
    Stored(Arc<StoredTensor>),
}

impl Weight {
    /// `x @ self^T (+ bias)` for `x` `(m, cols)`, with a backward pass for `x` only.
    pub(super) fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
        match self {
            Weight::Dense(w) => ops::linear(x, w, bias),
            Weight::Stored(w) => ops::stored_linear(x, w, bias),
        }
    }

    /// `(rows, cols)`.
    pub(super) fn dims(&self) -> (usize, usize) {
        match self {
            Weight::Dense(w) => {
                let dims = w.dims();
                (dims[0], dims[1])
            }
            Weight::Stored(w) => (w.rows(), w.cols()),
        }
    }

    /// Rows `first..first + n` as `(n, cols)` in `like`'s dtype on its device.
    pub(super) fn rows(
        &self,
        first: usize,
        n: usize,
        like: &Tensor,
    ) -> candle_core::Result<Tensor> {
        match self {
            Weight::Dense(w) => w.narrow(0, first, n)?.to_dtype(like.dtype()),
            Weight::Stored(w) => ops::panel(w, first, n, like),
        }
    }

    /// Rows `ids` `(n)` as `(n, cols)`.
    pub(super) fn gather(&self, ids: &Tensor, dtype: DType) -> Result<Tensor, ModelError> {
        match self {
            Weight::Dense(w) => Ok(w.index_select(ids, 0)?),
            Weight::Stored(w) => {
                let ids = ids.to_vec1::<u32>()?;
                let values = w.gather(&ids).map_err(candle_core::Error::Msg)?;
                // stored weights are the CPU's
                Ok(
                    Tensor::from_vec(values, (ids.len(), w.cols()), &Device::Cpu)?
                        .to_dtype(dtype)?,
                )
            }
        }
    }

    /// The whole matrix in `dtype` on `device`.
    pub(super) fn to_dense(&self, device: &Device, dtype: DType) -> Result<Tensor, ModelError> {
        match self {
            Weight::Dense(w) => Ok(w.to_dtype(dtype)?),
            Weight::Stored(w) => {
                let values = w.to_f32().map_err(candle_core::Error::Msg)?;
                Ok(Tensor::from_vec(values, (w.rows(), w.cols()), device)?.to_dtype(dtype)?)
            }
        }
    }
}

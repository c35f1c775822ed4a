//! The Hopscotch scalars as candle variables: what a training step optimizes and a forward pass
//! reads, with the linear stand-ins as constants of the graph.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use super::weight::{Weight, WeightStorage};
use super::ModelError;
use crate::checkpoint::StoredTensor;
use crate::plan::{LinearAttention, ScaleValues};

/// The four scalars per layer as trainable candle variables, each of shape `[n_layer]`, and the
/// linear stand-ins as constants of the graph.
#[derive(Debug, Clone)]
pub struct Scales {
    /// Weight of the attention output.
    pub b_att: Var,
    /// Weight of the residual around attention.
    pub s_att: Var,
    /// Weight of the MLP output.
    pub b_mlp: Var,
    /// Weight of the residual around the MLP.
    pub s_mlp: Var,
    /// The linear stand-ins as given (for [`Scales::values`]).
    linear: Vec<LinearAttention>,
    /// Per layer, its stand-in's weight `(n_embd, n_embd)`: on the CPU the values above
    /// themselves, shared rather than copied, and on a GPU a dense copy on the device.
    linear_weights: Vec<Option<Weight>>,
}

/// The scalars as graph inputs of one forward pass, with the stand-ins.
pub(super) struct ScaleTensors<'a> {
    /// `b_att, s_att, b_mlp, s_mlp`, each `[n_layer]`.
    pub(super) scalars: [Tensor; 4],
    /// Per layer, the weight of its linear stand-in, if it has one.
    pub(super) linear: &'a [Option<Weight>],
}

impl Scales {
    /// Variables holding `values`, in `dtype` on `device` (use [`super::Model::scales`] to match a model
    /// and check the shapes).
    pub fn new(values: &ScaleValues, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let var = |v: &[f32]| -> Result<Var, ModelError> {
            let t = Tensor::from_slice(v, v.len(), device)?.to_dtype(dtype)?;
            Ok(Var::from_tensor(&t)?)
        };
        let mut linear_weights = vec![None; values.b_att.len()];
        for a in &values.linear {
            let width = (a.weight.len() as f64).sqrt() as usize;
            let w = match WeightStorage::for_device(device) {
                WeightStorage::Stored => {
                    let name = format!("blk.{}.stand_in", a.layer);
                    let shared = Arc::clone(&a.weight);
                    let stored = StoredTensor::shared_f32(&name, &[width, width], shared)
                        .map_err(candle_core::Error::Msg)?;
                    Weight::Stored(Arc::new(stored))
                }
                WeightStorage::Dense => Weight::Dense(
                    Tensor::from_slice(&a.weight, (width, width), device)?.to_dtype(dtype)?,
                ),
            };
            if let Some(slot) = linear_weights.get_mut(a.layer) {
                *slot = Some(w);
            }
        }
        Ok(Self {
            b_att: var(&values.b_att)?,
            s_att: var(&values.s_att)?,
            b_mlp: var(&values.b_mlp)?,
            s_mlp: var(&values.s_mlp)?,
            linear: values.linear.clone(),
            linear_weights,
        })
    }

    /// The variables, for an optimizer.
    pub fn vars(&self) -> Vec<Var> {
        vec![
            self.b_att.clone(),
            self.s_att.clone(),
            self.b_mlp.clone(),
            self.s_mlp.clone(),
        ]
    }

    /// The current values.
    pub fn values(&self) -> Result<ScaleValues, ModelError> {
        let read = |v: &Var| -> Result<Vec<f32>, ModelError> {
            Ok(v.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?)
        };
        Ok(ScaleValues {
            b_att: read(&self.b_att)?,
            s_att: read(&self.s_att)?,
            b_mlp: read(&self.b_mlp)?,
            s_mlp: read(&self.s_mlp)?,
            linear: self.linear.clone(),
        })
    }

    /// The scalars and stand-ins as graph inputs: the scalars tracked for training, or detached
    /// for a pass without gradients.
    pub(super) fn tensors(&self, track: bool) -> ScaleTensors<'_> {
        let input = |v: &Var| {
            if track {
                v.as_tensor().clone()
            } else {
                v.as_tensor().detach()
            }
        };
        ScaleTensors {
            scalars: [&self.b_att, &self.s_att, &self.b_mlp, &self.s_mlp].map(input),
            linear: &self.linear_weights,
        }
    }
}

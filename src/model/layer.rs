//! A layer's frozen weights, and what the forward pass shows of its weight matrices' inputs (for
//! importance matrices).

use candle_core::Tensor;

use super::weight::Weight;
use super::ModelError;
use crate::gguf::consts::{blk_tensor, OUTPUT};

/// The input of one or more weight matrices, as [`super::Model::weight_inputs_no_grad`] shows it: what
/// llama.cpp's importance matrix accumulates per tensor (layer `l`'s q, k and v multiply the same
/// input, as do its gate and up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightInput {
    /// The normed stream entering layer `l`'s attention: `blk.l.attn_q/k/v.weight`.
    Qkv(usize),
    /// Layer `l`'s attention heads, concatenated, or the normed stream entering its linear
    /// stand-in: `blk.l.attn_output.weight`.
    AttnOutput(usize),
    /// The normed stream entering layer `l`'s MLP: `blk.l.ffn_gate/up.weight`.
    GateUp(usize),
    /// `silu(gate) * up` of layer `l`: `blk.l.ffn_down.weight`.
    Down(usize),
    /// The final norm's output: `output.weight` (the LM head).
    Output,
}

impl WeightInput {
    /// The GGUF names of the weight matrices this input multiplies.
    pub fn tensor_names(self) -> Vec<String> {
        let blk = |l: usize, suffixes: &[&str]| -> Vec<String> {
            suffixes.iter().map(|s| blk_tensor(l, s)).collect()
        };
        match self {
            WeightInput::Qkv(l) => blk(l, &["attn_q.weight", "attn_k.weight", "attn_v.weight"]),
            WeightInput::AttnOutput(l) => blk(l, &["attn_output.weight"]),
            WeightInput::GateUp(l) => blk(l, &["ffn_gate.weight", "ffn_up.weight"]),
            WeightInput::Down(l) => blk(l, &["ffn_down.weight"]),
            WeightInput::Output => vec![OUTPUT.to_string()],
        }
    }
}

/// What [`super::Model::weight_inputs_no_grad`] calls with every weight matrix's input `(b * t, in)`.
pub type WeightInputTap<'a> = dyn FnMut(WeightInput, &Tensor) -> Result<(), ModelError> + 'a;

/// A frozen projection `x @ weight^T + bias`.
#[derive(Clone)]
pub(super) struct Projection {
    pub(super) weight: Weight,
    pub(super) bias: Option<Tensor>,
}

impl Projection {
    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.weight.linear(x, self.bias.as_ref())
    }
}

/// One transformer layer's frozen weights (a clone shares them).
#[derive(Clone)]
pub(super) struct Layer {
    pub(super) attn_norm: Tensor,
    pub(super) q: Projection,
    pub(super) k: Projection,
    pub(super) v: Projection,
    pub(super) o: Projection,
    pub(super) ffn_norm: Tensor,
    pub(super) gate: Projection,
    pub(super) up: Projection,
    pub(super) down: Projection,
}

//! One forward pass, a layer at a time: the model's parts (the embedding, each layer, the final
//! norm) run on the residual stream `(b * t, n_embd)` of right-padded token ids `(b, t)`, with the
//! scalars, the skip mask and the linear stand-ins. The forward variants of [`Model`] compose
//! these parts; a caller can too.

use candle_core::{DType, Tensor};

use super::layer::{Layer, Projection};
use super::scales::ScaleTensors;
use super::{input_error, ops, Model, ModelError, Scales, WeightInput, WeightInputTap};

/// A forward pass in progress: the checked inputs, and the rope tables and causal mask of its
/// sequence length.
pub struct Pass<'a> {
    model: &'a Model,
    input_ids: Tensor,
    scales: ScaleTensors<'a>,
    skip: &'a [bool],
    b: usize,
    t: usize,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
}

/// What one layer leaves: the stream after its attention block (the stream it got when the block
/// is skipped without a stand-in), and after the whole layer.
pub struct LayerOutput {
    /// `s_att * x + b_att * Attn(Norm(x))`, `(b * t, n_embd)`.
    pub attn: Tensor,
    /// `s_mlp * attn + b_mlp * MLP(Norm(attn))`: the stream entering the next layer.
    pub out: Tensor,
}

impl Model {
    /// A forward pass over right-padded token ids `(b, t)` of dtype u32 with `scales` and the skip
    /// mask (`skip[l]` bypasses layer `l`'s attention), checking them first. With `track` the
    /// gradients flow to the scalars; without, no graph is recorded.
    pub fn pass<'a>(
        &'a self,
        input_ids: &Tensor,
        scales: &'a Scales,
        skip: &'a [bool],
        track: bool,
    ) -> Result<Pass<'a>, ModelError> {
        let scales = scales.tensors(track);

        let n_layer = self.arch.n_layer;
        if skip.len() != n_layer {
            return Err(ModelError::SkipMaskLength {
                expected: n_layer,
                found: skip.len(),
            });
        }
        for (name, s) in ["b_att", "s_att", "b_mlp", "s_mlp"]
            .into_iter()
            .zip(&scales.scalars)
        {
            if s.dims() != [n_layer] {
                return Err(ModelError::ScalesLength {
                    name,
                    expected: n_layer,
                    found: s.elem_count(),
                });
            }
        }
        let expected = "non-empty (b, t) of u32";
        let (b, t) = input_ids
            .dims2()
            .map_err(|_| input_error("input_ids", input_ids, expected))?;
        if b == 0 || t == 0 || input_ids.dtype() != DType::U32 {
            return Err(input_error("input_ids", input_ids, expected));
        }
        let max = input_ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max as usize >= self.arch.vocab_size {
            return Err(ModelError::TokenOutOfRange {
                token: max,
                vocab_size: self.arch.vocab_size,
            });
        }
        let (cos, sin) = self.rope_tables(t)?;
        let mask = self.causal_mask(t)?;
        Ok(Pass {
            model: self,
            input_ids: input_ids.clone(),
            scales,
            skip,
            b,
            t,
            cos,
            sin,
            mask,
        })
    }

    /// Rope `cos` and `sin` tables `(t, head_dim / 2)` for positions `0..t`.
    fn rope_tables(&self, t: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for pos in 0..t {
            for &f in &self.inv_freq {
                let angle = pos as f64 * self.position_scale * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let table =
            |v: Vec<f64>| Tensor::from_vec(v, (t, half), &self.device)?.to_dtype(self.dtype);
        Ok((table(cos)?, table(sin)?))
    }

    /// `(t, t)`: 0 where a query may attend (key position <= query position), `-inf` elsewhere.
    fn causal_mask(&self, t: usize) -> candle_core::Result<Tensor> {
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        Tensor::from_vec(mask, (t, t), &self.device)?.to_dtype(self.dtype)
    }
}

impl Pass<'_> {
    /// Rows of the residual stream, `b * t`.
    pub fn rows(&self) -> usize {
        self.b * self.t
    }

    /// The token embeddings: the stream entering layer 0, `(b * t, n_embd)`.
    pub fn embed(&self) -> Result<Tensor, ModelError> {
        Ok(self
            .model
            .token_embd
            .index_select(&self.input_ids.flatten_all()?, 0)?
            .reshape((self.rows(), self.model.arch.n_embd))?)
    }

    /// Layer `l` on `x`, the stream entering it; `tap` sees the input of each of its weight
    /// matrices (none for a skipped block).
    pub fn layer(
        &self,
        l: usize,
        x: &Tensor,
        mut tap: Option<&mut WeightInputTap<'_>>,
    ) -> Result<LayerOutput, ModelError> {
        let model = self.model;
        let layer = model.layers.get(l).ok_or(ModelError::NoSuchLayer {
            layer: l,
            n_layer: model.arch.n_layer,
        })?;
        let [b_att, s_att, b_mlp, s_mlp] = &self.scales.scalars;
        let eps = model.arch.rms_norm_eps;
        let stand_in = self.scales.linear.get(l).and_then(Option::as_ref);
        let branch = match (self.skip[l], stand_in) {
            (true, None) => None,
            (true, Some(w)) => {
                let h = ops::rms_norm(x, &layer.attn_norm, eps)?;
                if let Some(tap) = tap.as_mut() {
                    tap(WeightInput::AttnOutput(l), &h)?;
                }
                Some(ops::linear(&h, w, None)?)
            }
            (false, _) => {
                let h = ops::rms_norm(x, &layer.attn_norm, eps)?;
                let heads = self.attention(layer, &h)?;
                if let Some(tap) = tap.as_mut() {
                    tap(WeightInput::Qkv(l), &h)?;
                    tap(WeightInput::AttnOutput(l), &heads)?;
                }
                Some(layer.o.forward(&heads)?)
            }
        };
        let x1 = match branch {
            None => x.clone(),
            Some(attn) => {
                (attn.broadcast_mul(&b_att.narrow(0, l, 1)?)?
                    + x.broadcast_mul(&s_att.narrow(0, l, 1)?)?)?
            }
        };
        let h = ops::rms_norm(&x1, &layer.ffn_norm, eps)?;
        let act = (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
        if let Some(tap) = tap.as_mut() {
            tap(WeightInput::GateUp(l), &h)?;
            tap(WeightInput::Down(l), &act)?;
        }
        let mlp = layer.down.forward(&act)?;
        let out = (mlp.broadcast_mul(&b_mlp.narrow(0, l, 1)?)?
            + x1.broadcast_mul(&s_mlp.narrow(0, l, 1)?)?)?;
        Ok(LayerOutput { attn: x1, out })
    }

    /// The final norm of the stream leaving the last layer: the hidden states `(b, t, n_embd)`
    /// the LM head reads; `tap` sees them as `output.weight`'s input.
    pub fn final_norm(
        &self,
        x: &Tensor,
        tap: Option<&mut WeightInputTap<'_>>,
    ) -> Result<Tensor, ModelError> {
        let model = self.model;
        let x = ops::rms_norm(x, &model.output_norm, model.arch.rms_norm_eps)?;
        if let Some(tap) = tap {
            tap(WeightInput::Output, &x)?;
        }
        Ok(x.reshape((self.b, self.t, model.arch.n_embd))?)
    }

    /// The whole pass: embedding, every layer, final norm; `tap` sees every weight matrix's input.
    pub fn whole(&self, mut tap: Option<&mut WeightInputTap<'_>>) -> Result<Tensor, ModelError> {
        let mut x = self.embed()?;
        for l in 0..self.model.arch.n_layer {
            x = self.layer(l, &x, tap.as_deref_mut())?.out;
        }
        self.final_norm(&x, tap)
    }

    /// Causal grouped-query attention on normed hidden states `h` of shape `(b * t, n_embd)`:
    /// the heads' outputs concatenated, `(b * t, n_head * head_dim)`, before `attn_output`.
    fn attention(&self, layer: &Layer, h: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = (self.b, self.t);
        let (n_head, n_kv, hd) = (
            self.model.arch.n_head,
            self.model.arch.n_head_kv,
            self.model.arch.head_dim,
        );
        let group = n_head / n_kv;
        let heads = |p: &Projection, n: usize| -> candle_core::Result<Tensor> {
            p.forward(h)?
                .reshape((b, t, n, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = ops::rope(&heads(&layer.q, n_head)?, &self.cos, &self.sin)?;
        let k = ops::rope(&heads(&layer.k, n_kv)?, &self.cos, &self.sin)?;
        let v = heads(&layer.v, n_kv)?;
        // Query heads sharing a kv head are stacked along the time axis, so the shared keys and
        // values are used in place instead of being repeated.
        let scores = q.reshape((b, n_kv, group * t, hd))?.matmul(&k.t()?)?;
        let probs = ops::causal_softmax(
            &scores.reshape((b, n_head, t, t))?,
            1.0 / (hd as f64).sqrt(),
            &self.mask,
        )?;
        probs
            .reshape((b, n_kv, group * t, t))?
            .matmul(&v)?
            .reshape((b, n_head, t, hd))?
            .transpose(1, 2)?
            .reshape((b * t, n_head * hd))
    }
}

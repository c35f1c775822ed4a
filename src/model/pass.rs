//! One forward pass, a layer at a time: the model's parts (the embedding, each layer, the final
//! norm) run on the residual stream of right-padded token ids `(b, t)`, with the scalars, the skip
//! mask and the linear stand-ins. The forward variants of [`Model`] compose these parts; a caller
//! can too.
//!
//! The stream has one row per token, `(b * t, n_embd)`, or, in a pass that shares a prefix
//! ([`Model::pass_sharing_prefix`]), the `p` tokens all rows begin with once and then each row's
//! own `t - p` tokens, `(p + b * (t - p), n_embd)`: the rows' own tokens attend to the one copy
//! of the prefix's keys and values, which is what they would attend to in rows of their own
//! (the few-shot examples a task's documents share are computed once per batch, as llama.cpp's
//! evaluation reuses them). The hidden states the pass ends with are `(b, t, n_embd)` either way.

use candle_core::{DType, Tensor};

use super::layer::Layer;
use super::scales::ScaleTensors;
use super::weight::Weight;
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
    /// Tokens every row begins with, held once in the stream (0: none shared).
    prefix: usize,
    /// Whether a tracked pass recomputes each layer's activations in the backward pass.
    recompute: bool,
    geometry: Geometry,
}

/// The shape of a pass's stream and the tables its attention reads.
#[derive(Clone)]
struct Geometry {
    b: usize,
    t: usize,
    prefix: usize,
    n_head: usize,
    n_kv: usize,
    head_dim: usize,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
}

/// One layer's computation and what it reads besides its input and scalars, owned so that a
/// backward pass that recomputes the layer can keep it.
#[derive(Clone)]
struct LayerStep {
    l: usize,
    layer: Layer,
    skipped: bool,
    stand_in: Option<Weight>,
    eps: f64,
    geometry: Geometry,
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
    /// mask (`skip[l]` bypasses layer `l`'s attention), checking them first, its stream one row
    /// per token. With `track` the gradients flow to the scalars; without, no graph is recorded.
    pub fn pass<'a>(
        &'a self,
        input_ids: &Tensor,
        scales: &'a Scales,
        skip: &'a [bool],
        track: bool,
    ) -> Result<Pass<'a>, ModelError> {
        self.checked_pass(input_ids, scales, skip, track, false)
    }

    /// [`Model::pass`] computing the longest prefix all rows share once (at most `t - 1` tokens;
    /// none for a single row): the same hidden states, less work when the rows begin alike.
    pub fn pass_sharing_prefix<'a>(
        &'a self,
        input_ids: &Tensor,
        scales: &'a Scales,
        skip: &'a [bool],
        track: bool,
    ) -> Result<Pass<'a>, ModelError> {
        self.checked_pass(input_ids, scales, skip, track, true)
    }

    fn checked_pass<'a>(
        &'a self,
        input_ids: &Tensor,
        scales: &'a Scales,
        skip: &'a [bool],
        track: bool,
        share_prefix: bool,
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
        let prefix = if share_prefix && b > 1 {
            shared_prefix(&input_ids.to_vec2::<u32>()?).min(t - 1)
        } else {
            0
        };
        let (cos, sin) = self.rope_tables(t)?;
        let mask = self.causal_mask(t)?;
        Ok(Pass {
            model: self,
            input_ids: input_ids.clone(),
            scales,
            skip,
            b,
            t,
            prefix,
            recompute: track && self.recompute,
            geometry: Geometry {
                b,
                t,
                prefix,
                n_head: self.arch.n_head,
                n_kv: self.arch.n_head_kv,
                head_dim: self.arch.head_dim,
                cos,
                sin,
                mask,
            },
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

/// How many tokens every row of `rows` begins with.
fn shared_prefix(rows: &[Vec<u32>]) -> usize {
    let Some((first, rest)) = rows.split_first() else {
        return 0;
    };
    rest.iter().fold(first.len(), |n, row| {
        first[..n]
            .iter()
            .zip(row)
            .take_while(|(a, b)| a == b)
            .count()
    })
}

impl Pass<'_> {
    /// Rows of the residual stream: `b * t`, or `p + b * (t - p)` with a shared prefix of `p`.
    pub fn rows(&self) -> usize {
        self.prefix + self.b * (self.t - self.prefix)
    }

    /// Tokens every row begins with, held once in the stream (0 when none is shared).
    pub fn shared_prefix(&self) -> usize {
        self.prefix
    }

    /// The token ids in the stream's order, `(rows)`.
    fn stream_ids(&self) -> candle_core::Result<Tensor> {
        if self.prefix == 0 {
            return self.input_ids.flatten_all();
        }
        let own = self
            .input_ids
            .narrow(1, self.prefix, self.t - self.prefix)?;
        Tensor::cat(
            &[
                self.input_ids
                    .narrow(0, 0, 1)?
                    .narrow(1, 0, self.prefix)?
                    .flatten_all()?,
                own.flatten_all()?,
            ],
            0,
        )
    }

    /// The token embeddings: the stream entering layer 0, `(rows, n_embd)`.
    pub fn embed(&self) -> Result<Tensor, ModelError> {
        Ok(self
            .model
            .token_embd
            .gather(&self.stream_ids()?, self.model.dtype)?
            .reshape((self.rows(), self.model.arch.n_embd))?)
    }

    /// Layer `l` on `x`, the stream entering it; `tap` sees the input of each of its weight
    /// matrices (none for a skipped block).
    pub fn layer(
        &self,
        l: usize,
        x: &Tensor,
        tap: Option<&mut WeightInputTap<'_>>,
    ) -> Result<LayerOutput, ModelError> {
        self.step(l)?.run(x, &self.layer_scalars(l)?, tap)
    }

    /// The stream leaving layer `l`, as [`Pass::layer`] gives it; in a tracked pass of a model
    /// that recomputes ([`Model::with_recompute`]) the graph keeps only the layer's input and
    /// output, and the backward pass runs the layer again for its gradients.
    pub fn layer_out(&self, l: usize, x: &Tensor) -> Result<Tensor, ModelError> {
        let scalars = self.layer_scalars(l)?;
        let step = self.step(l)?;
        if !self.recompute || !(x.track_op() || scalars.track_op()) {
            return Ok(step.run(x, &scalars, None)?.out);
        }
        let value = step.run(&x.detach(), &scalars.detach(), None)?.out;
        Ok(ops::recomputed(x, &scalars, value, move |x, scalars| {
            step.run(x, scalars, None)
                .map(|o| o.out)
                .map_err(|e| candle_core::Error::Msg(format!("recomputing layer {l}: {e}")))
        })?)
    }

    /// Layer `l`'s `[b_att, s_att, b_mlp, s_mlp]`, `(4)`, tracked as the pass's scalars are.
    fn layer_scalars(&self, l: usize) -> Result<Tensor, ModelError> {
        let [b_att, s_att, b_mlp, s_mlp] = &self.scales.scalars;
        if l >= self.model.arch.n_layer {
            return Err(ModelError::NoSuchLayer {
                layer: l,
                n_layer: self.model.arch.n_layer,
            });
        }
        let parts = [b_att, s_att, b_mlp, s_mlp]
            .map(|s| s.narrow(0, l, 1))
            .into_iter()
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Layer `l`'s step in this pass.
    fn step(&self, l: usize) -> Result<LayerStep, ModelError> {
        let model = self.model;
        let layer = model.layers.get(l).ok_or(ModelError::NoSuchLayer {
            layer: l,
            n_layer: model.arch.n_layer,
        })?;
        Ok(LayerStep {
            l,
            layer: layer.clone(),
            skipped: self.skip[l],
            stand_in: self.scales.linear.get(l).cloned().flatten(),
            eps: model.arch.rms_norm_eps,
            geometry: self.geometry.clone(),
        })
    }

    /// The final norm of the stream leaving the last layer: the hidden states `(b, t, n_embd)`
    /// the LM head reads, the shared prefix's repeated in every row; `tap` sees the stream's
    /// rows as `output.weight`'s input.
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
        let x = if self.prefix == 0 {
            x
        } else {
            let (p, own) = (self.prefix, self.t - self.prefix);
            let rows: Vec<u32> = (0..self.b * self.t)
                .map(|i| {
                    let (row, j) = (i / self.t, i % self.t);
                    if j < p {
                        j as u32
                    } else {
                        (p + row * own + j - p) as u32
                    }
                })
                .collect();
            x.index_select(&Tensor::new(rows, x.device())?, 0)?
        };
        Ok(x.reshape((self.b, self.t, model.arch.n_embd))?)
    }

    /// The whole pass: embedding, every layer, final norm; `tap` sees every weight matrix's input.
    pub fn whole(&self, mut tap: Option<&mut WeightInputTap<'_>>) -> Result<Tensor, ModelError> {
        let mut x = self.embed()?;
        for l in 0..self.model.arch.n_layer {
            x = match tap.as_deref_mut() {
                Some(tap) => self.layer(l, &x, Some(tap))?.out,
                None => self.layer_out(l, &x)?,
            };
        }
        self.final_norm(&x, tap)
    }
}

impl LayerStep {
    /// The layer on `x` with `scalars` `[b_att, s_att, b_mlp, s_mlp]` `(4)`; `tap` sees the input
    /// of each of its weight matrices (none for a skipped block).
    fn run(
        &self,
        x: &Tensor,
        scalars: &Tensor,
        mut tap: Option<&mut WeightInputTap<'_>>,
    ) -> Result<LayerOutput, ModelError> {
        let (l, layer, eps) = (self.l, &self.layer, self.eps);
        let scalar = |k: usize| scalars.narrow(0, k, 1);
        let branch = match (self.skipped, &self.stand_in) {
            (true, None) => None,
            (true, Some(w)) => {
                let h = ops::rms_norm(x, &layer.attn_norm, eps)?;
                if let Some(tap) = tap.as_mut() {
                    tap(WeightInput::AttnOutput(l), &h)?;
                }
                Some(w.linear(&h, None)?)
            }
            (false, _) => {
                let h = ops::rms_norm(x, &layer.attn_norm, eps)?;
                let heads = self.geometry.attention(layer, &h)?;
                if let Some(tap) = tap.as_mut() {
                    tap(WeightInput::Qkv(l), &h)?;
                    tap(WeightInput::AttnOutput(l), &heads)?;
                }
                Some(layer.o.forward(&heads)?)
            }
        };
        let x1 = match branch {
            None => x.clone(),
            Some(attn) => (attn.broadcast_mul(&scalar(0)?)? + x.broadcast_mul(&scalar(1)?)?)?,
        };
        let h = ops::rms_norm(&x1, &layer.ffn_norm, eps)?;
        let act = (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
        if let Some(tap) = tap.as_mut() {
            tap(WeightInput::GateUp(l), &h)?;
            tap(WeightInput::Down(l), &act)?;
        }
        let mlp = layer.down.forward(&act)?;
        let out = (mlp.broadcast_mul(&scalar(2)?)? + x1.broadcast_mul(&scalar(3)?)?)?;
        Ok(LayerOutput { attn: x1, out })
    }
}

impl Geometry {
    /// Causal grouped-query attention on normed hidden states `h` of shape `(rows, n_embd)`: the
    /// heads' outputs concatenated, `(rows, n_head * head_dim)`, before `attn_output`.
    fn attention(&self, layer: &Layer, h: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, p) = (self.b, self.t, self.prefix);
        let (n_head, n_kv, hd) = (self.n_head, self.n_kv, self.head_dim);
        let (q, k, v) = (
            layer.q.forward(h)?,
            layer.k.forward(h)?,
            layer.v.forward(h)?,
        );
        // rows `start..` as `n` sequences of `len` tokens at positions `start..start + len` of
        // their rows (the stream's first row is the first of the prefix, the first row's own
        // tokens follow it): `(n, heads, len, head_dim)`, rope'd when `rotate`
        let heads = |x: &Tensor, heads: usize, n: usize, (start, len): (usize, usize), rotate| {
            let x = x
                .narrow(0, start, n * len)?
                .reshape((n, len, heads, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            if rotate {
                ops::rope(
                    &x,
                    &self.cos.narrow(0, start, len)?,
                    &self.sin.narrow(0, start, len)?,
                )
            } else {
                Ok(x)
            }
        };
        if p == 0 {
            let q = heads(&q, n_head, b, (0, t), true)?;
            let k = heads(&k, n_kv, b, (0, t), true)?;
            let v = heads(&v, n_kv, b, (0, t), false)?;
            return self
                .attend(&q, &k, &v, &self.mask)?
                .reshape((b * t, n_head * hd));
        }
        let own = t - p;
        let (qp, kp, vp) = (
            heads(&q, n_head, 1, (0, p), true)?,
            heads(&k, n_kv, 1, (0, p), true)?,
            heads(&v, n_kv, 1, (0, p), false)?,
        );
        let (qs, ks, vs) = (
            heads(&q, n_head, b, (p, own), true)?,
            heads(&k, n_kv, b, (p, own), true)?,
            heads(&v, n_kv, b, (p, own), false)?,
        );
        let prefix = self.attend(&qp, &kp, &vp, &self.mask.narrow(0, 0, p)?.narrow(1, 0, p)?)?;
        // each row's own tokens see the prefix's keys and values, then their own
        let with_prefix = |shared: &Tensor, own_part: &Tensor| {
            Tensor::cat(&[&shared.broadcast_as((b, n_kv, p, hd))?, own_part], 2)?.contiguous()
        };
        let rest = self.attend(
            &qs,
            &with_prefix(&kp, &ks)?,
            &with_prefix(&vp, &vs)?,
            &self.mask.narrow(0, p, own)?,
        )?;
        Tensor::cat(
            &[
                prefix.reshape((p, n_head * hd))?,
                rest.reshape((b * own, n_head * hd))?,
            ],
            0,
        )
    }

    /// Attention of queries `(n, n_head, len, head_dim)` to keys and values `(n, n_kv, keys,
    /// head_dim)` under `mask` `(len, keys)`: `(n, len, n_head, head_dim)`, each token's heads
    /// side by side.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (n, n_head, len, hd) = q.dims4()?;
        let (_, n_kv, keys, _) = k.dims4()?;
        let group = n_head / n_kv;
        // Query heads sharing a kv head are stacked along the time axis, so the shared keys and
        // values are used in place instead of being repeated.
        let scores = q
            .reshape((n, n_kv, group * len, hd))?
            .matmul(&k.contiguous()?.t()?)?;
        let probs = ops::causal_softmax(
            &scores.reshape((n, n_head, len, keys))?,
            1.0 / (hd as f64).sqrt(),
            mask,
        )?;
        probs
            .reshape((n, n_kv, group * len, keys))?
            .matmul(&v.contiguous()?)?
            .reshape((n, n_head, len, hd))?
            .transpose(1, 2)
    }
}

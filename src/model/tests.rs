//! The model against a plain reference forward written with candle's standard ops, gradients
//! against finite differences, and the custom ops against candle's own autograd.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{ops, Model, ModelError, Scales, WeightStorage};
use crate::arch::{Arch, Family, RopeScaling};
use crate::checkpoint::{CheckpointError, StoredTensor, TensorSource};
use crate::gguf::GgmlType;
use crate::plan::{LinearAttention, ScaleValues, SkipMask};

/// A [`TensorSource`] over tensors held in memory.
pub(crate) struct MapSource {
    pub(crate) arch: Arch,
    pub(crate) tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl TensorSource for MapSource {
    fn arch(&self) -> &Arch {
        &self.arch
    }

    fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), CheckpointError> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| CheckpointError::MissingTensor {
                path: "memory".into(),
                name: name.into(),
            })
    }
}

pub(crate) use crate::arch::tiny_arch;

/// Every tensor `arch` needs, with seeded random values of a sensible scale.
pub(crate) fn random_source(arch: &Arch, seed: u64) -> MapSource {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors = HashMap::new();
    let mut add = |name: String, shape: Vec<usize>, center: f32, spread: f32| {
        let n = shape.iter().product();
        let data = (0..n)
            .map(|_| center + spread * rng.gen_range(-1.0f32..1.0))
            .collect();
        tensors.insert(name, (shape, data));
    };
    let (d, q, kv, ff) = (arch.n_embd, arch.q_dim(), arch.kv_dim(), arch.n_ff);
    let fan = |n: usize| (3.0 / n as f32).sqrt();
    add(
        "token_embd.weight".into(),
        vec![arch.vocab_size, d],
        0.0,
        1.0,
    );
    if !arch.tie_word_embeddings {
        add(
            "output.weight".into(),
            vec![arch.vocab_size, d],
            0.0,
            fan(d),
        );
    }
    add("output_norm.weight".into(), vec![d], 1.0, 0.2);
    for i in 0..arch.n_layer {
        let p = format!("blk.{i}");
        add(format!("{p}.attn_norm.weight"), vec![d], 1.0, 0.2);
        add(format!("{p}.attn_q.weight"), vec![q, d], 0.0, 2.0 * fan(d));
        add(format!("{p}.attn_k.weight"), vec![kv, d], 0.0, 2.0 * fan(d));
        add(format!("{p}.attn_v.weight"), vec![kv, d], 0.0, fan(d));
        if arch.attn_bias {
            add(format!("{p}.attn_q.bias"), vec![q], 0.0, 0.5);
            add(format!("{p}.attn_k.bias"), vec![kv], 0.0, 0.5);
            add(format!("{p}.attn_v.bias"), vec![kv], 0.0, 0.5);
        }
        add(format!("{p}.attn_output.weight"), vec![d, q], 0.0, fan(q));
        add(format!("{p}.ffn_norm.weight"), vec![d], 1.0, 0.2);
        add(format!("{p}.ffn_gate.weight"), vec![ff, d], 0.0, fan(d));
        add(format!("{p}.ffn_up.weight"), vec![ff, d], 0.0, fan(d));
        add(format!("{p}.ffn_down.weight"), vec![d, ff], 0.0, fan(ff));
    }
    MapSource {
        arch: arch.clone(),
        tensors,
    }
}

/// Seeded random token ids `(b, t)`.
pub(crate) fn random_ids(arch: &Arch, b: usize, t: usize, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let ids: Vec<u32> = (0..b * t)
        .map(|_| rng.gen_range(0..arch.vocab_size as u32))
        .collect();
    Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap()
}

/// [`random_ids`] whose rows all begin with row 0's first `prefix` tokens.
fn ids_sharing_prefix(arch: &Arch, b: usize, t: usize, prefix: usize, seed: u64) -> Tensor {
    let mut rows = random_ids(arch, b, t, seed).to_vec2::<u32>().unwrap();
    let head = rows[0][..prefix].to_vec();
    for row in &mut rows {
        row[..prefix].copy_from_slice(&head);
    }
    Tensor::new(rows, &Device::Cpu).unwrap()
}

/// Logits `(b, t, vocab)` of the model written straightforwardly: fused norm and softmax,
/// plain matmuls, rotate-half rope on full-width tables, key/value heads repeated.
fn reference_logits(
    src: &MapSource,
    ids: &Tensor,
    scales: &ScaleValues,
    skip: &[bool],
) -> candle_core::Result<Tensor> {
    let arch = &src.arch;
    let dev = Device::Cpu;
    let get = |name: &str| {
        let (shape, data) = src.tensors[name].clone();
        Tensor::from_vec(data, shape, &dev)
    };
    let (b, t) = ids.dims2()?;
    let (nh, nkv, hd) = (arch.n_head, arch.n_head_kv, arch.head_dim);
    let eps = arch.rms_norm_eps as f32;
    let lin = |x: &Tensor, name: &str, bias: bool| -> candle_core::Result<Tensor> {
        let y = x.broadcast_matmul(&get(&format!("{name}.weight"))?.t()?)?;
        if bias {
            y.broadcast_add(&get(&format!("{name}.bias"))?)
        } else {
            Ok(y)
        }
    };

    // rope tables, (t, hd) with each frequency twice
    let factors = arch.llama3_rope_factors();
    let pos_div = match arch.rope_scaling {
        Some(RopeScaling::Linear { factor }) => factor as f32,
        _ => 1.0,
    };
    let mut cos = vec![0f32; t * hd];
    let mut sin = vec![0f32; t * hd];
    for p in 0..t {
        for i in 0..hd / 2 {
            let mut freq = 1.0 / (arch.rope_theta as f32).powf((2 * i) as f32 / hd as f32);
            if let Some(f) = &factors {
                freq /= f[i];
            }
            let a = p as f32 / pos_div * freq;
            for j in [i, i + hd / 2] {
                cos[p * hd + j] = a.cos();
                sin[p * hd + j] = a.sin();
            }
        }
    }
    let cos = Tensor::from_vec(cos, (t, hd), &dev)?;
    let sin = Tensor::from_vec(sin, (t, hd), &dev)?;
    let rotate = |x: &Tensor| -> candle_core::Result<Tensor> {
        let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
        let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    };
    let mask: Vec<f32> = (0..t * t)
        .map(|k| {
            if k % t <= k / t {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &dev)?;
    let kv_of_head = Tensor::from_vec(
        (0..nh as u32)
            .map(|h| h / (nh / nkv) as u32)
            .collect::<Vec<_>>(),
        nh,
        &dev,
    )?;

    let mut x = get("token_embd.weight")?
        .index_select(&ids.flatten_all()?, 0)?
        .reshape((b, t, arch.n_embd))?;
    for (l, &skipped) in skip.iter().enumerate() {
        let p = format!("blk.{l}");
        let x1 = if skipped {
            x.clone()
        } else {
            let h = candle_nn::ops::rms_norm(&x, &get(&format!("{p}.attn_norm.weight"))?, eps)?;
            let split = |y: Tensor, n: usize| y.reshape((b, t, n, hd))?.transpose(1, 2);
            let q = rotate(&split(
                lin(&h, &format!("{p}.attn_q"), arch.attn_bias)?,
                nh,
            )?)?;
            let k = rotate(&split(
                lin(&h, &format!("{p}.attn_k"), arch.attn_bias)?,
                nkv,
            )?)?;
            let v = split(lin(&h, &format!("{p}.attn_v"), arch.attn_bias)?, nkv)?;
            let k = k.contiguous()?.index_select(&kv_of_head, 1)?;
            let v = v.contiguous()?.index_select(&kv_of_head, 1)?;
            let att = (q.contiguous()?.matmul(&k.t()?)? / (hd as f64).sqrt())?;
            let att = candle_nn::ops::softmax(&att.broadcast_add(&mask)?, D::Minus1)?;
            let out = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
            let out = lin(&out, &format!("{p}.attn_output"), false)?;
            ((out * scales.b_att[l] as f64)? + (&x * scales.s_att[l] as f64)?)?
        };
        let h = candle_nn::ops::rms_norm(&x1, &get(&format!("{p}.ffn_norm.weight"))?, eps)?;
        let act = (candle_nn::ops::silu(&lin(&h, &format!("{p}.ffn_gate"), false)?)?
            * lin(&h, &format!("{p}.ffn_up"), false)?)?;
        let mlp = lin(&act, &format!("{p}.ffn_down"), false)?;
        x = ((mlp * scales.b_mlp[l] as f64)? + (x1 * scales.s_mlp[l] as f64)?)?;
    }
    let x = candle_nn::ops::rms_norm(&x, &get("output_norm.weight")?, eps)?;
    let head = if arch.tie_word_embeddings {
        get("token_embd.weight")?
    } else {
        get("output.weight")?
    };
    x.broadcast_matmul(&head.t()?)
}

/// The model's logits at every position, `(b, t, vocab)`.
fn model_logits(
    model: &Model,
    ids: &Tensor,
    values: &ScaleValues,
    skip: &[bool],
) -> Result<Tensor, ModelError> {
    let scales = model.scales(values)?;
    let hidden = model.forward_hidden(ids, &scales, skip)?;
    let (b, t, _) = hidden.dims3()?;
    let all = Tensor::arange(0u32, (b * t) as u32, model.device())?;
    Ok(model
        .logits_at(&hidden, &all)?
        .reshape((b, t, model.arch().vocab_size))?)
}

pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Scalars near 1, different per layer and kind.
fn perturbed_scales(n_layer: usize, seed: u64) -> ScaleValues {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = || (0..n_layer).map(|_| rng.gen_range(0.7f32..1.3)).collect();
    ScaleValues {
        b_att: v(),
        s_att: v(),
        b_mlp: v(),
        s_mlp: v(),
        linear: vec![],
    }
}

#[test]
fn unit_scales_match_reference() {
    let arch = tiny_arch();
    let src = random_source(&arch, 1);
    let model = Model::load(&src, &Device::Cpu).unwrap();
    let ids = random_ids(&arch, 2, 9, 2);
    let ones = ScaleValues::ones(arch.n_layer);
    let skip = SkipMask::none(arch.n_layer);
    let ours = model_logits(&model, &ids, &ones, skip.as_slice()).unwrap();
    let reference = reference_logits(&src, &ids, &ones, skip.as_slice()).unwrap();
    let diff = max_abs_diff(&ours, &reference);
    assert!(diff < 1e-5, "max |model - reference| = {diff}");
    // the logits are not trivially small
    assert!(max_abs_diff(&reference, &reference.zeros_like().unwrap()) > 1.0);
}

#[test]
fn other_scales_and_skips_match_reference() {
    let arch = tiny_arch();
    let src = random_source(&arch, 3);
    let model = Model::load(&src, &Device::Cpu).unwrap();
    let ids = random_ids(&arch, 3, 7, 4);
    let values = perturbed_scales(arch.n_layer, 5);
    for skipped in [vec![], vec![0], vec![1], vec![0, 2]] {
        let skip = SkipMask::from_layers(arch.n_layer, &skipped).unwrap();
        let ours = model_logits(&model, &ids, &values, skip.as_slice()).unwrap();
        let reference = reference_logits(&src, &ids, &values, skip.as_slice()).unwrap();
        let diff = max_abs_diff(&ours, &reference);
        assert!(diff < 1e-5, "skip {skipped:?}: max diff {diff}");
    }
}

#[test]
fn a_shared_prefix_is_computed_once_and_changes_no_logit() {
    let arch = tiny_arch();
    let src = random_source(&arch, 3);
    let model = Model::load(&src, &Device::Cpu).unwrap();
    let values = perturbed_scales(arch.n_layer, 5);
    let scales = model.scales(&values).unwrap();
    // 3 rows of 9 sharing 5 tokens; 2 identical rows (all but the last token is shared)
    let cases = [
        (ids_sharing_prefix(&arch, 3, 9, 5, 4), 5),
        (ids_sharing_prefix(&arch, 2, 7, 7, 6), 6),
        (random_ids(&arch, 1, 7, 6), 0),
    ];
    for (ids, prefix) in cases {
        let (b, t) = ids.dims2().unwrap();
        for skipped in [vec![], vec![1]] {
            let skip = SkipMask::from_layers(arch.n_layer, &skipped).unwrap();
            let shared = model
                .pass_sharing_prefix(&ids, &scales, skip.as_slice(), false)
                .unwrap();
            assert_eq!(shared.shared_prefix(), prefix);
            assert_eq!(shared.rows(), prefix + b * (t - prefix));
            let once = shared.whole(None).unwrap();
            let every_row = model
                .pass(&ids, &scales, skip.as_slice(), false)
                .unwrap()
                .whole(None)
                .unwrap();
            assert_eq!(once.dims(), [b, t, arch.n_embd]);
            let diff = max_abs_diff(&once, &every_row);
            assert!(diff < 1e-5, "prefix {prefix}, skip {skipped:?}: {diff}");
            let ours = model_logits(&model, &ids, &values, skip.as_slice()).unwrap();
            let reference = reference_logits(&src, &ids, &values, skip.as_slice()).unwrap();
            let diff = max_abs_diff(&ours, &reference);
            assert!(diff < 1e-5, "prefix {prefix}, skip {skipped:?}: {diff}");
        }
    }
}

#[test]
fn a_pass_from_a_cached_residual_equals_the_whole_pass() {
    let arch = tiny_arch();
    let model = Model::load(&random_source(&arch, 8), &Device::Cpu).unwrap();
    let ids = ids_sharing_prefix(&arch, 2, 9, 4, 3);
    let scales = model.scales(&perturbed_scales(arch.n_layer, 9)).unwrap();
    let base = SkipMask::from_layers(arch.n_layer, &[2]).unwrap();
    let residuals = model
        .residuals_no_grad(&ids, &scales, base.as_slice())
        .unwrap();
    assert_eq!(residuals.len(), arch.n_layer);
    for (from, residual) in residuals.iter().enumerate() {
        // the layers from `from` on may differ from the base mask; those before may not
        let skip = SkipMask::from_layers(arch.n_layer, &[from.max(1), 2]).unwrap();
        let whole = model
            .forward_hidden_no_grad(&ids, &scales, skip.as_slice())
            .unwrap();
        let cached = model
            .forward_hidden_from_no_grad(&ids, residual, from, &scales, skip.as_slice())
            .unwrap();
        assert_eq!(max_abs_diff(&whole, &cached), 0.0, "from layer {from}");
    }
    // a residual of the wrong shape or a layer past the model is refused
    assert!(model
        .forward_hidden_from_no_grad(&ids, &residuals[0], arch.n_layer, &scales, base.as_slice())
        .is_err());
    let short = residuals[0].narrow(0, 0, 3).unwrap();
    assert!(model
        .forward_hidden_from_no_grad(&ids, &short, 0, &scales, base.as_slice())
        .is_err());
}

#[test]
fn skipping_equals_removing_the_attention() {
    let arch = tiny_arch();
    let src = random_source(&arch, 6);
    let model = Model::load(&src, &Device::Cpu).unwrap();
    let ids = random_ids(&arch, 2, 8, 7);
    let ones = ScaleValues::ones(arch.n_layer);
    let skip = SkipMask::from_layers(arch.n_layer, &[1]).unwrap();
    let skipped = model_logits(&model, &ids, &ones, skip.as_slice()).unwrap();
    // the same as the reference without layer 1's attention
    let reference = reference_logits(&src, &ids, &ones, skip.as_slice()).unwrap();
    assert!(max_abs_diff(&skipped, &reference) < 1e-5);
    // and as the unskipped model with that attention's output weighted by 0
    let mut zeroed = ones.clone();
    zeroed.b_att[1] = 0.0;
    let none = SkipMask::none(arch.n_layer);
    let weighted = model_logits(&model, &ids, &zeroed, none.as_slice()).unwrap();
    assert!(max_abs_diff(&skipped, &weighted) < 1e-5);
    // and differs from the full model
    let full = model_logits(&model, &ids, &ones, none.as_slice()).unwrap();
    assert!(max_abs_diff(&skipped, &full) > 1e-2);
}

#[test]
fn scalar_gradients_match_finite_differences() {
    for storage in [WeightStorage::Stored, WeightStorage::Dense] {
        for recompute in [false, true] {
            scalar_gradients_match_finite_differences_with(storage, recompute);
        }
    }
}

fn scalar_gradients_match_finite_differences_with(storage: WeightStorage, recompute: bool) {
    let arch = tiny_arch();
    let src = random_source(&arch, 8);
    let model = Model::load_as(&src, &Device::Cpu, DType::F64, storage)
        .unwrap()
        .with_recompute(recompute);
    assert_eq!(model.weight_storage(), storage);
    // the rows share 3 tokens, computed once; targets in and after them
    let ids = ids_sharing_prefix(&arch, 2, 6, 3, 9);
    let skip = SkipMask::from_layers(arch.n_layer, &[1]).unwrap();
    let positions = Tensor::new(&[0u32, 3, 5, 6, 10, 11], &Device::Cpu).unwrap();
    let targets = Tensor::new(&[5u32, 17, 90, 0, 33, 64], &Device::Cpu).unwrap();
    let loss_of = |scales: &Scales, grad: bool| -> Tensor {
        let hidden = if grad {
            model.forward_hidden(&ids, scales, skip.as_slice())
        } else {
            model.forward_hidden_no_grad(&ids, scales, skip.as_slice())
        }
        .unwrap();
        // the fit's path: the targets' log-probabilities a chunk of the vocabulary at a time,
        // which equal the whole rows' log-softmax
        let picked = model
            .log_probs_at(&hidden, &positions, &targets.unsqueeze(1).unwrap())
            .unwrap();
        let logits = model.logits_at(&hidden, &positions).unwrap();
        let whole = candle_nn::ops::log_softmax(&logits, D::Minus1)
            .unwrap()
            .gather(&targets.unsqueeze(1).unwrap(), 1)
            .unwrap();
        assert!(max_abs_diff(&picked, &whole) < 1e-12);
        picked.mean_all().unwrap().neg().unwrap()
    };
    let scales = model.scales(&perturbed_scales(arch.n_layer, 10)).unwrap();
    let grads = loss_of(&scales, true).backward().unwrap();
    let h = 1e-3;
    let mut checked = 0;
    for (k, var) in scales.vars().iter().enumerate() {
        let analytic: Vec<f64> = match grads.get(var.as_tensor()) {
            Some(g) => g.to_vec1().unwrap(),
            None => vec![0.0; arch.n_layer],
        };
        let base: Vec<f64> = var.as_tensor().to_vec1().unwrap();
        for l in 0..arch.n_layer {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[l] += delta;
                var.set(&Tensor::new(v.as_slice(), &Device::Cpu).unwrap())
                    .unwrap();
                let loss = loss_of(&scales, false).to_scalar::<f64>().unwrap();
                var.set(&Tensor::new(base.as_slice(), &Device::Cpu).unwrap())
                    .unwrap();
                loss
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            let err = (numeric - analytic[l]).abs();
            assert!(
                err <= 1e-5 * numeric.abs().max(1.0),
                "scalar {k} layer {l}: analytic {} numeric {numeric}",
                analytic[l]
            );
            if l == 1 && k < 2 {
                // the skipped layer's attention scalars do not reach the loss
                assert_eq!(analytic[l], 0.0);
            } else {
                assert!(
                    analytic[l].abs() > 1e-6,
                    "scalar {k} layer {l} has no gradient"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 4 * arch.n_layer - 2);
}

/// Input gradient of `f(x)` under the loss `sum(f(x) * r)`, with the forward value.
pub(crate) fn grad_through(
    x: &Tensor,
    r: &Tensor,
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> (Tensor, Tensor, candle_core::backprop::GradStore, Var) {
    let var = Var::from_tensor(x).unwrap();
    let y = f(var.as_tensor()).unwrap();
    let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let g = grads.get(var.as_tensor()).unwrap().clone();
    (y, g, grads, var)
}

/// Normal draws of `mean` and `std` (Box-Muller on a generator seeded with `seed`), shaped
/// `shape`, in `dtype`: candle's `randn` is unseeded, and a test's bounds must hold for the
/// inputs they were checked on.
pub(crate) fn seeded_normal(
    shape: impl Into<candle_core::Shape>,
    mean: f64,
    std: f64,
    seed: u64,
    dtype: DType,
) -> Tensor {
    let shape = shape.into();
    let mut rng = StdRng::seed_from_u64(seed);
    let values: Vec<f64> = (0..shape.elem_count())
        .map(|_| {
            let (u1, u2): (f64, f64) = (1.0 - rng.gen::<f64>(), rng.gen());
            mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

#[test]
fn frozen_linear_gives_the_matmul_input_gradient_and_no_weight_gradient() {
    let x = seeded_normal((10, 7), 0.0, 1.0, 1, DType::F32);
    let w = seeded_normal((5, 7), 0.0, 1.0, 2, DType::F32);
    let bias = seeded_normal(5, 0.0, 1.0, 3, DType::F32);
    let r = seeded_normal((10, 5), 0.0, 1.0, 4, DType::F32);
    let (y1, g1, grads, _) = grad_through(&x, &r, |x| ops::linear(x, &w, Some(&bias)));
    let (y2, g2, _, _) = grad_through(&x, &r, |x| x.matmul(&w.t()?)?.broadcast_add(&bias));
    assert!(max_abs_diff(&y1, &y2) < 1e-5);
    assert!(max_abs_diff(&g1, &g2) < 1e-5);
    assert!(grads.get(&w).is_none() && grads.get(&bias).is_none());
}

/// `values` (`rows x cols`) stored as `dtype`, by ggml's own quantizer for block types.
pub(crate) fn stored_as(dtype: GgmlType, values: &[f32], rows: usize, cols: usize) -> StoredTensor {
    let bytes = match dtype {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        GgmlType::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => {
            let mut out = vec![0u8; dtype.tensor_bytes(&[rows, cols]).unwrap()];
            // SAFETY: `values` holds rows * cols floats and `out` the bytes ggml writes for them
            // (tensor_bytes of the type); no importance matrix is passed.
            let written = unsafe {
                llama_cpp_sys_2::ggml_quantize_chunk(
                    dtype.id() as _,
                    values.as_ptr(),
                    out.as_mut_ptr().cast(),
                    0,
                    rows as i64,
                    cols as i64,
                    std::ptr::null(),
                )
            };
            assert_eq!(written, out.len());
            out
        }
    };
    StoredTensor::from_bytes("w", dtype, &[rows, cols], bytes).unwrap()
}

#[test]
fn stored_linear_equals_the_dequantized_linear_for_every_stored_type() {
    let dev = Device::Cpu;
    // 600 rows of 512: more than one panel, and whole blocks of every type
    let (rows, cols, m) = (600, 512, 9);
    let w = seeded_normal((rows, cols), 0.0, 0.05, 5, DType::F32);
    let bias = seeded_normal(rows, 0.0, 1.0, 6, DType::F32);
    let x = seeded_normal((m, cols), 0.0, 1.0, 7, DType::F32);
    let r = seeded_normal((m, rows), 0.0, 1.0, 8, DType::F32);
    let values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for dtype in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ] {
        let stored = Arc::new(stored_as(dtype, &values, rows, cols));
        let dense = Tensor::from_vec(stored.to_f32().unwrap(), (rows, cols), &dev).unwrap();
        if dtype != GgmlType::F32 {
            // the stored values are not the f32 ones: the test would pass on a plain f32 copy
            assert!(max_abs_diff(&dense, &w) > 0.0, "{dtype}");
        }
        let (y1, g1, grads, _) =
            grad_through(&x, &r, |x| ops::stored_linear(x, &stored, Some(&bias)));
        let (y2, g2, _, _) = grad_through(&x, &r, |x| ops::linear(x, &dense, Some(&bias)));
        let (dy, dg) = (max_abs_diff(&y1, &y2), max_abs_diff(&g1, &g2));
        // both are f32 sums of 512 (forward) and 600 (backward) products of size about 0.05,
        // in a different order in the backward pass
        assert!(
            dy < 1e-5 && dg < 1e-5,
            "{dtype}: forward {dy}, input gradient {dg}"
        );
        assert!(grads.get(&bias).is_none());
    }
}

#[test]
fn stored_linear_input_gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    let (rows, cols, m) = (600, 512, 3);
    let w = seeded_normal((rows, cols), 0.0, 0.05, 9, DType::F32);
    let values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let stored = Arc::new(stored_as(GgmlType::Q4_K, &values, rows, cols));
    let x = seeded_normal((m, cols), 0.0, 1.0, 10, DType::F64);
    let r = seeded_normal((m, rows), 0.0, 1.0, 11, DType::F64);
    let loss = |x: &Tensor| -> f64 {
        let y = ops::stored_linear(x, &stored, None).unwrap();
        (y * &r).unwrap().sum_all().unwrap().to_scalar().unwrap()
    };
    let (_, g, _, _) = grad_through(&x, &r, |x| ops::stored_linear(x, &stored, None));
    let g = g.to_vec2::<f64>().unwrap();
    let base = x.to_vec2::<f64>().unwrap();
    let h = 1e-3;
    for (i, j) in [(0, 0), (1, 255), (2, 511), (0, 300)] {
        let at = |delta: f64| {
            let mut v = base.clone();
            v[i][j] += delta;
            loss(&Tensor::new(v, &dev).unwrap())
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        assert!(
            (numeric - g[i][j]).abs() <= 1e-6 * numeric.abs().max(1.0),
            "x[{i}][{j}]: analytic {} numeric {numeric}",
            g[i][j]
        );
        assert!(numeric.abs() > 1e-3);
    }
}

#[test]
fn rms_norm_backward_matches_autograd() {
    let x = seeded_normal((3, 4, 16), 0.0, 1.0, 12, DType::F32);
    let w = seeded_normal(16, 1.0, 0.3, 13, DType::F32);
    let r = seeded_normal((3, 4, 16), 0.0, 1.0, 14, DType::F32);
    let (y1, g1, _, _) = grad_through(&x, &r, |x| ops::rms_norm(x, &w, 1e-5));
    let (y2, g2, _, _) = grad_through(&x, &r, |x| candle_nn::ops::rms_norm_slow(x, &w, 1e-5));
    assert!(max_abs_diff(&y1, &y2) < 1e-5);
    assert!(max_abs_diff(&g1, &g2) < 1e-5);
}

#[test]
fn rope_backward_matches_autograd() {
    let x = seeded_normal((2, 3, 5, 8), 0.0, 1.0, 15, DType::F32);
    let angles = seeded_normal((5, 4), 0.0, 2.0, 16, DType::F32);
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    let r = seeded_normal((2, 3, 5, 8), 0.0, 1.0, 17, DType::F32);
    let (y1, g1, _, _) = grad_through(&x, &r, |x| ops::rope(x, &cos, &sin));
    let (y2, g2, _, _) = grad_through(&x, &r, |x| candle_nn::rotary_emb::rope_slow(x, &cos, &sin));
    assert!(max_abs_diff(&y1, &y2) < 1e-5);
    assert!(max_abs_diff(&g1, &g2) < 1e-5);
}

#[test]
fn causal_softmax_backward_matches_autograd() {
    let dev = Device::Cpu;
    let t = 6;
    let x = seeded_normal((2, 3, t, t), 0.0, 2.0, 18, DType::F32);
    let mask: Vec<f32> = (0..t * t)
        .map(|k| {
            if k % t <= k / t {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &dev).unwrap();
    let r = seeded_normal((2, 3, t, t), 0.0, 1.0, 19, DType::F32);
    let (y1, g1, _, _) = grad_through(&x, &r, |x| ops::causal_softmax(x, 0.25, &mask));
    let (y2, g2, _, _) = grad_through(&x, &r, |x| {
        candle_nn::ops::softmax(&(x * 0.25)?.broadcast_add(&mask)?, D::Minus1)
    });
    assert!(max_abs_diff(&y1, &y2) < 1e-6);
    assert!(max_abs_diff(&g1, &g2) < 1e-6);
    // nothing flows to the masked scores
    assert_eq!(
        g1.i((.., .., 0, 1..))
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}

#[test]
fn qwen2_biases_and_tied_embeddings_match_reference() {
    let arch = Arch {
        family: Family::Qwen2,
        hf_architecture: "Qwen2ForCausalLM".into(),
        attn_bias: true,
        tie_word_embeddings: true,
        rope_theta: 1_000_000.0,
        rms_norm_eps: 1e-6,
        ..tiny_arch()
    };
    let src = random_source(&arch, 11);
    assert!(!src.tensors.contains_key("output.weight"));
    let model = Model::load(&src, &Device::Cpu).unwrap();
    let ids = random_ids(&arch, 2, 8, 12);
    let values = perturbed_scales(arch.n_layer, 13);
    let skip = SkipMask::from_layers(arch.n_layer, &[2]).unwrap();
    let ours = model_logits(&model, &ids, &values, skip.as_slice()).unwrap();
    let reference = reference_logits(&src, &ids, &values, skip.as_slice()).unwrap();
    assert!(max_abs_diff(&ours, &reference) < 1e-5);

    // the biases are used: without them the output changes
    let mut unbiased = random_source(&arch, 11);
    for (name, (_, data)) in unbiased.tensors.iter_mut() {
        if name.ends_with(".bias") {
            data.iter_mut().for_each(|v| *v = 0.0);
        }
    }
    let model0 = Model::load(&unbiased, &Device::Cpu).unwrap();
    let ours0 = model_logits(&model0, &ids, &values, skip.as_slice()).unwrap();
    assert!(max_abs_diff(&ours, &ours0) > 1e-3);
}

#[test]
fn rope_scaling_changes_the_output_and_matches_reference() {
    let base = tiny_arch();
    let src = random_source(&base, 14);
    let ids = random_ids(&base, 1, 40, 15);
    let ones = ScaleValues::ones(base.n_layer);
    let skip = SkipMask::none(base.n_layer);
    let logits = |arch: &Arch| {
        let src = MapSource {
            arch: arch.clone(),
            tensors: src.tensors.clone(),
        };
        let model = Model::load(&src, &Device::Cpu).unwrap();
        let ours = model_logits(&model, &ids, &ones, skip.as_slice()).unwrap();
        let reference = reference_logits(&src, &ids, &ones, skip.as_slice()).unwrap();
        assert!(max_abs_diff(&ours, &reference) < 1e-4);
        ours
    };
    let plain = logits(&base);
    let llama3 = Arch {
        rope_scaling: Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        }),
        ..base.clone()
    };
    assert!(llama3
        .llama3_rope_factors()
        .unwrap()
        .iter()
        .any(|&f| f != 1.0));
    assert!(max_abs_diff(&plain, &logits(&llama3)) > 1e-3);
    let linear = Arch {
        rope_scaling: Some(RopeScaling::Linear { factor: 2.0 }),
        ..base.clone()
    };
    assert!(max_abs_diff(&plain, &logits(&linear)) > 1e-3);
}

#[test]
fn right_padding_does_not_change_earlier_positions() {
    let arch = tiny_arch();
    let model = Model::load(&random_source(&arch, 16), &Device::Cpu).unwrap();
    let ones = ScaleValues::ones(arch.n_layer);
    let skip = SkipMask::none(arch.n_layer);
    let short = random_ids(&arch, 1, 5, 17);
    let padded = Tensor::cat(
        &[
            &short,
            &Tensor::zeros((1, 4), DType::U32, &Device::Cpu).unwrap(),
        ],
        1,
    )
    .unwrap();
    let a = model_logits(&model, &short, &ones, skip.as_slice()).unwrap();
    let b = model_logits(&model, &padded, &ones, skip.as_slice()).unwrap();
    assert!(max_abs_diff(&a, &b.narrow(1, 0, 5).unwrap()) < 1e-5);
}

#[test]
fn bad_inputs_are_errors() {
    let arch = tiny_arch();
    let mut src = random_source(&arch, 18);
    let model = Model::load(&src, &Device::Cpu).unwrap();
    let scales = model.scales(&ScaleValues::ones(arch.n_layer)).unwrap();
    let ids = random_ids(&arch, 1, 4, 19);
    assert!(matches!(
        model.forward_hidden(&ids, &scales, &[false; 2]),
        Err(ModelError::SkipMaskLength {
            expected: 3,
            found: 2
        })
    ));
    let big = Tensor::new(&[[1u32, 97]], &Device::Cpu).unwrap();
    assert!(matches!(
        model.forward_hidden(&big, &scales, &[false; 3]),
        Err(ModelError::TokenOutOfRange { token: 97, .. })
    ));
    let floats = Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        model.forward_hidden(&floats, &scales, &[false; 3]),
        Err(ModelError::Input {
            name: "input_ids",
            ..
        })
    ));
    let hidden = model.forward_hidden(&ids, &scales, &[false; 3]).unwrap();
    assert!(matches!(
        model.logits_at(&hidden, &Tensor::new(&[4u32], &Device::Cpu).unwrap()),
        Err(ModelError::PositionOutOfRange {
            position: 4,
            len: 4
        })
    ));
    assert!(matches!(
        SkipMask::from_layers(3, &[3]).map_err(ModelError::from),
        Err(ModelError::NoSuchLayer {
            layer: 3,
            n_layer: 3
        })
    ));
    let mut short = ScaleValues::ones(3);
    short.s_mlp.pop();
    assert!(matches!(
        model.scales(&short),
        Err(ModelError::ScalesLength { name: "s_mlp", .. })
    ));

    src.tensors.get_mut("blk.1.attn_k.weight").unwrap().0 = vec![64, 32];
    match Model::load(&src, &Device::Cpu) {
        Err(ModelError::Checkpoint(CheckpointError::Shape { name, expected, .. })) => {
            assert_eq!(name, "blk.1.attn_k.weight");
            assert_eq!(expected, vec![32, 64]);
        }
        other => panic!("expected a shape error, got {:?}", other.err()),
    }
    let qwen = Arch {
        attn_bias: true,
        ..arch.clone()
    };
    let no_bias = MapSource {
        arch: qwen,
        tensors: random_source(&arch, 18).tensors,
    };
    assert!(matches!(
        Model::load(&no_bias, &Device::Cpu),
        Err(ModelError::Checkpoint(CheckpointError::MissingTensor { name, .. })) if name == "blk.0.attn_q.bias"
    ));
    let odd = MapSource {
        arch: Arch {
            n_head_kv: 3,
            ..arch.clone()
        },
        tensors: HashMap::new(),
    };
    assert!(matches!(
        Model::load(&odd, &Device::Cpu),
        Err(ModelError::InvalidArch { .. })
    ));
}

#[test]
fn stand_ins_of_the_wrong_shape_or_layer_are_refused() {
    let arch = tiny_arch();
    let model = Model::load(&random_source(&arch, 4), &Device::Cpu).unwrap();
    let d = arch.n_embd;
    let with = |linear: Vec<LinearAttention>| ScaleValues {
        linear,
        ..ScaleValues::ones(arch.n_layer)
    };
    let ok = |layer| LinearAttention {
        layer,
        weight: vec![0.1; d * d].into(),
    };
    assert!(model.scales(&with(vec![ok(1), ok(2)])).is_ok());
    let message = |v| match model.scales(&with(v)) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("accepted"),
    };
    assert_eq!(
        message(vec![ok(1), ok(1)]),
        "linear stand-in of layer 1: listed twice"
    );
    assert_eq!(
        message(vec![ok(arch.n_layer)]),
        format!(
            "linear stand-in of layer {}: the model has {} layers",
            arch.n_layer, arch.n_layer
        )
    );
    let short = LinearAttention {
        layer: 1,
        weight: vec![0.1; d].into(),
    };
    assert_eq!(
        message(vec![short]),
        format!("linear stand-in of layer 1: {d} values, expected {d} x {d}")
    );
    let mut weight = vec![0.1; d * d];
    weight[5] = f32::NAN;
    let nan = LinearAttention {
        layer: 2,
        weight: weight.into(),
    };
    assert_eq!(
        message(vec![nan]),
        "linear stand-in of layer 2: value 5 is not finite"
    );
}

#[test]
fn on_the_cpu_a_graph_reads_its_stand_ins_where_the_values_lie() {
    let arch = tiny_arch();
    let model = Model::load(&random_source(&arch, 4), &Device::Cpu).unwrap();
    let d = arch.n_embd;
    let weight: Arc<[f32]> = (0..d * d).map(|i| (i % 7) as f32 * 0.01).collect();
    let values = ScaleValues {
        linear: vec![LinearAttention {
            layer: 1,
            weight: weight.clone(),
        }],
        ..ScaleValues::ones(arch.n_layer)
    };
    let before = Arc::strong_count(&weight);
    let scales = model.scales(&values).unwrap();
    // the scales' values and the graph's weight: two more holders, no copy
    assert_eq!(Arc::strong_count(&weight), before + 2);
    let clones: Vec<Scales> = (0..3).map(|_| scales.clone()).collect();
    assert_eq!(Arc::strong_count(&weight), before + 2 + 3);
    drop((scales, clones));
    assert_eq!(Arc::strong_count(&weight), before);
}

/// The tiny model's logits and scalar gradients on `device` against the CPU's, with a shared
/// prefix, a skipped block and activation recomputation: the largest logit difference relative
/// to the largest |logit|, and the largest gradient difference relative to the largest
/// |gradient|.
pub(crate) fn device_parity(device: &Device) -> (f32, f32) {
    let arch = tiny_arch();
    let src = random_source(&arch, 8);
    let ids = ids_sharing_prefix(&arch, 3, 10, 4, 9);
    let skip = SkipMask::from_layers(arch.n_layer, &[1]).unwrap();
    let values = perturbed_scales(arch.n_layer, 10);
    let run = |device: &Device| -> (Vec<f32>, Vec<f32>) {
        let model = Model::load(&src, device).unwrap().with_recompute(true);
        let scales = model.scales(&values).unwrap();
        let ids = ids.to_device(device).unwrap();
        let hidden = model
            .forward_hidden(&ids, &scales, skip.as_slice())
            .unwrap();
        let all = Tensor::arange(0u32, 30, device).unwrap();
        let logits = model.logits_at(&hidden, &all).unwrap();
        let loss = candle_nn::ops::log_softmax(&logits, D::Minus1)
            .unwrap()
            .narrow(1, 0, 7)
            .unwrap()
            .mean_all()
            .unwrap()
            .neg()
            .unwrap();
        let grads = loss.backward().unwrap();
        let flat = |t: &Tensor| -> Vec<f32> {
            t.to_device(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let grads = scales
            .vars()
            .iter()
            .flat_map(|v| flat(grads.get(v.as_tensor()).unwrap()))
            .collect();
        (flat(&logits), grads)
    };
    let (cpu_logits, cpu_grads) = run(&Device::Cpu);
    let (logits, grads) = run(device);
    let relative = |a: &[f32], b: &[f32]| {
        let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    };
    (relative(&logits, &cpu_logits), relative(&grads, &cpu_grads))
}

/// The harness the GPU test uses, on the CPU against itself: the fit's passes are deterministic
/// (the same logits and gradients bit for bit, prefix sharing and recomputation included).
#[test]
fn device_parity_is_exact_on_the_cpu_itself() {
    assert_eq!(device_parity(&Device::Cpu), (0.0, 0.0));
}

/// Run by scripts/check-gpu.sh on a machine with an NVIDIA GPU: candle's CUDA kernels against
/// the CPU's, f32 throughout (TF32 off in candle's default), within 1e-3 of the largest value.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU: scripts/check-gpu.sh"]
fn the_gpu_gives_the_cpus_logits_and_gradients() {
    let device = Device::new_cuda(0).expect("a CUDA device");
    let (logits, grads) = device_parity(&device);
    eprintln!("gpu against cpu: logits {logits:.2e}, scalar gradients {grads:.2e} (relative)");
    assert!(
        logits < 1e-3 && grads < 1e-3,
        "logits {logits}, gradients {grads}"
    );
}

/// The finiteness check runs its panels side by side and still names the first bad value.
#[test]
fn the_finiteness_check_names_the_first_non_finite_value_of_many_panels() {
    let (rows, cols) = (1000, 600);
    let mut values = vec![0.5f32; rows * cols];
    assert!(ops::panels(&stored_as(GgmlType::F32, &values, rows, cols)).count() >= 3);
    super::check_finite(&stored_as(GgmlType::F32, &values, rows, cols)).unwrap();
    values[900 * cols] = f32::INFINITY;
    values[500 * cols + 7] = f32::NAN;
    let err = super::check_finite(&stored_as(GgmlType::F32, &values, rows, cols))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tensor w: holds a non-finite value (NaN) at flat index 300007"),
        "{err}"
    );
}

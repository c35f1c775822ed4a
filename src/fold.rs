//! Fold a plan's scalars into the weights, so that a plain transformer (stock llama.cpp's
//! `llama`, `qwen2` or `deci`) computes what the model with the Hopscotch scalars computes.
//!
//! The model with scalars, per layer `l` (Eyceoz et al. 2025, <https://arxiv.org/abs/2506.03303>):
//!
//! ```text
//! x1  = b_att[l] * Attn(N(x)) + s_att[l] * x        (attention skipped: x1 = x)
//! out = b_mlp[l] * MLP(N(x1)) + s_mlp[l] * x1
//! ```
//!
//! A plain layer adds its branches with weight 1: `x1 = x + Attn(N(x))`. The folded model
//! carries the true residual stream divided by a running factor `c` (`h' = h / c`, `c = 1` at
//! the embedding). RMSNorm `N` gives the same output for `h / c` as for `h` when `c > 0`, and
//! the negated output when `c < 0`, so each norm weight is multiplied by `sign(c)` of its input
//! and the branches see what they saw before. At a residual scalar `s` the true stream becomes
//! `s * h + b * branch`; dividing by `c_next = c * s` gives `h' + (b / c_next) * branch`, a plain
//! residual add once the branch's output projection (`attn_output`, `ffn_down`) is multiplied by
//! `b / c_next`. The final norm removes the last `c` (its weight takes `sign(c)`), so the LM head,
//! and the token embedding it may share, stay as they are.
//!
//! A skipped block's linear stand-in ([`LinearAttention`]) is a branch like attention: its
//! matrix becomes the layer's `attn_output.weight` (`n_embd x n_embd`), folded as `attn_output`
//! is, and the layer keeps `attn_norm`; llama.cpp's `deci` runs it as "linear attention".
//!
//! The one inexact step is RMSNorm's epsilon: `N(h / c)` divides by `sqrt(mean(h²) + eps c²)`
//! instead of `sqrt(mean(h²) + eps)`, a relative change of about `eps (c² - 1) / (2 mean(h²))`,
//! far below f32 rounding for residual streams of ordinary size.

use crate::arch::Arch;
use crate::checkpoint::{Checkpoint, CheckpointError, TensorSource};
use crate::deci::{split_block, AttentionKind};
use crate::plan::{LinearAttention, ScaleValues, StandInError};

/// Errors folding a plan's scalars.
#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    /// A vector of scalars or the skip mask has a length other than the number of layers.
    #[error("{name} has {found} entries, the model has {expected} layers")]
    Length {
        /// Which vector (`skip mask`, `b_att`, `s_att`, `b_mlp`, `s_mlp`).
        name: &'static str,
        /// The number of layers.
        expected: usize,
        /// The vector's length.
        found: usize,
    },
    /// A linear stand-in is not for a skipped block, or not `n_embd x n_embd` finite numbers.
    #[error(transparent)]
    LinearAttention(#[from] StandInError),
    /// A scalar is NaN or infinite.
    #[error("{name}[{layer}] is {value}, not a finite number")]
    NotFinite {
        /// Which scalar.
        name: &'static str,
        /// Its layer.
        layer: usize,
        /// Its value.
        value: f32,
    },
    /// A residual scalar is zero: the stream before it is erased and cannot be carried as a
    /// rescaled copy.
    #[error("{name}[{layer}] is 0: a residual erased by a zero scalar cannot be folded into the weights")]
    ZeroResidual {
        /// `s_att` or `s_mlp`.
        name: &'static str,
        /// Its layer.
        layer: usize,
    },
    /// The running residual factor left the range where the folded weights stay finite.
    #[error("after {name}[{layer}] the residual stream is scaled by {factor:e}, outside what f32 weights can carry")]
    FactorOutOfRange {
        /// The scalar that took it out of range.
        name: &'static str,
        /// Its layer.
        layer: usize,
        /// The running factor.
        factor: f64,
    },
}

/// How one layer is folded.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerFold {
    /// Whether the layer's attention block is skipped (its attention tensors are dropped).
    pub attn_skipped: bool,
    /// Whether the skipped block has a linear stand-in (`attn_norm` and `attn_output` stay).
    pub attn_linear: bool,
    /// The factor `c` the residual stream entering the layer is divided by.
    pub residual_in: f64,
    /// `c` after the attention sub-block (`residual_in * s_att`, or `residual_in` when skipped).
    pub residual_mid: f64,
    /// `c` after the MLP sub-block (`residual_mid * s_mlp`).
    pub residual_out: f64,
    /// Multiplier of `attn_output.weight`: `b_att / residual_mid` (1 when skipped without a
    /// stand-in).
    pub attn_output_scale: f64,
    /// Multiplier of `ffn_down.weight`: `b_mlp / residual_out`.
    pub ffn_down_scale: f64,
}

impl LayerFold {
    /// Whether the layer has an attention branch: its own block, or a linear stand-in.
    pub fn has_attn_branch(&self) -> bool {
        !self.attn_skipped || self.attn_linear
    }

    /// The layer's attention block: its own, a linear stand-in, or none.
    pub fn attention_kind(&self) -> AttentionKind {
        AttentionKind::of(self.attn_skipped, self.attn_linear)
    }
}

/// The fold of a plan into a model: per layer, which tensors go and what each is multiplied by.
#[derive(Debug, Clone, PartialEq)]
pub struct Fold {
    /// One entry per layer.
    pub layers: Vec<LayerFold>,
    /// The linear stand-ins of skipped blocks, which become their layers' `attn_output`.
    pub linear: Vec<LinearAttention>,
}

/// Largest (and, inverted, smallest) running factor accepted: beyond it a folded projection
/// or the rescaled stream itself would approach f32's range (about 3.4e38).
const MAX_RESIDUAL_FACTOR: f64 = 1e30;

fn sign(x: f64) -> f64 {
    if x < 0.0 {
        -1.0
    } else {
        1.0
    }
}

impl Fold {
    /// The fold of `scales` with the attention blocks flagged in `skipped` left out, for a model
    /// of width `n_embd` (the size of a stand-in). The attention scalars of a
    /// skipped layer are ignored unless it has a linear stand-in; a stand-in for a layer that is
    /// not skipped is refused.
    pub fn new(
        n_layer: usize,
        n_embd: usize,
        skipped: &[bool],
        scales: &ScaleValues,
    ) -> Result<Fold, FoldError> {
        if skipped.len() != n_layer {
            return Err(FoldError::Length {
                name: "skip mask",
                expected: n_layer,
                found: skipped.len(),
            });
        }
        for (name, v) in scales.named() {
            if v.len() != n_layer {
                return Err(FoldError::Length {
                    name,
                    expected: n_layer,
                    found: v.len(),
                });
            }
        }
        let check = |name: &'static str, layer: usize, value: f32| {
            if value.is_finite() {
                Ok(value as f64)
            } else {
                Err(FoldError::NotFinite { name, layer, value })
            }
        };
        let residual = |name: &'static str, layer: usize, c: f64, s: f64| {
            if s == 0.0 {
                return Err(FoldError::ZeroResidual { name, layer });
            }
            let next = c * s;
            let magnitude = next.abs();
            if !(1.0 / MAX_RESIDUAL_FACTOR..=MAX_RESIDUAL_FACTOR).contains(&magnitude) {
                return Err(FoldError::FactorOutOfRange {
                    name,
                    layer,
                    factor: next,
                });
            }
            Ok(next)
        };
        LinearAttention::check_all(&scales.linear, n_layer, n_embd)?;
        let mut linear = vec![false; n_layer];
        for a in &scales.linear {
            if !skipped[a.layer] {
                return Err(StandInError {
                    layer: a.layer,
                    message: "its attention block is not skipped".into(),
                }
                .into());
            }
            linear[a.layer] = true;
        }
        // a layer's attention branch is gone when it is skipped without a stand-in
        let no_branch: Vec<bool> = (0..n_layer).map(|l| skipped[l] && !linear[l]).collect();
        let mut c = 1.0f64;
        let mut layers = Vec::with_capacity(n_layer);
        for (l, &attn_skipped) in skipped.iter().enumerate() {
            let residual_in = c;
            let (residual_mid, attn_output_scale) = if no_branch[l] {
                (c, 1.0)
            } else {
                let b = check("b_att", l, scales.b_att[l])?;
                let s = check("s_att", l, scales.s_att[l])?;
                let mid = residual("s_att", l, c, s)?;
                (mid, b / mid)
            };
            let b = check("b_mlp", l, scales.b_mlp[l])?;
            let s = check("s_mlp", l, scales.s_mlp[l])?;
            let residual_out = residual("s_mlp", l, residual_mid, s)?;
            c = residual_out;
            layers.push(LayerFold {
                attn_skipped,
                attn_linear: linear[l],
                residual_in,
                residual_mid,
                residual_out,
                attn_output_scale,
                ffn_down_scale: b / residual_out,
            });
        }
        Ok(Fold {
            layers,
            linear: scales.linear.clone(),
        })
    }

    /// The weight of the linear stand-in that becomes tensor `name` (GGUF name), if it is one:
    /// `blk.N.attn_output.weight` of a layer with a stand-in, row-major `n_embd x n_embd`,
    /// before the fold's multipliers.
    pub fn linear_weight(&self, name: &str) -> Option<&[f32]> {
        let (l, suffix) = split_block(name)?;
        if suffix != "attn_output.weight" || !self.layers.get(l)?.attn_linear {
            return None;
        }
        self.linear
            .iter()
            .find(|a| a.layer == l)
            .map(|a| &a.weight[..])
    }

    /// Whether the fold changes tensor `name`'s values (a multiplier other than 1, or a
    /// stand-in's weight); a kept tensor it does not change can be copied as stored.
    pub fn alters(&self, name: &str) -> bool {
        self.tensor_scale(name) != 1.0 || self.linear_weight(name).is_some()
    }

    /// The running factor of the stream entering the final norm.
    pub fn residual_final(&self) -> f64 {
        self.layers.last().map_or(1.0, |l| l.residual_out)
    }

    /// The smallest and largest `|c|` over the stream (the embedding's 1 included): how far the
    /// folded stream's scale moves from the original's, which sets RMSNorm's epsilon error.
    pub fn residual_range(&self) -> (f64, f64) {
        self.layers
            .iter()
            .flat_map(|l| [l.residual_mid.abs(), l.residual_out.abs()])
            .fold((1.0f64, 1.0f64), |(lo, hi), c| (lo.min(c), hi.max(c)))
    }

    /// Whether the folded model keeps tensor `name` (GGUF name): the attention tensors of a
    /// skipped layer (`blk.N.attn_*`, its norm included) are dropped, everything else stays.
    /// A linear stand-in keeps its layer's `attn_norm.weight` and `attn_output.weight` (the
    /// stand-in's matrix).
    pub fn keeps(&self, name: &str) -> bool {
        match split_block(name) {
            Some((l, suffix)) => self
                .layers
                .get(l)
                .is_none_or(|f| f.attention_kind().keeps(suffix)),
            None => true,
        }
    }

    /// Each layer's attention block in the folded model.
    pub fn attention_kinds(&self) -> Vec<AttentionKind> {
        self.layers.iter().map(LayerFold::attention_kind).collect()
    }

    /// The multiplier of tensor `name` (GGUF name) in the folded model.
    pub fn tensor_scale(&self, name: &str) -> f64 {
        if name == crate::gguf::consts::OUTPUT_NORM {
            return sign(self.residual_final());
        }
        let Some((l, suffix)) = split_block(name) else {
            return 1.0;
        };
        let Some(f) = self.layers.get(l) else {
            return 1.0;
        };
        match suffix {
            "attn_norm.weight" => sign(f.residual_in),
            "attn_output.weight" | "attn_output.bias" => f.attn_output_scale,
            "ffn_norm.weight" => sign(f.residual_mid),
            "ffn_down.weight" | "ffn_down.bias" => f.ffn_down_scale,
            _ => 1.0,
        }
    }

    /// The tensors of the folded model, by GGUF name, with torch-order shapes.
    pub fn kept_tensors(&self, arch: &Arch) -> Vec<(String, Vec<usize>)> {
        crate::deci::expected_tensors(arch, &self.attention_kinds())
    }

    /// The fold of a model that is already folded: every multiplier 1, the layers' attention
    /// blocks as `kinds` say, a stand-in's matrix read from the model's own `attn_output`.
    pub fn identity(kinds: &[AttentionKind]) -> Fold {
        let layers = kinds
            .iter()
            .map(|&kind| LayerFold {
                attn_skipped: kind != AttentionKind::Attention,
                attn_linear: kind == AttentionKind::Linear,
                residual_in: 1.0,
                residual_mid: 1.0,
                residual_out: 1.0,
                attn_output_scale: 1.0,
                ffn_down_scale: 1.0,
            })
            .collect();
        Fold {
            layers,
            linear: Vec::new(),
        }
    }
}

/// Multiplies f32 values by a fold multiplier (nothing to do when it is 1).
pub fn scale_values(values: &mut [f32], scale: f64) {
    if scale != 1.0 {
        for v in values {
            *v = (*v as f64 * scale) as f32;
        }
    }
}

/// A tensor's values after the fold: times its multiplier. `false` when the values are left as
/// they are.
pub fn fold_values(fold: &Fold, name: &str, values: &mut [f32]) -> bool {
    if !fold.alters(name) {
        return false;
    }
    scale_values(values, fold.tensor_scale(name));
    true
}

/// A checkpoint's tensors with a fold applied, as f32 in Hugging Face layout. The tensors the
/// fold drops are missing ([`CheckpointError::MissingTensor`]).
pub struct FoldedWeights<'a> {
    ck: &'a Checkpoint,
    fold: &'a Fold,
}

impl<'a> FoldedWeights<'a> {
    /// The folded view of `ck`.
    pub fn new(ck: &'a Checkpoint, fold: &'a Fold) -> Self {
        Self { ck, fold }
    }
}

impl TensorSource for FoldedWeights<'_> {
    fn arch(&self) -> &Arch {
        &self.ck.arch
    }

    fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), CheckpointError> {
        if !self.fold.keeps(name) {
            return Err(CheckpointError::MissingTensor {
                path: format!("{} (folded)", self.ck.display_path()),
                name: name.to_string(),
            });
        }
        let (shape, mut values) = match self.fold.linear_weight(name) {
            Some(w) => (vec![self.ck.arch.n_embd; 2], w.to_vec()),
            None => self.ck.tensor_f32(name)?,
        };
        fold_values(self.fold, name, &mut values);
        Ok((shape, values))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scales(n: usize, s_att: f32, s_mlp: f32) -> ScaleValues {
        ScaleValues {
            b_att: vec![2.0; n],
            s_att: vec![s_att; n],
            b_mlp: vec![3.0; n],
            s_mlp: vec![s_mlp; n],
            linear: vec![],
        }
    }

    #[test]
    fn running_factor_multiplies_the_residual_scalars() {
        let f = Fold::new(3, 4, &[false, true, false], &scales(3, 0.5, 4.0)).unwrap();
        let c: Vec<_> = f.layers.iter().map(|l| l.residual_out).collect();
        // layer 0: 0.5 * 4; layer 1 (attention skipped): * 4; layer 2: * 0.5 * 4
        assert_eq!(c, vec![2.0, 8.0, 16.0]);
        assert_eq!(f.layers[0].attn_output_scale, 2.0 / 0.5);
        assert_eq!(f.layers[1].attn_output_scale, 1.0);
        assert_eq!(f.layers[2].ffn_down_scale, 3.0 / 16.0);
        // layer 2 enters with c = 8; its attention residual takes it to 8 * 0.5
        assert_eq!(f.tensor_scale("blk.2.attn_output.weight"), 2.0 / 4.0);
        assert_eq!(f.tensor_scale("output_norm.weight"), 1.0);
        assert_eq!(f.tensor_scale("token_embd.weight"), 1.0);
        assert!(!f.keeps("blk.1.attn_norm.weight"));
        assert!(!f.keeps("blk.1.attn_q.bias"));
        assert!(f.keeps("blk.1.ffn_norm.weight"));
        assert!(f.keeps("blk.0.attn_q.weight"));
        assert_eq!(f.residual_range(), (0.5, 16.0));
    }

    #[test]
    fn negative_factors_flip_the_following_norms() {
        let f = Fold::new(2, 4, &[false, false], &scales(2, -1.0, 1.0)).unwrap();
        assert_eq!(f.tensor_scale("blk.0.attn_norm.weight"), 1.0);
        assert_eq!(f.tensor_scale("blk.0.ffn_norm.weight"), -1.0);
        assert_eq!(f.tensor_scale("blk.1.attn_norm.weight"), -1.0);
        assert_eq!(f.tensor_scale("blk.1.ffn_norm.weight"), 1.0);
        assert_eq!(f.tensor_scale("output_norm.weight"), 1.0);
    }

    #[test]
    fn bad_scalars_are_refused() {
        let mut s = scales(2, 1.0, 1.0);
        s.s_mlp[1] = 0.0;
        assert!(matches!(
            Fold::new(2, 4, &[false, false], &s),
            Err(FoldError::ZeroResidual {
                name: "s_mlp",
                layer: 1
            })
        ));
        s.s_mlp[1] = f32::NAN;
        assert!(matches!(
            Fold::new(2, 4, &[false, false], &s),
            Err(FoldError::NotFinite {
                name: "s_mlp",
                layer: 1,
                ..
            })
        ));
        // a skipped layer's attention scalars are never read
        s.s_mlp[1] = 1.0;
        s.s_att[1] = 0.0;
        assert!(Fold::new(2, 4, &[false, true], &s).is_ok());
        assert!(matches!(
            Fold::new(3, 4, &[false, true], &s),
            Err(FoldError::Length { .. })
        ));
        let tiny = ScaleValues {
            s_mlp: vec![1e-20; 2],
            ..ScaleValues::ones(2)
        };
        assert!(matches!(
            Fold::new(2, 4, &[false, false], &tiny),
            Err(FoldError::FactorOutOfRange { layer: 1, .. })
        ));
    }
}

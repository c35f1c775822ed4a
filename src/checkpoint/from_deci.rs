//! A Hugging Face folder in the DeciLM (Nemotron-NAS) layout ([`crate::deci`]): a Llama model
//! whose layers' attention blocks are regular, linear stand-ins or absent, as `hopscotch export
//! --to hf` writes it and as NVIDIA publishes Nemotron-NAS models of one KV-head count and one
//! MLP width.

use std::path::Path;

use serde_json::Value as Json;

use super::from_hf::{arch_from_config, open_folder, read_json};
use super::{Checkpoint, CheckpointError};
use crate::deci::{
    expected_tensors, ffn_mult_to_intermediate_size, AttentionKind, DECI_HF_ARCHITECTURE,
    LINEAR_ATTN_GGUF_SUFFIX, LINEAR_ATTN_SUFFIX,
};
use crate::gguf::consts::{blk_tensor, hf_to_gguf_name};

/// Attention settings of a `block_configs` entry this tool does not model; each must be absent,
/// null or false.
const UNSUPPORTED_ATTENTION_KEYS: &[&str] = &[
    "sparsify",
    "window_length",
    "num_sink_tokens",
    "unshifted_sink",
    "use_prefill_window_in_sink_attention",
];

/// A DeciLM folder: the checkpoint (the tensors of the layers' attention blocks only where they
/// have them) and each layer's attention block.
pub struct DeciCheckpoint {
    /// The model: `arch` holds the heads, KV heads and MLP width its attention layers share.
    pub checkpoint: Checkpoint,
    /// Each layer's attention block.
    pub attention: Vec<AttentionKind>,
}

/// Whether `path` is a folder whose config.json names `DeciLMForCausalLM`.
pub fn is_deci_folder(path: &Path) -> bool {
    let config = path.join("config.json");
    path.is_dir()
        && read_json(&config).is_ok_and(|c| {
            c.get("architectures")
                .and_then(|a| a.get(0))
                .and_then(Json::as_str)
                == Some(DECI_HF_ARCHITECTURE)
        })
}

impl DeciCheckpoint {
    /// Opens a DeciLM folder: config.json with its `block_configs`, the tokenizer, and the
    /// safetensors, checked tensor by tensor against the layers' blocks.
    pub fn open(dir: &Path) -> Result<DeciCheckpoint, CheckpointError> {
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?;
        let (arch_config, attention) = layout(&config, &config_path)?;
        let mut arch = arch_from_config(&arch_config, &config_path)?;
        arch.hf_architecture = DECI_HF_ARCHITECTURE.into();
        let kinds = attention.clone();
        let gguf_name = move |hf: &str| deci_gguf_name(hf, &kinds);
        let ck = open_folder(dir, &config, arch, &gguf_name)?;
        let expected = expected_tensors(&ck.arch, &attention);
        for (name, shape) in &expected {
            let e = ck.require(name)?;
            if &e.shape != shape {
                return Err(CheckpointError::Shape {
                    path: ck.display_path(),
                    name: name.clone(),
                    found: e.shape.clone(),
                    expected: shape.clone(),
                });
            }
        }
        if let Some(extra) = ck
            .tensors
            .iter()
            .find(|t| !expected.iter().any(|(n, _)| *n == t.name))
        {
            return Err(CheckpointError::Invalid {
                path: ck.display_path(),
                message: format!(
                    "tensor {} belongs to no block of its layer's block_configs entry",
                    extra.source_name
                ),
            });
        }
        Ok(DeciCheckpoint {
            checkpoint: ck,
            attention,
        })
    }
}

/// The GGUF name of a DeciLM tensor: a linear stand-in's matrix becomes its layer's
/// `attn_output.weight` (as llama.cpp names it), where the layer has a stand-in.
fn deci_gguf_name(hf: &str, kinds: &[AttentionKind]) -> Option<String> {
    if let Some(layer) = hf
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.strip_suffix(LINEAR_ATTN_SUFFIX))
        .and_then(|n| n.strip_suffix('.'))
        .and_then(|n| n.parse::<usize>().ok())
    {
        return (kinds.get(layer) == Some(&AttentionKind::Linear))
            .then(|| blk_tensor(layer, LINEAR_ATTN_GGUF_SUFFIX));
    }
    hf_to_gguf_name(hf)
}

/// The layers' attention blocks from `block_configs`, and a Llama config.json with the heads,
/// KV heads and MLP width they share, for [`arch_from_config`]. Refuses, naming the layer and
/// the field, what the `deci` GGUF and this tool's Llama description cannot carry: an MLP-free
/// or linear MLP, MLP widths or KV-head counts that differ between layers, an attention-free
/// layer 0, biases.
fn layout(c: &Json, path: &Path) -> Result<(Json, Vec<AttentionKind>), CheckpointError> {
    let err = |key: String, expected: &str| CheckpointError::Key {
        path: path.display().to_string(),
        key,
        expected: expected.into(),
    };
    for key in ["attention_bias", "mlp_bias"] {
        if c.get(key).and_then(Json::as_bool) == Some(true) {
            return Err(err(
                key.into(),
                "false (biases on every projection are not supported)",
            ));
        }
    }
    let n_layer = c
        .get("num_hidden_layers")
        .and_then(Json::as_u64)
        .ok_or_else(|| err("num_hidden_layers".into(), "a non-negative integer"))?
        as usize;
    let n_embd =
        c.get("hidden_size")
            .and_then(Json::as_u64)
            .ok_or_else(|| err("hidden_size".into(), "a non-negative integer"))? as usize;
    let n_head = c
        .get("num_attention_heads")
        .and_then(Json::as_u64)
        .ok_or_else(|| err("num_attention_heads".into(), "a positive integer"))?
        as usize;
    let blocks = c
        .get("block_configs")
        .and_then(Json::as_array)
        .ok_or_else(|| err("block_configs".into(), "a list with one entry per layer"))?;
    if blocks.len() != n_layer {
        return Err(err(
            "block_configs".into(),
            &format!(
                "{n_layer} entries (num_hidden_layers), not {}",
                blocks.len()
            ),
        ));
    }
    let flag = |v: &Json, key: &str, field: &str| -> Result<bool, CheckpointError> {
        match v.get(key) {
            None | Some(Json::Null) => Ok(false),
            Some(Json::Bool(b)) => Ok(*b),
            Some(_) => Err(err(format!("{field}.{key}"), "true or false")),
        }
    };
    let mut kinds = Vec::with_capacity(n_layer);
    let mut group: Option<(usize, usize)> = None;
    let mut n_ff: Option<(usize, usize)> = None;
    for (l, block) in blocks.iter().enumerate() {
        let field = format!("block_configs[{l}].attention");
        let attn = block
            .get("attention")
            .filter(|a| a.is_object())
            .ok_or_else(|| err(field.clone(), "an object"))?;
        for key in UNSUPPORTED_ATTENTION_KEYS {
            if !matches!(
                attn.get(*key),
                None | Some(Json::Null) | Some(Json::Bool(false))
            ) {
                return Err(err(
                    format!("{field}.{key}"),
                    "absent (this attention variant is not supported)",
                ));
            }
        }
        let kind = match (
            flag(attn, "no_op", &field)?,
            flag(attn, "replace_with_linear", &field)?,
        ) {
            (true, true) => return Err(err(field, "no_op or replace_with_linear, not both")),
            (true, false) => AttentionKind::NoOp,
            (false, true) => AttentionKind::Linear,
            (false, false) => {
                let key = format!("{field}.n_heads_in_group");
                let g = attn
                    .get("n_heads_in_group")
                    .and_then(Json::as_u64)
                    .map(|g| g as usize)
                    .filter(|&g| g > 0 && n_head.is_multiple_of(g))
                    .ok_or_else(|| {
                        err(
                            key.clone(),
                            &format!("a positive divisor of num_attention_heads ({n_head})"),
                        )
                    })?;
                match group {
                    Some((first, g0)) if g0 != g => {
                        return Err(err(
                            key,
                            &format!("{g0}, as in layer {first} (KV-head counts that differ between layers are not supported)"),
                        ))
                    }
                    _ => group = group.or(Some((l, g))),
                }
                AttentionKind::Attention
            }
        };
        if l == 0 && kind != AttentionKind::Attention {
            return Err(err(
                field,
                "a regular attention block in layer 0 (llama.cpp's deci takes the head size from layer 0)",
            ));
        }
        kinds.push(kind);

        let field = format!("block_configs[{l}].ffn");
        let ffn = block
            .get("ffn")
            .filter(|a| a.is_object())
            .ok_or_else(|| err(field.clone(), "an object"))?;
        for key in ["no_op", "replace_with_linear"] {
            if flag(ffn, key, &field)? {
                return Err(err(
                    format!("{field}.{key}"),
                    "false (MLP-free and linear MLP layers are not supported)",
                ));
            }
        }
        let key = format!("{field}.ffn_mult");
        let mult = ffn
            .get("ffn_mult")
            .and_then(Json::as_f64)
            .filter(|m| m.is_finite() && *m > 0.0)
            .ok_or_else(|| err(key.clone(), "a positive number"))?;
        let width = ffn_mult_to_intermediate_size(mult, n_embd);
        match n_ff {
            Some((first, w0)) if w0 != width => {
                return Err(err(
                    key,
                    &format!("a multiplier giving MLP width {w0}, as in layer {first}, not {width} (MLP widths that differ between layers are not supported)"),
                ))
            }
            _ => n_ff = n_ff.or(Some((l, width))),
        }
    }
    let (_, group) = group.ok_or_else(|| err("block_configs".into(), "a layer with attention"))?;
    let (_, n_ff) = n_ff.ok_or_else(|| err("block_configs".into(), "at least one layer"))?;
    let mut llama = c.clone();
    llama["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    llama["intermediate_size"] = n_ff.into();
    llama["num_key_value_heads"] = (n_head / group).into();
    Ok((llama, kinds))
}

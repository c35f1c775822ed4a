//! `hopscotch export --to hf`: checkpoint + plan -> a Hugging Face folder for engines that
//! serve across GPUs (vLLM runs the DeciLM layout with tensor parallelism; llama.cpp's own
//! `convert_hf_to_gguf.py` reads it too).
//!
//! With attention blocks skipped the folder is a `DeciLMForCausalLM` (Nemotron-NAS,
//! [`crate::deci`]): one `block_configs` entry per layer, `no_op` for a skipped block,
//! `replace_with_linear` for one with a linear stand-in (`self_attn.linear_attn.weight`). With
//! nothing skipped it is the input's own architecture. The weights are the folded tensors the
//! GGUF export writes ([`crate::export::folded_hf_bytes`]), in Hugging Face layout, matrices in
//! the chosen float type, 1-D tensors (norms) in f32 as the GGUF writer keeps them, sharded as
//! the input's safetensors are.

use std::path::Path;

use serde_json::Value as Json;

use crate::checkpoint::{config_json, Checkpoint};
use crate::deci::{
    block_config, ffn_mult_for, split_block, AttentionKind, DECI_HF_ARCHITECTURE, DECI_MODEL_TYPE,
    LINEAR_ATTN_GGUF_SUFFIX, LINEAR_ATTN_SUFFIX,
};
use crate::export::{fold_for, folded_hf_bytes, ExportError};
use crate::gguf::consts::gguf_to_hf_name;
use crate::gguf::GgmlType;
use crate::hf_write::{write_hf_folder, HfTensor};
use crate::plan::Plan;
use crate::write::{float_out_type, FloatType, TensorJob, WriteError, WriteSummary};

/// Errors exporting a Hugging Face folder.
#[derive(Debug, thiserror::Error)]
pub enum HfExportError {
    /// The plan is invalid, fitted on another model, or cannot be folded.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// Writing the folder failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The model has q/k/v biases without an o bias (Qwen2); DeciLM's one bias switch,
    /// `attention_bias`, gives q, k, v and o (and a linear stand-in) biases together.
    #[error("{model}: its q/k/v projections have biases and its output projection has none (Qwen2); the DeciLM layout has one switch, attention_bias, that gives q, k, v and o a bias together in vLLM and mlx-lm, so it cannot carry this model with blocks skipped (the GGUF export can)")]
    QkvBiasOnly {
        /// The model.
        model: String,
    },
    /// No `ffn_mult` gives back the model's MLP width under DeciLM's rounding.
    #[error("{model}: MLP width {n_ff} at hidden size {n_embd} is no ffn_mult's width in the DeciLM layout (find_multiple(int(2 * ffn_mult * {n_embd} / 3), 256) gives multiples of 256 only)")]
    FfnWidth {
        /// The model.
        model: String,
        /// Its MLP width.
        n_ff: usize,
        /// Its hidden size.
        n_embd: usize,
    },
}

/// What an HF export wrote.
#[derive(Debug, Clone)]
pub struct HfExportSummary {
    /// The folder written.
    pub folder: WriteSummary,
    /// Its `architectures` entry.
    pub hf_architecture: String,
    /// The float type of its matrices.
    pub dtype: FloatType,
    /// The skipped attention blocks, ascending.
    pub skipped_blocks: Vec<usize>,
    /// The skipped blocks with a linear stand-in, ascending.
    pub linear_blocks: Vec<usize>,
    /// Layers in the model.
    pub n_layer: usize,
}

impl std::fmt::Display for HfExportSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wrote {} ({}, {} matrices, {} of {} attention blocks skipped: {:?}",
            self.folder,
            self.hf_architecture,
            self.dtype.name(),
            self.skipped_blocks.len(),
            self.n_layer,
            self.skipped_blocks,
        )?;
        if !self.linear_blocks.is_empty() {
            write!(f, ", linear stand-ins for {:?}", self.linear_blocks)?;
        }
        write!(f, ")")
    }
}

/// Exports `ck` slimmed by `plan` (read from `plan_path`, named in messages) as a Hugging Face
/// folder at `target`, matrices as `dtype` (default: the input's float type, f32 for a
/// quantized input). The folder is written whole or not at all; an existing one is replaced
/// only with `force`.
pub fn export_hf(
    ck: &Checkpoint,
    plan: &Plan,
    plan_path: &Path,
    target: &Path,
    dtype: Option<FloatType>,
    force: bool,
    progress: &indicatif::ProgressBar,
) -> Result<HfExportSummary, HfExportError> {
    let fold = fold_for(ck, plan, plan_path)?;
    let a = &ck.arch;
    let kinds = fold.attention_kinds();
    let slim = kinds.iter().any(|&k| k != AttentionKind::Attention);
    let float = dtype.unwrap_or_else(|| FloatType::intermediate_for(ck));
    let v = &ck.vocab;
    let mut config = config_json(a, v.bos_id, v.eos_id);
    config["torch_dtype"] = float.torch_name().into();
    if slim {
        if a.attn_bias {
            return Err(HfExportError::QkvBiasOnly {
                model: ck.display_path(),
            });
        }
        let ffn_mult = ffn_mult_for(a.n_ff, a.n_embd).ok_or_else(|| HfExportError::FfnWidth {
            model: ck.display_path(),
            n_ff: a.n_ff,
            n_embd: a.n_embd,
        })?;
        deci_config(&mut config, a, &kinds, ffn_mult);
    }

    let mut tensors = Vec::new();
    for (name, shape) in fold.kept_tensors(a) {
        let hf_name = match split_block(&name) {
            Some((l, LINEAR_ATTN_GGUF_SUFFIX)) if kinds[l] == AttentionKind::Linear => {
                Some(format!("model.layers.{l}.{LINEAR_ATTN_SUFFIX}"))
            }
            _ => gguf_to_hf_name(&name),
        }
        .ok_or_else(|| WriteError::Tensor {
            name: name.clone(),
            message: "has no Hugging Face name".into(),
        })?;
        // a stand-in sits where its layer's own output projection was
        let shard = ck.require(&name).map_err(WriteError::from)?.file_index();
        let out: GgmlType = float_out_type(&shape, float);
        let fold = &fold;
        tensors.push(HfTensor {
            job: TensorJob {
                name: hf_name,
                shape,
                dtype: out,
                produce: Box::new(move || folded_hf_bytes(ck, fold, &name, out)),
            },
            shard,
        });
    }
    let folder = write_hf_folder(target, force, tensors, &config, v, progress)?;
    let layers_where = |keep: &dyn Fn(AttentionKind) -> bool| -> Vec<usize> {
        (0..kinds.len()).filter(|&l| keep(kinds[l])).collect()
    };
    Ok(HfExportSummary {
        folder,
        hf_architecture: if slim {
            DECI_HF_ARCHITECTURE.into()
        } else {
            a.hf_architecture.clone()
        },
        dtype: float,
        skipped_blocks: layers_where(&|k| k != AttentionKind::Attention),
        linear_blocks: layers_where(&|k| k == AttentionKind::Linear),
        n_layer: a.n_layer,
    })
}

/// Turns a Llama config.json into the DeciLM one: its class and model type, one
/// `block_configs` entry per layer (attention `kinds`, every MLP `ffn_mult`); the model-wide
/// KV-head count and MLP width go, as the entries say them per layer.
fn deci_config(
    config: &mut Json,
    arch: &crate::arch::Arch,
    kinds: &[AttentionKind],
    ffn_mult: f64,
) {
    config["architectures"] = serde_json::json!([DECI_HF_ARCHITECTURE]);
    config["model_type"] = DECI_MODEL_TYPE.into();
    config["mlp_bias"] = false.into();
    config["block_configs"] = kinds
        .iter()
        .map(|&k| block_config(k, arch, ffn_mult))
        .collect();
    if let Some(c) = config.as_object_mut() {
        c.remove("intermediate_size");
        c.remove("num_key_value_heads");
    }
}

//! A GGUF file of arch `llama` or `qwen2` (as `convert_hf_to_gguf.py` writes them).

use std::path::Path;

use super::{Checkpoint, CheckpointError, RowOrder, SourceFormat, TensorEntry};
use crate::arch::{Arch, Family, RopeScaling};
use crate::gguf::consts::{arch_key, gguf_to_hf_name};
use crate::gguf::reader::GgufFile;
use crate::gguf::vocab::Vocab;

/// The GGUF architectures this tool reads as checkpoints.
pub const SUPPORTED_GGUF_ARCHS: &[&str] = &["llama", "qwen2"];

/// `general.*` keys that describe the file rather than the model; never carried over.
const FILE_KEYS: &[&str] = &[
    "general.architecture",
    "general.file_type",
    "general.quantization_version",
    "general.alignment",
];

pub(super) fn open(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let file = GgufFile::open(path)?;
    let p = || path.display().to_string();
    let arch_name = file.get_str("general.architecture")?.to_string();
    let family = match arch_name.as_str() {
        "llama" => Family::Llama,
        "qwen2" => Family::Qwen2,
        other => {
            return Err(CheckpointError::UnsupportedArch {
                path: p(),
                found: other.to_string(),
                supported: SUPPORTED_GGUF_ARCHS.join(", "),
            })
        }
    };
    let u = |suffix: &str| -> Result<usize, CheckpointError> {
        Ok(file.get_u64(&arch_key(&arch_name, suffix))? as usize)
    };
    let opt_u = |suffix: &str| -> Option<usize> {
        file.get(&arch_key(&arch_name, suffix))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
    };
    let opt_f = |suffix: &str| -> Option<f64> {
        file.get(&arch_key(&arch_name, suffix))
            .and_then(|v| v.as_f64())
    };
    let n_embd = u("embedding_length")?;
    let n_head = u("attention.head_count")?;
    if n_head == 0 {
        return Err(CheckpointError::Key {
            path: p(),
            key: arch_key(&arch_name, "attention.head_count"),
            expected: "a positive head count".into(),
        });
    }
    let has = |name: &str| file.tensors().iter().any(|t| t.name == name);
    if has("rope_freqs.weight") {
        return Err(CheckpointError::Invalid {
            path: p(),
            message: "tensor rope_freqs.weight (per-frequency rope factors) is not supported when reading a GGUF".into(),
        });
    }
    let rope_scaling = match file
        .get(&arch_key(&arch_name, "rope.scaling.type"))
        .and_then(|v| v.as_str())
    {
        Some("linear") => opt_f("rope.scaling.factor").map(|factor| RopeScaling::Linear { factor }),
        Some("none") | None => None,
        Some(other) => {
            return Err(CheckpointError::Key {
                path: p(),
                key: arch_key(&arch_name, "rope.scaling.type"),
                expected: format!("linear or none, not {other:?}"),
            })
        }
    };
    let tok_rows = file
        .tensors()
        .iter()
        .find(|t| t.name == "token_embd.weight")
        .map(|t| t.shape()[0]);
    let vocab_size =
        opt_u("vocab_size")
            .or(tok_rows)
            .ok_or_else(|| CheckpointError::MissingTensor {
                path: p(),
                name: "token_embd.weight".into(),
            })?;
    let attn_bias = has("blk.0.attn_q.bias");
    let arch = Arch {
        family,
        hf_architecture: match family {
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
        }
        .to_string(),
        n_layer: u("block_count")?,
        n_embd,
        n_ff: u("feed_forward_length")?,
        n_head,
        n_head_kv: opt_u("attention.head_count_kv").unwrap_or(n_head),
        head_dim: opt_u("attention.key_length").unwrap_or(n_embd / n_head),
        vocab_size,
        context_length: opt_u("context_length").unwrap_or(4096),
        rms_norm_eps: opt_f("attention.layer_norm_rms_epsilon").ok_or_else(|| {
            CheckpointError::Key {
                path: p(),
                key: arch_key(&arch_name, "attention.layer_norm_rms_epsilon"),
                expected: "a float".into(),
            }
        })?,
        rope_theta: opt_f("rope.freq_base").unwrap_or(10000.0),
        rope_scaling,
        tie_word_embeddings: !has("output.weight"),
        attn_bias,
    };
    arch.validate()
        .map_err(|message| CheckpointError::Invalid { path: p(), message })?;

    let vocab = Vocab::from_gguf(&|k: &str| file.get(k).cloned())?;
    let general = file
        .metadata()
        .iter()
        .filter(|(k, _)| k.starts_with("general.") && !FILE_KEYS.contains(&k.as_str()))
        .cloned()
        .collect();

    let mut tensors = Vec::with_capacity(file.tensors().len());
    for t in file.tensors() {
        if gguf_to_hf_name(&t.name).is_none() {
            return Err(CheckpointError::Invalid {
                path: p(),
                message: format!("tensor {} is not part of a {arch_name} model", t.name),
            });
        }
        let row_order = if family == Family::Llama
            && (t.name.ends_with("attn_q.weight") || t.name.ends_with("attn_q.bias"))
        {
            RowOrder::RopeInterleaved {
                n_head: arch.n_head,
            }
        } else if family == Family::Llama
            && (t.name.ends_with("attn_k.weight") || t.name.ends_with("attn_k.bias"))
        {
            RowOrder::RopeInterleaved {
                n_head: arch.n_head_kv,
            }
        } else {
            RowOrder::Hf
        };
        tensors.push(TensorEntry {
            name: t.name.clone(),
            source_name: t.name.clone(),
            dtype: t.ggml_type,
            shape: t.shape(),
            row_order,
            file: 0,
            start: t.offset as usize,
            len: t.nbytes,
        });
    }
    let ck = Checkpoint {
        path: path.to_path_buf(),
        format: SourceFormat::Gguf,
        arch,
        vocab,
        general,
        tensors,
        maps: vec![std::sync::Arc::new(super::map_file(path)?)],
    };
    ck.validate_tensors()?;
    Ok(ck)
}

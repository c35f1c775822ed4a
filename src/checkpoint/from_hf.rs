//! A Hugging Face folder: config.json, safetensors (one file or sharded with an index),
//! tokenizer.json and tokenizer_config.json.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use super::{map_file, Checkpoint, CheckpointError, RowOrder, SourceFormat, TensorEntry};
use crate::arch::{Arch, Family, RopeScaling};
use crate::gguf::consts::hf_to_gguf_name;
use crate::gguf::vocab::Vocab;
use crate::gguf::{GgmlType, Value};

/// The `architectures` values this tool reads.
pub const SUPPORTED_HF_ARCHS: &[&str] =
    &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// Tensors in HF checkpoints that carry nothing the model needs (recomputed buffers).
fn ignored_hf_tensor(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
}

pub(super) fn open(dir: &Path) -> Result<Checkpoint, CheckpointError> {
    let config_path = dir.join("config.json");
    let config = read_json(&config_path)?;
    let arch = arch_from_config(&config, &config_path)?;
    let ck = open_folder(dir, &config, arch, &hf_to_gguf_name)?;
    ck.validate_tensors()?;
    Ok(ck)
}

/// Opens the tokenizer and the safetensors of a folder whose config.json (`config`) describes
/// `arch`, naming each tensor by `gguf_name` (a tensor it does not name is refused). The
/// tensors are not checked against the architecture.
pub(super) fn open_folder(
    dir: &Path,
    config: &Json,
    arch: Arch,
    gguf_name: &dyn Fn(&str) -> Option<String>,
) -> Result<Checkpoint, CheckpointError> {
    let tok = dir.join("tokenizer.json");
    if !tok.is_file() {
        return Err(CheckpointError::Invalid {
            path: dir.display().to_string(),
            message: "tokenizer.json is missing (a Hugging Face folder needs it)".into(),
        });
    }
    let tok_cfg = dir.join("tokenizer_config.json");
    let mut vocab = Vocab::from_hf_files(
        &tok,
        tok_cfg.is_file().then_some(tok_cfg.as_path()),
        arch.vocab_size,
    )?;
    vocab.fill_special_ids_from_config_json(config);
    // convert_hf_to_gguf.py's LlamaModel: models with a 49152-token vocabulary (SmolLM,
    // Granite small) are written with add_bos_token = false.
    if arch.family == Family::Llama && arch.vocab_size == 49152 {
        vocab.add_bos = Some(false);
    }

    let mut maps = Vec::new();
    let mut tensors = Vec::new();
    let mut seen = BTreeSet::new();
    for file in safetensors_files(dir)? {
        let map = map_file(&file)?;
        let fname = file.display().to_string();
        let (header_len, meta) =
            safetensors::SafeTensors::read_metadata(&map[..]).map_err(|e| {
                CheckpointError::Invalid {
                    path: fname.clone(),
                    message: format!("not a valid safetensors file: {e}"),
                }
            })?;
        let data_start = 8 + header_len;
        let mut infos: Vec<_> = meta.tensors().into_iter().collect();
        infos.sort_by_key(|(_, info)| info.data_offsets.0);
        for (hf_name, info) in infos {
            if ignored_hf_tensor(&hf_name) {
                continue;
            }
            let name = gguf_name(&hf_name).ok_or_else(|| CheckpointError::Invalid {
                path: fname.clone(),
                message: format!(
                    "tensor {hf_name} has no GGUF counterpart for {}",
                    arch.hf_architecture
                ),
            })?;
            let dtype = match info.dtype {
                safetensors::Dtype::F32 => GgmlType::F32,
                safetensors::Dtype::F16 => GgmlType::F16,
                safetensors::Dtype::BF16 => GgmlType::BF16,
                other => {
                    return Err(CheckpointError::Invalid {
                        path: fname.clone(),
                        message: format!(
                            "tensor {hf_name} has dtype {other:?}; expected F32, F16 or BF16"
                        ),
                    })
                }
            };
            if !seen.insert(name.clone()) {
                return Err(CheckpointError::Invalid {
                    path: fname.clone(),
                    message: format!("tensor {hf_name} appears in more than one file"),
                });
            }
            let (a, b) = info.data_offsets;
            tensors.push(TensorEntry {
                name,
                source_name: hf_name,
                dtype,
                shape: info.shape.clone(),
                row_order: RowOrder::Hf,
                file: maps.len(),
                start: data_start + a,
                len: b - a,
            });
        }
        maps.push(std::sync::Arc::new(map));
    }
    let general = match dir.file_name().and_then(|n| n.to_str()) {
        Some(n) if !n.is_empty() => vec![("general.name".to_string(), Value::String(n.into()))],
        _ => Vec::new(),
    };
    Ok(Checkpoint {
        path: dir.to_path_buf(),
        format: SourceFormat::HfFolder,
        arch,
        vocab,
        general,
        tensors,
        maps,
    })
}

/// Reads and parses a JSON file.
pub(super) fn read_json(path: &Path) -> Result<Json, CheckpointError> {
    let text = std::fs::read_to_string(path).map_err(|source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| CheckpointError::Invalid {
        path: path.display().to_string(),
        message: format!("not valid JSON: {e}"),
    })
}

/// The safetensors files: those the index names, else every `*.safetensors` in the folder.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let j = read_json(&index)?;
        let map = j
            .get("weight_map")
            .and_then(Json::as_object)
            .ok_or_else(|| CheckpointError::Key {
                path: index.display().to_string(),
                key: "weight_map".into(),
                expected: "an object mapping tensor names to files".into(),
            })?;
        let mut files = BTreeSet::new();
        for (k, v) in map {
            let f = v.as_str().ok_or_else(|| CheckpointError::Key {
                path: index.display().to_string(),
                key: format!("weight_map.{k}"),
                expected: "a file name".into(),
            })?;
            if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                return Err(CheckpointError::Key {
                    path: index.display().to_string(),
                    key: format!("weight_map.{k}"),
                    expected: format!("a file name inside the folder, not {f:?}"),
                });
            }
            files.insert(dir.join(f));
        }
        return Ok(files.into_iter().collect());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| CheckpointError::Io {
            path: dir.display().to_string(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(CheckpointError::Invalid {
            path: dir.display().to_string(),
            message: "no *.safetensors files".into(),
        });
    }
    Ok(files)
}

/// Reads the architecture from a parsed config.json.
pub fn arch_from_config(c: &Json, path: &Path) -> Result<Arch, CheckpointError> {
    let p = || path.display().to_string();
    let key_err = |key: &str, expected: &str| CheckpointError::Key {
        path: p(),
        key: key.into(),
        expected: expected.into(),
    };
    let hf_arch = c
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Json::as_str)
        .ok_or_else(|| key_err("architectures", "a list with the model class name"))?
        .to_string();
    let family = match hf_arch.as_str() {
        "LlamaForCausalLM" | "MistralForCausalLM" => Family::Llama,
        "Qwen2ForCausalLM" => Family::Qwen2,
        _ => {
            return Err(CheckpointError::UnsupportedArch {
                path: p(),
                found: hf_arch,
                supported: SUPPORTED_HF_ARCHS.join(", "),
            })
        }
    };
    let req = |key: &str| -> Result<usize, CheckpointError> {
        c.get(key)
            .and_then(Json::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| key_err(key, "a non-negative integer"))
    };
    let opt_usize = |key: &str| -> Result<Option<usize>, CheckpointError> {
        match c.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|v| Some(v as usize))
                .ok_or_else(|| key_err(key, "a non-negative integer")),
        }
    };
    let opt_f64 = |key: &str| -> Result<Option<f64>, CheckpointError> {
        match c.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| key_err(key, "a number")),
        }
    };
    let opt_bool = |key: &str| -> Result<Option<bool>, CheckpointError> {
        match c.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| key_err(key, "true or false")),
        }
    };
    let n_embd = req("hidden_size")?;
    let n_head = req("num_attention_heads")?;
    if n_head == 0 {
        return Err(key_err("num_attention_heads", "a positive integer"));
    }
    let head_dim = opt_usize("head_dim")?.unwrap_or(n_embd / n_head);
    let rope_scaling = match c.get("rope_scaling") {
        None | Some(Json::Null) => None,
        Some(s) => {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(Json::as_str)
                .unwrap_or("");
            let f = |k: &str, d: f64| s.get(k).and_then(Json::as_f64).unwrap_or(d);
            match kind {
                "linear" => Some(RopeScaling::Linear {
                    factor: s
                        .get("factor")
                        .and_then(Json::as_f64)
                        .ok_or_else(|| key_err("rope_scaling.factor", "a number"))?,
                }),
                "llama3" => Some(RopeScaling::Llama3 {
                    factor: f("factor", 8.0),
                    low_freq_factor: f("low_freq_factor", 1.0),
                    high_freq_factor: f("high_freq_factor", 4.0),
                    original_max_position_embeddings: f("original_max_position_embeddings", 8192.0),
                }),
                "default" | "" => None,
                other => {
                    return Err(key_err(
                        "rope_scaling.rope_type",
                        &format!("linear, llama3 or default, not {other:?}"),
                    ))
                }
            }
        }
    };
    let arch = Arch {
        family,
        hf_architecture: hf_arch,
        n_layer: req("num_hidden_layers")?,
        n_embd,
        n_ff: req("intermediate_size")?,
        n_head,
        n_head_kv: opt_usize("num_key_value_heads")?.unwrap_or(n_head),
        head_dim,
        vocab_size: req("vocab_size")?,
        context_length: opt_usize("max_position_embeddings")?.unwrap_or(4096),
        rms_norm_eps: opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
        rope_theta: opt_f64("rope_theta")?.unwrap_or(10000.0),
        rope_scaling,
        tie_word_embeddings: opt_bool("tie_word_embeddings")?.unwrap_or(false),
        attn_bias: match family {
            Family::Qwen2 => true,
            Family::Llama => opt_bool("attention_bias")?.unwrap_or(false),
        },
    };
    arch.validate()
        .map_err(|message| CheckpointError::Invalid { path: p(), message })?;
    Ok(arch)
}

/// The config.json a Hugging Face loader expects for `arch`.
pub fn config_json(arch: &Arch, bos: Option<u32>, eos: Option<u32>) -> Json {
    let mut c = serde_json::json!({
        "architectures": [arch.hf_architecture],
        "model_type": match arch.family { Family::Llama => if arch.hf_architecture.starts_with("Mistral") { "mistral" } else { "llama" }, Family::Qwen2 => "qwen2" },
        "hidden_size": arch.n_embd,
        "intermediate_size": arch.n_ff,
        "num_hidden_layers": arch.n_layer,
        "num_attention_heads": arch.n_head,
        "num_key_value_heads": arch.n_head_kv,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.context_length,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    });
    if arch.family == Family::Llama {
        c["attention_bias"] = Json::Bool(arch.attn_bias);
    }
    if let Some(b) = bos {
        c["bos_token_id"] = b.into();
    }
    if let Some(e) = eos {
        c["eos_token_id"] = e.into();
    }
    c["rope_scaling"] = match &arch.rope_scaling {
        None => Json::Null,
        Some(RopeScaling::Linear { factor }) => {
            serde_json::json!({"rope_type": "linear", "factor": factor})
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => serde_json::json!({
            "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": *original_max_position_embeddings as u64,
        }),
    };
    c
}

//! `inspect`: what a GGUF file or Hugging Face folder holds: architecture, layers, per-layer
//! heads (arrays included, as `deci` files have), tensor types and sizes, tokenizer summary.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::checkpoint::{is_deci_folder, Checkpoint, CheckpointError, DeciCheckpoint};
use crate::gguf::consts::arch_key;
use crate::gguf::reader::GgufFile;
use crate::gguf::Value;

/// A summary of a model file or folder.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The path inspected.
    pub path: String,
    /// `gguf` or `hf`.
    pub format: String,
    /// GGUF version (GGUF only).
    pub gguf_version: Option<u32>,
    /// Architecture name (GGUF arch, or the HF class).
    pub architecture: String,
    /// Model name, if recorded.
    pub name: Option<String>,
    /// Layers.
    pub block_count: usize,
    /// Hidden width.
    pub embedding_length: usize,
    /// Query heads per layer (0 = attention-free layer).
    pub head_count: Vec<usize>,
    /// Key/value heads per layer (0 = no KV cache for that layer).
    pub head_count_kv: Vec<usize>,
    /// Number of tensors.
    pub tensor_count: usize,
    /// Tensor bytes in total.
    pub tensor_bytes: u64,
    /// Elements in total (parameters).
    pub parameters: u64,
    /// Tensor count per data type.
    pub tensor_types: BTreeMap<String, usize>,
    /// Tokenizer model (`gpt2`, `llama`).
    pub tokenizer_model: Option<String>,
    /// Pre-tokenizer name.
    pub tokenizer_pre: Option<String>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Whether a chat template is present.
    pub chat_template: bool,
    /// File size in bytes (sum of files for a folder).
    pub file_bytes: u64,
    /// What an importance matrix holds (`general.type` = `imatrix`; the model fields are then
    /// empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub imatrix: Option<ImatrixInfo>,
}

/// An importance matrix's summary.
#[derive(Debug, Clone, Serialize)]
pub struct ImatrixInfo {
    /// Weight matrices with an entry.
    pub entries: usize,
    /// Blocks with at least one entry.
    pub blocks: usize,
    /// Calibration data names.
    pub datasets: Vec<String>,
    /// Chunks (sequences) summed.
    pub chunk_count: u32,
    /// The most tokens any matrix summed.
    pub tokens: f64,
}

/// Errors from inspect.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The GGUF is malformed.
    #[error(transparent)]
    Gguf(#[from] crate::gguf::reader::GgufError),
    /// The folder is not a usable checkpoint.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The importance matrix is malformed.
    #[error(transparent)]
    Imatrix(Box<crate::gguf::imatrix::ImatrixFileError>),
}

/// Summarises an importance matrix (a GGUF whose `general.type` is `imatrix`).
fn inspect_imatrix(path: &Path, f: &GgufFile) -> Result<Summary, InspectError> {
    let im = crate::gguf::imatrix::Imatrix::from_gguf(f)
        .map_err(|e| InspectError::Imatrix(Box::new(e)))?;
    let blocks: std::collections::BTreeSet<&str> = im
        .entries
        .keys()
        .filter_map(|n| n.strip_prefix("blk.")?.split('.').next())
        .collect();
    Ok(Summary {
        path: path.display().to_string(),
        format: "gguf".into(),
        gguf_version: Some(f.version()),
        architecture: "imatrix".into(),
        name: None,
        block_count: 0,
        embedding_length: 0,
        head_count: Vec::new(),
        head_count_kv: Vec::new(),
        tensor_count: 2 * im.entries.len(),
        tensor_bytes: im
            .entries
            .values()
            .map(|e| 4 * (e.sums.len() + e.counts.len()) as u64)
            .sum(),
        parameters: 0,
        tensor_types: BTreeMap::from([("f32".to_string(), 2 * im.entries.len())]),
        tokenizer_model: None,
        tokenizer_pre: None,
        vocab_size: 0,
        chat_template: false,
        file_bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        imatrix: Some(ImatrixInfo {
            entries: im.entries.len(),
            blocks: blocks.len(),
            tokens: im
                .entries
                .values()
                .flat_map(|e| e.counts.iter().map(|&c| c as f64))
                .fold(0.0, f64::max),
            datasets: im.datasets,
            chunk_count: im.chunk_count,
        }),
    })
}

/// Summarises a GGUF file or HF folder (a DeciLM one with its layers' head counts as `deci`
/// GGUF arrays hold them: a linear stand-in has heads and no KV heads, a skipped block neither).
pub fn inspect(path: &Path) -> Result<Summary, InspectError> {
    if is_deci_folder(path) {
        let deci = DeciCheckpoint::open(path)?;
        let a = &deci.checkpoint.arch;
        let (heads, kv_heads) = deci.attention.iter().map(|k| k.head_counts(a)).unzip();
        return Ok(Summary {
            head_count: heads,
            head_count_kv: kv_heads,
            ..inspect_hf(&deci.checkpoint)
        });
    }
    if path.is_dir() {
        return Ok(inspect_hf(&Checkpoint::open(path)?));
    }
    let f = GgufFile::open(path)?;
    if f.get("general.type").and_then(Value::as_str) == Some("imatrix") {
        return inspect_imatrix(path, &f);
    }
    let arch = f.get_str("general.architecture")?.to_string();
    let n_layer = f.get_u64(&arch_key(&arch, "block_count")).unwrap_or(0) as usize;
    let per_layer = |suffix: &str| -> Vec<usize> {
        match f.get(&arch_key(&arch, suffix)) {
            Some(Value::Array(_, items)) => items
                .iter()
                .map(|v| v.as_u64().unwrap_or(0) as usize)
                .collect(),
            Some(v) => vec![v.as_u64().unwrap_or(0) as usize; n_layer],
            None => Vec::new(),
        }
    };
    let mut tensor_types = BTreeMap::new();
    for t in f.tensors() {
        *tensor_types
            .entry(t.ggml_type.name().to_string())
            .or_insert(0) += 1;
    }
    let tokens = f
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .map_or(0, |a| a.len());
    Ok(Summary {
        path: path.display().to_string(),
        format: "gguf".into(),
        gguf_version: Some(f.version()),
        name: f
            .get("general.name")
            .and_then(|v| v.as_str())
            .map(String::from),
        block_count: n_layer,
        embedding_length: f.get_u64(&arch_key(&arch, "embedding_length")).unwrap_or(0) as usize,
        head_count: per_layer("attention.head_count"),
        head_count_kv: per_layer("attention.head_count_kv"),
        tensor_count: f.tensors().len(),
        tensor_bytes: f.tensors().iter().map(|t| t.nbytes as u64).sum(),
        parameters: f
            .tensors()
            .iter()
            .map(|t| t.dims.iter().product::<u64>())
            .sum(),
        tensor_types,
        tokenizer_model: f
            .get("tokenizer.ggml.model")
            .and_then(|v| v.as_str())
            .map(String::from),
        tokenizer_pre: f
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .map(String::from),
        vocab_size: tokens,
        chat_template: f.get("tokenizer.chat_template").is_some(),
        file_bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        architecture: arch,
        imatrix: None,
    })
}

fn inspect_hf(ck: &Checkpoint) -> Summary {
    let mut tensor_types = BTreeMap::new();
    for t in &ck.tensors {
        *tensor_types.entry(t.dtype.name().to_string()).or_insert(0) += 1;
    }
    let a = &ck.arch;
    Summary {
        path: ck.display_path(),
        format: "hf".into(),
        gguf_version: None,
        architecture: a.hf_architecture.clone(),
        name: ck
            .general
            .iter()
            .find(|(k, _)| k == "general.name")
            .and_then(|(_, v)| v.as_str().map(String::from)),
        block_count: a.n_layer,
        embedding_length: a.n_embd,
        head_count: vec![a.n_head; a.n_layer],
        head_count_kv: vec![a.n_head_kv; a.n_layer],
        tensor_count: ck.tensors.len(),
        tensor_bytes: ck.weight_bytes(),
        parameters: ck.tensors.iter().map(|t| t.n_elements() as u64).sum(),
        tensor_types,
        tokenizer_model: Some(ck.vocab.model.clone()),
        tokenizer_pre: ck.vocab.pre.clone(),
        vocab_size: ck.vocab.tokens.len(),
        chat_template: ck.vocab.chat_template.is_some(),
        file_bytes: std::fs::read_dir(&ck.path)
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0),
        imatrix: None,
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} ({})", self.path, self.format)?;
        if let Some(v) = self.gguf_version {
            writeln!(f, "  gguf version     {v}")?;
        }
        if let Some(im) = &self.imatrix {
            writeln!(f, "  importance matrix for llama.cpp's quantizer")?;
            writeln!(
                f,
                "  entries          {} weight matrices in {} blocks",
                im.entries, im.blocks
            )?;
            writeln!(
                f,
                "  calibration      {} tokens in {} chunks: {}",
                im.tokens,
                im.chunk_count,
                if im.datasets.is_empty() {
                    "-".to_string()
                } else {
                    im.datasets.join("; ")
                }
            )?;
            return write!(f, "  file size        {} bytes", self.file_bytes);
        }
        writeln!(f, "  architecture     {}", self.architecture)?;
        if let Some(n) = &self.name {
            writeln!(f, "  name             {n}")?;
        }
        writeln!(f, "  layers           {}", self.block_count)?;
        writeln!(f, "  width            {}", self.embedding_length)?;
        writeln!(f, "  heads            {}", compact(&self.head_count))?;
        writeln!(f, "  kv heads         {}", compact(&self.head_count_kv))?;
        let free: Vec<String> = self
            .head_count
            .iter()
            .enumerate()
            .filter(|(_, &h)| h == 0)
            .map(|(i, _)| i.to_string())
            .collect();
        if !free.is_empty() {
            writeln!(f, "  attention-free   layers {}", free.join(", "))?;
        }
        // deci's "linear attention": heads but no KV heads (a matrix per token, no KV cache)
        let linear: Vec<String> = self
            .head_count
            .iter()
            .zip(&self.head_count_kv)
            .enumerate()
            .filter(|(_, (&h, &kv))| h > 0 && kv == 0)
            .map(|(i, _)| i.to_string())
            .collect();
        if !linear.is_empty() {
            writeln!(f, "  linear attention layers {}", linear.join(", "))?;
        }
        writeln!(
            f,
            "  tensors          {} ({:.1} MiB, {:.1} M parameters)",
            self.tensor_count,
            self.tensor_bytes as f64 / (1 << 20) as f64,
            self.parameters as f64 / 1e6
        )?;
        let types: Vec<String> = self
            .tensor_types
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        writeln!(f, "  tensor types     {}", types.join(", "))?;
        writeln!(
            f,
            "  tokenizer        {} / {} ({} tokens{})",
            self.tokenizer_model.as_deref().unwrap_or("-"),
            self.tokenizer_pre.as_deref().unwrap_or("-"),
            self.vocab_size,
            if self.chat_template {
                ", chat template"
            } else {
                ""
            }
        )?;
        write!(f, "  file size        {} bytes", self.file_bytes)
    }
}

/// `[9 x 30]` for a uniform list, the list itself otherwise.
fn compact(v: &[usize]) -> String {
    match v.first() {
        Some(&first) if v.iter().all(|&x| x == first) => {
            format!("{first} (all {} layers)", v.len())
        }
        _ => format!("{v:?}"),
    }
}

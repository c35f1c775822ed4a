//! Open a model checkpoint: a Hugging Face folder (config.json, sharded safetensors by mmap,
//! tokenizer.json) or a GGUF file, as one [`Checkpoint`] with lazy tensors.
//!
//! Tensors are named with their GGUF names (`blk.3.attn_q.weight`) and laid out as Hugging Face
//! lays them out (torch shape order `[out, in]`, q/k rows not rope-permuted), whatever the source.
//! Nothing is read until a stage asks for a tensor, so peak memory stays near one tensor.

mod from_deci;
mod from_gguf;
mod from_hf;
mod stored;

pub use from_deci::{is_deci_folder, DeciCheckpoint};
pub use from_gguf::SUPPORTED_GGUF_ARCHS;
pub use from_hf::{arch_from_config, config_json, SUPPORTED_HF_ARCHS};
pub use stored::StoredTensor;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::arch::{permute_rope_rows, Arch};
use crate::gguf::vocab::Vocab;
use crate::gguf::{GgmlType, Value};

/// Errors opening or reading a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file could not be opened or mapped.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A tensor the model needs is missing.
    #[error("{path}: tensor {name} is missing")]
    MissingTensor {
        /// The checkpoint path.
        path: String,
        /// The GGUF tensor name.
        name: String,
    },
    /// A tensor has a shape other than the architecture implies.
    #[error("{path}: tensor {name} has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The checkpoint path.
        path: String,
        /// The GGUF tensor name.
        name: String,
        /// The shape in the file.
        found: Vec<usize>,
        /// The shape the architecture implies.
        expected: Vec<usize>,
    },
    /// A config key is missing or has the wrong type.
    #[error("{path}: key {key}: {expected}")]
    Key {
        /// The file (config.json or the GGUF).
        path: String,
        /// The key.
        key: String,
        /// What was expected.
        expected: String,
    },
    /// The architecture is not one this tool supports.
    #[error("{path}: architecture {found} is not supported (supported: {supported})")]
    UnsupportedArch {
        /// The file naming it.
        path: String,
        /// The architecture found.
        found: String,
        /// The supported list.
        supported: String,
    },
    /// The GGUF file is malformed.
    #[error(transparent)]
    Gguf(#[from] crate::gguf::reader::GgufError),
    /// The tokenizer files are malformed.
    #[error(transparent)]
    Vocab(#[from] crate::gguf::vocab::VocabError),
    /// Any other problem, with its description.
    #[error("{path}: {message}")]
    Invalid {
        /// The checkpoint path.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Where a model's tensors come from: the architecture, and each tensor as f32 by GGUF name in
/// Hugging Face layout (shape in torch order, q/k rows not rope-permuted).
pub trait TensorSource {
    /// The architecture.
    fn arch(&self) -> &Arch;
    /// The tensor's shape and values, dequantized to f32.
    fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), CheckpointError>;
    /// The tensor in the precision it is stored in; by default its f32 values.
    fn tensor_stored(&self, name: &str) -> Result<StoredTensor, CheckpointError> {
        let (shape, values) = self.tensor_f32(name)?;
        Ok(StoredTensor::from_f32(name, &shape, &values))
    }
}

/// The kind of file a checkpoint came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    /// A Hugging Face folder with safetensors.
    HfFolder,
    /// A GGUF file.
    Gguf,
}

/// How a stored tensor's rows relate to Hugging Face layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOrder {
    /// Stored as Hugging Face stores it.
    Hf,
    /// q/k rows in llama.cpp's interleaved rope layout for `n_head` heads (GGUF `llama` files).
    RopeInterleaved {
        /// Heads in this projection (query heads for q, kv heads for k).
        n_head: usize,
    },
}

/// One tensor of a checkpoint: where its bytes are and what they hold.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// GGUF name.
    pub name: String,
    /// Name in the source file (the HF name for safetensors).
    pub source_name: String,
    /// Stored data type.
    pub dtype: GgmlType,
    /// Shape in torch order (`[rows, cols]`).
    pub shape: Vec<usize>,
    /// Row order of the stored bytes.
    pub row_order: RowOrder,
    file: usize,
    start: usize,
    len: usize,
}

impl TensorEntry {
    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Stored size in bytes.
    pub fn n_bytes(&self) -> usize {
        self.len
    }

    /// Which of the checkpoint's files holds it (0 for a GGUF; a shard's place for a folder).
    pub fn file_index(&self) -> usize {
        self.file
    }
}

/// An opened model: architecture, tokenizer, descriptive metadata and lazy tensors.
pub struct Checkpoint {
    /// The folder or file it was opened from.
    pub path: PathBuf,
    /// What kind of source it is.
    pub format: SourceFormat,
    /// The architecture.
    pub arch: Arch,
    /// The tokenizer.
    pub vocab: Vocab,
    /// Descriptive `general.*` metadata worth carrying into outputs (name, license, ...).
    pub general: Vec<(String, Value)>,
    /// The tensors, in file order.
    pub tensors: Vec<TensorEntry>,
    maps: Vec<Arc<Mmap>>,
}

impl Checkpoint {
    /// Opens a Hugging Face folder or a GGUF file.
    pub fn open(path: &Path) -> Result<Checkpoint, CheckpointError> {
        if path.is_dir() {
            from_hf::open(path)
        } else if path.is_file() {
            from_gguf::open(path)
        } else {
            Err(CheckpointError::Invalid {
                path: path.display().to_string(),
                message: "no such file or folder (expected a Hugging Face folder or a .gguf file)"
                    .into(),
            })
        }
    }

    /// The path as text, for messages.
    pub fn display_path(&self) -> String {
        self.path.display().to_string()
    }

    /// The entry for a GGUF tensor name.
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The entry for a name, or an error naming it.
    pub fn require(&self, name: &str) -> Result<&TensorEntry, CheckpointError> {
        self.entry(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                path: self.display_path(),
                name: name.to_string(),
            })
    }

    /// The stored bytes as they are in the file (source row order).
    pub fn stored_bytes(&self, e: &TensorEntry) -> &[u8] {
        &self.maps[e.file][e.start..e.start + e.len]
    }

    /// The bytes in Hugging Face row order, in the stored data type.
    pub fn hf_bytes(&self, e: &TensorEntry) -> Cow<'_, [u8]> {
        let raw = self.stored_bytes(e);
        match e.row_order {
            RowOrder::Hf => Cow::Borrowed(raw),
            RowOrder::RopeInterleaved { n_head } => {
                let rows = e.shape.first().copied().unwrap_or(1).max(1);
                Cow::Owned(permute_rope_rows(raw, raw.len() / rows, n_head, false))
            }
        }
    }

    /// The values as f32 in Hugging Face row order, dequantized where needed.
    pub fn f32_values(&self, e: &TensorEntry) -> Result<Vec<f32>, CheckpointError> {
        let bytes = self.hf_bytes(e);
        dequantize(e.dtype, &bytes, e.n_elements()).map_err(|message| CheckpointError::Invalid {
            path: self.display_path(),
            message: format!("tensor {}: {message}", e.name),
        })
    }

    /// Checks every tensor the architecture needs is present with the right shape.
    pub fn validate_tensors(&self) -> Result<(), CheckpointError> {
        for (name, expected) in self.arch.expected_tensors() {
            let e = self.require(&name)?;
            if e.shape != expected {
                return Err(CheckpointError::Shape {
                    path: self.display_path(),
                    name,
                    found: e.shape.clone(),
                    expected,
                });
            }
        }
        Ok(())
    }

    /// How many files the tensors are stored in (a folder's safetensors shards).
    pub fn file_count(&self) -> usize {
        self.maps.len()
    }

    /// The file bytes of the weights (sum of stored tensor sizes).
    pub fn weight_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.len as u64).sum()
    }
}

impl TensorSource for Checkpoint {
    fn arch(&self) -> &Arch {
        &self.arch
    }

    fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), CheckpointError> {
        let e = self.require(name)?;
        Ok((e.shape.clone(), self.f32_values(e)?))
    }

    fn tensor_stored(&self, name: &str) -> Result<StoredTensor, CheckpointError> {
        let e = self.require(name)?;
        if e.dtype.tensor_bytes(&e.shape) != Some(e.len) {
            return Err(CheckpointError::Invalid {
                path: self.display_path(),
                message: format!(
                    "tensor {name}: {} bytes where shape {:?} of {} takes {:?}",
                    e.len,
                    e.shape,
                    e.dtype,
                    e.dtype.tensor_bytes(&e.shape)
                ),
            });
        }
        Ok(StoredTensor::mapped(
            name,
            e.dtype,
            &e.shape,
            e.row_order,
            Arc::clone(&self.maps[e.file]),
            e.start,
            e.len,
        ))
    }
}

/// Converts `n` stored values of type `dtype` to f32: plain types directly, block-quantized
/// types with ggml's own `to_float` from the vendored llama.cpp.
pub fn dequantize(dtype: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
    let mut out = vec![0f32; n];
    dequantize_into(dtype, bytes, &mut out)?;
    Ok(out)
}

/// Converts the stored values in `bytes` to f32 into `out`, which holds as many values as the
/// bytes do (see [`dequantize`]).
pub fn dequantize_into(dtype: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), String> {
    let n = out.len();
    let expected = dtype
        .row_bytes(n)
        .ok_or_else(|| format!("{n} elements are not whole {dtype} blocks"))?;
    if bytes.len() != expected {
        return Err(format!(
            "{} bytes where {n} {dtype} values take {expected}",
            bytes.len()
        ));
    }
    match dtype {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        _ => {
            // SAFETY: ggml_get_type_traits returns a pointer into ggml's static table for
            // every valid type id; to_float reads exactly `n` values' worth of blocks from
            // `bytes` (length checked above) and writes `n` floats into `out`.
            unsafe {
                let traits = llama_cpp_sys_2::ggml_get_type_traits(dtype.id() as _);
                let to_float = traits
                    .as_ref()
                    .and_then(|t| t.to_float)
                    .ok_or_else(|| format!("ggml cannot dequantize {dtype}"))?;
                to_float(bytes.as_ptr().cast(), out.as_mut_ptr(), n as i64);
            }
        }
    }
    Ok(())
}

fn map_file(path: &Path) -> Result<Mmap, CheckpointError> {
    let file = std::fs::File::open(path).map_err(|source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    })?;
    // SAFETY: the map is read-only; a file changed underneath by another process is outside
    // what this tool can guard against (as for every mmap-based model loader).
    unsafe { Mmap::map(&file) }.map_err(|source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    })
}

//! A streaming GGUF v3 writer: key-values and tensor infos first, then each tensor's bytes once,
//! in order, as the caller produces them; only the header is ever held in memory.
//! Spec: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>
//!
//! We write our own rather than use candle's or gguf-rs's. candle's `gguf_file::write` writes
//! version 2 and takes every tensor as an in-memory `QTensor` at once. gguf-rs 0.1.8's
//! `GGUFWriter` does not keep tensors in memory, but it reserves the whole data section by
//! writing zeros one byte at a time and then seeks back to each tensor (every data byte is
//! written twice and the output must be seekable); it also accepts a tensor shorter than its
//! shape silently, re-sorts the keys, and its size table puts IQ4_NL and MXFP4 in 256-element
//! blocks where ggml uses 32. A stream needs only the header metadata up front: offsets follow
//! from types and shapes, so nothing has to be reserved or revisited.

/// Bytes handed to one `write` call for tensor data.
const WRITE_CHUNK: usize = 1 << 20;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::consts::{
    GENERAL_ALIGNMENT, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, MAX_ARRAY_LEN, MAX_DIMS,
    MAX_KEY_LEN, MAX_KV_COUNT, MAX_STRING_LEN, MAX_TENSOR_COUNT, MAX_TENSOR_NAME_LEN,
};
use super::{GgmlType, Value, ValueType};
use crate::output::{AtomicFile, OutputError};

/// Where a [`GgufWriter`] is in GGUF's fixed order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Collecting key-values and tensor infos; nothing written yet.
    Metadata,
    /// Header written; tensor data is being written, in info order.
    TensorData {
        /// Tensors whose data is written.
        written: usize,
        /// Tensors declared.
        total: usize,
    },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Metadata => f.write_str("collecting key-values and tensor infos"),
            Step::TensorData { written, total } => {
                write!(
                    f,
                    "writing tensor data ({written} of {total} tensors written)"
                )
            }
        }
    }
}

/// Why a GGUF file could not be written. Every variant names the output file.
#[derive(Debug, thiserror::Error)]
pub enum GgufWriteError {
    /// The output could not be created (exists without `force`, folder missing) or committed.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// Writing to the temporary output file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The output file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A method was called out of GGUF's order (key-values and tensor infos, header, data).
    #[error("{path}: {call} called while {step}; {rule}")]
    OutOfOrder {
        /// The output file.
        path: PathBuf,
        /// The method called.
        call: &'static str,
        /// Where the writer was.
        step: Step,
        /// What the order requires.
        rule: &'static str,
    },
    /// More key-values or tensors than the reader's caps allow.
    #[error("{path}: more than {max} {what}")]
    TooMany {
        /// The output file.
        path: PathBuf,
        /// `key-values` or `tensors`.
        what: &'static str,
        /// The cap.
        max: u64,
    },
    /// A key is empty or longer than [`MAX_KEY_LEN`].
    #[error("{path}: key of {len} bytes (expected 1 to {max})")]
    BadKeyLength {
        /// The output file.
        path: PathBuf,
        /// The key's length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The same key was added twice.
    #[error("{path}: key {key:?} added twice")]
    DuplicateKey {
        /// The output file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A string value is longer than [`MAX_STRING_LEN`].
    #[error("{path}: key {key:?} holds a string of {len} bytes, more than the limit of {max}")]
    StringTooLong {
        /// The output file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The string's length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// An array is longer than [`MAX_ARRAY_LEN`].
    #[error("{path}: key {key:?} holds an array of {len} elements, more than the limit of {max}")]
    ArrayTooLong {
        /// The output file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The array's length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// An array element's type differs from the array's declared element type.
    #[error(
        "{path}: element #{index} of array {key:?} is {found:?} (the array holds {expected:?})"
    )]
    MixedArray {
        /// The output file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The element's position.
        index: usize,
        /// The array's element type.
        expected: ValueType,
        /// The element's type.
        found: ValueType,
    },
    /// An array holds arrays. The GGUF spec allows it, but llama.cpp's loader refuses the
    /// whole file (`gguf_init_from_file`: "invalid GGUF type").
    #[error("{path}: key {key:?} holds an array of arrays, which llama.cpp cannot load")]
    NestedArray {
        /// The output file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// `general.alignment` is not a u32 power of two.
    #[error("{path}: general.alignment must be a u32 power of two, got {value:?}")]
    BadAlignment {
        /// The output file.
        path: PathBuf,
        /// The value given.
        value: Value,
    },
    /// A tensor name is longer than llama.cpp loads ([`MAX_TENSOR_NAME_LEN`]).
    #[error("{path}: tensor name {tensor:?} is {len} bytes long (llama.cpp loads at most {max})")]
    TensorNameTooLong {
        /// The output file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Its length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The same tensor name was added twice.
    #[error("{path}: tensor {tensor:?} added twice")]
    DuplicateTensor {
        /// The output file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
    },
    /// A tensor has more than [`MAX_DIMS`] dimensions.
    #[error("{path}: tensor {tensor:?} has {n_dims} dimensions (expected at most {max})")]
    TooManyDims {
        /// The output file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Its dimension count.
        n_dims: usize,
        /// The cap.
        max: usize,
    },
    /// A shape whose rows are not whole blocks of the type, or whose size overflows.
    #[error("{path}: tensor {tensor:?} of shape {shape:?} cannot be stored as {ggml_type}: the last dimension must be a multiple of {block} and the size must fit in memory")]
    BadShape {
        /// The output file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The type asked for.
        ggml_type: GgmlType,
        /// The shape, torch order.
        shape: Vec<usize>,
        /// The type's block size.
        block: usize,
    },
    /// Tensor data was given for another tensor than the next one declared.
    #[error("{path}: got data for tensor {got:?}, but the next tensor declared is {expected:?} (data must follow the info order)")]
    UnexpectedTensor {
        /// The output file.
        path: PathBuf,
        /// The next tensor declared.
        expected: String,
        /// The tensor given.
        got: String,
    },
    /// Tensor data was given after every declared tensor was written.
    #[error("{path}: got data for tensor {got:?}, but all {total} declared tensors are written")]
    NoMoreTensors {
        /// The output file.
        path: PathBuf,
        /// The tensor given.
        got: String,
        /// Tensors declared.
        total: usize,
    },
    /// Tensor data of another length than the type and shape require.
    #[error("{path}: tensor {tensor:?} needs {expected} bytes, got {got}")]
    WrongTensorSize {
        /// The output file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Bytes its type and shape require.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// `finish` was called before every declared tensor was written.
    #[error(
        "{path}: finish called after {written} of {total} tensors were written (next: {next:?})"
    )]
    Incomplete {
        /// The output file.
        path: PathBuf,
        /// Tensors written.
        written: usize,
        /// Tensors declared.
        total: usize,
        /// The next tensor due.
        next: String,
    },
}

/// A declared tensor: its info and where its data goes.
struct Planned {
    name: String,
    ggml_type: GgmlType,
    /// ggml order.
    dims: Vec<u64>,
    nbytes: usize,
    /// From the start of the data section.
    offset: u64,
}

/// Writes a GGUF v3 file through an [`AtomicFile`]: nothing appears at the target path until
/// [`GgufWriter::finish`] succeeds.
pub struct GgufWriter {
    out: AtomicFile,
    path: PathBuf,
    alignment: u64,
    metadata: Vec<(String, Value)>,
    keys: HashSet<String>,
    tensors: Vec<Planned>,
    names: HashSet<String>,
    step: Step,
}

/// Zeros for padding, written in pieces so no alignment needs a buffer of its size.
const ZEROS: [u8; 4096] = [0; 4096];

impl GgufWriter {
    /// Starts writing `path`; refuses an existing file unless `force`.
    pub fn create(path: impl AsRef<Path>, force: bool) -> Result<GgufWriter, GgufWriteError> {
        let path = path.as_ref().to_path_buf();
        let out = AtomicFile::create(&path, force)?;
        Ok(GgufWriter {
            out,
            path,
            alignment: GGUF_DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            keys: HashSet::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
            step: Step::Metadata,
        })
    }

    /// Where the writer is in the order.
    pub fn step(&self) -> Step {
        self.step
    }

    /// The tensor data alignment in effect (32 unless `general.alignment` was added).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    fn in_metadata(&self, call: &'static str) -> Result<(), GgufWriteError> {
        match self.step {
            Step::Metadata => Ok(()),
            step => Err(GgufWriteError::OutOfOrder {
                path: self.path.clone(),
                call,
                step,
                rule: "key-values and tensor infos must all be added before the header is written",
            }),
        }
    }

    /// Adds a key-value. Keys are written in the order added. `general.alignment` must be a
    /// u32 power of two and sets the alignment of the tensor data.
    pub fn add_kv(&mut self, key: impl Into<String>, value: Value) -> Result<(), GgufWriteError> {
        self.in_metadata("add_kv")?;
        let key = key.into();
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(GgufWriteError::BadKeyLength {
                path: self.path.clone(),
                len: key.len(),
                max: MAX_KEY_LEN,
            });
        }
        if self.keys.contains(&key) {
            return Err(GgufWriteError::DuplicateKey {
                path: self.path.clone(),
                key,
            });
        }
        if self.metadata.len() as u64 >= MAX_KV_COUNT {
            return Err(GgufWriteError::TooMany {
                path: self.path.clone(),
                what: "key-values",
                max: MAX_KV_COUNT,
            });
        }
        self.check_value(&key, &value)?;
        if key == GENERAL_ALIGNMENT {
            match value {
                Value::U32(a) if a.is_power_of_two() => self.set_alignment(u64::from(a)),
                _ => {
                    return Err(GgufWriteError::BadAlignment {
                        path: self.path.clone(),
                        value,
                    })
                }
            }
        }
        self.keys.insert(key.clone());
        self.metadata.push((key, value));
        Ok(())
    }

    /// Checks caps, element types and that arrays hold no arrays.
    fn check_value(&self, key: &str, value: &Value) -> Result<(), GgufWriteError> {
        match value {
            Value::String(s) if s.len() > MAX_STRING_LEN => Err(GgufWriteError::StringTooLong {
                path: self.path.clone(),
                key: key.to_string(),
                len: s.len(),
                max: MAX_STRING_LEN,
            }),
            Value::Array(elem, items) => {
                if items.len() > MAX_ARRAY_LEN {
                    return Err(GgufWriteError::ArrayTooLong {
                        path: self.path.clone(),
                        key: key.to_string(),
                        len: items.len(),
                        max: MAX_ARRAY_LEN,
                    });
                }
                if *elem == ValueType::Array {
                    return Err(GgufWriteError::NestedArray {
                        path: self.path.clone(),
                        key: key.to_string(),
                    });
                }
                for (index, item) in items.iter().enumerate() {
                    if item.value_type() != *elem {
                        return Err(GgufWriteError::MixedArray {
                            path: self.path.clone(),
                            key: key.to_string(),
                            index,
                            expected: *elem,
                            found: item.value_type(),
                        });
                    }
                    self.check_value(key, item)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Changes the alignment and re-plans the offsets of tensors already declared.
    fn set_alignment(&mut self, alignment: u64) {
        self.alignment = alignment;
        let mut end = 0u64;
        for t in &mut self.tensors {
            t.offset = end;
            end = padded_end(end, t.nbytes, alignment).unwrap_or(u64::MAX);
        }
    }

    /// Declares a tensor of `ggml_type` and `shape_torch_order` (outermost first, as candle and
    /// torch give it); returns the exact number of bytes its data must have. Data is then
    /// written in declaration order.
    pub fn add_tensor_info(
        &mut self,
        name: impl Into<String>,
        ggml_type: GgmlType,
        shape_torch_order: &[usize],
    ) -> Result<usize, GgufWriteError> {
        self.in_metadata("add_tensor_info")?;
        let name = name.into();
        if name.len() > MAX_TENSOR_NAME_LEN {
            return Err(GgufWriteError::TensorNameTooLong {
                path: self.path.clone(),
                len: name.len(),
                tensor: name,
                max: MAX_TENSOR_NAME_LEN,
            });
        }
        if self.names.contains(&name) {
            return Err(GgufWriteError::DuplicateTensor {
                path: self.path.clone(),
                tensor: name,
            });
        }
        if self.tensors.len() as u64 >= MAX_TENSOR_COUNT {
            return Err(GgufWriteError::TooMany {
                path: self.path.clone(),
                what: "tensors",
                max: MAX_TENSOR_COUNT,
            });
        }
        if shape_torch_order.len() > MAX_DIMS {
            return Err(GgufWriteError::TooManyDims {
                path: self.path.clone(),
                tensor: name,
                n_dims: shape_torch_order.len(),
                max: MAX_DIMS,
            });
        }
        let row = shape_torch_order.last().copied().unwrap_or(1);
        let offset = match self.tensors.last() {
            None => Some(0),
            Some(t) => padded_end(t.offset, t.nbytes, self.alignment),
        };
        // The reader refuses element counts beyond ggml's int64_t, so the writer does too.
        let fits_i64 = shape_torch_order
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .is_some_and(|n| n <= i64::MAX as u64);
        let planned = ggml_type
            .tensor_bytes(shape_torch_order)
            .filter(|_| fits_i64 && row.is_multiple_of(ggml_type.block_size()))
            .zip(offset)
            .filter(|&(nbytes, offset)| padded_end(offset, nbytes, self.alignment).is_some());
        let Some((nbytes, offset)) = planned else {
            return Err(GgufWriteError::BadShape {
                path: self.path.clone(),
                tensor: name,
                ggml_type,
                shape: shape_torch_order.to_vec(),
                block: ggml_type.block_size(),
            });
        };
        self.names.insert(name.clone());
        self.tensors.push(Planned {
            name,
            ggml_type,
            dims: shape_torch_order.iter().rev().map(|&d| d as u64).collect(),
            nbytes,
            offset,
        });
        Ok(nbytes)
    }

    fn io(&self, source: std::io::Error) -> GgufWriteError {
        GgufWriteError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn write_zeros(&mut self, mut n: u64) -> Result<(), GgufWriteError> {
        while n > 0 {
            let chunk = n.min(ZEROS.len() as u64) as usize;
            self.out
                .write_all(&ZEROS[..chunk])
                .map_err(|e| self.io(e))?;
            n -= chunk as u64;
        }
        Ok(())
    }

    /// Writes the header, key-values, tensor infos and the padding before the data section.
    /// Called implicitly by the first [`GgufWriter::write_tensor_data`] or by
    /// [`GgufWriter::finish`] when there are no tensors.
    pub fn write_header(&mut self) -> Result<(), GgufWriteError> {
        if self.step != Step::Metadata {
            return Err(GgufWriteError::OutOfOrder {
                path: self.path.clone(),
                call: "write_header",
                step: self.step,
                rule: "the header is written once",
            });
        }
        let mut buf = Vec::new();
        buf.extend_from_slice(&GGUF_MAGIC);
        buf.extend_from_slice(&GGUF_VERSION.to_le_bytes());
        buf.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        buf.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            encode_str(&mut buf, key);
            buf.extend_from_slice(&(value.value_type() as u32).to_le_bytes());
            encode_value(&mut buf, value);
        }
        for t in &self.tensors {
            encode_str(&mut buf, &t.name);
            buf.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                buf.extend_from_slice(&d.to_le_bytes());
            }
            buf.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            buf.extend_from_slice(&t.offset.to_le_bytes());
        }
        self.out.write_all(&buf).map_err(|e| self.io(e))?;
        self.write_zeros(padding(buf.len() as u64, self.alignment))?;
        self.step = Step::TensorData {
            written: 0,
            total: self.tensors.len(),
        };
        Ok(())
    }

    /// Writes the data of the next declared tensor, which must be `name` with exactly the byte
    /// length [`GgufWriter::add_tensor_info`] returned, then pads to the alignment.
    pub fn write_tensor_data(&mut self, name: &str, bytes: &[u8]) -> Result<(), GgufWriteError> {
        let (written, total) = match self.step {
            Step::Metadata => {
                self.write_header()?;
                (0, self.tensors.len())
            }
            Step::TensorData { written, total } => (written, total),
        };
        let Some(t) = self.tensors.get(written) else {
            return Err(GgufWriteError::NoMoreTensors {
                path: self.path.clone(),
                got: name.to_string(),
                total,
            });
        };
        if t.name != name {
            return Err(GgufWriteError::UnexpectedTensor {
                path: self.path.clone(),
                expected: t.name.clone(),
                got: name.to_string(),
            });
        }
        if bytes.len() != t.nbytes {
            return Err(GgufWriteError::WrongTensorSize {
                path: self.path.clone(),
                tensor: t.name.clone(),
                expected: t.nbytes,
                got: bytes.len(),
            });
        }
        let pad = padding(t.nbytes as u64, self.alignment);
        // In 1 MiB pieces: one write of a 200 MB tensor spends most of its time in the kernel's
        // page-cache copy (measured 3-9 s for 2.4 GB against 0.5-1.5 s in 1 MiB writes).
        for piece in bytes.chunks(WRITE_CHUNK) {
            self.out.write_all(piece).map_err(|e| self.io(e))?;
        }
        self.write_zeros(pad)?;
        self.step = Step::TensorData {
            written: written + 1,
            total,
        };
        Ok(())
    }

    /// Checks that every declared tensor was written, then flushes, syncs and renames the file
    /// onto its target.
    pub fn finish(mut self) -> Result<(), GgufWriteError> {
        if self.step == Step::Metadata && self.tensors.is_empty() {
            self.write_header()?;
        }
        let written = match self.step {
            Step::Metadata => 0,
            Step::TensorData { written, .. } => written,
        };
        if let Some(next) = self.tensors.get(written) {
            return Err(GgufWriteError::Incomplete {
                path: self.path.clone(),
                written,
                total: self.tensors.len(),
                next: next.name.clone(),
            });
        }
        self.out.commit()?;
        Ok(())
    }
}

/// Zero bytes that bring `len` to a multiple of `alignment`.
fn padding(len: u64, alignment: u64) -> u64 {
    (alignment - len % alignment) % alignment
}

/// Where the next tensor starts after one of `nbytes` at `offset`, or `None` on overflow.
fn padded_end(offset: u64, nbytes: usize, alignment: u64) -> Option<u64> {
    offset
        .checked_add(nbytes as u64)?
        .checked_next_multiple_of(alignment)
}

fn encode_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// Appends a value's payload (an array's element type and count, then its elements).
fn encode_value(buf: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => buf.push(*v),
        Value::I8(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => buf.push(u8::from(*v)),
        Value::String(s) => encode_str(buf, s),
        Value::Array(elem, items) => {
            buf.extend_from_slice(&(*elem as u32).to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                encode_value(buf, item);
            }
        }
        Value::U64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => buf.extend_from_slice(&v.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests;

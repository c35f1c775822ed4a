//! A validating GGUF reader over a memory map: header, key-values and tensor infos are parsed and
//! checked (caps from [`consts`](super::consts), checked arithmetic, every tensor inside the file,
//! aligned and not overlapping another) before anything is allocated from a size read in the file
//! or any tensor data is sliced. Tensor data stays in the map.
//! Spec: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::consts::{
    GENERAL_ALIGNMENT, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS, MAX_KEY_LEN, MAX_KV_COUNT,
    MAX_TENSOR_COUNT, MAX_TENSOR_NAME_LEN,
};
use super::{GgmlType, Value, ValueType};

mod cursor;

use cursor::{read_value, value_type, Cursor, What};

/// Why a GGUF file could not be read. Every variant names the file; offsets are bytes from the
/// start of the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or memory-mapped.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file does not start with the bytes `GGUF`.
    #[error("{path}: not a GGUF file (starts with {found:02x?}, expected \"GGUF\")")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first bytes found.
        found: Vec<u8>,
    },
    /// The version is neither 2 nor 3 (a big-endian file shows up here too).
    #[error("{path}: GGUF version {version:#x} is not supported (expected 2 or 3)")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version read.
        version: u32,
    },
    /// The file ends before a field it declares.
    #[error("{path}: file ends at byte {file_len} while reading {what} ({needed} bytes needed at offset {offset})")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What was being read.
        what: String,
        /// Where it starts.
        offset: u64,
        /// How many bytes it needs.
        needed: u64,
        /// The file's length.
        file_len: u64,
    },
    /// The tensor count or key-value count in the header is above its cap.
    #[error("{path}: {what} is {count}, more than the limit of {max}")]
    CountTooLarge {
        /// The file.
        path: PathBuf,
        /// Which count (`tensor count` or `key-value count`).
        what: &'static str,
        /// The count read.
        count: u64,
        /// The cap.
        max: u64,
    },
    /// A key, tensor name or string value is longer than its cap.
    #[error("{path}: {what} is {len} bytes long, more than the limit of {max}")]
    StringTooLong {
        /// The file.
        path: PathBuf,
        /// Which string.
        what: String,
        /// The length read.
        len: u64,
        /// The cap.
        max: usize,
    },
    /// An array declares more elements than [`MAX_ARRAY_LEN`](super::consts::MAX_ARRAY_LEN).
    #[error("{path}: key {key:?} holds an array of {len} elements, more than the limit of {max}")]
    ArrayTooLong {
        /// The file.
        path: PathBuf,
        /// The key holding the array.
        key: String,
        /// The length read.
        len: u64,
        /// The cap.
        max: usize,
    },
    /// A key, tensor name or string value is not valid UTF-8.
    #[error("{path}: {what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// The file.
        path: PathBuf,
        /// Which string.
        what: String,
        /// Where its bytes start.
        offset: u64,
    },
    /// A metadata key is the empty string.
    #[error("{path}: key-value #{index} has an empty key")]
    EmptyKey {
        /// The file.
        path: PathBuf,
        /// Position of the key-value (from 0).
        index: u64,
    },
    /// The same metadata key appears twice.
    #[error("{path}: key {key:?} appears twice")]
    DuplicateKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A value or array element type tag is not one of GGUF's 13 types.
    #[error("{path}: key {key:?} has unknown value type {type_id:#x} (expected 0x0..=0xc)")]
    UnknownValueType {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The tag read.
        type_id: u32,
    },
    /// An array holds arrays that hold arrays; one level of nesting is the most accepted.
    #[error("{path}: key {key:?} nests arrays more than one level deep")]
    NestedArrayTooDeep {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A bool is stored as a byte other than 0 or 1.
    #[error("{path}: key {key:?} has bool byte {byte:#04x} (expected 0x00 or 0x01)")]
    InvalidBool {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The byte read.
        byte: u8,
    },
    /// `general.alignment` is zero or not a power of two.
    #[error("{path}: general.alignment is {alignment} (expected a power of two)")]
    BadAlignment {
        /// The file.
        path: PathBuf,
        /// The alignment read.
        alignment: u64,
    },
    /// A typed metadata lookup found no such key.
    #[error("{path}: key {key:?} is missing (expected {expected})")]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key looked up.
        key: String,
        /// What the caller wanted.
        expected: &'static str,
    },
    /// A metadata value has another type than the one required.
    #[error("{path}: key {key:?} holds a {found:?} value (expected {expected})")]
    WrongType {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What was required.
        expected: &'static str,
        /// The type found.
        found: ValueType,
    },
    /// Two tensor infos have the same name.
    #[error("{path}: tensor {tensor:?} appears twice")]
    DuplicateTensor {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
    },
    /// A tensor has more than [`MAX_DIMS`] dimensions.
    #[error("{path}: tensor {tensor:?} has {n_dims} dimensions (expected at most {max})")]
    TooManyDims {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The dimension count read.
        n_dims: u32,
        /// The cap.
        max: usize,
    },
    /// A tensor's element count or byte size does not fit ggml's `int64_t` or this machine's
    /// `usize`.
    #[error("{path}: tensor {tensor:?} with dims {dims:?} has a size that overflows")]
    SizeOverflow {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Its dims, ggml order.
        dims: Vec<u64>,
    },
    /// A tensor's ggml type id is not one this crate knows.
    #[error("{path}: tensor {tensor:?} has unknown ggml type {type_id:#x}")]
    UnknownGgmlType {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The id read.
        type_id: u32,
    },
    /// A quantized tensor's rows are not a whole number of blocks.
    #[error("{path}: tensor {tensor:?} of type {ggml_type} has rows of {row} elements, not a multiple of the block size {block}")]
    PartialBlock {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Its type.
        ggml_type: GgmlType,
        /// Its row length (`dims[0]`).
        row: u64,
        /// The type's block size.
        block: usize,
    },
    /// A tensor's data offset is not a multiple of the file's alignment.
    #[error("{path}: tensor {tensor:?} starts at data offset {offset}, not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Its offset from the start of the data section.
        offset: u64,
        /// The required alignment.
        alignment: u64,
    },
    /// A tensor's bytes run past the end of the file.
    #[error("{path}: tensor {tensor:?} ({nbytes} bytes at data offset {offset}) runs past the end of the file ({file_len} bytes, data section at {data_start})")]
    TensorOutOfBounds {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Its offset from the start of the data section.
        offset: u64,
        /// Its size as its type and dims require.
        nbytes: usize,
        /// Where the data section starts.
        data_start: u64,
        /// The file's length.
        file_len: u64,
    },
    /// Two tensors' byte ranges overlap.
    #[error("{path}: tensors {first:?} and {second:?} overlap ({first:?} ends at byte {first_end}, {second:?} starts at byte {second_start})")]
    OverlappingTensors {
        /// The file.
        path: PathBuf,
        /// The tensor that starts first.
        first: String,
        /// The tensor that starts inside it.
        second: String,
        /// Where the first ends (absolute).
        first_end: u64,
        /// Where the second starts (absolute).
        second_start: u64,
    },
}

/// One tensor's description, validated against the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The GGUF tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// The element type.
    pub ggml_type: GgmlType,
    /// Dimensions in ggml order: `dims[0]` is the contiguous row length.
    pub dims: Vec<u64>,
    /// Absolute offset of the first byte in the file.
    pub offset: u64,
    /// Size of the data in bytes.
    pub nbytes: usize,
}

impl TensorInfo {
    /// The shape in torch order (outermost first): `dims` reversed.
    pub fn shape(&self) -> Vec<usize> {
        // The reader checked that every dim fits a usize.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file: metadata in file order, tensor infos, and the mapped bytes.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    parsed: Parsed,
}

/// Everything parsed from the bytes, kept apart from the map so tests can parse plain buffers.
#[derive(Debug)]
struct Parsed {
    version: u32,
    alignment: u64,
    data_start: u64,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("len", &self.mmap.len())
            .field("version", &self.parsed.version)
            .field("kv_count", &self.parsed.metadata.len())
            .field("tensor_count", &self.parsed.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and validates `path`. The file must not be modified while the returned value lives
    /// (as with any memory map).
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: a read-only private map; the documented contract above is that nobody
        // truncates or rewrites the file while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let parsed = parse(&path, &mmap)?;
        Ok(GgufFile { path, mmap, parsed })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.parsed.version
    }

    /// The tensor data alignment (`general.alignment`, or 32).
    pub fn alignment(&self) -> u64 {
        self.parsed.alignment
    }

    /// Absolute offset of the (aligned) data section.
    pub fn data_start(&self) -> u64 {
        self.parsed.data_start
    }

    /// All key-values, in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.parsed.metadata
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.parsed
            .metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        convert: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<T, GgufError> {
        let value = self.get(key).ok_or_else(|| GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
            expected,
        })?;
        convert(value).ok_or_else(|| GgufError::WrongType {
            path: self.path.clone(),
            key: key.to_string(),
            expected,
            found: value.value_type(),
        })
    }

    /// `key` as an unsigned integer (any integer type holding a non-negative value).
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.typed(key, "a non-negative integer", Value::as_u64)
    }

    /// `key` as a string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.typed(key, "a string", Value::as_str)
    }

    /// `key` as a float (f32 or f64).
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.typed(key, "a float", Value::as_f64)
    }

    /// `key` as a bool.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        self.typed(key, "a bool", Value::as_bool)
    }

    /// `key` as an array's elements.
    pub fn get_arr(&self, key: &str) -> Result<&[Value], GgufError> {
        self.typed(key, "an array", Value::as_array)
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.parsed.tensors
    }

    /// The info of tensor `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.parsed.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of a tensor of this file. An info that did not come from this file and lies
    /// outside it gives an empty slice.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        usize::try_from(info.offset)
            .ok()
            .and_then(|start| self.mmap.get(start..start.checked_add(info.nbytes)?))
            .unwrap_or(&[])
    }
}

/// A tensor info as read, before the data section's position is known.
struct RawTensor {
    info: TensorInfo,
    rel_offset: u64,
}

fn read_tensor_info(cur: &mut Cursor<'_>, index: u64) -> Result<RawTensor, GgufError> {
    let path = cur.path;
    let name = cur.string(MAX_TENSOR_NAME_LEN, What::TensorName(index))?;
    let what = What::TensorInfo(&name);
    let n_dims = cur.u32(what)?;
    if n_dims as usize > MAX_DIMS {
        return Err(GgufError::TooManyDims {
            path: path.to_path_buf(),
            tensor: name,
            n_dims,
            max: MAX_DIMS,
        });
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(cur.u64(what)?);
    }
    let type_id = cur.u32(what)?;
    let rel_offset = cur.u64(what)?;
    let Some(ggml_type) = GgmlType::from_id(type_id) else {
        return Err(GgufError::UnknownGgmlType {
            path: path.to_path_buf(),
            tensor: name,
            type_id,
        });
    };
    let overflow = |name: String, dims: Vec<u64>| GgufError::SizeOverflow {
        path: path.to_path_buf(),
        tensor: name,
        dims,
    };
    // ggml keeps dims and the element count in int64_t.
    let count = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64);
    let shape: Option<Vec<usize>> = dims.iter().map(|&d| usize::try_from(d).ok()).collect();
    let (Some(_), Some(shape)) = (count, shape) else {
        return Err(overflow(name, dims));
    };
    let row = dims.first().copied().unwrap_or(1);
    if !row.is_multiple_of(ggml_type.block_size() as u64) {
        return Err(GgufError::PartialBlock {
            path: path.to_path_buf(),
            tensor: name,
            ggml_type,
            row,
            block: ggml_type.block_size(),
        });
    }
    let Some(nbytes) = ggml_type.tensor_bytes(&shape) else {
        return Err(overflow(name, dims));
    };
    Ok(RawTensor {
        info: TensorInfo {
            name,
            ggml_type,
            dims,
            offset: 0,
            nbytes,
        },
        rel_offset,
    })
}

/// Parses and validates a whole GGUF image; `path` only names the file in errors.
fn parse(path: &Path, buf: &[u8]) -> Result<Parsed, GgufError> {
    let mut cur = Cursor { buf, pos: 0, path };
    let magic = buf.get(..4).unwrap_or(buf);
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic {
            path: path.to_path_buf(),
            found: magic.to_vec(),
        });
    }
    cur.pos = 4;
    let version = cur.u32(What::Field("the version"))?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    let tensor_count = cur.u64(What::Field("the tensor count"))?;
    let kv_count = cur.u64(What::Field("the key-value count"))?;
    for (what, count, max) in [
        ("the tensor count", tensor_count, MAX_TENSOR_COUNT),
        ("the key-value count", kv_count, MAX_KV_COUNT),
    ] {
        if count > max {
            return Err(GgufError::CountTooLarge {
                path: path.to_path_buf(),
                what,
                count,
                max,
            });
        }
    }

    // Capacities are bounded by what the rest of the file can hold, not by the counts alone.
    let mut metadata = Vec::with_capacity((kv_count as usize).min(cur.remaining() / 13));
    let mut keys = HashSet::new();
    for index in 0..kv_count {
        let key = cur.string(MAX_KEY_LEN, What::Key(index))?;
        if key.is_empty() {
            return Err(GgufError::EmptyKey {
                path: path.to_path_buf(),
                index,
            });
        }
        if !keys.insert(key.clone()) {
            return Err(GgufError::DuplicateKey {
                path: path.to_path_buf(),
                key,
            });
        }
        let type_id = cur.u32(What::Type(&key))?;
        let ty = value_type(type_id).ok_or_else(|| GgufError::UnknownValueType {
            path: path.to_path_buf(),
            key: key.clone(),
            type_id,
        })?;
        let value = read_value(&mut cur, ty, &key, 0)?;
        metadata.push((key, value));
    }

    let mut raw = Vec::with_capacity((tensor_count as usize).min(cur.remaining() / 24));
    let mut names = HashSet::new();
    for index in 0..tensor_count {
        let t = read_tensor_info(&mut cur, index)?;
        if !names.insert(t.info.name.clone()) {
            return Err(GgufError::DuplicateTensor {
                path: path.to_path_buf(),
                tensor: t.info.name,
            });
        }
        raw.push(t);
    }

    let alignment = match metadata.iter().find(|(k, _)| k == GENERAL_ALIGNMENT) {
        None => GGUF_DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some((_, Value::U32(a))) => {
            return Err(GgufError::BadAlignment {
                path: path.to_path_buf(),
                alignment: u64::from(*a),
            })
        }
        Some((_, other)) => {
            return Err(GgufError::WrongType {
                path: path.to_path_buf(),
                key: GENERAL_ALIGNMENT.to_string(),
                expected: "a u32",
                found: other.value_type(),
            })
        }
    };
    // The position is at most the buffer length and the alignment at most 2^31: no overflow.
    let data_start = (cur.pos as u64).next_multiple_of(alignment);
    let file_len = buf.len() as u64;

    let mut tensors = Vec::with_capacity(raw.len());
    for RawTensor {
        mut info,
        rel_offset,
    } in raw
    {
        if !rel_offset.is_multiple_of(alignment) {
            return Err(GgufError::MisalignedTensor {
                path: path.to_path_buf(),
                tensor: info.name,
                offset: rel_offset,
                alignment,
            });
        }
        let start = data_start.checked_add(rel_offset).filter(|&s| {
            s.checked_add(info.nbytes as u64)
                .is_some_and(|e| e <= file_len)
        });
        let Some(start) = start else {
            return Err(GgufError::TensorOutOfBounds {
                path: path.to_path_buf(),
                tensor: info.name,
                offset: rel_offset,
                nbytes: info.nbytes,
                data_start,
                file_len,
            });
        };
        info.offset = start;
        tensors.push(info);
    }
    check_overlaps(path, &tensors)?;

    Ok(Parsed {
        version,
        alignment,
        data_start,
        metadata,
        tensors,
    })
}

/// Refuses two tensors whose (non-empty) byte ranges intersect. All ranges are inside the file,
/// so the ends cannot overflow.
fn check_overlaps(path: &Path, tensors: &[TensorInfo]) -> Result<(), GgufError> {
    let mut order: Vec<&TensorInfo> = tensors.iter().filter(|t| t.nbytes > 0).collect();
    order.sort_by_key(|t| t.offset);
    let mut furthest: Option<&TensorInfo> = None;
    for t in order {
        if let Some(f) = furthest {
            let f_end = f.offset + f.nbytes as u64;
            if f_end > t.offset {
                return Err(GgufError::OverlappingTensors {
                    path: path.to_path_buf(),
                    first: f.name.clone(),
                    second: t.name.clone(),
                    first_end: f_end,
                    second_start: t.offset,
                });
            }
        }
        // Ranges are disjoint so far, so the latest one also ends furthest.
        furthest = Some(t);
    }
    Ok(())
}

#[cfg(test)]
mod tests;

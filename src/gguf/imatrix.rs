//! Importance matrix files, as llama.cpp's `llama-imatrix` makes them and `llama-quantize
//! --imatrix` uses them: per weight matrix, the mean square of each input column over
//! calibration tokens. The quantizer weights each weight's rounding error by its column's value,
//! so the columns the task's activations use most are kept most exactly. The lowest-bit types
//! (`iq1_s`, `iq1_m`, `iq2_xxs`, `iq2_xs`, `iq2_s`, `iq2_m`, `q2_k_s`) refuse to quantize without
//! one; every other type gets better with one.
//!
//! - Read: llama.cpp's GGUF format (`<tensor>.in_sum2` and `<tensor>.counts`, f32) and the
//!   legacy `.dat` format `llama-imatrix` wrote before it ([`Imatrix::read`]).
//! - Written: the GGUF format ([`Imatrix::write`]), which `llama-quantize --imatrix` reads too.
//!
//! `crate::imatrix` computes one from a task's documents.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::reader::{GgufError, GgufFile};
use super::types::GgmlType;
use super::value::Value;
use super::writer::{GgufWriteError, GgufWriter};
use crate::output::OutputError;

const GENERAL_TYPE: &str = "general.type";
/// The value llama.cpp writes there.
const IMATRIX_TYPE: &str = "imatrix";
/// The calibration data's names.
const KEY_DATASETS: &str = "imatrix.datasets";
/// Chunks (here: sequences) the statistics were gathered over.
const KEY_CHUNK_COUNT: &str = "imatrix.chunk_count";
/// Tokens per chunk (here: the longest sequence allowed).
const KEY_CHUNK_SIZE: &str = "imatrix.chunk_size";
/// Suffix of a tensor's summed squared inputs.
const SUFFIX_SUM2: &str = ".in_sum2";
/// Suffix of a tensor's token counts.
const SUFFIX_COUNTS: &str = ".counts";
/// Suffix of a tensor's summed inputs (written by newer `llama-imatrix`; not needed to quantize).
const SUFFIX_SUM: &str = ".in_sum";

/// Errors reading, writing or checking an importance matrix file.
#[derive(Debug, thiserror::Error)]
pub enum ImatrixFileError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not an importance matrix in either format.
    #[error("{path}: not an importance matrix: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the entry or tensor.
        message: String,
    },
    /// An entry does not fit the tensor of the same name in the model being quantized.
    #[error("{imatrix}: the entry for {tensor} has {found} values, but {model} has {expected} input columns there: the importance matrix was made for another model")]
    Size {
        /// The importance matrix.
        imatrix: PathBuf,
        /// The tensor.
        tensor: String,
        /// Values in the entry.
        found: usize,
        /// Input columns (times experts) of the tensor.
        expected: usize,
        /// The model file.
        model: String,
    },
    /// The model has a tensor the quantization type needs an entry for, and there is none.
    #[error("{imatrix} has no entry for {tensor} of {model}, and {qtype} needs one for every matrix of the blocks: the importance matrix was made for another model")]
    Missing {
        /// The importance matrix.
        imatrix: PathBuf,
        /// The tensor.
        tensor: String,
        /// The model file.
        model: String,
        /// The quantization type.
        qtype: String,
    },
    /// No entry names a tensor of the model.
    #[error("{imatrix}: none of its {entries} entries names a tensor of {model}: the importance matrix was made for another model")]
    NoMatch {
        /// The importance matrix.
        imatrix: PathBuf,
        /// Its number of entries.
        entries: usize,
        /// The model file.
        model: String,
    },
    /// A GGUF could not be read.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The GGUF could not be written.
    #[error(transparent)]
    Write(#[from] GgufWriteError),
    /// The output may not be written.
    #[error(transparent)]
    Output(#[from] OutputError),
}

/// One weight matrix's statistics: for each of its `n_mat` matrices (experts; 1 for a dense
/// model) the sum of each input column's squares and the number of tokens summed.
#[derive(Debug, Clone, PartialEq)]
pub struct ImatrixEntry {
    /// `n_mat * n_columns` sums of squared inputs, matrix by matrix.
    pub sums: Vec<f32>,
    /// Tokens summed per matrix, `n_mat` values.
    pub counts: Vec<f32>,
}

impl ImatrixEntry {
    /// The values the quantizer uses: each sum divided by its matrix's count (the mean square;
    /// 1 for a matrix that saw no token), as `llama-quantize` computes them.
    pub fn values(&self) -> Vec<f32> {
        let per = self.sums.len() / self.counts.len().max(1);
        self.sums
            .chunks(per.max(1))
            .zip(&self.counts)
            .flat_map(|(sums, &count)| {
                sums.iter()
                    .map(move |&s| if count > 0.0 { s / count } else { 1.0 })
            })
            .collect()
    }
}

/// An importance matrix: entries by GGUF tensor name, and where they came from.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Imatrix {
    /// Entries by tensor name (`blk.3.ffn_down.weight`).
    pub entries: BTreeMap<String, ImatrixEntry>,
    /// Names of the calibration data.
    pub datasets: Vec<String>,
    /// Chunks (sequences) the statistics were gathered over.
    pub chunk_count: u32,
    /// Tokens per chunk (the longest sequence allowed).
    pub chunk_size: u32,
    /// The file it was read from or written to, named in messages (empty when neither).
    pub source: PathBuf,
}

/// The magic of a GGUF file.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";

impl Imatrix {
    /// Reads llama.cpp's GGUF format or, when the file does not start with the GGUF magic, the
    /// legacy `.dat` format.
    pub fn read(path: &Path) -> Result<Imatrix, ImatrixFileError> {
        let io = |source| ImatrixFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut magic = [0u8; 4];
        let mut f = std::fs::File::open(path).map_err(io)?;
        let n = read_up_to(&mut f, &mut magic).map_err(io)?;
        let mut imatrix = if n == 4 && &magic == GGUF_MAGIC {
            Self::from_gguf(&GgufFile::open(path)?)?
        } else {
            let bytes = std::fs::read(path).map_err(io)?;
            Self::parse_legacy(path, &bytes)?
        };
        imatrix.source = path.to_path_buf();
        Ok(imatrix)
    }

    /// Reads the entries of an open GGUF in llama.cpp's imatrix format (its `source` is left
    /// empty: [`Imatrix::read`] sets it).
    pub fn from_gguf(file: &GgufFile) -> Result<Imatrix, ImatrixFileError> {
        let path = file.path();
        let bad = |message: String| ImatrixFileError::Format {
            path: path.to_path_buf(),
            message,
        };
        let f32s = |name: &str| -> Result<Vec<f32>, ImatrixFileError> {
            let info = file
                .tensor(name)
                .ok_or_else(|| bad(format!("tensor {name} is missing")))?;
            if info.ggml_type != GgmlType::F32 {
                return Err(bad(format!(
                    "tensor {name} is {}, expected f32",
                    info.ggml_type.name()
                )));
            }
            let bytes = file.tensor_data(info);
            le_f32s(bytes, bytes.len() / 4).map_err(bad)
        };
        let mut entries = BTreeMap::new();
        for info in file.tensors() {
            let name = &info.name;
            let Some(base) = name.strip_suffix(SUFFIX_SUM2) else {
                let known = [SUFFIX_COUNTS, SUFFIX_SUM]
                    .iter()
                    .any(|s| name.ends_with(s));
                if !known {
                    return Err(bad(format!(
                        "tensor {name} is neither <tensor>{SUFFIX_SUM2}, {SUFFIX_COUNTS} nor {SUFFIX_SUM}"
                    )));
                }
                continue;
            };
            let sums = f32s(name)?;
            let counts = f32s(&format!("{base}{SUFFIX_COUNTS}"))?;
            if counts.is_empty() || sums.is_empty() || sums.len() % counts.len() != 0 {
                return Err(bad(format!(
                    "{base}: {} sums do not divide into {} matrices",
                    sums.len(),
                    counts.len()
                )));
            }
            entries.insert(base.to_string(), ImatrixEntry { sums, counts });
        }
        for info in file.tensors() {
            if let Some(base) = info.name.strip_suffix(SUFFIX_COUNTS) {
                if !entries.contains_key(base) {
                    return Err(bad(format!(
                        "{} has no {base}{SUFFIX_SUM2} beside it",
                        info.name
                    )));
                }
            }
        }
        if entries.is_empty() {
            return Err(bad("it holds no <tensor>.in_sum2 entries".into()));
        }
        let u32_or_0 = |key: &str| file.get(key).and_then(Value::as_u64).unwrap_or(0) as u32;
        let datasets = file
            .get(KEY_DATASETS)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Imatrix {
            entries,
            datasets,
            chunk_count: u32_or_0(KEY_CHUNK_COUNT),
            chunk_size: u32_or_0(KEY_CHUNK_SIZE),
            source: PathBuf::new(),
        })
    }

    /// Parses the legacy format: an i32 entry count, then per entry an i32 name length, the
    /// name, the i32 number of calls, the i32 number of values and the values (f32), all
    /// little-endian; then optionally the i32 chunk count and a dataset name.
    fn parse_legacy(path: &Path, bytes: &[u8]) -> Result<Imatrix, ImatrixFileError> {
        let bad = |message: String| ImatrixFileError::Format {
            path: path.to_path_buf(),
            message: format!("neither GGUF nor the legacy .dat format: {message}"),
        };
        let mut at = 0usize;
        let mut take = |n: usize, what: &str| -> Result<&[u8], ImatrixFileError> {
            let end = at
                .checked_add(n)
                .filter(|&e| e <= bytes.len())
                .ok_or_else(|| bad(format!("the file ends inside {what} (byte {at})")))?;
            let out = &bytes[at..end];
            at = end;
            Ok(out)
        };
        let i32_at = |b: &[u8]| i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let n_entries = i32_at(take(4, "the entry count")?);
        if n_entries < 1 {
            return Err(bad(format!("entry count {n_entries}")));
        }
        let mut entries = BTreeMap::new();
        for i in 0..n_entries {
            let len = i32_at(take(4, "an entry's name length")?);
            if !(1..=4096).contains(&len) {
                return Err(bad(format!("entry {i} has a name length of {len}")));
            }
            let name = std::str::from_utf8(take(len as usize, "an entry's name")?)
                .map_err(|_| bad(format!("entry {i}'s name is not UTF-8")))?
                .to_string();
            let ncall = i32_at(take(4, "an entry's call count")?);
            let nval = i32_at(take(4, "an entry's value count")?);
            if nval < 1 {
                return Err(bad(format!("entry {name} has {nval} values")));
            }
            let values = take(nval as usize * 4, "an entry's values")?;
            let sums = le_f32s(values, nval as usize).map_err(&bad)?;
            entries.insert(
                name,
                ImatrixEntry {
                    sums,
                    counts: vec![ncall as f32],
                },
            );
        }
        let mut imatrix = Imatrix {
            entries,
            ..Default::default()
        };
        if let Ok(b) = take(4, "the chunk count") {
            imatrix.chunk_count = i32_at(b).max(0) as u32;
            if let Ok(b) = take(4, "the dataset name's length") {
                let len = i32_at(b).max(0) as usize;
                if let Ok(name) = take(len, "the dataset name") {
                    imatrix
                        .datasets
                        .push(String::from_utf8_lossy(name).into_owned());
                }
            }
        }
        Ok(imatrix)
    }

    /// Writes llama.cpp's GGUF format through a temporary file; refuses an existing `path`
    /// unless `force`.
    pub fn write(&self, path: &Path, force: bool) -> Result<(), ImatrixFileError> {
        let mut w = GgufWriter::create(path, force)?;
        w.add_kv(GENERAL_TYPE, Value::String(IMATRIX_TYPE.into()))?;
        w.add_kv(KEY_DATASETS, Value::strings(self.datasets.iter().cloned()))?;
        w.add_kv(KEY_CHUNK_COUNT, Value::U32(self.chunk_count))?;
        w.add_kv(KEY_CHUNK_SIZE, Value::U32(self.chunk_size))?;
        for (name, e) in &self.entries {
            let n_mat = e.counts.len();
            w.add_tensor_info(
                format!("{name}{SUFFIX_SUM2}"),
                GgmlType::F32,
                &[n_mat, e.sums.len() / n_mat.max(1)],
            )?;
            w.add_tensor_info(format!("{name}{SUFFIX_COUNTS}"), GgmlType::F32, &[n_mat, 1])?;
        }
        w.write_header()?;
        let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        for (name, e) in &self.entries {
            w.write_tensor_data(&format!("{name}{SUFFIX_SUM2}"), &bytes(&e.sums))?;
            w.write_tensor_data(&format!("{name}{SUFFIX_COUNTS}"), &bytes(&e.counts))?;
        }
        w.finish()?;
        Ok(())
    }

    /// Checks the entries against the GGUF about to be quantized: an entry naming one of its
    /// tensors must have one value per input column (times experts), at least one entry must
    /// name one, and when `required` (the type cannot quantize without one: see
    /// [`crate::gguf::consts::QuantType::needs_imatrix`]) every block matrix needs an entry.
    pub fn check_model(
        &self,
        model: &GgufFile,
        required: Option<&str>,
    ) -> Result<(), ImatrixFileError> {
        let path = self.source.as_path();
        let model_name = model.path().display().to_string();
        let mut matched = 0;
        for info in model.tensors() {
            let is_matrix = info.dims.len() >= 2 && info.name.ends_with(".weight");
            let Some(e) = self.entries.get(&info.name) else {
                if let Some(qtype) = required {
                    if is_matrix && info.name.starts_with("blk.") {
                        return Err(ImatrixFileError::Missing {
                            imatrix: path.to_path_buf(),
                            tensor: info.name.clone(),
                            model: model_name,
                            qtype: qtype.to_string(),
                        });
                    }
                }
                continue;
            };
            matched += 1;
            let experts = info.dims.get(2).copied().unwrap_or(1) as usize;
            let expected = info.dims[0] as usize * experts;
            if e.sums.len() != expected {
                return Err(ImatrixFileError::Size {
                    imatrix: path.to_path_buf(),
                    tensor: info.name.clone(),
                    found: e.sums.len(),
                    expected,
                    model: model_name,
                });
            }
        }
        if matched == 0 {
            return Err(ImatrixFileError::NoMatch {
                imatrix: path.to_path_buf(),
                entries: self.entries.len(),
                model: model_name,
            });
        }
        Ok(())
    }
}

/// `n` little-endian f32 values from `bytes`, which must hold exactly that many.
fn le_f32s(bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
    if bytes.len() != n * 4 {
        return Err(format!(
            "{} bytes where {n} f32 values take {}",
            bytes.len(),
            n * 4
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Reads up to `buf.len()` bytes, fewer only at the end of the file.
fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests;

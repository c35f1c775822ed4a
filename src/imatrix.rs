//! Importance matrices, as llama.cpp's `llama-imatrix` makes them and `llama-quantize --imatrix`
//! uses them: per weight matrix, the mean square of each input column over calibration tokens.
//! The quantizer weights each weight's rounding error by its column's value, so the columns the
//! task's activations use most are kept most exactly. The lowest-bit types (`iq1_s`, `iq1_m`,
//! `iq2_xxs`, `iq2_xs`, `iq2_s`, `iq2_m`, `q2_k_s`) refuse to quantize without one; every other
//! type gets better with one.
//!
//! - Read: llama.cpp's GGUF format (`<tensor>.in_sum2` and `<tensor>.counts`, f32) and the
//!   legacy `.dat` format `llama-imatrix` wrote before it ([`Imatrix::read`]).
//! - Written: the GGUF format ([`Imatrix::write`]), which `llama-quantize --imatrix` reads too.
//! - Computed: [`compute`] runs the candle model over a task's documents, with a plan's skipped
//!   blocks and scalars when there is one, so the statistics are the slim model's. Folding does
//!   not change any weight matrix's input (the scalars and gains scale output rows; RMSNorm
//!   removes the running residual factor), so they hold for the exported file.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::checkpoint::{dequantize, Checkpoint, CheckpointError};
use crate::fit::data;
use crate::fit::plan::{ModelFingerprint, Plan, PlanError};
use crate::fit::progress::Progress;
use crate::fit::scales::{Objective, TrainBatch};
use crate::fit::search::{FitModel, FitOptions, SearchError};
use crate::gguf::reader::{GgufError, GgufFile};
use crate::gguf::types::GgmlType;
use crate::gguf::value::Value;
use crate::gguf::writer::{GgufWriteError, GgufWriter};
use crate::model::{Model, ModelError, ScaleValues, WeightInput};
use crate::output::{check_overwrite, OutputError};
use crate::task::{self, TaskError};

/// `general.type` of an importance-matrix GGUF.
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

/// Errors reading, writing, checking or computing an importance matrix.
#[derive(Debug, thiserror::Error)]
pub enum ImatrixError {
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
    /// The model could not be opened.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The task could not be read.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// The plan could not be read or does not fit the model.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Loading the model or building the calibration batches failed.
    #[error(transparent)]
    Search(Box<SearchError>),
    /// The forward pass failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<SearchError> for ImatrixError {
    fn from(e: SearchError) -> Self {
        ImatrixError::Search(Box::new(e))
    }
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
    pub fn read(path: &Path) -> Result<Imatrix, ImatrixError> {
        let io = |source| ImatrixError::Io {
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
    pub fn from_gguf(file: &GgufFile) -> Result<Imatrix, ImatrixError> {
        let path = file.path();
        let bad = |message: String| ImatrixError::Format {
            path: path.to_path_buf(),
            message,
        };
        let f32s = |name: &str| -> Result<Vec<f32>, ImatrixError> {
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
            dequantize(GgmlType::F32, bytes, bytes.len() / 4).map_err(bad)
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
    fn parse_legacy(path: &Path, bytes: &[u8]) -> Result<Imatrix, ImatrixError> {
        let bad = |message: String| ImatrixError::Format {
            path: path.to_path_buf(),
            message: format!("neither GGUF nor the legacy .dat format: {message}"),
        };
        let mut at = 0usize;
        let mut take = |n: usize, what: &str| -> Result<&[u8], ImatrixError> {
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
            let sums = dequantize(GgmlType::F32, values, nval as usize).map_err(&bad)?;
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
    pub fn write(&self, path: &Path, force: bool) -> Result<(), ImatrixError> {
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
    ) -> Result<(), ImatrixError> {
        let path = self.source.as_path();
        let model_name = model.path().display().to_string();
        let mut matched = 0;
        for info in model.tensors() {
            let is_matrix = info.dims.len() >= 2 && info.name.ends_with(".weight");
            let Some(e) = self.entries.get(&info.name) else {
                if let Some(qtype) = required {
                    if is_matrix && info.name.starts_with("blk.") {
                        return Err(ImatrixError::Missing {
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
                return Err(ImatrixError::Size {
                    imatrix: path.to_path_buf(),
                    tensor: info.name.clone(),
                    found: e.sums.len(),
                    expected,
                    model: model_name,
                });
            }
        }
        if matched == 0 {
            return Err(ImatrixError::NoMatch {
                imatrix: path.to_path_buf(),
                entries: self.entries.len(),
                model: model_name,
            });
        }
        Ok(())
    }
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

/// Accumulates every weight matrix's squared inputs over the real (unpadded) tokens of
/// `batches` (`lengths`: each row's length before padding), running `model` with `scales` and
/// the skip mask: the slim model's statistics. Skipped blocks get no attention entries. The LM
/// head gets one when it is a tensor of its own (`output.weight`, as `llama-imatrix
/// --process-output` collects it), none when tied to `token_embd`, which `llama-imatrix` never
/// collects either.
pub fn compute(
    model: &Model,
    scales: &ScaleValues,
    skip: &[bool],
    batches: &[TrainBatch],
    lengths: &[Vec<usize>],
) -> Result<Imatrix, ImatrixError> {
    let scales = model.scales(scales)?;
    let mut sums: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut tokens = 0usize;
    for (batch, lens) in batches.iter().zip(lengths) {
        let mask = batch.real_token_mask(lens, model.dtype())?;
        tokens += lens.iter().sum::<usize>();
        model.weight_inputs_no_grad(&batch.input_ids, &scales, skip, &mut |input, x| {
            if input == WeightInput::Output && model.arch().tie_word_embeddings {
                return Ok(());
            }
            let s = x.sqr()?.broadcast_mul(&mask)?.sum(0)?;
            for name in input.tensor_names() {
                match sums.get_mut(&name) {
                    Some(total) => *total = (&*total + &s)?,
                    None => {
                        sums.insert(name, s.clone());
                    }
                }
            }
            Ok(())
        })?;
    }
    let mut entries = BTreeMap::new();
    for (name, s) in sums {
        entries.insert(
            name,
            ImatrixEntry {
                sums: s.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                counts: vec![tokens as f32],
            },
        );
    }
    Ok(Imatrix {
        entries,
        datasets: Vec::new(),
        chunk_count: batches.iter().map(|b| b.input_ids.dims()[0] as u32).sum(),
        chunk_size: 0,
        source: PathBuf::new(),
    })
}

/// What `hopscotch imatrix` computes.
#[derive(Debug, Clone)]
pub struct ImatrixRequest {
    /// The model (HF folder or GGUF).
    pub model: PathBuf,
    /// The task whose documents calibrate.
    pub task: PathBuf,
    /// A plan: the statistics are then the slim model's, and the documents follow its seed.
    pub plan: Option<PathBuf>,
    /// Documents to calibrate on: the first of the task's seeded split, as the fit takes them.
    pub docs: usize,
    /// Seed of the split when there is no plan (a plan's own seed is used otherwise).
    pub seed: u64,
    /// Longest sequence in tokens.
    pub max_seq_len: usize,
    /// The output file (GGUF).
    pub output: PathBuf,
    /// Replace an existing output.
    pub force: bool,
}

/// What `hopscotch imatrix` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ImatrixSummary {
    /// The file written.
    pub output: PathBuf,
    /// Entries (weight matrices) in it.
    pub entries: usize,
    /// Documents and tokens the statistics cover.
    pub docs: usize,
    /// Real tokens summed.
    pub tokens: usize,
    /// Skipped attention blocks of the plan, if one was given.
    pub skipped_blocks: Vec<usize>,
    /// Ids of the documents used.
    pub doc_ids: Vec<String>,
    /// How many of them the plan was not trained on, so `eval --exclude-fit` does not hold them
    /// out (0 without a plan).
    pub beyond_plan: usize,
    /// Seconds taken.
    pub seconds: f64,
}

/// Computes the importance matrix of `request.model` (slimmed by the plan, if any) over the
/// first `request.docs` documents of the task's seeded split, writes it, and returns what it
/// wrote with the matrix itself (its `source` the output).
pub fn run(
    request: &ImatrixRequest,
    progress: &Progress,
) -> Result<(ImatrixSummary, Imatrix), ImatrixError> {
    let started = std::time::Instant::now();
    check_overwrite(&request.output, request.force)?;
    let ck = Checkpoint::open(&request.model)?;
    ck.validate_tensors()?;
    let plan = match &request.plan {
        Some(path) => {
            let plan = Plan::load(path)?;
            plan.validate().map_err(|message| PlanError::Invalid {
                path: path.display().to_string(),
                message,
            })?;
            plan.check_model(&ck, path)?;
            Some(plan)
        }
        None => None,
    };
    let n_layer = ck.arch.n_layer;
    let (skip, scales, seed) = match &plan {
        Some(p) => (p.skip_mask(), p.scales.clone(), p.settings.seed),
        None => (
            vec![false; n_layer],
            ScaleValues::ones(n_layer),
            request.seed,
        ),
    };
    let task_data = task::load(&request.task)?;
    let fingerprint = ModelFingerprint::of(&ck);
    let model = FitModel::load(ck, fingerprint)?;
    let options = FitOptions {
        objective: Objective::Ce,
        seed,
        max_seq_len: request.max_seq_len,
        ..FitOptions::default()
    };
    let fit_data = data::build(
        &model.ck,
        &model.model,
        &task_data,
        &model.fingerprint.tensor_sha256,
        &options,
        request.docs,
        progress,
    )?;
    let mut imatrix = compute(
        &model.model,
        &scales,
        &skip,
        &fit_data.batches,
        &fit_data.lengths,
    )?;
    imatrix.datasets = vec![format!(
        "{} ({} documents, seed {seed})",
        request.task.display(),
        fit_data.fit_doc_ids.len()
    )];
    imatrix.chunk_size = request.max_seq_len as u32;
    imatrix.write(&request.output, request.force)?;
    imatrix.source = request.output.clone();
    let summary = ImatrixSummary {
        output: request.output.clone(),
        entries: imatrix.entries.len(),
        docs: fit_data.fit_doc_ids.len(),
        tokens: fit_data.n_tokens(),
        beyond_plan: plan.as_ref().map_or(0, |p| {
            let trained: std::collections::HashSet<&str> = p.trained_doc_ids().collect();
            fit_data
                .fit_doc_ids
                .iter()
                .filter(|id| !trained.contains(id.as_str()))
                .count()
        }),
        skipped_blocks: plan.map(|p| p.skipped_blocks).unwrap_or_default(),
        doc_ids: fit_data.fit_doc_ids,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((summary, imatrix))
}

#[cfg(test)]
mod tests;

//! Checkpoint -> GGUF (f32/f16/bf16, then llama.cpp's quantizer for every other type) and
//! GGUF -> Hugging Face folder. Tensors stream one at a time from the mmap to the output.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::arch::{permute_rope_rows, Arch, Family, RopeScaling};
use crate::checkpoint::{dequantize, Checkpoint, CheckpointError, RowOrder, TensorEntry};
use crate::gguf::consts::{arch_key, gguf_to_hf_name, QuantType};
use crate::gguf::writer::GgufWriter;
use crate::gguf::{GgmlType, Value};
use crate::output::{check_overwrite, AtomicFile, OutputError};
use crate::quantize::{quantize_file, QuantizeError};

/// Errors converting a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// Reading the input failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Writing the GGUF failed.
    #[error(transparent)]
    Gguf(#[from] crate::gguf::writer::GgufWriteError),
    /// The output could not be written.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// llama.cpp's quantizer failed.
    #[error(transparent)]
    Quantize(#[from] QuantizeError),
    /// A tensor could not be converted.
    #[error("tensor {name}: {message}")]
    Tensor {
        /// GGUF tensor name.
        name: String,
        /// What went wrong.
        message: String,
    },
    /// An I/O error on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// The plain float types written directly (everything else goes through llama.cpp's quantizer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

impl FloatType {
    fn ggml(self) -> GgmlType {
        match self {
            FloatType::F32 => GgmlType::F32,
            FloatType::F16 => GgmlType::F16,
            FloatType::BF16 => GgmlType::BF16,
        }
    }

    /// llama.cpp's `general.file_type` for a file of this type.
    pub fn file_type(self) -> u32 {
        match self {
            FloatType::F32 => 0,
            FloatType::F16 => 1,
            FloatType::BF16 => 32,
        }
    }

    /// The float type for a quant type that names one, `None` for a quantized type.
    pub fn from_quant(q: QuantType) -> Option<FloatType> {
        match q.name() {
            "f32" => Some(FloatType::F32),
            "f16" => Some(FloatType::F16),
            "bf16" => Some(FloatType::BF16),
            _ => None,
        }
    }

    /// The float type a quantizer input should have for this checkpoint: the source's own
    /// float type when every matrix has it, else f32 (quantized or mixed sources).
    pub fn intermediate_for(ck: &Checkpoint) -> FloatType {
        let mut types = ck
            .tensors
            .iter()
            .filter(|t| t.shape.len() > 1)
            .map(|t| t.dtype);
        match types.next() {
            Some(first) if types.all(|t| t == first) => match first {
                GgmlType::F16 => FloatType::F16,
                GgmlType::BF16 => FloatType::BF16,
                _ => FloatType::F32,
            },
            _ => FloatType::F32,
        }
    }
}

/// One tensor to write: its GGUF name, torch-order shape, output type and a producer of its
/// bytes in GGUF layout.
pub struct TensorJob<'a> {
    /// GGUF tensor name.
    pub name: String,
    /// Shape in torch order.
    pub shape: Vec<usize>,
    /// Output data type.
    pub dtype: GgmlType,
    /// Produces the output bytes (called once, when the tensor is written).
    pub produce: Box<dyn Fn() -> Result<Vec<u8>, ConvertError> + 'a>,
}

/// What a write produced.
#[derive(Debug, Clone)]
pub struct WriteSummary {
    /// The file written.
    pub path: PathBuf,
    /// Tensors written.
    pub n_tensors: usize,
    /// Bytes of the file.
    pub file_bytes: u64,
}

/// The metadata llama.cpp needs for `arch` in a plain `llama`/`qwen2` file.
pub fn arch_kvs(arch: &Arch, gguf_arch: &str) -> Vec<(String, Value)> {
    let k = |s: &str| arch_key(gguf_arch, s);
    let mut kv = vec![
        (k("context_length"), Value::U32(arch.context_length as u32)),
        (k("embedding_length"), Value::U32(arch.n_embd as u32)),
        (k("feed_forward_length"), Value::U32(arch.n_ff as u32)),
        (k("block_count"), Value::U32(arch.n_layer as u32)),
        (k("attention.head_count"), Value::U32(arch.n_head as u32)),
        (
            k("attention.head_count_kv"),
            Value::U32(arch.n_head_kv as u32),
        ),
        (k("rope.freq_base"), Value::F32(arch.rope_theta as f32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(arch.rms_norm_eps as f32),
        ),
    ];
    if arch.family == Family::Llama {
        kv.push((k("vocab_size"), Value::U32(arch.vocab_size as u32)));
        kv.push((k("rope.dimension_count"), Value::U32(arch.head_dim as u32)));
    }
    if arch.head_dim != arch.n_embd / arch.n_head {
        kv.push((k("attention.key_length"), Value::U32(arch.head_dim as u32)));
        kv.push((
            k("attention.value_length"),
            Value::U32(arch.head_dim as u32),
        ));
    }
    if let Some(RopeScaling::Linear { factor }) = arch.rope_scaling {
        kv.push((k("rope.scaling.type"), Value::String("linear".into())));
        kv.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    kv
}

/// The output type of one tensor for a float target: 1-D tensors (norms, biases) stay f32, as
/// `convert_hf_to_gguf.py` keeps them.
pub fn float_out_type(shape: &[usize], target: FloatType) -> GgmlType {
    if shape.len() <= 1 {
        GgmlType::F32
    } else {
        target.ggml()
    }
}

/// Converts plain values of `from` to `to` (both plain float types), through f32 for
/// anything but a copy.
pub fn convert_plain(
    from: GgmlType,
    bytes: &[u8],
    n: usize,
    to: GgmlType,
) -> Result<Vec<u8>, String> {
    if from == to {
        return Ok(bytes.to_vec());
    }
    let values = dequantize(from, bytes, n)?;
    Ok(encode_f32(&values, to))
}

/// Encodes f32 values as f32, f16 or bf16 little-endian bytes (round to nearest even).
pub fn encode_f32(values: &[f32], to: GgmlType) -> Vec<u8> {
    match to {
        GgmlType::F16 => {
            let mut h = vec![half::f16::ZERO; values.len()];
            half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut h[..], values);
            h.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        GgmlType::BF16 => {
            let mut h = vec![half::bf16::ZERO; values.len()];
            half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut h[..], values);
            h.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        _ => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Bytes of `e` converted to `to`, in the row order a `gguf_family` file wants (llama files
/// hold q/k rows interleaved for rope; qwen2 files keep Hugging Face's order).
pub fn gguf_tensor_bytes(
    ck: &Checkpoint,
    e: &TensorEntry,
    to: GgmlType,
    interleave_rope: bool,
) -> Result<Vec<u8>, ConvertError> {
    let n_heads = rope_heads(&ck.arch, &e.name);
    let want = match (interleave_rope, n_heads) {
        (true, Some(n_head)) => RowOrder::RopeInterleaved { n_head },
        _ => RowOrder::Hf,
    };
    let terr = |message: String| ConvertError::Tensor {
        name: e.name.clone(),
        message,
    };
    if e.row_order == want {
        return convert_plain(e.dtype, ck.stored_bytes(e), e.n_elements(), to).map_err(terr);
    }
    let hf = ck.hf_bytes(e);
    let out = convert_plain(e.dtype, &hf, e.n_elements(), to).map_err(terr)?;
    Ok(match want {
        RowOrder::RopeInterleaved { n_head } => {
            let rows = e.shape[0].max(1);
            permute_rope_rows(&out, out.len() / rows, n_head, true)
        }
        RowOrder::Hf => out,
    })
}

/// Heads of the rope permutation for a q or k tensor name; `None` for other tensors.
pub fn rope_heads(arch: &Arch, name: &str) -> Option<usize> {
    if name.ends_with("attn_q.weight") || name.ends_with("attn_q.bias") {
        Some(arch.n_head)
    } else if name.ends_with("attn_k.weight") || name.ends_with("attn_k.bias") {
        Some(arch.n_head_kv)
    } else {
        None
    }
}

/// Writes a GGUF file from metadata and tensor jobs, streaming one tensor at a time.
pub fn write_gguf(
    target: &Path,
    force: bool,
    kvs: Vec<(String, Value)>,
    jobs: Vec<TensorJob<'_>>,
    progress: &indicatif::ProgressBar,
) -> Result<WriteSummary, ConvertError> {
    let mut w = GgufWriter::create(target, force)?;
    for (k, v) in kvs {
        w.add_kv(&k, v)?;
    }
    let mut total = 0u64;
    for j in &jobs {
        w.add_tensor_info(&j.name, j.dtype, &j.shape)?;
        total += j.dtype.tensor_bytes(&j.shape).unwrap_or(0) as u64;
    }
    progress.set_length(total);
    for j in &jobs {
        let bytes = (j.produce)()?;
        w.write_tensor_data(&j.name, &bytes)?;
        progress.inc(bytes.len() as u64);
    }
    w.finish()?;
    progress.finish_and_clear();
    let file_bytes = std::fs::metadata(target)
        .map(|m| m.len())
        .map_err(|source| ConvertError::Io {
            path: target.to_path_buf(),
            source,
        })?;
    Ok(WriteSummary {
        path: target.to_path_buf(),
        n_tensors: jobs.len(),
        file_bytes,
    })
}

/// The tensor jobs that turn a checkpoint into a plain `llama`/`qwen2` GGUF of `target` type.
pub fn checkpoint_jobs<'a>(ck: &'a Checkpoint, target: FloatType) -> Vec<TensorJob<'a>> {
    let interleave = ck.arch.family == Family::Llama;
    let mut jobs = Vec::new();
    if let Some(factors) = ck.arch.llama3_rope_factors() {
        let shape = vec![factors.len()];
        jobs.push(TensorJob {
            name: "rope_freqs.weight".into(),
            shape,
            dtype: GgmlType::F32,
            produce: Box::new(move || Ok(encode_f32(&factors, GgmlType::F32))),
        });
    }
    for (name, shape) in ck.arch.expected_tensors() {
        let dtype = float_out_type(&shape, target);
        jobs.push(TensorJob {
            name: name.clone(),
            shape,
            dtype,
            produce: Box::new(move || {
                let e = ck.require(&name)?;
                gguf_tensor_bytes(ck, e, dtype, interleave)
            }),
        });
    }
    jobs
}

/// All metadata of a plain GGUF for `ck`: general, architecture, tokenizer.
pub fn checkpoint_kvs(ck: &Checkpoint, gguf_arch: &str, file_type: u32) -> Vec<(String, Value)> {
    let mut kvs = vec![(
        "general.architecture".to_string(),
        Value::String(gguf_arch.into()),
    )];
    kvs.extend(ck.general.iter().cloned());
    kvs.push(("general.file_type".into(), Value::U32(file_type)));
    kvs.push(("general.quantization_version".into(), Value::U32(2)));
    kvs.extend(arch_kvs(&ck.arch, gguf_arch));
    kvs.extend(ck.vocab.to_gguf_kvs());
    kvs
}

/// Converts a checkpoint to a GGUF of quant type `qtype` at `target`.
pub fn to_gguf(
    ck: &Checkpoint,
    target: &Path,
    qtype: QuantType,
    force: bool,
    threads: usize,
    progress: &indicatif::ProgressBar,
) -> Result<WriteSummary, ConvertError> {
    let arch_name = ck.arch.gguf_arch();
    write_typed(
        target,
        qtype,
        force,
        threads,
        progress,
        |path, float, bar| {
            let kvs = checkpoint_kvs(ck, arch_name, float.file_type());
            write_gguf(path, true, kvs, checkpoint_jobs(ck, float), bar)
        },
        FloatType::intermediate_for(ck),
    )
}

/// Writes `target` as `qtype`: float types directly through `write`, quantized types by
/// writing an intermediate float file next to the target and running llama.cpp's quantizer.
pub fn write_typed<F>(
    target: &Path,
    qtype: QuantType,
    force: bool,
    threads: usize,
    progress: &indicatif::ProgressBar,
    write: F,
    intermediate: FloatType,
) -> Result<WriteSummary, ConvertError>
where
    F: FnOnce(&Path, FloatType, &indicatif::ProgressBar) -> Result<WriteSummary, ConvertError>,
{
    check_overwrite(target, force)?;
    if let Some(float) = FloatType::from_quant(qtype) {
        return write(target, float, progress);
    }
    let tmp = target.with_file_name(format!(
        ".{}.{}.unquantized.tmp",
        target
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    crate::output::register_temp(&tmp);
    let result = write(&tmp, intermediate, progress).and_then(|written| {
        progress.set_message(format!("quantizing to {}", qtype.name()));
        quantize_file(&tmp, target, qtype, threads, force)?;
        let file_bytes = std::fs::metadata(target)
            .map(|m| m.len())
            .map_err(|source| ConvertError::Io {
                path: target.to_path_buf(),
                source,
            })?;
        Ok(WriteSummary {
            path: target.to_path_buf(),
            n_tensors: written.n_tensors,
            file_bytes,
        })
    });
    let _ = std::fs::remove_file(&tmp);
    crate::output::unregister_temp(&tmp);
    result
}

/// Writes a Hugging Face folder (model.safetensors, config.json, tokenizer.json,
/// tokenizer_config.json, generation_config.json) from a checkpoint. Plain float tensors keep
/// their type; quantized ones are dequantized to f32.
pub fn to_hf(
    ck: &Checkpoint,
    target: &Path,
    force: bool,
    progress: &indicatif::ProgressBar,
) -> Result<WriteSummary, ConvertError> {
    if target.exists() && !force {
        return Err(OutputError::Exists(target.to_path_buf()).into());
    }
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let tmp_dir = target.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ConvertError::Io { path, source }
    };
    std::fs::create_dir_all(&tmp_dir).map_err(io(&tmp_dir))?;
    crate::output::register_temp(&tmp_dir);
    let result = write_hf_files(ck, &tmp_dir, progress).and_then(|n| {
        if target.exists() {
            std::fs::remove_dir_all(target).map_err(io(target))?;
        }
        std::fs::rename(&tmp_dir, target).map_err(io(target))?;
        Ok(n)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp_dir);
    }
    crate::output::unregister_temp(&tmp_dir);
    let n_tensors = result?;
    let file_bytes = std::fs::read_dir(target)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    Ok(WriteSummary {
        path: target.to_path_buf(),
        n_tensors,
        file_bytes,
    })
}

fn write_hf_files(
    ck: &Checkpoint,
    dir: &Path,
    progress: &indicatif::ProgressBar,
) -> Result<usize, ConvertError> {
    let io = |path: PathBuf| move |source| ConvertError::Io { path, source };
    // safetensors: header first (all shapes are known), then each tensor streamed.
    let mut entries = Vec::new();
    for (name, _) in ck.arch.expected_tensors() {
        let e = ck.require(&name)?;
        let hf_name = gguf_to_hf_name(&name).ok_or_else(|| ConvertError::Tensor {
            name: name.clone(),
            message: "has no Hugging Face name".into(),
        })?;
        let out = match e.dtype {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => e.dtype,
            _ => GgmlType::F32,
        };
        entries.push((e, hf_name, out));
    }
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (e, hf_name, out) in &entries {
        let n = out.tensor_bytes(&e.shape).unwrap_or(0);
        let dtype = match out {
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            _ => "F32",
        };
        header.insert(
            hf_name.clone(),
            serde_json::json!({"dtype": dtype, "shape": e.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut header_bytes = serde_json::to_vec(&header).expect("JSON of plain values");
    while header_bytes.len() % 8 != 0 {
        header_bytes.push(b' ');
    }
    progress.set_length(offset as u64);
    let st_path = dir.join("model.safetensors");
    let mut f = AtomicFile::create(&st_path, true)?;
    let werr = io(st_path.clone());
    f.write_all(&(header_bytes.len() as u64).to_le_bytes())
        .and_then(|_| f.write_all(&header_bytes))
        .map_err(werr)?;
    for (e, _, out) in &entries {
        let bytes =
            convert_plain(e.dtype, &ck.hf_bytes(e), e.n_elements(), *out).map_err(|message| {
                ConvertError::Tensor {
                    name: e.name.clone(),
                    message,
                }
            })?;
        f.write_all(&bytes).map_err(io(st_path.clone()))?;
        progress.inc(bytes.len() as u64);
    }
    f.commit()?;
    progress.finish_and_clear();

    let v = &ck.vocab;
    let json_files = [
        (
            "config.json",
            crate::checkpoint::config_json(&ck.arch, v.bos_id, v.eos_id),
        ),
        (
            "tokenizer.json",
            v.to_tokenizer_json().map_err(CheckpointError::from)?,
        ),
        ("tokenizer_config.json", v.to_tokenizer_config_json()),
        ("generation_config.json", {
            let mut g = serde_json::json!({});
            if let Some(b) = v.bos_id {
                g["bos_token_id"] = b.into();
            }
            if let Some(e) = v.eos_id {
                g["eos_token_id"] = e.into();
            }
            g
        }),
    ];
    for (file, json) in json_files {
        let path = dir.join(file);
        let text = serde_json::to_string_pretty(&json).expect("JSON of plain values");
        std::fs::write(&path, text).map_err(io(path.clone()))?;
    }
    Ok(entries.len())
}

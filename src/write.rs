//! Writing a checkpoint's tensors as GGUF: the tensor jobs (name, shape, output type and a
//! producer of the bytes in GGUF layout), the metadata llama.cpp needs, the float encodings,
//! and the typed write (a float file directly, any other type through llama.cpp's quantizer).
//! `convert` and `export` both write through it. Tensors stream one at a time from the mmap to
//! the output.

use std::path::{Path, PathBuf};

use crate::arch::{permute_rope_rows, Arch, Family, RopeScaling};
use crate::checkpoint::{dequantize, Checkpoint, CheckpointError, RowOrder, TensorEntry};
use crate::gguf::consts::{arch_key, QuantType};
use crate::gguf::imatrix::Imatrix;
use crate::gguf::writer::GgufWriter;
use crate::gguf::{GgmlType, Value};
use crate::output::{check_overwrite, OutputError};
use crate::quantize::{quantize_file, require_imatrix, QuantizeError, TypeOverride};

/// Errors writing a checkpoint's tensors to a file: a GGUF (float, or through llama.cpp's
/// quantizer) or a Hugging Face folder.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
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

    /// The name as llama.cpp's tools spell it (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            FloatType::F32 => "f32",
            FloatType::F16 => "f16",
            FloatType::BF16 => "bf16",
        }
    }

    /// The `torch_dtype` a Hugging Face config.json gives this type.
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatType::F32 => "float32",
            FloatType::F16 => "float16",
            FloatType::BF16 => "bfloat16",
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
    pub produce: Box<dyn Fn() -> Result<Vec<u8>, WriteError> + 'a>,
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

impl std::fmt::Display for WriteSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} tensors, {:.1} MiB)",
            self.path.display(),
            self.n_tensors,
            self.file_bytes as f64 / (1 << 20) as f64
        )
    }
}

impl WriteSummary {
    /// The summary of a finished file at `path` holding `n_tensors` tensors.
    fn of(path: &Path, n_tensors: usize) -> Result<WriteSummary, WriteError> {
        let file_bytes =
            std::fs::metadata(path)
                .map(|m| m.len())
                .map_err(|source| WriteError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
        Ok(WriteSummary {
            path: path.to_path_buf(),
            n_tensors,
            file_bytes,
        })
    }
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

/// Converts plain values of `from` to `to` (both plain float types). Between two plain float
/// types the values go through f32 a chunk at a time on the stack, straight into the output;
/// block-quantized sources are dequantized whole first.
pub fn convert_plain(
    from: GgmlType,
    bytes: &[u8],
    n: usize,
    to: GgmlType,
) -> Result<Vec<u8>, String> {
    if from == to {
        let mut out = take_buffer(bytes.len());
        out.extend_from_slice(bytes);
        return Ok(out);
    }
    let (Some(from_size), Some(to_size)) = (plain_size(from), plain_size(to)) else {
        let values = dequantize(from, bytes, n)?;
        return Ok(encode_f32(&values, to));
    };
    let expected = n.checked_mul(from_size);
    if expected != Some(bytes.len()) {
        return Err(match expected {
            Some(e) => format!("{} bytes where {n} {from} values take {e}", bytes.len()),
            None => format!("{n} {from} values overflow the address space"),
        });
    }
    let mut out = take_buffer(n * to_size);
    let mut f = [0f32; CHUNK];
    let mut encoded = [0u8; CHUNK * 4];
    for src in bytes.chunks(CHUNK * from_size) {
        let vals = &mut f[..src.len() / from_size];
        decode_plain(from, src, vals);
        let dst = &mut encoded[..vals.len() * to_size];
        encode_plain(vals, to, dst);
        out.extend_from_slice(dst);
    }
    Ok(out)
}

/// Output buffers that [`write_gguf`] has written, kept for [`convert_plain`] to fill again:
/// their pages are already mapped, where a fresh allocation of each tensor's size faults in
/// (and zeroes) every page anew, then unmaps it on drop. Emptied when `write_gguf` ends.
static SPARE_BUFFERS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// Spare buffers kept at most (one being filled while one is written, plus one).
const MAX_SPARE_BUFFERS: usize = 2;

/// An empty buffer with room for `len` bytes: the smallest spare that holds `len`, else the
/// largest spare (grown), else a new one.
fn take_buffer(len: usize) -> Vec<u8> {
    let spare = SPARE_BUFFERS.lock().ok().and_then(|mut spares| {
        let fits = (0..spares.len())
            .filter(|&i| spares[i].capacity() >= len)
            .min_by_key(|&i| spares[i].capacity());
        let pick = fits.or_else(|| (0..spares.len()).max_by_key(|&i| spares[i].capacity()))?;
        Some(spares.swap_remove(pick))
    });
    let mut buf = spare.unwrap_or_default();
    buf.clear();
    buf.reserve_exact(len);
    buf
}

/// Keeps a written buffer for [`take_buffer`], in place of a smaller spare when all are taken.
fn recycle_buffer(buf: Vec<u8>) {
    if let Ok(mut spares) = SPARE_BUFFERS.lock() {
        if spares.len() < MAX_SPARE_BUFFERS {
            spares.push(buf);
        } else if let Some(i) = (0..spares.len()).min_by_key(|&i| spares[i].capacity()) {
            if spares[i].capacity() < buf.capacity() {
                spares[i] = buf;
            }
        }
    }
}

/// Values converted per step of [`convert_plain`] (16 KiB of f32 on the stack).
const CHUNK: usize = 4096;

/// Bytes per value of a plain float type; `None` for anything else.
fn plain_size(t: GgmlType) -> Option<usize> {
    match t {
        GgmlType::F32 => Some(4),
        GgmlType::F16 | GgmlType::BF16 => Some(2),
        _ => None,
    }
}

/// Decodes little-endian plain values into `out` (one per value), exactly as [`dequantize`].
fn decode_plain(from: GgmlType, src: &[u8], out: &mut [f32]) {
    match from {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            // half's bf16::to_f32, written without a branch so that it vectorizes: a shift,
            // with the top mantissa bit set on NaNs (quieting them) as half does.
            let bf16_to_f32 = |i: u16| {
                let quiet = if i & 0x7FFF > 0x7F80 { 0x0040 } else { 0 };
                f32::from_bits(u32::from(i | quiet) << 16)
            };
            // Read the aligned middle as u16s (the byte order is the machine's on little-endian
            // targets) so that loads, shift and select vectorize; the ends byte by byte.
            #[cfg(target_endian = "little")]
            {
                // SAFETY: every bit pattern is a valid u16; align_to only reinterprets the
                // aligned middle of the slice.
                let (head, mid, _) = unsafe { src.align_to::<u16>() };
                if head.is_empty() {
                    for (o, &i) in out.iter_mut().zip(mid) {
                        *o = bf16_to_f32(i);
                    }
                    let done = mid.len().min(out.len());
                    for (o, c) in out[done..].iter_mut().zip(src[2 * done..].chunks_exact(2)) {
                        *o = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
                    }
                    return;
                }
            }
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        _ => unreachable!("decode_plain called for {from}"),
    }
}

/// Encodes values into `dst` (exactly their size) as [`encode_f32`] does.
fn encode_plain(vals: &[f32], to: GgmlType, dst: &mut [u8]) {
    match to {
        GgmlType::F16 => {
            let mut h = [half::f16::ZERO; CHUNK];
            let h = &mut h[..vals.len()];
            half::slice::HalfFloatSliceExt::convert_from_f32_slice(h, vals);
            for (d, x) in dst.chunks_exact_mut(2).zip(h.iter()) {
                d.copy_from_slice(&x.to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            let mut h = [half::bf16::ZERO; CHUNK];
            let h = &mut h[..vals.len()];
            half::slice::HalfFloatSliceExt::convert_from_f32_slice(h, vals);
            for (d, x) in dst.chunks_exact_mut(2).zip(h.iter()) {
                d.copy_from_slice(&x.to_le_bytes());
            }
        }
        _ => {
            for (d, x) in dst.chunks_exact_mut(4).zip(vals) {
                d.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// Encodes f32 values as f32, f16 or bf16 little-endian bytes (round to nearest even).
pub fn encode_f32(values: &[f32], to: GgmlType) -> Vec<u8> {
    let size = match to {
        GgmlType::F16 | GgmlType::BF16 => 2,
        _ => 4,
    };
    let mut out = vec![0u8; values.len() * size];
    for (vals, dst) in values.chunks(CHUNK).zip(out.chunks_mut(CHUNK * size)) {
        encode_plain(vals, to, dst);
    }
    out
}

/// Bytes of `e` converted to `to`, in the row order a `gguf_family` file wants (llama files
/// hold q/k rows interleaved for rope; qwen2 files keep Hugging Face's order).
pub fn gguf_tensor_bytes(
    ck: &Checkpoint,
    e: &TensorEntry,
    to: GgmlType,
    interleave_rope: bool,
) -> Result<Vec<u8>, WriteError> {
    let n_heads = rope_heads(&ck.arch, &e.name);
    let want = match (interleave_rope, n_heads) {
        (true, Some(n_head)) => RowOrder::RopeInterleaved { n_head },
        _ => RowOrder::Hf,
    };
    let terr = |message: String| WriteError::Tensor {
        name: e.name.clone(),
        message,
    };
    let stored = ck.stored_bytes(e);
    let out = if e.row_order == want {
        convert_plain(e.dtype, stored, e.n_elements(), to).map_err(terr)?
    } else {
        let hf = ck.hf_bytes(e);
        let out = convert_plain(e.dtype, &hf, e.n_elements(), to).map_err(terr)?;
        match want {
            RowOrder::RopeInterleaved { n_head } => {
                let rows = e.shape[0].max(1);
                let permuted = permute_rope_rows(&out, out.len() / rows, n_head, true);
                recycle_buffer(out);
                permuted
            }
            RowOrder::Hf => out,
        }
    };
    release_mapped(stored);
    Ok(out)
}

/// Tells the kernel this process is done with the pages of `bytes`, a slice of one of the
/// checkpoint's read-only file maps, so that they stop counting towards its resident set:
/// a whole-model conversion otherwise ends up with every page of the input mapped. The pages
/// stay in the page cache, and a later read of the slice faults them back in unchanged
/// (`MADV_DONTNEED` on a shared file mapping discards no data). Only whole pages inside the
/// slice are released; anywhere but Linux this does nothing.
fn release_mapped(bytes: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        extern "C" {
            fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
            fn sysconf(name: i32) -> std::ffi::c_long;
        }
        const MADV_DONTNEED: i32 = 4;
        const SC_PAGESIZE: i32 = 30;
        // SAFETY: sysconf only reads a constant.
        let page = match unsafe { sysconf(SC_PAGESIZE) } {
            p if p > 0 => p as usize,
            _ => return,
        };
        let start = bytes.as_ptr() as usize;
        let first = start.div_ceil(page) * page;
        let end = (start + bytes.len()) / page * page;
        if end > first {
            // SAFETY: the range lies inside `bytes`, which `Checkpoint::stored_bytes` takes
            // from a read-only shared file mapping (memmap2's `Mmap::map`) that outlives this
            // call; MADV_DONTNEED there only drops this process's page-table entries, and the
            // next access reads the same file bytes back from the page cache. A failure
            // (e.g. EINVAL) leaves the mapping as it was.
            unsafe {
                madvise(first as *mut std::ffi::c_void, end - first, MADV_DONTNEED);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = bytes;
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
) -> Result<WriteSummary, WriteError> {
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
    // Two stages: this thread produces (reads, converts) tensor i+1 while a second thread
    // writes tensor i. The rendezvous channel hands over one tensor at a time, so at most two
    // tensors' bytes are in memory.
    let w = std::thread::scope(|s| -> Result<GgufWriter, WriteError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(String, Vec<u8>)>(0);
        let writer = s.spawn(move || -> Result<GgufWriter, WriteError> {
            for (name, bytes) in rx {
                w.write_tensor_data(&name, &bytes)?;
                progress.inc(bytes.len() as u64);
                recycle_buffer(bytes);
            }
            Ok(w)
        });
        let mut produced = Ok(());
        for j in &jobs {
            match (j.produce)() {
                // A closed channel means the writer stopped on an error, reported below.
                Ok(bytes) => {
                    if tx.send((j.name.clone(), bytes)).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    produced = Err(e);
                    break;
                }
            }
        }
        drop(tx);
        let w = writer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        produced.map(|()| w)
    });
    if let Ok(mut spares) = SPARE_BUFFERS.lock() {
        spares.clear();
    }
    let w = w?;
    w.finish()?;
    progress.finish_and_clear();
    WriteSummary::of(target, jobs.len())
}

/// The `rope_freqs` tensor that carries Llama 3.1's rope scaling, when the model has it.
pub fn rope_freqs_job(arch: &Arch) -> Option<TensorJob<'static>> {
    let factors = arch.llama3_rope_factors()?;
    Some(TensorJob {
        name: crate::gguf::consts::ROPE_FREQS.into(),
        shape: vec![factors.len()],
        dtype: GgmlType::F32,
        produce: Box::new(move || Ok(encode_f32(&factors, GgmlType::F32))),
    })
}

/// The tensor jobs that turn a checkpoint into a plain `llama`/`qwen2` GGUF of `target` type.
pub fn checkpoint_jobs<'a>(ck: &'a Checkpoint, target: FloatType) -> Vec<TensorJob<'a>> {
    let interleave = ck.arch.family == Family::Llama;
    let mut jobs: Vec<TensorJob<'a>> = rope_freqs_job(&ck.arch).into_iter().collect();
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

/// How a GGUF is written: its type, whether it may replace a file, the quantizer's threads and
/// importance matrix.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions<'a> {
    /// Output type: a float type written directly or any llama.cpp quantization preset.
    pub qtype: QuantType,
    /// Replace existing outputs.
    pub force: bool,
    /// Threads for quantization.
    pub threads: usize,
    /// An importance matrix for the quantizer.
    pub imatrix: Option<&'a Imatrix>,
}

/// Writes `target` as `opts.qtype`: float types directly through `write`, quantized types by
/// writing an intermediate float file next to the target and running llama.cpp's quantizer
/// (with the importance matrix, when given; a type that needs one is refused before any work
/// without it; `overrides` give tensors their own types).
pub fn write_typed<F>(
    target: &Path,
    opts: &WriteOptions<'_>,
    overrides: &[TypeOverride],
    progress: &indicatif::ProgressBar,
    write: F,
    intermediate: FloatType,
) -> Result<WriteSummary, WriteError>
where
    F: FnOnce(&Path, FloatType, &indicatif::ProgressBar) -> Result<WriteSummary, WriteError>,
{
    let WriteOptions {
        qtype,
        force,
        threads,
        imatrix,
    } = *opts;
    check_overwrite(target, force)?;
    require_imatrix(qtype, imatrix.is_some())?;
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
        quantize_file(&tmp, target, qtype, threads, force, imatrix, overrides)?;
        WriteSummary::of(target, written.n_tensors)
    });
    let _ = std::fs::remove_file(&tmp);
    crate::output::unregister_temp(&tmp);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The conversion as it was written before the chunked one: a copy for the same type,
    /// else dequantize everything to a `Vec<f32>` and encode with half's slice conversion.
    fn reference(from: GgmlType, bytes: &[u8], n: usize, to: GgmlType) -> Vec<u8> {
        if from == to {
            return bytes.to_vec();
        }
        let values = dequantize(from, bytes, n).expect("dequantize");
        match to {
            GgmlType::F16 => {
                let mut h = vec![half::f16::ZERO; values.len()];
                half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut h[..], &values);
                h.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
            GgmlType::BF16 => {
                let mut h = vec![half::bf16::ZERO; values.len()];
                half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut h[..], &values);
                h.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
            _ => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    #[test]
    fn chunked_conversion_matches_the_reference_bit_for_bit() {
        // Every 16-bit pattern (NaNs, infinities, subnormals, both zeros), in an order that
        // spans several chunks and ends in a partial one.
        let halves: Vec<u8> = (0..=u16::MAX)
            .chain(0..1234)
            .flat_map(|i| i.to_le_bytes())
            .collect();
        // f32 patterns around every bf16/f16 rounding boundary and the special values.
        let floats: Vec<u8> = (0..=u16::MAX)
            .flat_map(|hi| {
                [0u32, 0x7FFF, 0x8000, 0x8001, 0x1000, 0x0FFF, 0x2000, 0xFFFF]
                    .map(|lo| (u32::from(hi) << 16) | lo)
            })
            .chain(
                [
                    f32::MAX,
                    f32::MIN_POSITIVE,
                    65504.0,
                    65520.0,
                    6.0e-8,
                    3.0e-8,
                ]
                .map(f32::to_bits),
            )
            .flat_map(|b| b.to_le_bytes())
            .collect();
        let plain = [GgmlType::F32, GgmlType::F16, GgmlType::BF16];
        for from in plain {
            let bytes = if from == GgmlType::F32 {
                &floats
            } else {
                &halves
            };
            let n = bytes.len() / plain_size(from).unwrap();
            for to in plain {
                let got = convert_plain(from, bytes, n, to).expect("convert");
                assert!(
                    got == reference(from, bytes, n, to),
                    "{from} -> {to} differs from the reference"
                );
            }
        }
        // A source that does not start on a u16 boundary takes the byte-wise path.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&halves);
        let n = halves.len() / 2;
        for to in plain {
            let got = convert_plain(GgmlType::BF16, &shifted[1..], n, to).expect("convert");
            assert!(
                got == reference(GgmlType::BF16, &halves, n, to),
                "unaligned bf16 -> {to}"
            );
        }
        let values: Vec<f32> = floats
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        for to in plain {
            assert!(encode_f32(&values, to) == reference(GgmlType::F32, &floats, values.len(), to));
        }
    }

    #[test]
    fn convert_plain_rejects_a_wrong_length() {
        let err = convert_plain(GgmlType::BF16, &[0; 5], 3, GgmlType::F16).unwrap_err();
        assert_eq!(err, "5 bytes where 3 bf16 values take 6");
    }
}

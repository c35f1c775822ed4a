//! The writer: round trips through our reader and llama.cpp's, the order of its steps, and what
//! it refuses.

use super::*;
use crate::gguf::reader::GgufFile;

/// Deterministic bytes that differ per tensor.
fn bytes(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn all_kinds_of_values() -> Vec<(String, Value)> {
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("t.u8".into(), Value::U8(200)),
        ("t.i8".into(), Value::I8(-5)),
        ("t.u16".into(), Value::U16(60000)),
        ("t.i16".into(), Value::I16(-30000)),
        ("t.u32".into(), Value::U32(4_000_000_000)),
        ("t.i32".into(), Value::I32(-7)),
        ("t.f32".into(), Value::F32(1e-5)),
        ("t.bool".into(), Value::Bool(true)),
        ("t.u64".into(), Value::U64(u64::MAX)),
        ("t.i64".into(), Value::I64(i64::MIN)),
        ("t.f64".into(), Value::F64(-0.25)),
        ("t.empty_str".into(), Value::String(String::new())),
        (
            "t.tokens".into(),
            Value::strings(["<s>", "héllo", "", "▁world"]),
        ),
        ("deci.attention.head_count".into(), Value::i32s([32, 0, 32])),
        ("t.scores".into(), Value::f32s([0.5, -1.0])),
        ("t.empty_arr".into(), Value::Array(ValueType::U8, vec![])),
        (
            "t.bools".into(),
            Value::Array(ValueType::Bool, vec![Value::Bool(false), Value::Bool(true)]),
        ),
    ]
}

#[test]
fn round_trip_values_and_tensors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("out.gguf");
    let shapes: [(&str, GgmlType, Vec<usize>); 6] = [
        ("token_embd.weight", GgmlType::F16, vec![5, 7]),
        ("blk.0.attn_q.weight", GgmlType::Q8_0, vec![3, 64]),
        ("blk.0.attn_q.bias", GgmlType::F32, vec![3]),
        ("blk.0.ffn_up.weight", GgmlType::Q4_K, vec![2, 256]),
        ("blk.0.ffn_down.weight", GgmlType::BF16, vec![2, 1, 3]),
        ("output_norm.weight", GgmlType::F32, vec![0]),
    ];
    let mut w = GgufWriter::create(&path, false).expect("create");
    let kvs = all_kinds_of_values();
    for (k, v) in &kvs {
        w.add_kv(k.clone(), v.clone()).expect("add_kv");
    }
    let mut data = Vec::new();
    for (i, (name, ty, shape)) in shapes.iter().enumerate() {
        let n = w
            .add_tensor_info(*name, *ty, shape)
            .expect("add_tensor_info");
        data.push(bytes(i as u8, n));
    }
    assert_eq!(
        data.iter().map(Vec::len).collect::<Vec<_>>(),
        [70, 204, 12, 288, 12, 0]
    );
    for ((name, ..), d) in shapes.iter().zip(&data) {
        w.write_tensor_data(name, d).expect("write_tensor_data");
    }
    assert!(!path.exists(), "nothing at the target before finish");
    w.finish().expect("finish");

    let g = GgufFile::open(&path).expect("read back");
    assert_eq!(g.version(), 3);
    assert_eq!(g.metadata(), kvs.as_slice());
    assert_eq!(g.tensors().len(), shapes.len());
    for ((name, ty, shape), (t, d)) in shapes.iter().zip(g.tensors().iter().zip(&data)) {
        assert_eq!(&t.name, name);
        assert_eq!(t.ggml_type, *ty);
        assert_eq!(&t.shape(), shape);
        assert_eq!(t.offset % 32, 0);
        assert_eq!(g.tensor_data(t), d.as_slice(), "{name}");
    }
    let len = std::fs::metadata(&path).expect("stat").len();
    assert_eq!(len % 32, 0, "the last tensor is padded too");
}

/// What llama.cpp's own parser (`gguf_init_from_file`) makes of a file.
struct LlamaCppView {
    n_kv: i64,
    alignment: usize,
    data_offset: usize,
    /// (ggml type id, offset in the data section, bytes) per tensor.
    tensors: Vec<(u32, usize, usize)>,
}

fn llama_cpp_parse(path: &Path) -> Option<LlamaCppView> {
    use llama_cpp_sys_2 as sys;
    let c_path = std::ffi::CString::new(path.to_str()?).ok()?;
    let params = sys::gguf_init_params {
        no_alloc: true,
        ctx: std::ptr::null_mut(),
    };
    // SAFETY: a NUL-terminated path and parameters asking for metadata only; the context
    // is only read through its own accessors, with ids below its tensor count, then freed.
    unsafe {
        let ctx = sys::gguf_init_from_file(c_path.as_ptr(), params);
        if ctx.is_null() {
            return None;
        }
        let view = LlamaCppView {
            n_kv: sys::gguf_get_n_kv(ctx),
            alignment: sys::gguf_get_alignment(ctx),
            data_offset: sys::gguf_get_data_offset(ctx),
            tensors: (0..sys::gguf_get_n_tensors(ctx))
                .map(|i| {
                    (
                        sys::gguf_get_tensor_type(ctx, i) as u32,
                        sys::gguf_get_tensor_offset(ctx, i),
                        sys::gguf_get_tensor_size(ctx, i),
                    )
                })
                .collect(),
        };
        sys::gguf_free(ctx);
        Some(view)
    }
}

#[test]
fn llama_cpp_reads_what_we_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("llama.gguf");
    let mut w = GgufWriter::create(&path, false).expect("create");
    for (k, v) in all_kinds_of_values() {
        w.add_kv(k, v).expect("add_kv");
    }
    w.add_kv(GENERAL_ALIGNMENT, Value::U32(64))
        .expect("alignment");
    let tensors = [
        ("a", GgmlType::F32, vec![3usize, 5]),
        ("b", GgmlType::Q4_K, vec![2, 256]),
        ("c", GgmlType::IQ4_NL, vec![32]),
        ("d", GgmlType::F16, vec![7]),
    ];
    let sizes: Vec<usize> = tensors
        .iter()
        .map(|(n, t, s)| w.add_tensor_info(*n, *t, s).expect("info"))
        .collect();
    for ((name, ..), n) in tensors.iter().zip(&sizes) {
        w.write_tensor_data(name, &bytes(3, *n)).expect("data");
    }
    w.finish().expect("finish");

    let ours = GgufFile::open(&path).expect("our reader");
    let theirs = llama_cpp_parse(&path).expect("llama.cpp parses our file");
    assert_eq!(theirs.n_kv, ours.metadata().len() as i64);
    assert_eq!(theirs.alignment as u64, ours.alignment());
    assert_eq!(theirs.data_offset as u64, ours.data_start());
    assert_eq!(theirs.tensors.len(), ours.tensors().len());
    for (t, &(ty, offset, size)) in ours.tensors().iter().zip(&theirs.tensors) {
        assert_eq!(ty, t.ggml_type.id(), "{}", t.name);
        assert_eq!(offset as u64 + ours.data_start(), t.offset, "{}", t.name);
        assert_eq!(size, t.nbytes, "{}", t.name);
    }

    // An array of arrays: valid GGUF that our reader takes, but llama.cpp refuses the whole
    // file, which is why the writer refuses such values.
    let mut nested = Vec::new();
    nested.extend_from_slice(b"GGUF");
    nested.extend_from_slice(&3u32.to_le_bytes());
    nested.extend_from_slice(&0u64.to_le_bytes());
    nested.extend_from_slice(&1u64.to_le_bytes());
    encode_str(&mut nested, "k");
    nested.extend_from_slice(&9u32.to_le_bytes());
    encode_value(
        &mut nested,
        &Value::Array(ValueType::Array, vec![Value::i32s([1, 2])]),
    );
    let nested_path = dir.path().join("nested.gguf");
    std::fs::write(&nested_path, nested).expect("write");
    assert!(GgufFile::open(&nested_path).is_ok());
    assert!(llama_cpp_parse(&nested_path).is_none());
}

#[test]
fn alignment_key_replans_offsets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.gguf");
    let mut w = GgufWriter::create(&path, false).expect("create");
    w.add_tensor_info("a", GgmlType::F32, &[3]).expect("a");
    w.add_tensor_info("b", GgmlType::F32, &[5]).expect("b");
    w.add_kv(GENERAL_ALIGNMENT, Value::U32(128))
        .expect("alignment");
    assert_eq!(w.alignment(), 128);
    w.write_tensor_data("a", &bytes(1, 12)).expect("a data");
    w.write_tensor_data("b", &bytes(2, 20)).expect("b data");
    w.finish().expect("finish");
    let g = GgufFile::open(&path).expect("read back");
    assert_eq!(g.alignment(), 128);
    assert_eq!(g.data_start() % 128, 0);
    assert_eq!(g.tensors()[1].offset, g.data_start() + 128);
    assert_eq!(g.tensor_data(&g.tensors()[1]), bytes(2, 20).as_slice());

    let mut w = GgufWriter::create(dir.path().join("b.gguf"), false).expect("create");
    for bad in [Value::U32(48), Value::U32(0), Value::U64(64)] {
        let err = w.add_kv(GENERAL_ALIGNMENT, bad).unwrap_err();
        assert!(matches!(err, GgufWriteError::BadAlignment { .. }), "{err}");
    }
}

#[test]
fn empty_file_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("empty.gguf");
    GgufWriter::create(&path, false)
        .expect("create")
        .finish()
        .expect("finish");
    let g = GgufFile::open(&path).expect("read back");
    assert!(g.metadata().is_empty() && g.tensors().is_empty());
}

#[test]
fn order_is_enforced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("order.gguf");
    let mut w = GgufWriter::create(&path, false).expect("create");
    w.add_tensor_info("a", GgmlType::F32, &[2]).expect("a");
    w.add_tensor_info("b", GgmlType::F16, &[4]).expect("b");

    let err = w.write_tensor_data("b", &[0; 8]).unwrap_err();
    assert!(
        matches!(err, GgufWriteError::UnexpectedTensor { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("\"a\""), "{err}");
    assert_eq!(
        w.step(),
        Step::TensorData {
            written: 0,
            total: 2
        }
    );

    let err = w.add_kv("late", Value::U8(1)).unwrap_err().to_string();
    assert!(
        err.contains("add_kv") && err.contains("writing tensor data (0 of 2"),
        "{err}"
    );
    let err = w
        .add_tensor_info("c", GgmlType::F32, &[1])
        .unwrap_err()
        .to_string();
    assert!(err.contains("add_tensor_info"), "{err}");
    let err = w.write_header().unwrap_err().to_string();
    assert!(
        err.contains("write_header") && err.contains("once"),
        "{err}"
    );

    let err = w.write_tensor_data("a", &[0; 7]).unwrap_err();
    assert!(matches!(
        err,
        GgufWriteError::WrongTensorSize {
            expected: 8,
            got: 7,
            ..
        }
    ));
    w.write_tensor_data("a", &[0; 8]).expect("a");

    let err = w.write_tensor_data("a", &[0; 8]).unwrap_err().to_string();
    assert!(err.contains("\"b\""), "{err}");
    w.write_tensor_data("b", &[0; 8]).expect("b");
    let err = w.write_tensor_data("c", &[]).unwrap_err();
    assert!(matches!(
        err,
        GgufWriteError::NoMoreTensors { total: 2, .. }
    ));
    w.finish().expect("finish");
    assert!(GgufFile::open(&path).is_ok());
}

#[test]
fn unfinished_file_is_refused_and_left_behind_nowhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("partial.gguf");
    let mut w = GgufWriter::create(&path, false).expect("create");
    w.add_tensor_info("a", GgmlType::F32, &[2]).expect("a");
    w.add_tensor_info("b", GgmlType::F32, &[2]).expect("b");
    w.write_tensor_data("a", &[0; 8]).expect("a");
    let err = w.finish().unwrap_err().to_string();
    assert!(err.contains("1 of 2") && err.contains("\"b\""), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);

    let mut w = GgufWriter::create(&path, false).expect("create");
    w.add_tensor_info("a", GgmlType::F32, &[2]).expect("a");
    let err = w.finish().unwrap_err().to_string();
    assert!(err.contains("0 of 1"), "{err}");
    assert!(!path.exists());
}

#[test]
fn refuses_existing_file_without_force() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("x.gguf");
    std::fs::write(&path, b"old").expect("write");
    let err = GgufWriter::create(&path, false).err().expect("refused");
    assert!(matches!(
        err,
        GgufWriteError::Output(OutputError::Exists(_))
    ));
    GgufWriter::create(&path, true)
        .expect("forced")
        .finish()
        .expect("finish");
    assert!(GgufFile::open(&path).is_ok());
}

#[test]
fn values_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = GgufWriter::create(dir.path().join("v.gguf"), false).expect("create");
    let mixed = Value::Array(ValueType::I32, vec![Value::I32(1), Value::U32(2)]);
    let err = w.add_kv("k", mixed).unwrap_err();
    assert!(matches!(
        err,
        GgufWriteError::MixedArray {
            index: 1,
            expected: ValueType::I32,
            found: ValueType::U32,
            ..
        }
    ));
    let nested = Value::Array(ValueType::Array, vec![Value::i32s([1, 2])]);
    assert!(matches!(
        w.add_kv("k", nested),
        Err(GgufWriteError::NestedArray { .. })
    ));
    let empty_nested = Value::Array(ValueType::Array, vec![]);
    assert!(matches!(
        w.add_kv("k", empty_nested),
        Err(GgufWriteError::NestedArray { .. })
    ));
    assert!(matches!(
        w.add_kv("", Value::U8(0)),
        Err(GgufWriteError::BadKeyLength { .. })
    ));
    w.add_kv("k", Value::U8(0)).expect("first");
    assert!(matches!(
        w.add_kv("k", Value::U8(1)),
        Err(GgufWriteError::DuplicateKey { .. })
    ));
}

#[test]
fn tensor_infos_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = GgufWriter::create(dir.path().join("t.gguf"), false).expect("create");
    let err = w
        .add_tensor_info("q", GgmlType::Q4_0, &[4, 16])
        .unwrap_err();
    assert!(
        matches!(err, GgufWriteError::BadShape { block: 32, .. }),
        "{err}"
    );
    let err = w
        .add_tensor_info("big", GgmlType::F32, &[usize::MAX, 2])
        .unwrap_err();
    assert!(matches!(err, GgufWriteError::BadShape { .. }), "{err}");
    let err = w
        .add_tensor_info("d", GgmlType::F32, &[1, 1, 1, 1, 1])
        .unwrap_err();
    assert!(matches!(err, GgufWriteError::TooManyDims { n_dims: 5, .. }));
    let long = "x".repeat(MAX_TENSOR_NAME_LEN + 1);
    let err = w.add_tensor_info(long, GgmlType::F32, &[1]).unwrap_err();
    assert!(matches!(err, GgufWriteError::TensorNameTooLong { .. }));
    assert_eq!(
        w.add_tensor_info("q", GgmlType::Q4_0, &[4, 32]).expect("q"),
        72
    );
    let err = w.add_tensor_info("q", GgmlType::F32, &[1]).unwrap_err();
    assert!(matches!(err, GgufWriteError::DuplicateTensor { .. }));
}

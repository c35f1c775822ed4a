//! The reader on GGUF bytes built field by field: a valid file, every truncation, bit flips and
//! forged values, and each check it makes.

use super::*;
use crate::gguf::consts::{MAX_ARRAY_LEN, MAX_STRING_LEN};

/// Builds GGUF bytes field by field.
#[derive(Default)]
struct Bytes(Vec<u8>);

impl Bytes {
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn str(self, s: &str) -> Self {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    fn header(self, tensors: u64, kvs: u64) -> Self {
        self.raw(b"GGUF").u32(3).u64(tensors).u64(kvs)
    }
    fn tensor(self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Self {
        let mut b = self.str(name).u32(dims.len() as u32);
        for &d in dims {
            b = b.u64(d);
        }
        b.u32(ty).u64(offset)
    }
    fn pad_to(mut self, align: usize) -> Self {
        while !self.0.len().is_multiple_of(align) {
            self.0.push(0);
        }
        self
    }
    fn zeros(mut self, n: usize) -> Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

fn p(buf: &[u8]) -> Result<Parsed, GgufError> {
    parse(Path::new("test.gguf"), buf)
}

/// A small valid file: three key-values (string, u32, array of strings), two tensors
/// (f32 [2, 3] and q8_0 [32, 1]).
fn small() -> Vec<u8> {
    Bytes::default()
        .header(2, 3)
        .str("general.architecture")
        .u32(8)
        .str("llama")
        .str("llama.block_count")
        .u32(4)
        .u32(2)
        .str("tokenizer.ggml.tokens")
        .u32(9)
        .u32(8)
        .u64(2)
        .str("a")
        .str("bc")
        .tensor("a", &[3, 2], 0, 0)
        .tensor("b", &[32, 1], 8, 32)
        .pad_to(32)
        .raw(&[1; 24])
        .pad_to(32)
        .raw(&[2; 34])
        .0
}

#[test]
fn parses_hand_built_file() {
    let buf = small();
    let g = p(&buf).expect("valid file");
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 32);
    assert_eq!(g.metadata.len(), 3);
    assert_eq!(
        g.metadata[0],
        ("general.architecture".into(), Value::String("llama".into()))
    );
    assert_eq!(g.metadata[1].1, Value::U32(2));
    assert_eq!(g.metadata[2].1, Value::strings(["a", "bc"]));
    let a = &g.tensors[0];
    assert_eq!(
        (a.ggml_type, a.dims.clone(), a.nbytes),
        (GgmlType::F32, vec![3, 2], 24)
    );
    assert_eq!(a.shape(), vec![2, 3]);
    assert_eq!(a.offset, g.data_start);
    assert_eq!(g.data_start % 32, 0);
    let b = &g.tensors[1];
    assert_eq!(
        (b.ggml_type, b.nbytes, b.offset),
        (GgmlType::Q8_0, 34, g.data_start + 32)
    );
    assert_eq!(&buf[b.offset as usize..][..34], &[2; 34]);
}

#[test]
fn open_maps_file_and_typed_getters_name_key_and_type() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("small.gguf");
    std::fs::write(&path, small()).expect("write");
    let g = GgufFile::open(&path).expect("open");
    assert_eq!(g.get_str("general.architecture").expect("arch"), "llama");
    assert_eq!(g.get_u64("llama.block_count").expect("blocks"), 2);
    assert_eq!(g.get_arr("tokenizer.ggml.tokens").expect("tokens").len(), 2);
    let info = g.tensor("b").expect("tensor b").clone();
    assert_eq!(g.tensor_data(&info), &[2; 34]);
    assert_eq!(g.tensor_data(&g.tensors()[0]), &[1; 24]);
    let err = g.get_f64("llama.block_count").unwrap_err().to_string();
    assert!(
        err.contains("small.gguf") && err.contains("llama.block_count") && err.contains("a float"),
        "{err}"
    );
    let err = g.get_str("general.name").unwrap_err().to_string();
    assert!(
        err.contains("general.name") && err.contains("missing"),
        "{err}"
    );
    let forged = TensorInfo {
        offset: u64::MAX,
        ..info
    };
    assert!(g.tensor_data(&forged).is_empty());
}

#[test]
fn open_reports_missing_and_empty_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.gguf");
    assert!(matches!(
        GgufFile::open(&missing),
        Err(GgufError::Io { .. })
    ));
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").expect("write");
    assert!(matches!(
        GgufFile::open(&empty),
        Err(GgufError::BadMagic { .. })
    ));
}

#[test]
fn every_truncation_is_an_error() {
    let buf = small();
    for len in 0..buf.len() {
        assert!(p(&buf[..len]).is_err(), "truncated at {len} parsed");
    }
}

#[test]
fn bit_flips_never_panic() {
    let buf = small();
    for i in 0..buf.len() {
        for bit in 0..8 {
            let mut b = buf.clone();
            b[i] ^= 1 << bit;
            let _ = p(&b);
        }
    }
}

#[test]
fn forged_byte_values_never_panic() {
    let buf = small();
    for i in 0..buf.len() {
        for v in [0x00, 0x7f, 0x80, 0xff] {
            let mut b = buf.clone();
            b[i] = v;
            let _ = p(&b);
        }
    }
}

#[test]
fn bad_magic_and_version() {
    let mut b = small();
    b[0] = b'X';
    assert!(matches!(p(&b), Err(GgufError::BadMagic { .. })));
    let b = Bytes::default().raw(b"GGUF").u32(1).u64(0).u64(0).0;
    assert!(matches!(
        p(&b),
        Err(GgufError::UnsupportedVersion { version: 1, .. })
    ));
    let b = Bytes::default()
        .raw(b"GGUF")
        .raw(&[0, 0, 0, 3])
        .u64(0)
        .u64(0)
        .0;
    let err = p(&b).unwrap_err().to_string();
    assert!(err.contains("0x3000000"), "{err}");
    let b = Bytes::default().raw(b"GGUF").u32(2).u64(0).u64(0).0;
    assert_eq!(p(&b).expect("v2").version, 2);
}

#[test]
fn forged_counts_and_lengths() {
    let b = Bytes::default().header(u64::MAX, 0).0;
    assert!(matches!(p(&b), Err(GgufError::CountTooLarge { .. })));
    let b = Bytes::default().header(0, MAX_KV_COUNT + 1).0;
    assert!(matches!(p(&b), Err(GgufError::CountTooLarge { .. })));
    // Within the cap but more than the file holds.
    let b = Bytes::default().header(MAX_TENSOR_COUNT, MAX_KV_COUNT).0;
    assert!(matches!(p(&b), Err(GgufError::Truncated { .. })));

    let b = Bytes::default().header(0, 1).u64(u64::MAX).0;
    assert!(matches!(p(&b), Err(GgufError::StringTooLong { .. })));
    let b = Bytes::default().header(0, 1).u64(100).raw(b"short").0;
    assert!(matches!(p(&b), Err(GgufError::Truncated { .. })));

    let string_value = |len: u64| Bytes::default().header(0, 1).str("k").u32(8).u64(len).0;
    assert!(matches!(
        p(&string_value(u64::MAX)),
        Err(GgufError::StringTooLong { .. })
    ));
    assert!(matches!(
        p(&string_value(MAX_STRING_LEN as u64)),
        Err(GgufError::Truncated { .. })
    ));

    let array = |ty: u32, len: u64| {
        Bytes::default()
            .header(0, 1)
            .str("k")
            .u32(9)
            .u32(ty)
            .u64(len)
            .0
    };
    assert!(matches!(
        p(&array(0, u64::MAX)),
        Err(GgufError::ArrayTooLong { .. })
    ));
    assert!(matches!(
        p(&array(0, MAX_ARRAY_LEN as u64 + 1)),
        Err(GgufError::ArrayTooLong { .. })
    ));
    // A full-size array of strings in a tiny file is refused before allocating.
    let err = p(&array(8, MAX_ARRAY_LEN as u64)).unwrap_err();
    assert!(
        matches!(err, GgufError::Truncated { needed, .. } if needed == 8 * MAX_ARRAY_LEN as u64)
    );

    let b = Bytes::default()
        .header(1, 0)
        .tensor("t", &[u64::MAX, u64::MAX], 0, 0)
        .0;
    assert!(matches!(p(&b), Err(GgufError::SizeOverflow { .. })));
    let b = Bytes::default()
        .header(1, 0)
        .tensor("t", &[1 << 62, 4], 0, 0)
        .0;
    assert!(matches!(p(&b), Err(GgufError::SizeOverflow { .. })));
    let b = Bytes::default()
        .header(1, 0)
        .tensor("t", &[1, 1, 1, 1, 1], 0, 0)
        .0;
    assert!(matches!(
        p(&b),
        Err(GgufError::TooManyDims { n_dims: 5, .. })
    ));
    let b = Bytes::default().header(1, 0).u64(64).raw(&[b'x'; 64]).0;
    assert!(matches!(
        p(&b),
        Err(GgufError::StringTooLong { len: 64, .. })
    ));
}

#[test]
fn values_are_checked() {
    let kv = |ty: u32, payload: &[u8]| {
        Bytes::default()
            .header(0, 1)
            .str("k")
            .u32(ty)
            .raw(payload)
            .0
    };
    let err = p(&kv(13, &[])).unwrap_err();
    assert!(matches!(
        err,
        GgufError::UnknownValueType { type_id: 13, .. }
    ));
    assert!(err.to_string().contains("0xd") && err.to_string().contains("\"k\""));
    assert!(matches!(
        p(&kv(7, &[2])),
        Err(GgufError::InvalidBool { byte: 2, .. })
    ));
    assert_eq!(
        p(&kv(7, &[1])).expect("bool").metadata[0].1,
        Value::Bool(true)
    );
    let bad_utf8 = Bytes::default().u64(2).raw(&[0xc3, 0x28]).0;
    assert!(matches!(
        p(&kv(8, &bad_utf8)),
        Err(GgufError::InvalidUtf8 { .. })
    ));
    // Array of unknown element type.
    let arr = Bytes::default().u32(42).u64(0).0;
    assert!(matches!(
        p(&kv(9, &arr)),
        Err(GgufError::UnknownValueType { type_id: 42, .. })
    ));

    // One level of nesting is fine: [[1, 2], []] of i32.
    let nested = Bytes::default()
        .u32(9)
        .u64(2)
        .u32(5)
        .u64(2)
        .u32(1)
        .u32(2)
        .u32(5)
        .u64(0)
        .0;
    let g = p(&kv(9, &nested)).expect("nested");
    assert_eq!(
        g.metadata[0].1,
        Value::Array(ValueType::Array, vec![Value::i32s([1, 2]), Value::i32s([])])
    );
    // Two levels are not.
    let deep = Bytes::default().u32(9).u64(1).u32(9).u64(1).u32(5).u64(0).0;
    assert!(matches!(
        p(&kv(9, &deep)),
        Err(GgufError::NestedArrayTooDeep { .. })
    ));

    let empty_key = Bytes::default().header(0, 1).str("").u32(0).raw(&[0]).0;
    assert!(matches!(
        p(&empty_key),
        Err(GgufError::EmptyKey { index: 0, .. })
    ));
    let dup = Bytes::default()
        .header(0, 2)
        .str("k")
        .u32(0)
        .raw(&[0])
        .str("k")
        .u32(0)
        .raw(&[1])
        .0;
    assert!(matches!(p(&dup), Err(GgufError::DuplicateKey { .. })));
}

#[test]
fn alignment_is_checked_and_used() {
    let with_align = |ty: u32, v: &[u8], offset: u64| {
        Bytes::default()
            .header(1, 1)
            .str(GENERAL_ALIGNMENT)
            .u32(ty)
            .raw(v)
            .tensor("t", &[4], 0, offset)
            .pad_to(64)
            .zeros(80)
            .0
    };
    let g = p(&with_align(4, &64u32.to_le_bytes(), 64)).expect("aligned to 64");
    assert_eq!(g.alignment, 64);
    assert_eq!(g.data_start % 64, 0);
    assert_eq!(g.tensors[0].offset, g.data_start + 64);
    let err = p(&with_align(4, &64u32.to_le_bytes(), 32)).unwrap_err();
    assert!(matches!(
        err,
        GgufError::MisalignedTensor {
            offset: 32,
            alignment: 64,
            ..
        }
    ));
    assert!(matches!(
        p(&with_align(4, &24u32.to_le_bytes(), 0)),
        Err(GgufError::BadAlignment { alignment: 24, .. })
    ));
    assert!(matches!(
        p(&with_align(4, &0u32.to_le_bytes(), 0)),
        Err(GgufError::BadAlignment { alignment: 0, .. })
    ));
    assert!(matches!(
        p(&with_align(10, &64u64.to_le_bytes(), 0)),
        Err(GgufError::WrongType {
            found: ValueType::U64,
            ..
        })
    ));
    // Default alignment: an offset of 16 is misaligned.
    let b = Bytes::default()
        .header(1, 0)
        .tensor("t", &[4], 0, 16)
        .pad_to(32)
        .zeros(64)
        .0;
    assert!(matches!(
        p(&b),
        Err(GgufError::MisalignedTensor {
            offset: 16,
            alignment: 32,
            ..
        })
    ));
}

#[test]
fn tensor_ranges_are_checked() {
    let two = |off_a: u64, off_b: u64, data: usize| {
        Bytes::default()
            .header(2, 0)
            .tensor("a", &[16], 0, off_a)
            .tensor("b", &[16], 0, off_b)
            .pad_to(32)
            .zeros(data)
            .0
    };
    assert!(p(&two(0, 64, 128)).is_ok());
    let err = p(&two(0, 32, 128)).unwrap_err();
    assert!(
        matches!(&err, GgufError::OverlappingTensors { first, second, .. } if first == "a" && second == "b"),
        "{err}"
    );
    assert!(matches!(
        p(&two(64, 32, 128)),
        Err(GgufError::OverlappingTensors { .. })
    ));
    assert!(matches!(
        p(&two(0, 0, 128)),
        Err(GgufError::OverlappingTensors { .. })
    ));
    // b ends one byte past the file.
    assert!(matches!(
        p(&two(0, 64, 127)),
        Err(GgufError::TensorOutOfBounds { .. })
    ));
    let err = p(&two(0, u64::MAX - 31, 128)).unwrap_err();
    assert!(matches!(err, GgufError::TensorOutOfBounds { .. }), "{err}");
    assert!(err.to_string().contains("\"b\""));
    // Empty tensors may share an offset.
    let b = Bytes::default()
        .header(2, 0)
        .tensor("a", &[0], 0, 0)
        .tensor("b", &[0, 5], 0, 0)
        .pad_to(32)
        .0;
    let g = p(&b).expect("empty tensors");
    assert_eq!(g.tensors[1].nbytes, 0);
    let dup = Bytes::default()
        .header(2, 0)
        .tensor("a", &[0], 0, 0)
        .tensor("a", &[0], 0, 0)
        .0;
    assert!(matches!(p(&dup), Err(GgufError::DuplicateTensor { .. })));
}

#[test]
fn ggml_types_are_checked() {
    let one = |ty: u32, dims: &[u64]| {
        Bytes::default()
            .header(1, 0)
            .tensor("w", dims, ty, 0)
            .pad_to(32)
            .zeros(1024)
            .0
    };
    let err = p(&one(0xbeef, &[32])).unwrap_err();
    assert!(matches!(
        err,
        GgufError::UnknownGgmlType {
            type_id: 0xbeef,
            ..
        }
    ));
    let msg = err.to_string();
    assert!(msg.contains("0xbeef") && msg.contains("\"w\""), "{msg}");
    // Removed Q4_2 (id 4) is unknown too.
    assert!(matches!(
        p(&one(4, &[32])),
        Err(GgufError::UnknownGgmlType { .. })
    ));
    // q4_0 rows must be whole 32-element blocks.
    assert!(matches!(
        p(&one(2, &[16, 2])),
        Err(GgufError::PartialBlock { row: 16, .. })
    ));
    let g = p(&one(2, &[64, 3])).expect("q4_0");
    assert_eq!(g.tensors[0].nbytes, 2 * 3 * 18);
    assert_eq!(g.tensors[0].shape(), vec![3, 64]);
}

//! ggml tensor data types: ids as stored in GGUF tensor infos, block sizes and byte sizes.
//! Numbers from ggml's `ggml.h` (`enum ggml_type`) and `ggml.c` (`type_traits`).

/// A ggml tensor data type. Quantized types store `block_size` elements in `type_size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[allow(non_camel_case_types, missing_docs)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

/// Every type with its ggml id, elements per block, bytes per block and name.
const TABLE: &[(GgmlType, u32, usize, usize, &str)] = &[
    (GgmlType::F32, 0, 1, 4, "f32"),
    (GgmlType::F16, 1, 1, 2, "f16"),
    (GgmlType::Q4_0, 2, 32, 18, "q4_0"),
    (GgmlType::Q4_1, 3, 32, 20, "q4_1"),
    (GgmlType::Q5_0, 6, 32, 22, "q5_0"),
    (GgmlType::Q5_1, 7, 32, 24, "q5_1"),
    (GgmlType::Q8_0, 8, 32, 34, "q8_0"),
    (GgmlType::Q8_1, 9, 32, 36, "q8_1"),
    (GgmlType::Q2_K, 10, 256, 84, "q2_K"),
    (GgmlType::Q3_K, 11, 256, 110, "q3_K"),
    (GgmlType::Q4_K, 12, 256, 144, "q4_K"),
    (GgmlType::Q5_K, 13, 256, 176, "q5_K"),
    (GgmlType::Q6_K, 14, 256, 210, "q6_K"),
    (GgmlType::Q8_K, 15, 256, 292, "q8_K"),
    (GgmlType::IQ2_XXS, 16, 256, 66, "iq2_xxs"),
    (GgmlType::IQ2_XS, 17, 256, 74, "iq2_xs"),
    (GgmlType::IQ3_XXS, 18, 256, 98, "iq3_xxs"),
    (GgmlType::IQ1_S, 19, 256, 50, "iq1_s"),
    (GgmlType::IQ4_NL, 20, 32, 18, "iq4_nl"),
    (GgmlType::IQ3_S, 21, 256, 110, "iq3_s"),
    (GgmlType::IQ2_S, 22, 256, 82, "iq2_s"),
    (GgmlType::IQ4_XS, 23, 256, 136, "iq4_xs"),
    (GgmlType::I8, 24, 1, 1, "i8"),
    (GgmlType::I16, 25, 1, 2, "i16"),
    (GgmlType::I32, 26, 1, 4, "i32"),
    (GgmlType::I64, 27, 1, 8, "i64"),
    (GgmlType::F64, 28, 1, 8, "f64"),
    (GgmlType::IQ1_M, 29, 256, 56, "iq1_m"),
    (GgmlType::BF16, 30, 1, 2, "bf16"),
    (GgmlType::TQ1_0, 34, 256, 54, "tq1_0"),
    (GgmlType::TQ2_0, 35, 256, 66, "tq2_0"),
    (GgmlType::MXFP4, 39, 32, 17, "mxfp4"),
];

impl GgmlType {
    fn row(self) -> &'static (GgmlType, u32, usize, usize, &'static str) {
        TABLE
            .iter()
            .find(|r| r.0 == self)
            .expect("every GgmlType has a table row")
    }

    /// The type for a ggml id read from a file; `None` for an id this tool does not know.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TABLE.iter().find(|r| r.1 == id).map(|r| r.0)
    }

    /// The ggml id stored in GGUF tensor infos.
    pub fn id(self) -> u32 {
        self.row().1
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> usize {
        self.row().2
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.row().3
    }

    /// ggml's name for the type (`q4_K`, `f16`, ...).
    pub fn name(self) -> &'static str {
        self.row().4
    }

    /// Whether the type is block-quantized.
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes for one row of `n` elements, or `None` when `n` is not a whole number of blocks
    /// or the size overflows.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_size()) {
            return None;
        }
        (n / self.block_size()).checked_mul(self.type_size())
    }

    /// Bytes for a tensor of `shape` (any order), `None` on overflow or partial blocks.
    pub fn tensor_bytes(self, shape: &[usize]) -> Option<usize> {
        let n = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
        self.row_bytes(n)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

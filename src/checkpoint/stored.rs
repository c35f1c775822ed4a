//! A tensor in the precision its checkpoint stores it in (f32, f16, bf16 or ggml quantized
//! blocks), dequantized a run of rows at a time on demand.
//!
//! The bytes stay where they are: a checkpoint's tensors borrow its memory map (shared, so the
//! tensor outlives the [`super::Checkpoint`] value), and other sources hand over f32 values they
//! own or share (a stand-in's weights, held once for its plan and the graphs that read it). Rows
//! are addressed in Hugging Face order whatever order the file stores them in.

use std::sync::Arc;

use memmap2::Mmap;

use super::{dequantize_into, RowOrder};
use crate::gguf::GgmlType;

/// Where a stored tensor's bytes live.
#[derive(Clone)]
enum Bytes {
    /// A range of a checkpoint file's memory map.
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    /// Bytes owned by the tensor (f32 values handed over by a source that computed them).
    Owned(Arc<[u8]>),
    /// f32 values shared with whoever else holds them, not copied (a stand-in's weights).
    Values(Arc<[f32]>),
}

impl Bytes {
    /// The stored bytes; `None` for values held as f32.
    fn as_slice(&self) -> Option<&[u8]> {
        match self {
            Bytes::Mapped { map, start, len } => Some(&map[*start..*start + *len]),
            Bytes::Owned(bytes) => Some(bytes),
            Bytes::Values(_) => None,
        }
    }

    /// The size in bytes.
    fn len(&self) -> usize {
        match self {
            Bytes::Values(values) => 4 * values.len(),
            bytes => bytes.as_slice().map_or(0, <[u8]>::len),
        }
    }
}

/// A matrix `(rows, cols)` (or a vector, one row) in its stored data type, read by rows in
/// Hugging Face row order.
#[derive(Clone)]
pub struct StoredTensor {
    name: String,
    dtype: GgmlType,
    shape: Vec<usize>,
    bytes: Bytes,
    /// The stored row holding each Hugging Face row, when the file permutes rows.
    stored_row: Option<Arc<[u32]>>,
}

impl std::fmt::Debug for StoredTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredTensor")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl StoredTensor {
    /// A tensor over `len` bytes of `map` from `start`, rows ordered as `row_order` says.
    /// The caller has checked that the range lies in the map and holds `shape` of `dtype`.
    pub(super) fn mapped(
        name: &str,
        dtype: GgmlType,
        shape: &[usize],
        row_order: RowOrder,
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    ) -> Self {
        let rows = shape.first().copied().unwrap_or(1);
        let stored_row = match row_order {
            RowOrder::Hf => None,
            RowOrder::RopeInterleaved { n_head } => Some(rope_stored_rows(rows, n_head)),
        };
        StoredTensor {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            bytes: Bytes::Mapped { map, start, len },
            stored_row,
        }
    }

    /// A tensor of f32 `values` in Hugging Face layout.
    pub fn from_f32(name: &str, shape: &[usize], values: &[f32]) -> Self {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        StoredTensor {
            name: name.to_string(),
            dtype: GgmlType::F32,
            shape: shape.to_vec(),
            bytes: Bytes::Owned(bytes.into()),
            stored_row: None,
        }
    }

    /// A tensor of f32 `values` in Hugging Face layout that shares them instead of copying them;
    /// an error says when their count is not what `shape` holds.
    pub fn shared_f32(name: &str, shape: &[usize], values: Arc<[f32]>) -> Result<Self, String> {
        let expected: usize = shape.iter().product();
        if values.len() != expected {
            return Err(format!(
                "{name}: {} values where shape {shape:?} holds {expected}",
                values.len()
            ));
        }
        Ok(StoredTensor {
            name: name.to_string(),
            dtype: GgmlType::F32,
            shape: shape.to_vec(),
            bytes: Bytes::Values(values),
            stored_row: None,
        })
    }

    /// A tensor of `shape` from its stored `bytes` of `dtype`, in Hugging Face layout; an error
    /// says when the bytes are not what the type and shape take.
    pub fn from_bytes(
        name: &str,
        dtype: GgmlType,
        shape: &[usize],
        bytes: Vec<u8>,
    ) -> Result<Self, String> {
        let expected = dtype.tensor_bytes(shape);
        if expected != Some(bytes.len()) {
            return Err(format!(
                "{name}: {} bytes where shape {shape:?} of {dtype} takes {expected:?}",
                bytes.len()
            ));
        }
        Ok(StoredTensor {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            bytes: Bytes::Owned(bytes.into()),
            stored_row: None,
        })
    }

    /// The GGUF name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stored data type.
    pub fn dtype(&self) -> GgmlType {
        self.dtype
    }

    /// The shape in torch order.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Rows: the first dimension (1 for a scalar).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Values per row: the product of the dimensions after the first.
    pub fn cols(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// The stored size in bytes.
    pub fn n_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the bytes are the file's own (mapped) rather than owned by this tensor.
    pub fn is_mapped(&self) -> bool {
        matches!(self.bytes, Bytes::Mapped { .. })
    }

    /// The stored bytes of one row; the caller has checked `row < rows`.
    fn row_bytes(&self, row: usize) -> Result<&[u8], String> {
        let cols = self.cols();
        let n = self
            .dtype
            .row_bytes(cols)
            .ok_or_else(|| format!("{cols} values are not whole {} blocks", self.dtype))?;
        let stored = match &self.stored_row {
            Some(map) => map[row] as usize,
            None => row,
        };
        let bytes = self
            .bytes
            .as_slice()
            .ok_or("the values are held as f32, not as bytes")?;
        bytes
            .get(stored * n..(stored + 1) * n)
            .ok_or_else(|| format!("row {stored} lies past the tensor's {} bytes", bytes.len()))
    }

    /// Rows `first..first + out.len() / cols` as f32 into `out`.
    pub fn rows_into(&self, first: usize, out: &mut [f32]) -> Result<(), String> {
        let cols = self.cols().max(1);
        let n = out.len() / cols;
        if out.len() != n * cols || first + n > self.rows() {
            return Err(format!(
                "{}: rows {first}..{} of {} asked into {} values",
                self.name,
                first + n,
                self.rows(),
                out.len()
            ));
        }
        let in_error = |e: String| format!("{}: {e}", self.name);
        let bytes = match &self.bytes {
            Bytes::Values(values) => {
                out.copy_from_slice(&values[first * cols..(first + n) * cols]);
                return Ok(());
            }
            bytes => bytes.as_slice().unwrap_or_default(),
        };
        if self.stored_row.is_none() {
            // the rows from `first` on lie one after another
            let row_len = self
                .dtype
                .row_bytes(cols)
                .ok_or_else(|| in_error(format!("{cols} values are not whole blocks")))?;
            let run = bytes
                .get(first * row_len..(first + n) * row_len)
                .ok_or_else(|| in_error(format!("rows past the tensor's {} bytes", bytes.len())))?;
            return dequantize_into(self.dtype, run, out).map_err(in_error);
        }
        for (i, row) in out.chunks_exact_mut(cols).enumerate() {
            dequantize_into(
                self.dtype,
                self.row_bytes(first + i).map_err(in_error)?,
                row,
            )
            .map_err(in_error)?;
        }
        Ok(())
    }

    /// The rows `ids` as f32, one after another; every id must be below [`Self::rows`].
    pub fn gather(&self, ids: &[u32]) -> Result<Vec<f32>, String> {
        let cols = self.cols();
        let mut out = vec![0f32; ids.len() * cols];
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(cols.max(1))) {
            if id as usize >= self.rows() {
                return Err(format!(
                    "{}: row {id} asked of {} rows",
                    self.name,
                    self.rows()
                ));
            }
            self.rows_into(id as usize, row)?;
        }
        Ok(out)
    }

    /// Every value as f32, in Hugging Face layout.
    pub fn to_f32(&self) -> Result<Vec<f32>, String> {
        let mut out = vec![0f32; self.rows() * self.cols().max(1)];
        self.rows_into(0, &mut out)?;
        Ok(out)
    }
}

/// For a q or k projection of `rows` rows stored in llama.cpp's interleaved rope order for
/// `n_head` heads, the stored row of each Hugging Face row.
fn rope_stored_rows(rows: usize, n_head: usize) -> Arc<[u32]> {
    let head_dim = rows / n_head.max(1);
    let half = head_dim / 2;
    let mut stored = (0..rows as u32).collect::<Vec<_>>();
    for h in 0..n_head {
        for j in 0..half {
            for k in 0..2 {
                stored[h * head_dim + k * half + j] = (h * head_dim + 2 * j + k) as u32;
            }
        }
    }
    stored.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::permute_rope_rows;

    #[test]
    fn rope_rows_read_back_in_hf_order() {
        // 2 heads of 4 rows, 3 values per row: HF row r holds r * 10 + c
        let (rows, cols, n_head) = (8, 3, 2);
        let hf: Vec<f32> = (0..rows * cols)
            .map(|i| ((i / cols) * 10 + i % cols) as f32)
            .collect();
        let hf_bytes: Vec<u8> = hf.iter().flat_map(|v| v.to_le_bytes()).collect();
        let gguf = permute_rope_rows(&hf_bytes, cols * 4, n_head, true);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        std::fs::write(&path, &gguf).unwrap();
        let map = Arc::new(super::super::map_file(&path).unwrap());
        let t = StoredTensor::mapped(
            "blk.0.attn_q.weight",
            GgmlType::F32,
            &[rows, cols],
            RowOrder::RopeInterleaved { n_head },
            map,
            0,
            gguf.len(),
        );
        assert_eq!(t.to_f32().unwrap(), hf);
        let mut two = vec![0f32; 2 * cols];
        t.rows_into(5, &mut two).unwrap();
        assert_eq!(two, hf[5 * cols..7 * cols]);
        assert_eq!(t.gather(&[7, 0]).unwrap()[..cols], hf[7 * cols..]);
        assert!(t
            .gather(&[8])
            .unwrap_err()
            .contains("row 8 asked of 8 rows"));
        assert!(t.rows_into(7, &mut two).is_err());
    }

    #[test]
    fn shared_values_are_read_where_they_lie_and_a_wrong_count_is_refused() {
        let (rows, cols) = (5, 3);
        let values: Arc<[f32]> = (0..rows * cols).map(|i| i as f32 * 0.5).collect();
        let t =
            StoredTensor::shared_f32("blk.2.stand_in", &[rows, cols], Arc::clone(&values)).unwrap();
        // held once: the tensor and the caller share the values
        assert_eq!(Arc::strong_count(&values), 2);
        assert_eq!(t.n_bytes(), 4 * rows * cols);
        assert_eq!(t.to_f32().unwrap(), values.to_vec());
        let mut two = vec![0f32; 2 * cols];
        t.rows_into(3, &mut two).unwrap();
        assert_eq!(two, values[3 * cols..5 * cols]);
        assert_eq!(t.gather(&[4, 1]).unwrap()[cols..], values[cols..2 * cols]);
        assert!(t.rows_into(4, &mut two).is_err());
        let err = StoredTensor::shared_f32("blk.2.stand_in", &[rows, 4], values).unwrap_err();
        assert_eq!(err, "blk.2.stand_in: 15 values where shape [5, 4] holds 20");
    }
}

//! Reading the file's fields: a cursor of little-endian reads whose every short read names what
//! was being read, and the key-values' values (type tags, scalars, strings and arrays within the
//! caps of [`consts`](crate::gguf::consts)).

use std::path::Path;

use super::GgufError;
use crate::gguf::consts::{MAX_ARRAY_LEN, MAX_STRING_LEN};
use crate::gguf::{Value, ValueType};

/// What a read is for, formatted only when it fails.
#[derive(Clone, Copy)]
pub(super) enum What<'k> {
    /// A header field.
    Field(&'static str),
    /// The key of the key-value at this index.
    Key(u64),
    /// The type tag of this key.
    Type(&'k str),
    /// The value of this key.
    Value(&'k str),
    /// The name of the tensor info at this index.
    TensorName(u64),
    /// The rest of this tensor's info.
    TensorInfo(&'k str),
}

impl std::fmt::Display for What<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            What::Field(name) => f.write_str(name),
            What::Key(i) => write!(f, "the key of key-value #{i}"),
            What::Type(key) => write!(f, "the type of key {key:?}"),
            What::Value(key) => write!(f, "the value of key {key:?}"),
            What::TensorName(i) => write!(f, "the name of tensor #{i}"),
            What::TensorInfo(name) => write!(f, "the info of tensor {name:?}"),
        }
    }
}

/// Reads little-endian fields from a byte buffer, turning every short read into
/// [`GgufError::Truncated`] that names what was being read.
pub(super) struct Cursor<'a> {
    pub(super) buf: &'a [u8],
    pub(super) pos: usize,
    pub(super) path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn truncated(&self, what: What<'_>, needed: u64) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            what: what.to_string(),
            offset: self.pos as u64,
            needed,
            file_len: self.buf.len() as u64,
        }
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: u64, what: What<'_>) -> Result<&'a [u8], GgufError> {
        let bytes = usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.remaining())
            .and_then(|n| self.buf.get(self.pos..self.pos + n))
            .ok_or_else(|| self.truncated(what, n))?;
        self.pos += bytes.len();
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: What<'_>) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: What<'_>) -> Result<u8, GgufError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(super) fn u32(&mut self, what: What<'_>) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self, what: What<'_>) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A u64 length then that many UTF-8 bytes; the length is checked against `max` before the
    /// bytes are touched.
    pub(super) fn string(&mut self, max: usize, what: What<'_>) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        if len > max as u64 {
            return Err(GgufError::StringTooLong {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                len,
                max,
            });
        }
        let start = self.pos as u64;
        let bytes = self.take(len, what)?;
        let s = std::str::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 {
            path: self.path.to_path_buf(),
            what: what.to_string(),
            offset: start,
        })?;
        Ok(s.to_string())
    }
}

/// The value type for a tag read from the file.
pub(super) fn value_type(id: u32) -> Option<ValueType> {
    Some(match id {
        0 => ValueType::U8,
        1 => ValueType::I8,
        2 => ValueType::U16,
        3 => ValueType::I16,
        4 => ValueType::U32,
        5 => ValueType::I32,
        6 => ValueType::F32,
        7 => ValueType::Bool,
        8 => ValueType::String,
        9 => ValueType::Array,
        10 => ValueType::U64,
        11 => ValueType::I64,
        12 => ValueType::F64,
        _ => return None,
    })
}

/// The fewest bytes one value of a type takes in the file, to refuse an array count that the
/// rest of the file cannot hold before allocating for it.
fn min_encoded_len(ty: ValueType) -> u64 {
    match ty {
        ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
        ValueType::U16 | ValueType::I16 => 2,
        ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
        ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::String => 8,
        ValueType::Array => 12,
    }
}

/// Reads one value of type `ty` for `key`; `depth` is how many arrays enclose it.
pub(super) fn read_value(
    cur: &mut Cursor<'_>,
    ty: ValueType,
    key: &str,
    depth: u8,
) -> Result<Value, GgufError> {
    let what = What::Value(key);
    Ok(match ty {
        ValueType::U8 => Value::U8(cur.u8(what)?),
        ValueType::I8 => Value::I8(i8::from_le_bytes(cur.array(what)?)),
        ValueType::U16 => Value::U16(u16::from_le_bytes(cur.array(what)?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(cur.array(what)?)),
        ValueType::U32 => Value::U32(cur.u32(what)?),
        ValueType::I32 => Value::I32(i32::from_le_bytes(cur.array(what)?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(cur.array(what)?)),
        ValueType::U64 => Value::U64(cur.u64(what)?),
        ValueType::I64 => Value::I64(i64::from_le_bytes(cur.array(what)?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(cur.array(what)?)),
        ValueType::Bool => match cur.u8(what)? {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            byte => {
                return Err(GgufError::InvalidBool {
                    path: cur.path.to_path_buf(),
                    key: key.to_string(),
                    byte,
                })
            }
        },
        ValueType::String => Value::String(cur.string(MAX_STRING_LEN, what)?),
        ValueType::Array => {
            let type_id = cur.u32(what)?;
            let elem = value_type(type_id).ok_or_else(|| GgufError::UnknownValueType {
                path: cur.path.to_path_buf(),
                key: key.to_string(),
                type_id,
            })?;
            if elem == ValueType::Array && depth > 0 {
                return Err(GgufError::NestedArrayTooDeep {
                    path: cur.path.to_path_buf(),
                    key: key.to_string(),
                });
            }
            let len = cur.u64(what)?;
            if len > MAX_ARRAY_LEN as u64 {
                return Err(GgufError::ArrayTooLong {
                    path: cur.path.to_path_buf(),
                    key: key.to_string(),
                    len,
                    max: MAX_ARRAY_LEN,
                });
            }
            // len <= MAX_ARRAY_LEN and the minimum size is at most 12, so this cannot overflow.
            let least = len * min_encoded_len(elem);
            if least > cur.remaining() as u64 {
                return Err(cur.truncated(what, least));
            }
            let mut items = Vec::with_capacity(len as usize);
            for _ in 0..len {
                items.push(read_value(cur, elem, key, depth + 1)?);
            }
            Value::Array(elem, items)
        }
    })
}

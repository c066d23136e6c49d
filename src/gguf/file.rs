//! GGUF v3 reader and writer (our own: candle's writer knows only its built-in types, not Q2_0).
//!
//! Layout: magic "GGUF", version u32, tensor count u64, metadata count u64, metadata
//! (key string, value type u32, value), tensor infos (name, n_dims u32, dims u64 x n with the
//! contiguous dim first, ggml type u32, data offset u64), padding to `general.alignment` (32),
//! then the tensor data, each tensor aligned. Strings are u64 length + UTF-8 bytes.
//!
//! The reader checks everything against the file size before allocating: a corrupted count or
//! length is an error naming the field, never a panic or a giant allocation.

use crate::error::{Error, Result};
use crate::quant::codec::Packing;
use candle_core::quantized::GgmlDType;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const ALIGNMENT: usize = 32;

pub const GGML_F32: u32 = 0;
pub const GGML_F16: u32 = 1;
pub const GGML_BF16: u32 = 30;

/// The llama.cpp quantized types candle decodes (ggml type id -> candle's type): tern reads
/// them as f32 latents through candle; its own ternary types it decodes itself.
pub fn candle_type(ggml_type: u32) -> Option<GgmlDType> {
    Some(match ggml_type {
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        _ => return None,
    })
}

/// llama.cpp's name of a ggml type id, for messages.
pub fn type_name(ggml_type: u32) -> String {
    let known = match ggml_type {
        GGML_F32 => "F32",
        GGML_F16 => "F16",
        GGML_BF16 => "BF16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        t if Packing::from_ggml_type(t) == Some(Packing::Q2_0) => "Q2_0",
        t if Packing::from_ggml_type(t) == Some(Packing::PQ2_0) => "PQ2_0",
        _ => return format!("unknown ({ggml_type})"),
    };
    format!("{known} ({ggml_type})")
}

/// The types tern reads, for messages.
pub const READABLE_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K..Q8_K, Q2_0 (42), PQ2_0 (142)";

/// Bytes of `n` elements of a ggml type (None for types tern does not read).
pub fn type_size(ggml_type: u32, n: u64) -> Option<u64> {
    match ggml_type {
        GGML_F32 => Some(n * 4),
        GGML_F16 | GGML_BF16 => Some(n * 2),
        t => {
            let (block, bytes) = match (Packing::from_ggml_type(t), candle_type(t)) {
                (Some(p), _) => (p.block() as u64, p.block_bytes() as u64),
                (None, Some(c)) => (c.block_size() as u64, c.type_size() as u64),
                (None, None) => return None,
            };
            n.is_multiple_of(block).then(|| n / block * bytes)
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Element type id and elements.
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(..) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(x) => Some(x as u64),
            Value::U16(x) => Some(x as u64),
            Value::U32(x) => Some(x as u64),
            Value::U64(x) => Some(x),
            Value::I32(x) if x >= 0 => Some(x as u64),
            Value::I64(x) if x >= 0 => Some(x as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => Some(x as f64),
            Value::F64(x) => Some(x),
            _ => self.as_u64().map(|x| x as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn strings(items: impl IntoIterator<Item = String>) -> Value {
        Value::Array(8, items.into_iter().map(Value::Str).collect())
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: dims[0] is the contiguous (column) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// (rows, cols) of a 1-D or 2-D tensor.
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = self.dims.first().copied().unwrap_or(1) as usize;
        (self.elements() as usize / cols.max(1), cols)
    }
}

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub data_offset: usize,
    /// The whole file: memory-mapped when read from disk.
    pub bytes: FileBytes,
}

/// A GGUF file's bytes: mapped read-only from disk (loading touches only what it reads, and
/// the pages are the page cache's, not a copy), or owned (a file just written, tests).
pub enum FileBytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, what: &str) -> Error {
        Error::Msg(format!(
            "GGUF {}: {what} (at byte {})",
            self.path.display(),
            self.pos
        ))
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.b.len() - self.pos {
            return Err(self.err(&format!("file ends inside {what} (needs {n} more bytes)")));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    /// A count that must fit in the rest of the file at `min_bytes` per item.
    fn count(&mut self, what: &str, min_bytes: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let rest = (self.b.len() - self.pos) as u64;
        if n > rest / min_bytes.max(1) as u64 {
            return Err(self.err(&format!("{what} = {n} cannot fit in the {rest} bytes left")));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(&format!("length of {what}"), 1)?;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| self.err(&format!("{what} is not UTF-8")))
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.take(1, key)?[0]),
            1 => Value::I8(self.take(1, key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(
                self.take(2, key)?.try_into().expect("2"),
            )),
            3 => Value::I16(i16::from_le_bytes(
                self.take(2, key)?.try_into().expect("2"),
            )),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(self.u32(key)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(key)?)),
            7 => Value::Bool(self.take(1, key)?[0] != 0),
            8 => Value::Str(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(self.err(&format!("'{key}': arrays nested too deep")));
                }
                let et = self.u32(key)?;
                let n = self.count(&format!("length of array '{key}'"), 1)?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(et, key, depth + 1)?);
                }
                Value::Array(et, v)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(self.u64(key)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(key)?)),
            t => return Err(self.err(&format!("metadata '{key}' has unknown value type {t}"))),
        })
    }
}

impl GgufFile {
    /// Maps the file read-only and parses its header.
    pub fn read(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: mapped read-only; tern never writes a file it has mapped (exports are written
        // under a temporary name and renamed). Another process truncating the file while it is
        // mapped would make reads fault, as with any mmap-based loader (llama.cpp's included).
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        Self::parse_bytes(path, FileBytes::Mapped(map))
    }

    /// Parses a GGUF held in memory.
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::parse_bytes(path, FileBytes::Owned(bytes))
    }

    fn parse_bytes(path: &Path, bytes: FileBytes) -> Result<Self> {
        let mut r = Reader {
            b: &bytes[..],
            pos: 0,
            path,
        };
        if r.take(4, "magic")
            .map_err(|_| r.err("too short for a GGUF header"))?
            != MAGIC
        {
            return Err(Error::Msg(format!(
                "GGUF {}: bad magic (not a GGUF file)",
                path.display()
            )));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(r.err(&format!(
                "unsupported GGUF version {version} (expected 2 or 3)"
            )));
        }
        let n_tensors = r.count("tensor count", 24)?;
        let n_kv = r.count("metadata count", 13)?;
        let mut metadata = Vec::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32(&key)?;
            let v = r.value(ty, &key, 0)?;
            metadata.push((key, v));
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let nd = r.u32(&name)? as usize;
            if nd == 0 || nd > 4 {
                return Err(r.err(&format!(
                    "tensor '{name}' has {nd} dimensions (expected 1..=4)"
                )));
            }
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                dims.push(r.u64(&name)?);
            }
            let ggml_type = r.u32(&name)?;
            let offset = r.u64(&name)?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let align = metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .unwrap_or(ALIGNMENT as u64) as usize;
        if align == 0 || !align.is_power_of_two() {
            return Err(r.err(&format!(
                "general.alignment = {align} is not a power of two"
            )));
        }
        let data_offset = r.pos.div_ceil(align) * align;
        for t in &tensors {
            let n = t.dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let size = match n {
                None => {
                    return Err(r.err(&format!("tensor '{}': dims {:?} overflow", t.name, t.dims)))
                }
                Some(n) => type_size(t.ggml_type, n).ok_or_else(|| {
                    let why = if candle_type(t.ggml_type).is_some()
                        || Packing::from_ggml_type(t.ggml_type).is_some()
                    {
                        format!("{n} elements are not a whole number of its blocks")
                    } else {
                        format!("tern reads {READABLE_TYPES}")
                    };
                    Error::Msg(format!(
                        "GGUF {}: tensor '{}' has type {}: {why}",
                        path.display(),
                        t.name,
                        type_name(t.ggml_type)
                    ))
                })?,
            };
            let end = (data_offset as u64)
                .checked_add(t.offset)
                .and_then(|x| x.checked_add(size));
            if end.is_none_or(|e| e > bytes.len() as u64) {
                return Err(Error::Msg(format!(
                    "GGUF {}: tensor '{}' data ({size} bytes at offset {}) runs past the end of the file ({} bytes): \
                     truncated?",
                    path.display(),
                    t.name,
                    t.offset,
                    bytes.len()
                )));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_offset,
            bytes,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        let start = self.data_offset + t.offset as usize;
        let size = type_size(t.ggml_type, t.elements()).expect("checked at parse") as usize;
        &self.bytes[start..start + size]
    }
}

/// Collects metadata and tensors, then writes a GGUF v3 file atomically.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::Str(s) => put_string(out, s),
        Value::Array(et, items) => {
            out.extend_from_slice(&et.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

impl GgufWriter {
    pub fn meta(&mut self, key: &str, v: Value) {
        self.metadata.push((key.to_string(), v));
    }

    /// Adds a tensor: `dims` in ggml order (contiguous dim first), raw data of `ggml_type`.
    pub fn tensor(&mut self, name: &str, dims: Vec<u64>, ggml_type: u32, data: Vec<u8>) {
        self.tensors.push((name.to_string(), dims, ggml_type, data));
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64 + 1).to_le_bytes());
        put_string(&mut out, "general.alignment");
        out.extend_from_slice(&4u32.to_le_bytes());
        out.extend_from_slice(&(ALIGNMENT as u32).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for (name, dims, ty, data) in &self.tensors {
            put_string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(ALIGNMENT as u64) * ALIGNMENT as u64;
        }
        out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
        for (_, _, _, data) in &self.tensors {
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
        }
        out
    }

    pub fn write(&self, path: &Path) -> Result<u64> {
        let bytes = self.to_bytes();
        crate::files::write_atomic(path, &bytes)?;
        Ok(bytes.len() as u64)
    }
}

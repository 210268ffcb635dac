//! Reading the float tensors stored in a TorchScript archive, buffers included.
//!
//! tch 0.26 exposes a module's parameters but not its buffers (no `named_buffers`, no
//! attribute access on a `CModule`), and CLP needs BatchNorm's `running_var`. A
//! TorchScript archive is a zip whose `data.pkl` pickles the module tree: each module is
//! an object whose state dict maps attribute names to submodules or to tensors rebuilt by
//! `torch._utils._rebuild_tensor_v2` from a storage stored raw under `data/<key>`. This
//! module runs the small subset of the pickle machine that file uses and returns every
//! float32 tensor under its dotted module path (`features.1.running_var`). It only reads:
//! nothing in the archive is executed. Pure Rust apart from building the result tensors.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use tch::Tensor;

use super::error::EngineError;

#[derive(Debug, Clone)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String),
    Object(Vec<(Value, Value)>),
    Persistent(Box<Value>),
    Tensor(TensorRef),
    Opaque,
    Mark,
}

#[derive(Debug, Clone)]
struct TensorRef {
    storage_class: String,
    key: String,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

fn bad(why: impl std::fmt::Display) -> EngineError {
    EngineError::InvalidInput(format!("model archive: {why}"))
}

/// Every float32 tensor (parameters and buffers) of the archive at `path`, by dotted name.
pub fn read_float_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>, EngineError> {
    let mut archive = TensorArchive::open(path)?;
    let mut out = BTreeMap::new();
    for (name, r) in std::mem::take(&mut archive.tensors) {
        if r.storage_class != "FloatStorage" {
            continue;
        }
        let bytes = archive.read(&format!("{}data/{}", archive.prefix, r.key))?;
        let storage: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(name, gather(&storage, &r)?);
    }
    Ok(out)
}

/// The dotted names of every tensor (parameters and buffers) the archive at `path`
/// stores, read from its module tree alone: no tensor data is read.
pub fn tensor_names(path: &Path) -> Result<Vec<String>, EngineError> {
    Ok(TensorArchive::open(path)?
        .tensors
        .into_iter()
        .map(|(name, _)| name)
        .collect())
}

/// An opened archive with its unpickled module tree's tensors, their data not yet read.
struct TensorArchive {
    zip: zip::ZipArchive<std::fs::File>,
    /// The archive's top folder, where `data.pkl` and `data/` are.
    prefix: String,
    tensors: Vec<(String, TensorRef)>,
}

impl TensorArchive {
    fn open(path: &Path) -> Result<Self, EngineError> {
        let file =
            std::fs::File::open(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
        let zip = zip::ZipArchive::new(file).map_err(|e| bad(format!("not a zip: {e}")))?;
        let pickle_name = zip
            .file_names()
            .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .map(str::to_string)
            .ok_or_else(|| bad("no data.pkl"))?;
        let mut archive = TensorArchive {
            zip,
            prefix: pickle_name.trim_end_matches("data.pkl").to_string(),
            tensors: Vec::new(),
        };
        let root = unpickle(&archive.read(&pickle_name)?)?;
        collect_tensors(&root, "", &mut archive.tensors);
        Ok(archive)
    }

    fn read(&mut self, name: &str) -> Result<Vec<u8>, EngineError> {
        let mut entry = self
            .zip
            .by_name(name)
            .map_err(|e| bad(format!("{name}: {e}")))?;
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("{name}: {e}")))?;
        Ok(bytes)
    }
}

/// The strided view `r` of `storage` as a contiguous tensor.
fn gather(storage: &[f32], r: &TensorRef) -> Result<Tensor, EngineError> {
    let numel: i64 = r.size.iter().product();
    let mut values = Vec::with_capacity(numel.max(0) as usize);
    let mut index = vec![0i64; r.size.len()];
    for _ in 0..numel {
        let at = r.offset + index.iter().zip(&r.stride).map(|(i, s)| i * s).sum::<i64>();
        values.push(
            *storage
                .get(at as usize)
                .ok_or_else(|| bad(format!("tensor view outside storage {}", r.key)))?,
        );
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < r.size[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Ok(Tensor::from_slice(&values).f_reshape(&r.size)?)
}

fn collect_tensors(value: &Value, prefix: &str, out: &mut Vec<(String, TensorRef)>) {
    let Value::Object(state) = value else {
        return;
    };
    for (key, item) in state {
        let Value::Str(key) = key else { continue };
        let name = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match item {
            Value::Tensor(r) => out.push((name, r.clone())),
            Value::Object(_) => collect_tensors(item, &name, out),
            _ => {}
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], EngineError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| bad("data.pkl ends early"))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, EngineError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, EngineError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, EngineError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn line(&mut self) -> Result<String, EngineError> {
        let rest = &self.bytes[self.at..];
        let len = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| bad("data.pkl: unterminated line"))?;
        let text = String::from_utf8_lossy(&rest[..len]).into_owned();
        self.at += len + 1;
        Ok(text)
    }
    fn string(&mut self, len: usize) -> Result<String, EngineError> {
        Ok(String::from_utf8_lossy(self.take(len)?).into_owned())
    }
}

/// Most values the memo may copy in one archive. A memo reference is a copy here (the
/// values are owned trees), so a hostile pickle that stores a list and refers to it
/// twice, forty levels deep, grew past 3.7 GB from 5 KB; TorchScript's own pickles copy
/// a few strings and globals per module.
const MAX_MEMO_COPIED_VALUES: usize = 1_000_000;

struct CopyBudget {
    left: usize,
}

impl CopyBudget {
    /// Counts `value`'s nodes against the budget, stopping as soon as it is spent.
    fn charge(&mut self, value: &Value) -> Result<(), EngineError> {
        let mut pending = vec![value];
        while let Some(v) = pending.pop() {
            self.left = self.left.checked_sub(1).ok_or_else(|| {
                bad(format!(
                    "data.pkl: memo references copy more than {MAX_MEMO_COPIED_VALUES} values"
                ))
            })?;
            match v {
                Value::Tuple(items) | Value::List(items) => pending.extend(items),
                Value::Dict(pairs) | Value::Object(pairs) => {
                    pending.extend(pairs.iter().flat_map(|(k, v)| [k, v]))
                }
                Value::Persistent(inner) => pending.push(inner),
                _ => {}
            }
        }
        Ok(())
    }
}

/// Runs the pickle opcodes TorchScript's pickler writes and returns the root object.
fn unpickle(bytes: &[u8]) -> Result<Value, EngineError> {
    let mut r = Reader { bytes, at: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    let mut copies = CopyBudget {
        left: MAX_MEMO_COPIED_VALUES,
    };
    let pop = |stack: &mut Vec<Value>| stack.pop().ok_or_else(|| bad("data.pkl: stack underflow"));
    let pop_mark = |stack: &mut Vec<Value>| -> Result<Vec<Value>, EngineError> {
        let mark = stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or_else(|| bad("data.pkl: missing mark"))?;
        let items = stack.split_off(mark + 1);
        stack.pop();
        Ok(items)
    };
    loop {
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?; // PROTO
            }
            b'.' => return pop(&mut stack), // STOP
            b'(' => stack.push(Value::Mark),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool),
            0x89 => stack.push(Value::Bool),
            b'K' => stack.push(Value::Int(r.u8()? as i64)),
            b'M' => stack.push(Value::Int(r.u16()? as i64)),
            b'J' => stack.push(Value::Int(r.u32()? as i32 as i64)),
            0x8a => {
                // LONG1: little-endian two's complement of n bytes.
                let n = r.u8()? as usize;
                let b = r.take(n)?;
                let mut v: i64 = 0;
                for (i, &byte) in b.iter().enumerate().take(8) {
                    v |= (byte as i64) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Value::Int(v));
            }
            b'G' => {
                r.take(8)?;
                stack.push(Value::Float);
            }
            b'X' => {
                let n = r.u32()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            0x8c => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            b'U' => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            b'T' => {
                let n = r.u32()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(Value::Global(format!("{module}.{name}")));
            }
            b')' => stack.push(Value::Tuple(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err(bad("data.pkl: stack underflow"));
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b'q' | b'r' | 0x94 => {
                let k = match op {
                    b'q' => r.u8()? as u32,
                    b'r' => r.u32()?,
                    _ => memo.len() as u32,
                };
                let top = stack.last().unwrap_or(&Value::None);
                copies.charge(top)?;
                memo.insert(k, top.clone());
            }
            b'h' | b'j' => {
                let k = if op == b'h' { r.u8()? as u32 } else { r.u32()? };
                let v = memo
                    .get(&k)
                    .ok_or_else(|| bad("data.pkl: unknown memo key"))?;
                copies.charge(v)?;
                stack.push(v.clone());
            }
            b'a' => {
                let item = pop(&mut stack)?;
                if let Some(Value::List(list)) = stack.last_mut() {
                    list.push(item);
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                if let Some(Value::List(list)) = stack.last_mut() {
                    list.extend(items);
                }
            }
            b's' => {
                let value = pop(&mut stack)?;
                let key = pop(&mut stack)?;
                if let Some(Value::Dict(d) | Value::Object(d)) = stack.last_mut() {
                    d.push((key, value));
                }
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                if let Some(Value::Dict(d)) = stack.last_mut() {
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                }
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(Value::Persistent(Box::new(pid)));
            }
            0x81 => {
                // NEWOBJ: a module (or other class) instance whose state BUILD sets.
                pop(&mut stack)?;
                pop(&mut stack)?;
                stack.push(Value::Object(Vec::new()));
            }
            b'b' => {
                let state = pop(&mut stack)?;
                if let Some(Value::Object(fields)) = stack.last_mut() {
                    if let Value::Dict(d) = state {
                        fields.extend(d);
                    }
                }
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let func = pop(&mut stack)?;
                stack.push(reduce(&func, args));
            }
            other => {
                return Err(bad(format!(
                    "data.pkl: unsupported pickle opcode 0x{other:02x}"
                )))
            }
        }
    }
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, …)` becomes a tensor reference;
/// every other call (OrderedDict(), …) an opaque value.
fn reduce(func: &Value, args: Value) -> Value {
    let Value::Global(name) = func else {
        return Value::Opaque;
    };
    if name != "torch._utils._rebuild_tensor_v2" {
        return Value::Opaque;
    }
    let Value::Tuple(args) = args else {
        return Value::Opaque;
    };
    let ints = |v: Option<&Value>| -> Option<Vec<i64>> {
        match v? {
            Value::Tuple(items) => items
                .iter()
                .map(|i| match i {
                    Value::Int(n) => Some(*n),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    };
    let parsed = (|| {
        let Value::Persistent(pid) = args.first()? else {
            return None;
        };
        let Value::Tuple(pid) = pid.as_ref() else {
            return None;
        };
        let storage_class = match pid.get(1)? {
            Value::Global(g) => g.rsplit('.').next()?.to_string(),
            _ => return None,
        };
        let key = match pid.get(2)? {
            Value::Str(s) => s.clone(),
            _ => return None,
        };
        let offset = match args.get(1)? {
            Value::Int(n) => *n,
            _ => return None,
        };
        Some(TensorRef {
            storage_class,
            key,
            offset,
            size: ints(args.get(2))?,
            stride: ints(args.get(3))?,
        })
    })();
    parsed.map_or(Value::Opaque, Value::Tensor)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A list stored in the memo, then `levels` levels of lists each holding the level
    /// below twice, by memo reference: 2^levels values once copied.
    fn doubling_pickle(levels: u32) -> Vec<u8> {
        let mut pickle = vec![0x80, 2, b']', b'r', 0, 0, 0, 0];
        for level in 1..=levels {
            pickle.extend_from_slice(b"](");
            for _ in 0..2 {
                pickle.push(b'j');
                pickle.extend_from_slice(&(level - 1).to_le_bytes());
            }
            pickle.push(b'e');
            pickle.push(b'r');
            pickle.extend_from_slice(&level.to_le_bytes());
        }
        pickle.push(b'.');
        pickle
    }

    #[test]
    fn a_pickle_whose_memo_references_double_each_level_is_refused() {
        // Under 500 bytes, 2^40 values.
        let err = unpickle(&doubling_pickle(40)).unwrap_err().to_string();
        assert!(err.contains("memo references copy more than"), "{err}");
        // Twelve levels (8,191 values) are an ordinary pickle's business.
        let small = unpickle(&doubling_pickle(12)).unwrap();
        assert!(matches!(small, Value::List(items) if items.len() == 2));
    }

    #[test]
    fn reads_parameters_and_batchnorm_buffers_of_the_fixture() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/mnist_cnn_bn.pt");
        let tensors = read_float_tensors(&path).unwrap();
        let module = tch::CModule::load(&path).unwrap();
        for (name, param) in module.named_parameters().unwrap() {
            let read = tensors
                .get(&name)
                .unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(read.size(), param.size(), "{name}");
            assert!(read.equal(&param), "{name} differs");
        }
        // A freshly initialised BatchNorm: running_var is all ones, running_mean zeros.
        let var = &tensors["features.1.running_var"];
        assert_eq!(var.size(), vec![16]);
        assert!(var.equal(&Tensor::ones([16], (tch::Kind::Float, tch::Device::Cpu))));
        assert_eq!(tensors["features.5.running_mean"].size(), vec![32]);
        // The names alone come from the module tree without reading any tensor data: every
        // float32 tensor's, plus BatchNorm's integer step counters.
        let names = tensor_names(&path).unwrap();
        assert!(tensors.keys().all(|name| names.contains(name)));
        let others: Vec<&String> = names.iter().filter(|n| !tensors.contains_key(*n)).collect();
        assert_eq!(others.len(), 2, "{others:?}");
        assert!(
            others.iter().all(|n| n.ends_with(".num_batches_tracked")),
            "{others:?}"
        );
        let plain = path.with_file_name("mnist_cnn.pt");
        assert!(!tensor_names(&plain)
            .unwrap()
            .iter()
            .any(|name| name.ends_with("running_mean")));
    }
}

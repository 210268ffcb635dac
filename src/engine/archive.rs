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

/// How many times the archive file's size the tensors read may hold together. Each
/// view is bounded by the file alone, but many names may view one storage: tied weights
/// do so a few times; a pickle naming a 100 MB storage 2,000 times would have had this
/// reader hold 200 GB for a 100 MB upload.
const MAX_READ_PER_FILE_BYTE: u64 = 8;

/// Every float32 tensor (parameters and buffers) of the archive at `path`, by dotted name.
/// Each storage is read once, as far as its farthest view reaches (views of one flat
/// storage, as some exporters write, share it); the views' values are then copied out.
pub fn read_float_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>, EngineError> {
    let mut archive = TensorArchive::open(path)?;
    let views: Vec<(String, TensorRef, u64, u64)> = std::mem::take(&mut archive.tensors)
        .into_iter()
        .filter(|(_, r)| r.storage_class == "FloatStorage")
        .map(|(name, r)| {
            let (reached, numel) = view_extent(&r, archive.file_bytes)?;
            Ok((name, r, reached, numel))
        })
        .collect::<Result<_, EngineError>>()?;
    let budget = archive.file_bytes.saturating_mul(MAX_READ_PER_FILE_BYTE);
    let mut held: u64 = 0;
    for (name, _, _, numel) in &views {
        held = held.saturating_add(numel.saturating_mul(4));
        if held > budget {
            return Err(bad(format!(
                "its tensors hold more than {MAX_READ_PER_FILE_BYTE} times the {}-byte \
                 archive's values (at `{name}`): too many names for the same storage",
                archive.file_bytes
            )));
        }
    }
    let mut reach: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, r, reached, _) in &views {
        let farthest = reach.entry(r.key.as_str()).or_default();
        *farthest = (*farthest).max(*reached);
    }
    let mut storages: BTreeMap<&str, Vec<f32>> = BTreeMap::new();
    for (key, reached) in reach {
        let entry = format!("{}data/{}", archive.prefix, key);
        // Only as much of the storage as its views reach: never more than a view was
        // allowed to declare, however far the entry inflates.
        let bytes = archive.read_prefix(&entry, reached.saturating_mul(4))?;
        let storage = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        storages.insert(key, storage);
    }
    let mut out = BTreeMap::new();
    for (name, r, _, numel) in &views {
        let storage = &storages[r.key.as_str()];
        out.insert(name.clone(), gather(storage, r, *numel)?);
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
    /// The archive file's size, a bound on what any honest tensor in it holds.
    file_bytes: u64,
    tensors: Vec<(String, TensorRef)>,
}

/// Largest `data.pkl` read. TorchScript's pickle of a module tree is kilobytes to a
/// few megabytes; the entry can be deflated, so its declared size proves nothing.
const MAX_PICKLE_BYTES: u64 = 64 << 20;

impl TensorArchive {
    fn open(path: &Path) -> Result<Self, EngineError> {
        let file =
            std::fs::File::open(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
        let file_bytes = file
            .metadata()
            .map_err(|e| bad(format!("{}: {e}", path.display())))?
            .len();
        let zip = zip::ZipArchive::new(file).map_err(|e| bad(format!("not a zip: {e}")))?;
        // The folder libtorch loads from: that of the archive's first entry. Looking for
        // the first `*/data.pkl` instead would let an archive carry a second module tree,
        // one that libtorch never loads, for this reader alone.
        let first = zip.name_for_index(0).ok_or_else(|| bad("empty zip"))?;
        let prefix = match first.find('/') {
            Some(slash) => first[..=slash].to_string(),
            None => return Err(bad(format!("{first} is not in the archive's folder"))),
        };
        let pickle_name = format!("{prefix}data.pkl");
        let mut archive = TensorArchive {
            zip,
            prefix,
            file_bytes,
            tensors: Vec::new(),
        };
        let root = unpickle(&archive.read(&pickle_name, MAX_PICKLE_BYTES)?)?;
        collect_tensors(&root, "", &mut archive.tensors);
        Ok(archive)
    }

    /// At most `limit` bytes of the entry `name`, from its start.
    fn read_up_to(&mut self, name: &str, limit: u64) -> Result<Vec<u8>, EngineError> {
        let entry = self
            .zip
            .by_name(name)
            .map_err(|e| bad(format!("{name}: {e}")))?;
        let mut bytes = Vec::new();
        entry
            .take(limit)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("{name}: {e}")))?;
        Ok(bytes)
    }

    /// The entry `name`, refused if it holds more than `limit` bytes.
    fn read(&mut self, name: &str, limit: u64) -> Result<Vec<u8>, EngineError> {
        let bytes = self.read_up_to(name, limit.saturating_add(1))?;
        if bytes.len() as u64 > limit {
            return Err(bad(format!("{name} holds more than {limit} bytes")));
        }
        Ok(bytes)
    }

    /// The first `len` bytes of the entry `name`.
    fn read_prefix(&mut self, name: &str, len: u64) -> Result<Vec<u8>, EngineError> {
        let bytes = self.read_up_to(name, len)?;
        if (bytes.len() as u64) < len {
            return Err(bad(format!("tensor view outside storage {name}")));
        }
        Ok(bytes)
    }
}

/// How many elements of its storage the view `r` reaches, with its own element count;
/// refused when either overflows, an index is negative, or the view holds more float32
/// values than `file_bytes` could store. Checked before anything is allocated: the
/// pickle that declares a view is not one libtorch has vetted.
fn view_extent(r: &TensorRef, file_bytes: u64) -> Result<(u64, u64), EngineError> {
    let refuse = || bad(format!("tensor view of storage {} is not valid", r.key));
    if r.size.len() != r.stride.len() || r.offset < 0 {
        return Err(refuse());
    }
    let mut numel: u64 = 1;
    let mut last = r.offset as u64;
    for (&size, &stride) in r.size.iter().zip(&r.stride) {
        if size < 0 || stride < 0 {
            return Err(refuse());
        }
        numel = numel.checked_mul(size as u64).ok_or_else(refuse)?;
        if size > 0 {
            let reach = (size as u64 - 1)
                .checked_mul(stride as u64)
                .ok_or_else(refuse)?;
            last = last.checked_add(reach).ok_or_else(refuse)?;
        }
    }
    let reached = if numel == 0 {
        0
    } else {
        last.checked_add(1).ok_or_else(refuse)?
    };
    // torch.jit.save stores entries uncompressed, so no honest view holds or reaches
    // more float32 values than the archive file has bytes for.
    if numel.max(reached).saturating_mul(4) > file_bytes {
        return Err(bad(format!(
            "tensor view of storage {} spans more values than the {file_bytes}-byte archive stores",
            r.key
        )));
    }
    Ok((reached, numel))
}

/// The strided view `r` of `storage` as a contiguous tensor. `numel` and the storage's
/// length come from [`view_extent`], so no index computed here overflows.
fn gather(storage: &[f32], r: &TensorRef, numel: u64) -> Result<Tensor, EngineError> {
    let mut values = Vec::with_capacity(numel as usize);
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

/// Deepest nesting of containers a pickle may build. A TorchScript module tree nests a
/// few levels per submodule; a hostile pickle of a few megabytes can nest a million
/// tuples, and dropping (or cloning, or walking) such a value recurses once per level
/// until the stack overflows.
const MAX_NESTING: u32 = 1000;

/// The pickle machine's stack, with each value's nesting depth beside it.
#[derive(Default)]
struct Stack {
    values: Vec<Value>,
    depths: Vec<u32>,
}

impl Stack {
    fn push(&mut self, value: Value) {
        self.values.push(value);
        self.depths.push(0);
    }

    fn push_nested(&mut self, value: Value, depth: u32) -> Result<(), EngineError> {
        if depth > MAX_NESTING {
            return Err(bad(format!(
                "data.pkl: values nested more than {MAX_NESTING} deep"
            )));
        }
        self.values.push(value);
        self.depths.push(depth);
        Ok(())
    }

    /// A container holding `items` (of nesting `depth`): one level deeper than they.
    fn push_container(&mut self, container: Value, depth: u32) -> Result<(), EngineError> {
        self.push_nested(container, depth + 1)
    }

    fn pop(&mut self) -> Result<(Value, u32), EngineError> {
        match (self.values.pop(), self.depths.pop()) {
            (Some(value), Some(depth)) => Ok((value, depth)),
            _ => Err(bad("data.pkl: stack underflow")),
        }
    }

    /// The top `n` values and their deepest nesting.
    fn pop_n(&mut self, n: usize) -> Result<(Vec<Value>, u32), EngineError> {
        let at = self
            .values
            .len()
            .checked_sub(n)
            .ok_or_else(|| bad("data.pkl: stack underflow"))?;
        let depth = self.depths.split_off(at).into_iter().max().unwrap_or(0);
        Ok((self.values.split_off(at), depth))
    }

    /// Everything above the topmost mark, and its deepest nesting; the mark goes too.
    fn pop_mark(&mut self) -> Result<(Vec<Value>, u32), EngineError> {
        let mark = self
            .values
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or_else(|| bad("data.pkl: missing mark"))?;
        let items = self.pop_n(self.values.len() - mark - 1)?;
        self.pop()?;
        Ok(items)
    }

    /// Puts `children` (of nesting `depth`) into the container on top, if the top is
    /// one that `put` accepts.
    fn add_to_top(
        &mut self,
        depth: u32,
        put: impl FnOnce(&mut Value) -> bool,
    ) -> Result<(), EngineError> {
        if let (Some(top), Some(top_depth)) = (self.values.last_mut(), self.depths.last_mut()) {
            if put(top) {
                *top_depth = (*top_depth).max(depth + 1);
                if *top_depth > MAX_NESTING {
                    return Err(bad(format!(
                        "data.pkl: values nested more than {MAX_NESTING} deep"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Runs the pickle opcodes TorchScript's pickler writes and returns the root object.
fn unpickle(bytes: &[u8]) -> Result<Value, EngineError> {
    let mut r = Reader { bytes, at: 0 };
    let mut stack = Stack::default();
    let mut memo: HashMap<u32, (Value, u32)> = HashMap::new();
    let mut copies = CopyBudget {
        left: MAX_MEMO_COPIED_VALUES,
    };
    loop {
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?; // PROTO
            }
            b'.' => return Ok(stack.pop()?.0), // STOP
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
                let (items, depth) = stack.pop_mark()?;
                stack.push_container(Value::Tuple(items), depth)?;
            }
            0x85..=0x87 => {
                let (items, depth) = stack.pop_n((op - 0x84) as usize)?;
                stack.push_container(Value::Tuple(items), depth)?;
            }
            b'q' | b'r' | 0x94 => {
                let k = match op {
                    b'q' => r.u8()? as u32,
                    b'r' => r.u32()?,
                    _ => memo.len() as u32,
                };
                let (top, depth) = match (stack.values.last(), stack.depths.last()) {
                    (Some(top), Some(&depth)) => (top, depth),
                    _ => (&Value::None, 0),
                };
                copies.charge(top)?;
                memo.insert(k, (top.clone(), depth));
            }
            b'h' | b'j' => {
                let k = if op == b'h' { r.u8()? as u32 } else { r.u32()? };
                let (v, depth) = memo
                    .get(&k)
                    .ok_or_else(|| bad("data.pkl: unknown memo key"))?;
                copies.charge(v)?;
                stack.push_nested(v.clone(), *depth)?;
            }
            b'a' | b'e' => {
                // APPEND one value, or APPENDS everything above the mark.
                let (items, depth) = if op == b'a' {
                    stack.pop_n(1)?
                } else {
                    stack.pop_mark()?
                };
                stack.add_to_top(depth, |top| match top {
                    Value::List(list) => {
                        list.extend(items);
                        true
                    }
                    _ => false,
                })?;
            }
            b's' => {
                let (value, value_depth) = stack.pop()?;
                let (key, key_depth) = stack.pop()?;
                stack.add_to_top(value_depth.max(key_depth), |top| match top {
                    Value::Dict(d) | Value::Object(d) => {
                        d.push((key, value));
                        true
                    }
                    _ => false,
                })?;
            }
            b'u' => {
                let (items, depth) = stack.pop_mark()?;
                stack.add_to_top(depth, |top| match top {
                    Value::Dict(d) => {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                        true
                    }
                    _ => false,
                })?;
            }
            b'Q' => {
                let (pid, depth) = stack.pop()?;
                stack.push_container(Value::Persistent(Box::new(pid)), depth)?;
            }
            0x81 => {
                // NEWOBJ: a module (or other class) instance whose state BUILD sets.
                stack.pop()?;
                stack.pop()?;
                stack.push(Value::Object(Vec::new()));
            }
            b'b' => {
                let (state, depth) = stack.pop()?;
                // The state dict's entries become the object's own: no level is added.
                stack.add_to_top(depth.saturating_sub(1), |top| match (top, state) {
                    (Value::Object(fields), Value::Dict(d)) => {
                        fields.extend(d);
                        true
                    }
                    _ => false,
                })?;
            }
            b'R' => {
                let (args, _) = stack.pop()?;
                let (func, _) = stack.pop()?;
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
    fn a_pickle_nested_deeper_than_the_limit_is_refused_not_overflowed() {
        // A million-deep tuple would overflow the stack when dropped; this one is
        // refused at the limit, and one just inside it parses.
        let nested = |levels: usize| {
            let mut pickle = vec![0x80, 2, b')'];
            pickle.extend(std::iter::repeat_n(0x85, levels));
            pickle.push(b'.');
            pickle
        };
        let err = unpickle(&nested(1_000_000)).unwrap_err().to_string();
        assert!(err.contains("nested more than"), "{err}");
        assert!(unpickle(&nested(MAX_NESTING as usize - 1)).is_ok());
        // Lists grown by APPEND count too.
        let mut appended = vec![0x80, 2];
        appended.extend(std::iter::repeat_n(b']', 5000));
        appended.extend(std::iter::repeat_n(b'a', 4999));
        appended.push(b'.');
        let err = unpickle(&appended).unwrap_err().to_string();
        assert!(err.contains("nested more than"), "{err}");
    }

    #[test]
    fn tensor_views_are_checked_against_the_archive_before_any_allocation() {
        let view = |offset: i64, size: Vec<i64>, stride: Vec<i64>| TensorRef {
            storage_class: "FloatStorage".into(),
            key: "0".into(),
            offset,
            size,
            stride,
        };
        // A 3×4 view at offset 2 reaches 14 values of its storage.
        assert_eq!(
            view_extent(&view(2, vec![3, 4], vec![4, 1]), 1000).unwrap(),
            (14, 12)
        );
        assert_eq!(
            view_extent(&view(0, vec![0, 4], vec![4, 1]), 0).unwrap(),
            (0, 0)
        );
        // 2^33 values from one stored value (stride 0): 32 GiB that libtorch's own
        // storage check lets through.
        let expanded = view(0, vec![1 << 33], vec![0]);
        assert!(view_extent(&expanded, 1 << 20).is_err());
        for hostile in [
            view(0, vec![1 << 40, 1 << 40], vec![1, 1]),
            view(i64::MAX, vec![2], vec![1]),
            view(0, vec![2], vec![i64::MAX]),
            view(-1, vec![2], vec![1]),
            view(0, vec![-2], vec![1]),
            view(0, vec![2, 2], vec![1]),
            view(i64::MAX, vec![2, 2], vec![i64::MAX, 1]),
        ] {
            assert!(view_extent(&hostile, 1 << 20).is_err(), "{hostile:?}");
        }
    }

    /// The fixture's entries rewritten into a new zip, with `extra` entries placed
    /// right after its first one.
    fn rezipped(source: &Path, extra: &[(&str, &[u8])], out: &Path) {
        let mut input = zip::ZipArchive::new(std::fs::File::open(source).unwrap()).unwrap();
        let mut writer = zip::ZipWriter::new(std::fs::File::create(out).unwrap());
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for i in 0..input.len() {
            let mut entry = input.by_index(i).unwrap();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            writer.start_file(entry.name(), stored).unwrap();
            std::io::Write::write_all(&mut writer, &bytes).unwrap();
            if i == 0 {
                for (name, bytes) in extra {
                    writer.start_file(*name, stored).unwrap();
                    std::io::Write::write_all(&mut writer, bytes).unwrap();
                }
            }
        }
        writer.finish().unwrap();
    }

    #[test]
    fn the_module_tree_is_read_from_the_folder_libtorch_loads() {
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/mnist_cnn.pt");
        let dir = tempfile::tempdir().unwrap();
        // A second tree in another folder, which libtorch (folder of the first entry)
        // never reads: a pickle of one tensor name, `planted`.
        let planted = b"\x80\x02c__torch__\nM\n)\x81}X\x07\x00\x00\x00plantedcnone\nx\n)Rsb.";
        let two_trees = dir.path().join("two_trees.pt");
        rezipped(&fixture, &[("aaa/data.pkl", planted)], &two_trees);
        assert!(tch::CModule::load(&two_trees).is_ok(), "libtorch loads it");
        assert_eq!(
            tensor_names(&two_trees).unwrap(),
            tensor_names(&fixture).unwrap()
        );
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

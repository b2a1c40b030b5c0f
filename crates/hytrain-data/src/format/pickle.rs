//! A small, bounded pickle reader for the CIFAR-10 "python version" batch files.
//!
//! Why not `serde-pickle`: it has no notion of `numpy.ndarray`. The CIFAR files hold the pixels as an array rebuilt
//! through `numpy.core.multiarray._reconstruct` and `ndarray.__setstate__` (Python 2's cPickle), or through
//! `_codecs.encode(str, 'latin1')` / `numpy._core.numeric._frombuffer` when Python 3 re-pickled them. Those are
//! `REDUCE`/`BUILD` calls on globals, which a data-only deserializer refuses. This reader runs exactly the opcodes of
//! protocols 0-5 that such files use and recognises only the handful of globals above; anything else is an error,
//! never code execution. Every length is checked against the bytes left, so a truncated or hostile file fails
//! cleanly.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ops::Deref;
use std::rc::Rc;

/// A value on the pickle machine's stack.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    // Read only to keep the stack right; CIFAR batches hold no floats that matter.
    #[allow(dead_code)]
    Float(f64),
    /// Python 3 `bytes`, and Python 2 `str` (which is bytes).
    Bytes(Rc<Vec<u8>>),
    Str(Rc<str>),
    List(Rc<RefCell<Vec<Value>>>),
    Tuple(Rc<Vec<Value>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Rc<(String, String)>),
    /// A `numpy.dtype`, by its type string (`u1`, `<i8`, ...).
    Dtype(Rc<RefCell<String>>),
    Array(Rc<RefCell<Array>>),
}

/// A numpy array as pickled: C order, little-endian (`Array::dtype` says which type).
#[derive(Debug, Default)]
pub(crate) struct Array {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Rc<Vec<u8>>,
}

impl Value {
    /// Text of a `str` or (latin-1 / ASCII) `bytes` value.
    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Str(s) => Some(s.to_string()),
            Value::Bytes(b) => Some(b.iter().map(|&c| c as char).collect()),
            _ => None,
        }
    }

    /// Looks a key up in a dict, matching `str` and `bytes` keys alike (Python 2 files use byte strings).
    pub fn get(&self, key: &str) -> Option<Value> {
        let Value::Dict(items) = self else {
            return None;
        };
        let items = items.borrow();
        items.iter().find(|(k, _)| k.as_text().as_deref() == Some(key)).map(|(_, v)| v.clone())
    }

    /// The items of a list or tuple.
    pub fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::List(l) => Some(l.borrow().clone()),
            Value::Tuple(t) => Some(t.as_ref().clone()),
            _ => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Bytes(_) => "bytes",
            Value::Str(_) => "str",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Dtype(_) => "numpy.dtype",
            Value::Array(_) => "numpy.ndarray",
        }
    }
}

/// Most memo entries a file may define; CIFAR batches use a few dozen.
const MAX_MEMO: usize = 1 << 20;
/// Deepest stack a file may build; CIFAR batches need a few levels plus one list of 10,000 labels.
const MAX_STACK: usize = 1 << 22;

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.data.len() - self.pos {
            return Err(format!(
                "truncated pickle: needs {n} bytes at offset {} but only {} remain",
                self.pos,
                self.data.len() - self.pos
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn len64(&mut self) -> Result<usize, String> {
        let n = self.u64()?;
        usize::try_from(n).map_err(|_| format!("length {n} too large"))
    }
    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.data[self.pos..];
        let end = rest.iter().position(|&c| c == b'\n').ok_or("truncated pickle: unterminated text line")?;
        self.pos += end + 1;
        std::str::from_utf8(&rest[..end]).map_err(|_| "pickle text line is not UTF-8".to_string())
    }
}

struct Machine {
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
}

impl Drop for Machine {
    fn drop(&mut self) {
        teardown(self.stack.drain(..).chain(self.memo.drain().map(|(_, v)| v)));
    }
}

/// What [`load`] built. A pickle can make a list or dict that holds itself (APPEND of a memoized or DUPed list),
/// which reference counting alone never frees; dropping this empties every list and dict reachable from the value
/// and the machine's memo, so a hostile file cannot leak memory each time it is read.
#[derive(Debug)]
pub(crate) struct Pickled {
    value: Value,
    leftovers: Vec<Value>,
}

impl Deref for Pickled {
    type Target = Value;
    fn deref(&self) -> &Value {
        &self.value
    }
}

impl Drop for Pickled {
    fn drop(&mut self) {
        let value = std::mem::replace(&mut self.value, Value::None);
        teardown(std::iter::once(value).chain(self.leftovers.drain(..)));
    }
}

/// Empties every list and dict reachable from `roots`, breaking reference cycles. Iterative, so a deeply nested
/// value cannot overflow the stack; tuples are visited once each, so shared sub-tuples cost nothing extra.
fn teardown(roots: impl Iterator<Item = Value>) {
    let mut pending: Vec<Value> = roots.collect();
    let mut seen_tuples = HashSet::new();
    while let Some(v) = pending.pop() {
        match v {
            Value::List(items) => pending.extend(std::mem::take(&mut *items.borrow_mut())),
            Value::Dict(pairs) => {
                for (k, v) in std::mem::take(&mut *pairs.borrow_mut()) {
                    pending.push(k);
                    pending.push(v);
                }
            }
            Value::Tuple(items) if seen_tuples.insert(Rc::as_ptr(&items)) => pending.extend(items.iter().cloned()),
            _ => {}
        }
    }
}

impl Machine {
    fn push(&mut self, v: Value) -> Result<(), String> {
        if self.stack.len() >= MAX_STACK {
            return Err("pickle stack too deep".into());
        }
        self.stack.push(v);
        Ok(())
    }
    fn pop(&mut self) -> Result<Value, String> {
        self.stack.pop().ok_or_else(|| "pickle stack underflow".to_string())
    }
    fn top(&self) -> Result<&Value, String> {
        self.stack.last().ok_or_else(|| "pickle stack underflow".to_string())
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let m = self.marks.pop().ok_or("pickle pops a MARK that was never set")?;
        if m > self.stack.len() {
            return Err("pickle MARK below the stack".into());
        }
        Ok(self.stack.split_off(m))
    }
    fn memo_put(&mut self, idx: u64) -> Result<(), String> {
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&idx) {
            return Err("pickle memo too large".into());
        }
        let v = self.top()?.clone();
        self.memo.insert(idx, v);
        Ok(())
    }
    fn memo_get(&mut self, idx: u64) -> Result<(), String> {
        let v = self.memo.get(&idx).cloned().ok_or_else(|| format!("pickle refers to memo {idx}, never stored"))?;
        self.push(v)
    }
}

fn latin1(s: &str) -> Result<Vec<u8>, String> {
    s.chars().map(|c| u8::try_from(u32::from(c)).map_err(|_| format!("character {c:?} is not latin-1"))).collect()
}

fn bytes_of(v: &Value) -> Result<Rc<Vec<u8>>, String> {
    match v {
        Value::Bytes(b) => Ok(b.clone()),
        // Python 3 pickles bytes-like array data at protocol 2 as text to be latin-1 encoded.
        Value::Str(s) => Ok(Rc::new(latin1(s)?)),
        other => Err(format!("expected bytes, found {}", other.kind())),
    }
}

fn shape_of(v: &Value) -> Result<Vec<usize>, String> {
    let items = v.items().ok_or_else(|| format!("array shape is a {}, not a tuple", v.kind()))?;
    items
        .iter()
        .map(|d| match d {
            Value::Int(n) if *n >= 0 => Ok(*n as usize),
            other => Err(format!("array dimension {other:?} is not a size")),
        })
        .collect()
}

fn dtype_of(v: &Value) -> Result<String, String> {
    match v {
        Value::Dtype(d) => Ok(d.borrow().clone()),
        other => other.as_text().ok_or_else(|| format!("expected a numpy dtype, found {}", other.kind())),
    }
}

/// Calls one of the few globals CIFAR pickles use.
fn call(global: &(String, String), args: &[Value]) -> Result<Value, String> {
    let (module, name) = (global.0.as_str(), global.1.as_str());
    let arg = |i: usize| args.get(i).ok_or_else(|| format!("{module}.{name} called with too few arguments"));
    match (module, name) {
        (m, "_reconstruct") if m.ends_with("multiarray") => {
            // `_reconstruct(ndarray, (0,), b'b')` makes an empty array that BUILD then fills.
            Ok(Value::Array(Rc::new(RefCell::new(Array::default()))))
        }
        ("numpy", "dtype") => Ok(Value::Dtype(Rc::new(RefCell::new(dtype_of(arg(0)?)?)))),
        ("_codecs", "encode") => Ok(Value::Bytes(bytes_of(arg(0)?)?)),
        ("__builtin__" | "builtins", "bytearray" | "bytes") => match args.first() {
            None => Ok(Value::Bytes(Rc::new(Vec::new()))),
            Some(v) => Ok(Value::Bytes(bytes_of(v)?)),
        },
        (m, "_frombuffer") if m.ends_with("numeric") => {
            let data = bytes_of(arg(0)?)?;
            let dtype = dtype_of(arg(1)?)?;
            let shape = shape_of(arg(2)?)?;
            if let Some(order) = args.get(3).and_then(Value::as_text) {
                if order == "F" {
                    return Err("Fortran-ordered arrays are not supported; re-save the array in C order".into());
                }
            }
            Ok(Value::Array(Rc::new(RefCell::new(Array { dtype, shape, data }))))
        }
        _ => Err(format!("pickle calls {module}.{name}, which a CIFAR batch never uses")),
    }
}

/// Applies `BUILD` (an object's `__setstate__`).
fn build(obj: &Value, state: &Value) -> Result<(), String> {
    match obj {
        Value::Array(a) => {
            // ndarray.__setstate__((version, shape, dtype, is_fortran, rawdata))
            let items = state.items().ok_or("ndarray state is not a tuple")?;
            let (shape, dtype, fortran, raw) = match items.len() {
                5 => (&items[1], &items[2], &items[3], &items[4]),
                4 => (&items[0], &items[1], &items[2], &items[3]),
                n => return Err(format!("ndarray state has {n} fields, expected 4 or 5")),
            };
            if matches!(fortran, Value::Bool(true) | Value::Int(1)) {
                return Err("Fortran-ordered arrays are not supported; re-save the array in C order".into());
            }
            let mut a = a.borrow_mut();
            a.shape = shape_of(shape)?;
            a.dtype = dtype_of(dtype)?;
            a.data = bytes_of(raw)?;
            Ok(())
        }
        Value::Dtype(d) => {
            // dtype.__setstate__((3, byteorder, ...)): keep the byte order with the type.
            let items = state.items().ok_or("dtype state is not a tuple")?;
            if let Some(order) = items.get(1).and_then(Value::as_text) {
                let mut d = d.borrow_mut();
                if order != "|" && !d.starts_with(['<', '>', '|', '=']) {
                    *d = format!("{order}{d}");
                }
            }
            Ok(())
        }
        other => Err(format!("pickle sets the state of a {}, which a CIFAR batch never does", other.kind())),
    }
}

/// Runs a pickle and returns the object it builds.
pub(crate) fn load(data: &[u8]) -> Result<Pickled, String> {
    let mut r = Reader { data, pos: 0 };
    let mut m = Machine { stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() };
    loop {
        let at = r.pos;
        let op = r.u8().map_err(|_| "truncated pickle: ends before STOP".to_string())?;
        match op {
            0x80 => {
                let proto = r.u8()?;
                if proto > 5 {
                    return Err(format!("pickle protocol {proto} is newer than 5"));
                }
            }
            0x95 => {
                r.u64()?; // FRAME: only a read-ahead hint
            }
            b'.' => {
                let value = m.pop()?;
                let leftovers = m.stack.drain(..).chain(m.memo.drain().map(|(_, v)| v)).collect();
                return Ok(Pickled { value, leftovers });
            }
            b'(' => m.marks.push(m.stack.len()),
            b'0' => {
                m.pop()?;
            }
            b'1' => {
                m.pop_mark()?;
            }
            b'2' => {
                let v = m.top()?.clone();
                m.push(v)?;
            }
            b'N' => m.push(Value::None)?,
            0x88 => m.push(Value::Bool(true))?,
            0x89 => m.push(Value::Bool(false))?,
            b'I' => {
                let line = r.line()?;
                let v = match line {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    _ => Value::Int(line.trim().parse().map_err(|_| format!("bad INT {line:?}"))?),
                };
                m.push(v)?;
            }
            b'L' => {
                let line = r.line()?.trim_end_matches('L');
                m.push(Value::Int(line.parse().map_err(|_| format!("LONG {line:?} out of range"))?))?;
            }
            b'J' => m.push(Value::Int(i64::from(r.u32()? as i32)))?,
            b'K' => m.push(Value::Int(i64::from(r.u8()?)))?,
            b'M' => m.push(Value::Int(i64::from(r.u16()?)))?,
            0x8a | 0x8b => {
                let n = if op == 0x8a { usize::from(r.u8()?) } else { r.u32()? as usize };
                if n > 8 {
                    return Err(format!("integer of {n} bytes does not fit 64 bits"));
                }
                let b = r.take(n)?;
                let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) { [0xff; 8] } else { [0; 8] };
                buf[..n].copy_from_slice(b);
                m.push(Value::Int(i64::from_le_bytes(buf)))?;
            }
            b'G' => m.push(Value::Float(f64::from_be_bytes(r.take(8)?.try_into().unwrap())))?,
            b'F' => {
                let line = r.line()?;
                m.push(Value::Float(line.trim().parse().map_err(|_| format!("bad FLOAT {line:?}"))?))?;
            }
            b'T' | b'U' | b'B' | b'C' | 0x8e | 0x96 => {
                let n = match op {
                    b'T' => {
                        let n = r.u32()? as i32;
                        usize::try_from(n).map_err(|_| format!("negative string length {n}"))?
                    }
                    b'U' | b'C' => usize::from(r.u8()?),
                    b'B' => r.u32()? as usize,
                    _ => r.len64()?,
                };
                let b = r.take(n)?;
                m.push(Value::Bytes(Rc::new(b.to_vec())))?;
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => r.u32()? as usize,
                    0x8c => usize::from(r.u8()?),
                    _ => r.len64()?,
                };
                let b = r.take(n)?;
                let s = std::str::from_utf8(b).map_err(|_| "pickled str is not UTF-8".to_string())?;
                m.push(Value::Str(Rc::from(s)))?;
            }
            b']' => m.push(Value::List(Rc::new(RefCell::new(Vec::new()))))?,
            b'l' => {
                let items = m.pop_mark()?;
                m.push(Value::List(Rc::new(RefCell::new(items))))?;
            }
            b'a' => {
                let v = m.pop()?;
                match m.top()? {
                    Value::List(l) => l.borrow_mut().push(v),
                    other => return Err(format!("APPEND to a {}", other.kind())),
                }
            }
            b'e' => {
                let items = m.pop_mark()?;
                match m.top()? {
                    Value::List(l) => l.borrow_mut().extend(items),
                    other => return Err(format!("APPENDS to a {}", other.kind())),
                }
            }
            b')' => m.push(Value::Tuple(Rc::new(Vec::new())))?,
            b't' => {
                let items = m.pop_mark()?;
                m.push(Value::Tuple(Rc::new(items)))?;
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if m.stack.len() < n {
                    return Err("pickle stack underflow".into());
                }
                let items = m.stack.split_off(m.stack.len() - n);
                m.push(Value::Tuple(Rc::new(items)))?;
            }
            b'}' => m.push(Value::Dict(Rc::new(RefCell::new(Vec::new()))))?,
            b'd' | b's' | b'u' => {
                let items = match op {
                    b'd' => m.pop_mark()?,
                    b's' => {
                        let v = m.pop()?;
                        let k = m.pop()?;
                        vec![k, v]
                    }
                    _ => m.pop_mark()?,
                };
                if items.len() % 2 != 0 {
                    return Err("dict items come in an odd number".into());
                }
                let mut pairs = Vec::with_capacity(items.len() / 2);
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    pairs.push((k, v));
                }
                if op == b'd' {
                    m.push(Value::Dict(Rc::new(RefCell::new(pairs))))?;
                } else {
                    match m.top()? {
                        Value::Dict(d) => d.borrow_mut().extend(pairs),
                        other => return Err(format!("SETITEM on a {}", other.kind())),
                    }
                }
            }
            b'c' => {
                let module = r.line()?.to_string();
                let name = r.line()?.to_string();
                m.push(Value::Global(Rc::new((module, name))))?;
            }
            0x93 => {
                let name = m.pop()?.as_text().ok_or("STACK_GLOBAL name is not a string")?;
                let module = m.pop()?.as_text().ok_or("STACK_GLOBAL module is not a string")?;
                m.push(Value::Global(Rc::new((module, name))))?;
            }
            b'R' => {
                let args = m.pop()?;
                let func = m.pop()?;
                let Value::Global(g) = func else {
                    return Err(format!("REDUCE calls a {}, not a global", func.kind()));
                };
                let args = match args {
                    Value::Tuple(t) => t,
                    other => return Err(format!("REDUCE arguments are a {}, not a tuple", other.kind())),
                };
                let v = call(&g, &args)?;
                m.push(v)?;
            }
            b'b' => {
                let state = m.pop()?;
                build(m.top()?, &state)?;
            }
            b'p' => {
                let idx = r.line()?.trim().parse().map_err(|_| "bad PUT index".to_string())?;
                m.memo_put(idx)?;
            }
            b'q' => {
                let idx = u64::from(r.u8()?);
                m.memo_put(idx)?;
            }
            b'r' => {
                let idx = u64::from(r.u32()?);
                m.memo_put(idx)?;
            }
            0x94 => {
                let idx = m.memo.len() as u64;
                m.memo_put(idx)?;
            }
            b'g' => {
                let idx = r.line()?.trim().parse().map_err(|_| "bad GET index".to_string())?;
                m.memo_get(idx)?;
            }
            b'h' => {
                let idx = u64::from(r.u8()?);
                m.memo_get(idx)?;
            }
            b'j' => {
                let idx = u64::from(r.u32()?);
                m.memo_get(idx)?;
            }
            _ => {
                return Err(format!(
                "pickle opcode 0x{op:02x} at offset {at} is not one a CIFAR batch uses (or the file is not a pickle)"
            ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_pickle_is_an_error_not_a_panic() {
        // PROTO 2, EMPTY_DICT, BINSTRING claiming 100 bytes with 3 present.
        let data = b"\x80\x02}T\x64\x00\x00\x00abc";
        let e = load(data).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        for cut in 0..data.len() {
            assert!(load(&data[..cut]).is_err());
        }
    }

    #[test]
    fn unknown_global_is_refused() {
        let data = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.";
        let e = load(data).unwrap_err();
        assert!(e.contains("os.system"), "{e}");
    }

    #[test]
    fn a_list_that_holds_itself_is_freed_when_the_result_is_dropped() {
        // EMPTY_LIST, MEMOIZE, GET 0... as protocol 4: ], \x94 (memo 0), h\x00 (get 0), a (append) -> l = [l].
        let data = b"\x80\x04]\x94h\x00a.";
        let v = load(data).unwrap();
        let Value::List(list) = &*v else {
            panic!("not a list: {:?}", v.kind());
        };
        let weak = Rc::downgrade(list);
        assert_eq!(list.borrow().len(), 1, "the list should hold itself");
        drop(v);
        assert!(weak.upgrade().is_none(), "the self-referencing list leaked");

        // A pickle that fails after building such a cycle leaves it on the machine, which frees it when dropped.
        assert!(load(b"\x80\x04]\x94h\x00a\xff").is_err());
        let list = Rc::new(RefCell::new(Vec::new()));
        list.borrow_mut().push(Value::List(list.clone()));
        let weak = Rc::downgrade(&list);
        drop(Machine { stack: vec![Value::List(list)], marks: Vec::new(), memo: HashMap::new() });
        assert!(weak.upgrade().is_none(), "a machine dropped on error leaked its cycle");
    }

    #[test]
    fn negative_and_long_ints_decode() {
        // LONG1 of 0xff (-1), BININT -2, tuple of both.
        let data = b"\x80\x02\x8a\x01\xffJ\xfe\xff\xff\xff\x86.";
        let v = load(data).unwrap();
        let items = v.items().unwrap();
        assert!(matches!(items[0], Value::Int(-1)));
        assert!(matches!(items[1], Value::Int(-2)));
    }
}

//! Length-prefixed little-endian framing shared by the store client and server.

use std::io::{self, Read, Write};

/// Longest key or value the store accepts; a larger length prefix means the peer is not speaking our protocol.
pub(crate) const MAX_FIELD: usize = 256 << 20;

pub(crate) fn put_u8(out: &mut Vec<u8>, v: u8) {
    out.push(v);
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, v: &[u8]) {
    put_u64(out, v.len() as u64);
    out.extend_from_slice(v);
}

pub(crate) fn get_u8(r: &mut impl Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

pub(crate) fn get_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Longest store key; keys are short paths such as `job/ring/0/addr/3`.
pub(crate) const MAX_KEY: usize = 64 << 10;

pub(crate) fn get_bytes(r: &mut impl Read) -> io::Result<Vec<u8>> {
    get_bytes_max(r, MAX_FIELD)
}

/// A length-prefixed field of at most `max` bytes. Memory grows with the bytes that actually arrive, not with
/// the length the peer claims, so a lying prefix costs nothing.
pub(crate) fn get_bytes_max(r: &mut impl Read, max: usize) -> io::Result<Vec<u8>> {
    let n = get_u64(r)?;
    if n > max as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a field of {n} bytes exceeds the protocol limit of {max} bytes"),
        ));
    }
    let n = n as usize;
    let mut v = Vec::with_capacity(n.min(64 << 10));
    r.take(n as u64).read_to_end(&mut v)?;
    if v.len() < n {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in the middle of a field"));
    }
    Ok(v)
}

/// A store key: UTF-8, at most [`MAX_KEY`] bytes.
pub(crate) fn get_string(r: &mut impl Read) -> io::Result<String> {
    String::from_utf8(get_bytes_max(r, MAX_KEY)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "key is not UTF-8"))
}

/// A count prefix of at most `max` items.
pub(crate) fn get_count(r: &mut impl Read, max: usize, what: &str) -> io::Result<usize> {
    let n = get_u64(r)?;
    if n > max as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{n} {what} exceed the protocol limit of {max}"),
        ));
    }
    Ok(n as usize)
}

pub(crate) fn get_u64_list(r: &mut impl Read) -> io::Result<Vec<u64>> {
    let n = get_count(r, MAX_FIELD / 8, "list items")?;
    let mut v = Vec::with_capacity(n.min(8192));
    for _ in 0..n {
        v.push(get_u64(r)?);
    }
    Ok(v)
}

pub(crate) fn put_u64_list(out: &mut Vec<u8>, v: &[u64]) {
    put_u64(out, v.len() as u64);
    for x in v {
        put_u64(out, *x);
    }
}

pub(crate) fn send(w: &mut impl Write, frame: &[u8]) -> io::Result<()> {
    w.write_all(frame)?;
    w.flush()
}

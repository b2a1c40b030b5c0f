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

pub(crate) fn get_bytes(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let n = get_u64(r)? as usize;
    if n > MAX_FIELD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("field of {n} bytes exceeds the protocol limit"),
        ));
    }
    let mut v = vec![0u8; n];
    r.read_exact(&mut v)?;
    Ok(v)
}

pub(crate) fn get_string(r: &mut impl Read) -> io::Result<String> {
    String::from_utf8(get_bytes(r)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "key is not UTF-8"))
}

pub(crate) fn get_u64_list(r: &mut impl Read) -> io::Result<Vec<u64>> {
    let n = get_u64(r)? as usize;
    if n > MAX_FIELD / 8 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "list exceeds the protocol limit",
        ));
    }
    (0..n).map(|_| get_u64(r)).collect()
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

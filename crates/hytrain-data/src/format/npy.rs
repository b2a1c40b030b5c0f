//! `.npy` tensors (numpy's format, versions 1-3): parsed by hand, since the header is one Python dict literal.

use super::{DType, Tensor};

/// Parses an `.npy` file. Only little-endian (or byte-sized) numeric types in C order.
pub fn parse(bytes: &[u8]) -> Result<Tensor, String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("npy member does not start with the numpy magic \\x93NUMPY".into());
    }
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
        v => return Err(format!("npy version {v} is not supported")),
    };
    let header = bytes.get(start..start.saturating_add(header_len)).ok_or("npy header is truncated")?;
    let header = std::str::from_utf8(header).map_err(|_| "npy header is not text".to_string())?;
    let descr = field(header, "descr").ok_or("npy header has no 'descr'")?;
    let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"');
    let dtype = match descr {
        "|u1" | "u1" | "<u1" => DType::U8,
        "|i1" | "i1" | "<i1" => DType::I8,
        "<u2" => DType::U16,
        "<i2" => DType::I16,
        "<i4" => DType::I32,
        "<i8" => DType::I64,
        "<f4" => DType::F32,
        "<f8" => DType::F64,
        other => return Err(format!("npy dtype {other} is not supported (use a little-endian int or float)")),
    };
    let fortran = field(header, "fortran_order").ok_or("npy header has no 'fortran_order'")?;
    if fortran.trim() != "False" {
        return Err("npy array is in Fortran order; save it in C order".into());
    }
    let shape_text = field(header, "shape").ok_or("npy header has no 'shape'")?;
    let shape_text = shape_text.trim().trim_start_matches('(').trim_end_matches(')');
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("npy shape has a bad dimension {s:?}")))
        .collect::<Result<Vec<_>, _>>()?;
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("npy shape is too large")?;
    let nbytes = count.checked_mul(dtype.size()).ok_or("npy shape is too large")?;
    let data = &bytes[start + header_len..];
    if data.len() != nbytes {
        return Err(format!("npy data has {} bytes, its shape {shape:?} needs {nbytes}", data.len()));
    }
    Ok(Tensor { dtype, shape, data: data.to_vec() })
}

/// The text of one `'key': value` entry of the header dict (a tuple value runs to its closing parenthesis).
fn field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'")).or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = &header[at + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let end = if rest.starts_with('(') { rest.find(')')? + 1 } else { rest.find([',', '}'])? };
    Some(&rest[..end])
}

/// Writes an `.npy` (version 1) file; used by tests and examples that make tensor shards.
pub fn write(tensor: &Tensor) -> Vec<u8> {
    let descr = match tensor.dtype {
        DType::U8 => "|u1",
        DType::I8 => "|i1",
        DType::U16 => "<u2",
        DType::I16 => "<i2",
        DType::I32 => "<i4",
        DType::I64 => "<i8",
        DType::F32 => "<f4",
        DType::F64 => "<f8",
    };
    let shape = match tensor.shape.len() {
        1 => format!("({},)", tensor.shape[0]),
        _ => format!("({})", tensor.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // numpy pads the header with spaces so the data starts 64-byte aligned, ending in a newline.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&tensor.data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_npy_parses_back() {
        let t = Tensor { dtype: DType::F32, shape: vec![2, 3], data: (0..24).collect() };
        assert_eq!(parse(&write(&t)).unwrap(), t);
        let t = Tensor { dtype: DType::I64, shape: vec![1], data: 7i64.to_le_bytes().to_vec() };
        assert_eq!(parse(&write(&t)).unwrap(), t);
    }

    #[test]
    fn npy_errors_say_what_is_wrong() {
        assert!(parse(b"PK\x03\x04 not npy").unwrap_err().contains("magic"));
        let t = Tensor { dtype: DType::U8, shape: vec![4], data: vec![1, 2, 3, 4] };
        let mut bytes = write(&t);
        bytes.pop();
        assert!(parse(&bytes).unwrap_err().contains("needs 4"));
        let mut big = write(&t);
        let at = big.windows(3).position(|w| w == b"|u1").unwrap();
        big[at..at + 3].copy_from_slice(b">f8");
        assert!(parse(&big).unwrap_err().contains(">f8"));
    }
}

//! Reader for NumPy `.npy` arrays as stored inside `.npz` archives.
//!
//! Only what a sample bundle needs: little-endian `u1`, `f4` and `i8` arrays in C order.
//! Everything else is rejected with a message that says what was found, because the
//! file comes from a user and may be malformed or hostile.

use super::bundle::{BundleError, RawTensor, TensorDtype};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Parses one `.npy` file's bytes into a [`RawTensor`]. `name` is used in error messages.
/// The array keeps the buffer it arrived in (the header is cut off in place): a bundle's
/// images can be gigabytes, and a copy here would hold them twice at once.
pub fn parse_npy(name: &str, mut bytes: Vec<u8>) -> Result<RawTensor, BundleError> {
    let bad = |why: String| BundleError::Malformed(format!("array `{name}`: {why}"));
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad("not a .npy array (bad magic)".into()));
    }
    let major = bytes[6];
    let (header_len, header_start): (usize, usize) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(bad("truncated header".into()));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(bad(format!("unsupported .npy version {v}"))),
    };
    let data_start = header_start
        .checked_add(header_len)
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| bad("truncated header".into()))?;
    let header = std::str::from_utf8(&bytes[header_start..data_start])
        .map_err(|_| bad("header is not text".into()))?;

    let descr = dict_value(header, "descr").ok_or_else(|| bad("header has no descr".into()))?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let dtype = match descr {
        "|u1" | "<u1" | "u1" => TensorDtype::U8,
        "<f4" => TensorDtype::F32,
        "<i8" => TensorDtype::I64,
        other => {
            return Err(BundleError::WrongDtype {
                tensor: name.to_string(),
                found: describe_numpy_dtype(other),
            })
        }
    };
    let fortran = dict_value(header, "fortran_order")
        .ok_or_else(|| bad("header has no fortran_order".into()))?;
    if fortran.trim() != "False" {
        return Err(bad(
            "Fortran-ordered arrays are not supported; save with np.ascontiguousarray".into(),
        ));
    }
    let shape_text =
        dict_value(header, "shape").ok_or_else(|| bad("header has no shape".into()))?;
    let shape =
        parse_shape(shape_text).ok_or_else(|| bad(format!("unreadable shape {shape_text}")))?;
    bytes.drain(..data_start);
    RawTensor::new(name, dtype, shape, bytes)
}

/// Finds `'key': value` in the header's Python dict literal and returns the value text.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let quoted = [format!("'{key}'"), format!("\"{key}\"")];
    let key_pos = quoted
        .iter()
        .find_map(|k| header.find(k.as_str()).map(|p| p + k.len()))?;
    let rest = header[key_pos..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    Some(rest[..end].trim())
}

fn parse_shape(text: &str) -> Option<Vec<usize>> {
    let inner = text.strip_prefix('(')?.strip_suffix(')')?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>().ok())
        .collect()
}

fn describe_numpy_dtype(descr: &str) -> String {
    let readable = match descr.trim_start_matches(['<', '>', '|', '=']) {
        "f8" => "float64",
        "f2" => "float16",
        "i4" => "int32",
        "i2" => "int16",
        "i1" => "int8",
        "u2" => "uint16",
        "u4" => "uint32",
        "u8" => "uint64",
        "b1" => "bool",
        _ => "",
    };
    if descr.starts_with('>') {
        format!("big-endian {descr}")
    } else if readable.is_empty() {
        descr.to_string()
    } else {
        readable.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = MAGIC.to_vec();
        out.extend([1, 0]);
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }

    #[test]
    fn reads_a_uint8_array() {
        let t = parse_npy("images", npy("|u1", "(2, 1, 1, 2)", &[1, 2, 3, 4])).unwrap();
        assert_eq!(t.dtype, TensorDtype::U8);
        assert_eq!(t.shape, vec![2, 1, 1, 2]);
        assert_eq!(t.data, vec![1, 2, 3, 4]);
    }

    #[test]
    fn keeps_the_array_in_the_buffer_it_arrived_in() {
        let pixels: Vec<u8> = (0..=255).collect();
        let file = npy("|u1", "(1, 1, 16, 16)", &pixels);
        let buffer = file.as_ptr();
        let t = parse_npy("images", file).unwrap();
        assert_eq!(t.data, pixels);
        assert_eq!(t.data.as_ptr(), buffer, "the pixels were copied");
    }

    #[test]
    fn reads_a_one_dimensional_shape() {
        let t = parse_npy("labels", npy("<i8", "(1,)", &7i64.to_le_bytes())).unwrap();
        assert_eq!(t.shape, vec![1]);
    }

    #[test]
    fn rejects_float64_by_name() {
        let err = parse_npy("images", npy("<f8", "(1,)", &[0; 8])).unwrap_err();
        assert!(err.to_string().contains("float64"), "{err}");
    }

    #[test]
    fn rejects_truncated_data() {
        let err = parse_npy("images", npy("<f4", "(4,)", &[0; 8])).unwrap_err();
        assert!(err.to_string().contains("bytes"), "{err}");
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_npy("images", b"hello world, not numpy".to_vec()).is_err());
    }
}

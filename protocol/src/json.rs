//! Decoding protocol JSON: serde_json, after one check serde cannot make.
//!
//! A JSON integer (a number written without `.`, `e` or `E`) outside the
//! `i64` range is an error (docs/PROTOCOL.md §2), never a silent REAL:
//! serde_json hands such a number to a deserializer as an `f64`, so the
//! value type alone cannot tell it from `1e19`. [`decode`] finds it in the
//! text first.

use serde::de::DeserializeOwned;

/// Why a message did not decode.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A JSON integer outside the 64-bit signed range.
    #[error(
        "the JSON integer {0} is outside the 64-bit signed range (write a REAL with a fraction or an exponent)"
    )]
    IntegerRange(String),
    /// Not JSON, or not this message's shape.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

/// Decodes one protocol message (or HTTP body).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    if let Some(n) = out_of_range_integer(bytes) {
        return Err(DecodeError::IntegerRange(n));
    }
    Ok(serde_json::from_slice(bytes)?)
}

/// The first integer token of a JSON text (outside strings) that does not
/// fit in an `i64`. The scan does not validate the JSON: serde does that.
pub fn out_of_range_integer(text: &[u8]) -> Option<String> {
    let n = text.len();
    let mut i = 0;
    while i < n {
        match text[i] {
            b'"' => {
                i += 1;
                while i < n {
                    match text[i] {
                        b'\\' => i += 2,
                        b'"' => {
                            i += 1;
                            break;
                        }
                        _ => i += 1,
                    }
                }
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                i += 1;
                while i < n && matches!(text[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') {
                    i += 1;
                }
                let token = &text[start..i];
                let integral = !token.iter().any(|b| matches!(b, b'.' | b'e' | b'E'));
                if integral && token.iter().any(u8::is_ascii_digit) {
                    let s = std::str::from_utf8(token).expect("ASCII");
                    if s.parse::<i64>().is_err() {
                        return Some(s.to_owned());
                    }
                }
            }
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_outside_i64_are_found_outside_strings_only() {
        let cases: &[(&str, Option<&str>)] = &[
            (r#"[1, -9223372036854775808, 9223372036854775807]"#, None),
            (r#"[9223372036854775808]"#, Some("9223372036854775808")),
            (
                r#"{"v": -9223372036854775809}"#,
                Some("-9223372036854775809"),
            ),
            (r#"[1e30, 1.5, 99999999999999999999.0, 1E400]"#, None),
            (
                r#"["99999999999999999999", "\"99999999999999999999"]"#,
                None,
            ),
            (
                r#"{"a": [0, {"b": 123456789012345678901234567890}]}"#,
                Some("123456789012345678901234567890"),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(
                out_of_range_integer(text.as_bytes()).as_deref(),
                *want,
                "{text}"
            );
        }
    }

    #[test]
    fn decode_refuses_what_serde_would_read_as_a_real() {
        let v: Result<tenantsync_types::Value, _> = decode(b"18446744073709551616");
        assert!(matches!(v, Err(DecodeError::IntegerRange(_))));
        let v: tenantsync_types::Value = decode(b"1.8446744073709552e19").unwrap();
        assert_eq!(v, tenantsync_types::Value::Real(1.8446744073709552e19));
    }
}

//! SQLite's conversions between numbers and text, ported from the SQLite
//! the workspace bundles (3.54, `util.c` and `printf.c`): `sqlite3AtoF`,
//! `sqlite3Atoi64`, `sqlite3FpDecode` and the `%!.17g` rendering of a REAL.
//!
//! They are ported, not approximated with Rust's own parser and formatter,
//! because SQLite's are not Rust's: it reads at most 19 significant digits
//! of a text, stops at a NUL, and renders a REAL with 17 significant digits
//! unless a shorter text it tries reads back the same. The evaluator and
//! the core must agree with the SQLite that stores the rows on every value;
//! `core/tests` holds these functions against that SQLite.

/// `sqlite3Isspace`: ASCII space, tab, newline, vertical tab, form feed,
/// carriage return. Not U+00A0, not U+3000.
pub fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

const POWERS_OF_10_FIRST: i32 = -348;
const POWERS_OF_10_LAST: i32 = 347;

fn mul128(a: u64, b: u64) -> (u64, u64) {
    let r = u128::from(a) * u128::from(b);
    ((r >> 64) as u64, r as u64)
}

fn mul160(a: u64, a_lo: u32, b: u64) -> (u64, u32) {
    let mut r = u128::from(a) * u128::from(b);
    r += (u128::from(a_lo) * u128::from(b)) >> 32;
    ((r >> 64) as u64, ((r >> 32) & 0xffff_ffff) as u32)
}

const BASE: [u64; 27] = [
    0x8000000000000000,
    0xa000000000000000,
    0xc800000000000000,
    0xfa00000000000000,
    0x9c40000000000000,
    0xc350000000000000,
    0xf424000000000000,
    0x9896800000000000,
    0xbebc200000000000,
    0xee6b280000000000,
    0x9502f90000000000,
    0xba43b74000000000,
    0xe8d4a51000000000,
    0x9184e72a00000000,
    0xb5e620f480000000,
    0xe35fa931a0000000,
    0x8e1bc9bf04000000,
    0xb1a2bc2ec5000000,
    0xde0b6b3a76400000,
    0x8ac7230489e80000,
    0xad78ebc5ac620000,
    0xd8d726b7177a8000,
    0x878678326eac9000,
    0xa968163f0a57b400,
    0xd3c21bcecceda100,
    0x84595161401484a0,
    0xa56fa5b99019a5c8,
];

const SCALE: [u64; 26] = [
    0x8049a4ac0c5811ae,
    0xcf42894a5dce35ea,
    0xa76c582338ed2621,
    0x873e4f75e2224e68,
    0xda7f5bf590966848,
    0xb080392cc4349dec,
    0x8e938662882af53e,
    0xe65829b3046b0afa,
    0xba121a4650e4ddeb,
    0x964e858c91ba2655,
    0xf2d56790ab41c2a2,
    0xc428d05aa4751e4c,
    0x9e74d1b791e07e48,
    0xcccccccccccccccc,
    0xcecb8f27f4200f3a,
    0xa70c3c40a64e6c51,
    0x86f0ac99b4e8dafd,
    0xda01ee641a708de9,
    0xb01ae745b101e9e4,
    0x8e41ade9fbebc27d,
    0xe5d3ef282a242e81,
    0xb9a74a0637ce2ee1,
    0x95f83d0a1fb69cd9,
    0xf24a01a73cf2dccf,
    0xc3b8358109e84f07,
    0x9e19db92b4e31ba9,
];

const SCALE_LO: [u32; 26] = [
    0x205b896d, 0x52064cad, 0xaf2af2b8, 0x5a7744a7, 0xaf39a475, 0xbd8d794e, 0x547eb47b, 0x0cb4a5a3,
    0x92f34d62, 0x3a6a07f9, 0xfae27299, 0xaa97e14c, 0x775ea265, 0xcccccccc, 0x00000000, 0x999090b6,
    0x69a028bb, 0xe80e6f48, 0x5ec05dd0, 0x14588f14, 0x8f1668c9, 0x6d953e2c, 0x4abdaf10, 0xbc633b39,
    0x0a862f81, 0x6c07a2c2,
];

/// `powerOfTen`: the top 64 bits of 10^p, and the next 32.
fn power_of_ten(p: i32) -> (u64, u32) {
    debug_assert!((POWERS_OF_10_FIRST..=POWERS_OF_10_LAST).contains(&p));
    let (g, n);
    if p < 0 {
        if p == -1 {
            return (SCALE[13], SCALE_LO[13]);
        }
        let (mut gg, mut nn) = (p / 27, p % 27);
        if nn != 0 {
            gg -= 1;
            nn += 27;
        }
        (g, n) = (gg, nn);
    } else if p < 27 {
        return (BASE[p as usize], 0);
    } else {
        (g, n) = (p / 27, p % 27);
    }
    let s = SCALE[(g + 13) as usize];
    if n == 0 {
        return (s, SCALE_LO[(g + 13) as usize]);
    }
    let (mut x, mut lo) = mul160(s, SCALE_LO[(g + 13) as usize], BASE[n as usize]);
    if x & (1 << 63) == 0 {
        x = (x << 1) | u64::from((lo >> 31) & 1);
        lo = (lo << 1) | 1;
    }
    (x, lo)
}

fn pwr10to2(p: i32) -> i32 {
    (p * 108853) >> 15
}

fn pwr2to10(p: i32) -> i32 {
    (p * 78913) >> 18
}

/// `sqlite3Fp2Convert10`: r = m * 2^e as d * 10^p with at least n digits.
fn fp2_convert10(m: u64, e: i32, n: i32) -> (u64, i32) {
    let p = n - 1 - pwr2to10(e + 63);
    let (pw, _) = power_of_ten(p);
    let (mut h, _) = mul128(m, pw);
    let d = if n == 18 {
        h >>= -(e + pwr10to2(p) + 2);
        (h + ((h << 1) & 2)) >> 1
    } else {
        h >> -(e + pwr10to2(p) + 1)
    };
    (d, -p)
}

/// `sqlite3Fp10Convert2`: the double nearest d * 10^p (Russ Cox's method).
fn fp10_convert2(d: u64, p: i32) -> f64 {
    if p < POWERS_OF_10_FIRST {
        return 0.0;
    }
    if p > POWERS_OF_10_LAST {
        return f64::INFINITY;
    }
    let b = 64 - d.leading_zeros() as i32;
    let lp = pwr10to2(p);
    let mut e = 53 - b - lp;
    if e > 1074 {
        if e >= 1130 {
            return 0.0;
        }
        e = 1074;
    }
    let s = -(e - (64 - b) + lp + 3);
    let (mut pwr10h, mut pwr10l) = power_of_ten(p);
    if pwr10l != 0 {
        pwr10h = pwr10h.wrapping_add(1);
        pwr10l = !pwr10l;
    }
    let x = d << (64 - b);
    let (mut hi, lo) = mul128(x, pwr10h);
    let mid1 = (lo >> 32) as u32;
    let mut sticky = 1u64;
    if hi & ((1u64 << s) - 1) == 0 {
        let (h2, _) = mul128(x, u64::from(pwr10l) << 32);
        let mid2 = h2 as u32;
        sticky = u64::from(mid1.wrapping_sub(mid2) > 1);
        hi -= u64::from(mid1 < mid2);
    }
    let mut u = (hi >> s) | sticky;
    let adj = i32::from(u >= (1u64 << 55) - 2);
    if adj != 0 {
        u = (u >> adj) | (u & 1);
        e -= adj;
    }
    let mut m = (u + 1 + ((u >> 2) & 1)) >> 2;
    if e <= -972 {
        return f64::INFINITY;
    }
    if m & (1u64 << 52) != 0 {
        m = (m & !(1u64 << 52)) | ((1075 - e) as u64) << 52;
    }
    f64::from_bits(m)
}

/// The mantissa of `sqlite3AtoF`'s result code: a digit was seen.
pub const ATOF_DIGITS: i32 = 1;
/// ... the text has a `.` or an exponent.
pub const ATOF_FRACTION: i32 = 2;

/// `sqlite3AtoF` on SQLite's C string of `z` (up to its first NUL): the
/// value of the number it spells and SQLite's result code: positive when
/// all of it (bar ASCII whitespace around) is the number, negative when
/// only a prefix is, 0 when no prefix is; bit [`ATOF_FRACTION`] set when
/// the number has a `.` or an exponent.
pub fn atof(z: &[u8]) -> (f64, i32) {
    let z = z.iter().position(|&b| b == 0).map_or(z, |i| &z[..i]);
    let at = |i: usize| z.get(i).copied().unwrap_or(0);
    const LIMIT: u64 = (u64::MAX - 9) / 10;
    let mut i = 0;
    let mut neg = false;
    let mut s: u64 = 0;
    let mut d: i32 = 0;
    let mut m_state: i32 = 0;
    // The integer part, after optional whitespace and sign.
    let mut integer_at = None;
    loop {
        let c = at(i);
        if c.is_ascii_digit() {
            integer_at = Some(i);
        } else if c == b'-' || c == b'+' {
            neg = c == b'-';
            i += 1;
            if at(i).is_ascii_digit() {
                integer_at = Some(i);
            }
        } else if is_space(c) {
            while is_space(at(i)) {
                i += 1;
            }
            continue;
        }
        break;
    }
    if let Some(start) = integer_at {
        i = start;
        m_state = 1;
        s = u64::from(at(i) - b'0');
        i += 1;
        while at(i).is_ascii_digit() {
            s = s * 10 + u64::from(at(i) - b'0');
            i += 1;
            if s >= LIMIT {
                m_state = 9;
                while at(i).is_ascii_digit() {
                    i += 1;
                    d += 1;
                }
                break;
            }
        }
    }
    if at(i) == b'.' {
        i += 1;
        if at(i).is_ascii_digit() {
            m_state |= 1;
            loop {
                if s < LIMIT {
                    s = s * 10 + u64::from(at(i) - b'0');
                    d -= 1;
                } else {
                    m_state = 11;
                }
                i += 1;
                if !at(i).is_ascii_digit() {
                    break;
                }
            }
        } else if m_state == 0 {
            return (0.0, 0);
        }
        m_state |= 2;
    } else if m_state == 0 {
        return (0.0, 0);
    }
    if at(i) == b'e' || at(i) == b'E' {
        i += 1;
        let mut esign = 1;
        if at(i) == b'-' {
            esign = -1;
            i += 1;
        } else if at(i) == b'+' {
            i += 1;
        }
        if at(i).is_ascii_digit() {
            let mut exp = i32::from(at(i) - b'0');
            i += 1;
            m_state |= 2;
            while at(i).is_ascii_digit() {
                exp = if exp < 10000 {
                    exp * 10 + i32::from(at(i) - b'0')
                } else {
                    10000
                };
                i += 1;
            }
            d += esign * exp;
        } else {
            // Back to the 'e' or its sign: text follows the number.
            i -= 1;
        }
    }
    let mut r = if s == 0 {
        m_state |= 4;
        0.0
    } else {
        fp10_convert2(s, d)
    };
    if neg {
        r = -r;
    }
    while is_space(at(i)) {
        i += 1;
    }
    if i >= z.len() {
        (r, m_state)
    } else {
        (r, (0xffff_fff0u32 as i32) | m_state)
    }
}

/// `sqlite3Atoi64` (UTF-8) over all of `z`: the integer and SQLite's result
/// code: 0 an integer that fits, with nothing but whitespace around; 1 text
/// after it; 2 too large for 64 bits; 3 exactly 9223372036854775808;
/// -1 no digits. An integer too large is clamped to the end of the range.
pub fn atoi64(z: &[u8]) -> (i64, i32) {
    let mut i = 0;
    while i < z.len() && is_space(z[i]) {
        i += 1;
    }
    let mut neg = false;
    if i < z.len() && (z[i] == b'-' || z[i] == b'+') {
        neg = z[i] == b'-';
        i += 1;
    }
    let start = i;
    while i < z.len() && z[i] == b'0' {
        i += 1;
    }
    let first = i;
    let mut u: u64 = 0;
    while i < z.len() && z[i].is_ascii_digit() {
        u = u.wrapping_mul(10).wrapping_add(u64::from(z[i] - b'0'));
        i += 1;
    }
    let ndigits = i - first;
    let mut value = if u > i64::MAX as u64 {
        if neg { i64::MIN } else { i64::MAX }
    } else if neg {
        -(u as i64)
    } else {
        u as i64
    };
    let mut rc = 0;
    if ndigits == 0 && start == first {
        rc = -1;
    } else if i < z.len() && z[i..].iter().any(|&b| !is_space(b)) {
        rc = 1;
    }
    if ndigits < 19 {
        return (value, rc);
    }
    let cmp = if ndigits > 19 {
        std::cmp::Ordering::Greater
    } else {
        z[first..first + 19].cmp(b"9223372036854775808")
    };
    match cmp {
        std::cmp::Ordering::Less => (value, rc),
        std::cmp::Ordering::Greater => {
            value = if neg { i64::MIN } else { i64::MAX };
            (value, 2)
        }
        std::cmp::Ordering::Equal => {
            value = if neg { i64::MIN } else { i64::MAX };
            (value, if neg { rc } else { 3 })
        }
    }
}

/// `sqlite3RealToI64`: truncation, clamped near the ends of the range.
pub fn real_to_i64(r: f64) -> i64 {
    if r < -9223372036854774784.0 {
        i64::MIN
    } else if r > 9223372036854774784.0 {
        i64::MAX
    } else {
        r as i64
    }
}

/// `sqlite3RealSameAsInt`: `r` is exactly the integer `i`, small enough
/// (|i| < 2^51) for every text of it to read back as that integer.
pub fn real_same_as_int(r: f64, i: i64) -> bool {
    r == 0.0
        || (r.to_bits() == (i as f64).to_bits()
            && (-2251799813685248..2251799813685248).contains(&i))
}

/// The digits of a REAL as `sqlite3FpDecode` leaves them.
struct FpDecode {
    negative: bool,
    /// The significant digits (no trailing zeros).
    digits: Vec<u8>,
    /// Position of the decimal point relative to the first digit.
    dp: i32,
}

/// `sqlite3FpDecode(r, iRound = 17, mxRound = 20)` for a finite `r`.
fn fp_decode(r: f64, mut round: i32, max_round: i32) -> FpDecode {
    let negative = r < 0.0;
    let r = r.abs();
    if r == 0.0 {
        return FpDecode {
            negative: false,
            digits: vec![b'0'],
            dp: 1,
        };
    }
    let bits = r.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i32;
    let mut v = bits & 0x000f_ffff_ffff_ffff;
    if e == 0 {
        let nn = v.leading_zeros() as i32;
        v <<= nn;
        e = -1074 - nn;
    } else {
        v = (v << 11) | (1 << 63);
        e -= 1086;
    }
    let (v, exp) = fp2_convert10(
        v,
        e,
        if round <= 0 || round >= 18 {
            18
        } else {
            round + 1
        },
    );
    // Digits, one spare slot in front for a carry.
    let mut z: Vec<u8> = v.to_string().into_bytes();
    let mut n = z.len() as i32;
    let mut dp = n + exp;
    let mut first = 0usize;
    z.insert(0, b'0');
    first += 1;
    if round <= 0 {
        round = dp - round;
        if round == 0 && z[first] >= b'5' {
            round = 1;
            first -= 1;
            z[first] = b'0';
            n += 1;
            dp += 1;
        }
    }
    let digit = |z: &Vec<u8>, k: usize| z.get(first + k).copied().unwrap_or(0);
    if round > 0 && (round < n || n > max_round) {
        if round > max_round {
            round = max_round;
        }
        if round == 17 {
            if digit(&z, 15) == b'9' && digit(&z, 14) == b'9' {
                let mut jj = 14usize;
                while jj > 0 && digit(&z, jj - 1) == b'9' {
                    jj -= 1;
                }
                let v2 = if jj == 0 {
                    1
                } else {
                    let mut v2 = u64::from(digit(&z, 0) - b'0');
                    for kk in 1..jj {
                        v2 = v2 * 10 + u64::from(digit(&z, kk) - b'0');
                    }
                    v2 + 1
                };
                if r == fp10_convert2(v2, exp + n - jj as i32) {
                    round = jj as i32 + 1;
                }
            } else if dp >= n
                || (digit(&z, 15) == b'0' && digit(&z, 14) == b'0' && digit(&z, 13) == b'0')
            {
                let mut jj = 13usize;
                while digit(&z, jj - 1) == b'0' {
                    jj -= 1;
                }
                let mut v2 = u64::from(digit(&z, 0) - b'0');
                for kk in 1..jj {
                    v2 = v2 * 10 + u64::from(digit(&z, kk) - b'0');
                }
                if r == fp10_convert2(v2, exp + n - jj as i32) {
                    round = jj as i32 + 1;
                }
            }
        }
        n = round;
        if digit(&z, round as usize) >= b'5' {
            let mut j = round as usize - 1;
            loop {
                z[first + j] += 1;
                if z[first + j] <= b'9' {
                    break;
                }
                z[first + j] = b'0';
                if j == 0 {
                    first -= 1;
                    z[first] = b'1';
                    n += 1;
                    dp += 1;
                    break;
                }
                j -= 1;
            }
        }
    }
    let mut digits: Vec<u8> = z[first..first + n as usize].to_vec();
    while digits.len() > 1 && *digits.last().expect("non-empty") == b'0' {
        digits.pop();
    }
    FpDecode {
        negative,
        digits,
        dp,
    }
}

/// A REAL as SQLite renders it to text (`vdbeMemRenderNum`, `%!.17g`):
/// `1.0`, `0.1`, `1.0e+20`, `1.5e-07`, `-1.7780109043107891e+270`; `Inf`,
/// `-Inf`, `NaN`; -0.0 as `0.0`.
pub fn real_to_text(r: f64) -> String {
    if r.is_nan() {
        return "NaN".into();
    }
    if r.is_infinite() {
        return if r > 0.0 { "Inf".into() } else { "-Inf".into() };
    }
    let s = fp_decode(r, 17, 20);
    let mut out = String::new();
    if s.negative {
        out.push('-');
    }
    // etGENERIC with precision 17 and the `!` flag.
    let exp = s.dp - 1;
    let mut precision: i32 = 16;
    let exponent_form = exp < -4 || exp > precision;
    let mut e2 = if exponent_form {
        0
    } else {
        precision -= exp;
        s.dp - 1
    };
    let n = s.digits.len() as i32;
    let mut j: i32 = 0;
    if e2 < 0 {
        out.push('0');
    } else {
        j = (e2 + 1).min(n);
        out.push_str(std::str::from_utf8(&s.digits[..j as usize]).expect("digits"));
        e2 -= j;
        if e2 >= 0 {
            out.extend(std::iter::repeat_n('0', (e2 + 1) as usize));
            e2 = -1;
        }
    }
    out.push('.');
    if e2 < -1 && precision > 0 {
        let nn = (-1 - e2).min(precision);
        out.extend(std::iter::repeat_n('0', nn as usize));
        precision -= nn;
    }
    if precision > 0 {
        let nn = (n - j).min(precision);
        if nn > 0 {
            out.push_str(
                std::str::from_utf8(&s.digits[j as usize..(j + nn) as usize]).expect("digits"),
            );
        }
    }
    // Trailing zeros go, but one digit stays after the point.
    while out.ends_with('0') {
        out.pop();
    }
    if out.ends_with('.') {
        out.push('0');
    }
    if exponent_form {
        let exp = s.dp - 1;
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        let a = exp.abs();
        if a >= 100 {
            out.push(char::from(b'0' + (a / 100) as u8));
        }
        out.push(char::from(b'0' + ((a % 100) / 10) as u8));
        out.push(char::from(b'0' + (a % 10) as u8));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reals_render_as_sqlite_does() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e20, "1.0e+20"),
            (1e16, "10000000000000000.0"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (123456.789, "123456.789"),
            (49.47, "49.47"),
            (-0.0, "0.0"),
            (-1.778010904310789e270, "-1.7780109043107891e+270"),
        ];
        for (r, text) in cases {
            assert_eq!(real_to_text(r), text, "{r}");
        }
    }

    #[test]
    fn texts_read_as_sqlite_reads_them() {
        let cases: &[(&str, f64, i32)] = &[
            ("5", 5.0, 1),
            (" 5 ", 5.0, 1),
            ("5.0", 5.0, 3),
            ("1e3", 1000.0, 3),
            ("1e", 1.0, -15),
            ("x", 0.0, 0),
            ("-", 0.0, 0),
            ("+.5", 0.5, 3),
            ("5\0x", 5.0, 1),
            ("\u{a0}5", 0.0, 0),
            ("0", 0.0, 5),
        ];
        for (t, v, rc) in cases {
            let (got, grc) = atof(t.as_bytes());
            assert_eq!((got, grc), (*v, *rc), "{t:?}");
        }
    }
}

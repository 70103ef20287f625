//! [`Input`]: reads structured choices from fuzzer bytes. Every read
//! succeeds: past the end it yields zeros, so any byte string decodes to
//! some input and a short one to a small input.

use tenantsync_types::Value;

/// A cursor over the fuzzer's bytes.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// One byte (0 past the end).
    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    /// Up to `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// What is left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        usize::from(self.byte()) % n
    }

    /// One of `items`.
    pub fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }

    /// Eight bytes, big-endian.
    pub fn u64(&mut self) -> u64 {
        (0..8).fold(0u64, |acc, _| (acc << 8) | u64::from(self.byte()))
    }

    /// A length-prefixed byte string of at most `max` bytes.
    pub fn short_bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        self.bytes(n).to_vec()
    }

    /// A length-prefixed string (lossy UTF-8) of at most `max` bytes.
    pub fn short_text(&mut self, max: usize) -> String {
        String::from_utf8_lossy(&self.short_bytes(max)).into_owned()
    }

    /// An integer, mostly one of the interesting ones.
    pub fn int(&mut self) -> i64 {
        match self.byte() {
            0..=9 => i64::from(self.byte() % 8) - 2,
            10 => i64::MAX,
            11 => i64::MIN,
            12 => i64::MAX - 1,
            13 => 1 << 53,
            14 => (1 << 53) + 1,
            15 => 255,
            16 => 256,
            17 => -129,
            18 => u32::MAX.into(),
            19 => 1 << 31,
            _ => self.u64() as i64,
        }
    }

    /// Any value of any storage class, with arbitrary contents (any REAL bit
    /// pattern, NaNs and infinities included).
    pub fn value(&mut self) -> Value {
        match self.byte() % 8 {
            0 => Value::Null,
            1 | 2 => Value::Integer(self.int()),
            3 => Value::Real(f64::from_bits(self.u64())),
            4 => Value::Real(self.pick(&[
                0.0,
                -0.0,
                1.0,
                0.5,
                -1.5,
                1e300,
                f64::INFINITY,
                f64::NEG_INFINITY,
                9.223_372_036_854_776e18,
                -9.223_372_036_854_776e18,
            ])),
            5 => Value::Text(self.short_text(24)),
            6 => Value::Blob(self.short_bytes(24)),
            _ => self.pick(&[
                Value::Text(String::new()),
                Value::Text("a".into()),
                Value::Text("1".into()),
                Value::Text("é".into()),
                Value::Blob(vec![]),
                Value::Integer(0),
                Value::Integer(1),
            ]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Input;

    #[test]
    fn reads_past_the_end_are_zeros() {
        let mut i = Input::new(&[7, 1, 2]);
        assert_eq!(i.byte(), 7);
        assert_eq!(i.bytes(5), &[1, 2]);
        assert!(i.is_empty());
        assert_eq!(i.byte(), 0);
        assert_eq!(i.u64(), 0);
        assert_eq!(i.short_bytes(10), Vec::<u8>::new());
    }
}

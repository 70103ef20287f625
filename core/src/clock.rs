//! The per-row clock record stored in `"<t>__crsql_clock".clock`.
//!
//! One record per tracked row holds the sentinel clock (cid `'-1'`, whose
//! col_version is the row's causal length) and one clock per non-PK column
//! (identified by its *slot*, a per-table number mapped to the column name in
//! `crsql_tenantsync_columns`, so ALTER can drop and add columns).
//!
//! Encoding: a format byte (1), then for each present clock in slot order
//! (slot 0 = sentinel): `varint(slot) zigzag(col_version) zigzag(db_version)
//! varint(site ordinal) zigzag(seq)`. Small numbers take one byte each, so a
//! typical cell costs 5-8 bytes.

/// The clock of one cell (or of the sentinel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Clock {
    pub col_version: i64,
    pub db_version: i64,
    /// Ordinal in `crsql_site_id` (0 = this database).
    pub site: i64,
    pub seq: i64,
}

/// All clocks of one row. `cells[slot - 1]` is the clock of the column with
/// that slot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RowClock {
    pub sentinel: Option<Clock>,
    pub cells: Vec<Option<Clock>>,
}

const FORMAT: u8 = 1;

/// Why a stored clock record could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt clock record: {0}")]
pub(crate) struct ClockError(pub &'static str);

impl RowClock {
    /// The clock of the cell in `slot` (1-based).
    pub fn cell(&self, slot: u32) -> Option<Clock> {
        self.cells.get(slot as usize - 1).copied().flatten()
    }

    pub fn cell_mut(&mut self, slot: u32) -> &mut Option<Clock> {
        let i = slot as usize - 1;
        if self.cells.len() <= i {
            self.cells.resize(i + 1, None);
        }
        &mut self.cells[i]
    }

    pub fn has_cells(&self) -> bool {
        self.cells.iter().any(Option::is_some)
    }

    pub fn is_empty(&self) -> bool {
        self.sentinel.is_none() && !self.has_cells()
    }

    /// The causal length as cr-sqlite computes it for merges: the sentinel's
    /// col_version, else 1 if any cell clock exists, else 0.
    pub fn local_cl(&self) -> i64 {
        match self.sentinel {
            Some(s) => s.col_version,
            None if self.has_cells() => 1,
            None => 0,
        }
    }

    /// The `cl` column of `crsql_changes`: the sentinel's col_version or 1.
    pub fn reported_cl(&self) -> i64 {
        self.sentinel.map_or(1, |s| s.col_version)
    }

    pub fn clear_cells(&mut self) {
        self.cells.clear();
    }

    /// Every (slot, clock) present, sentinel (slot 0) first.
    pub fn entries(&self) -> impl Iterator<Item = (u32, Clock)> + '_ {
        self.sentinel.map(|c| (0, c)).into_iter().chain(
            self.cells
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.map(|c| (i as u32 + 1, c))),
        )
    }

    /// The distinct db_versions present, sorted.
    pub fn versions(&self) -> Vec<i64> {
        let mut v: Vec<i64> = self.entries().map(|(_, c)| c.db_version).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 8 * (1 + self.cells.len()));
        out.push(FORMAT);
        for (slot, c) in self.entries() {
            put_varint(&mut out, u64::from(slot));
            put_varint(&mut out, zigzag(c.col_version));
            put_varint(&mut out, zigzag(c.db_version));
            put_varint(&mut out, c.site as u64);
            put_varint(&mut out, zigzag(c.seq));
        }
        out
    }

    pub fn decode(mut b: &[u8]) -> Result<RowClock, ClockError> {
        let mut rc = RowClock::default();
        match b.split_first() {
            Some((&FORMAT, rest)) => b = rest,
            Some(_) => return Err(ClockError("unknown format byte")),
            None => return Err(ClockError("empty")),
        }
        while !b.is_empty() {
            let slot = get_varint(&mut b)?;
            let clock = Clock {
                col_version: unzigzag(get_varint(&mut b)?),
                db_version: unzigzag(get_varint(&mut b)?),
                site: get_varint(&mut b)? as i64,
                seq: unzigzag(get_varint(&mut b)?),
            };
            if slot == 0 {
                rc.sentinel = Some(clock);
            } else {
                let slot = u32::try_from(slot).map_err(|_| ClockError("slot out of range"))?;
                *rc.cell_mut(slot) = Some(clock);
            }
        }
        Ok(rc)
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &mut &[u8]) -> Result<u64, ClockError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first().ok_or(ClockError("truncated varint"))?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(ClockError("varint longer than 10 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(col_version: i64, db_version: i64, site: i64, seq: i64) -> Clock {
        Clock {
            col_version,
            db_version,
            site,
            seq,
        }
    }

    #[test]
    fn round_trips_with_extreme_values() {
        let rc = RowClock {
            sentinel: Some(c(3, 7, 0, 0)),
            cells: vec![
                Some(c(1, 7, 0, 1)),
                None,
                Some(c(i64::MAX, i64::MIN, 5000, -1)),
                Some(c(0, 0, 0, 0)),
            ],
        };
        let bytes = rc.encode();
        assert_eq!(RowClock::decode(&bytes).unwrap(), rc);
        // A fresh two-column row is 11 bytes: format + 2 x (slot cv dbv site seq).
        let fresh = RowClock {
            sentinel: None,
            cells: vec![Some(c(1, 1, 0, 0)), Some(c(1, 1, 0, 1))],
        };
        assert_eq!(fresh.encode().len(), 11);
        assert_eq!(fresh.versions(), vec![1]);
        assert_eq!(rc.versions(), vec![i64::MIN, 0, 7]);
    }

    #[test]
    fn causal_length_rules() {
        let mut rc = RowClock::default();
        assert_eq!(rc.local_cl(), 0);
        assert_eq!(rc.reported_cl(), 1);
        *rc.cell_mut(2) = Some(c(1, 1, 0, 0));
        assert_eq!(rc.local_cl(), 1);
        rc.sentinel = Some(c(4, 2, 0, 0));
        assert_eq!(rc.local_cl(), 4);
        assert_eq!(rc.reported_cl(), 4);
    }

    #[test]
    fn corrupt_records_are_errors() {
        assert!(RowClock::decode(&[]).is_err());
        assert!(RowClock::decode(&[9]).is_err());
        assert!(RowClock::decode(&[1, 1, 2]).is_err());
        assert!(RowClock::decode(&[1, 0x80, 0x80]).is_err());
    }
}

//! `Timestamp`: an instant in UTC with millisecond precision, written as RFC 3339 with `Z`.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Milliseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The current instant.
    pub fn now() -> Self {
        let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        Timestamp(since.as_millis() as i64)
    }

    /// An instant from Unix milliseconds.
    pub const fn from_millis(millis: i64) -> Self {
        Timestamp(millis)
    }

    /// Unix milliseconds.
    pub const fn millis(self) -> i64 {
        self.0
    }

    /// Unix seconds, rounded down.
    pub const fn seconds(self) -> i64 {
        self.0.div_euclid(1000)
    }

    /// This instant moved forward by `duration`.
    pub fn plus(self, duration: Duration) -> Self {
        Timestamp(self.0.saturating_add(duration.as_millis() as i64))
    }

    /// This instant moved back by `duration`.
    pub fn minus(self, duration: Duration) -> Self {
        Timestamp(self.0.saturating_sub(duration.as_millis() as i64))
    }

    /// How long after `earlier` this instant is (zero when it is not after it).
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0).max(0) as u64)
    }

    /// Parses RFC 3339 with any offset; sub-millisecond digits are truncated.
    pub fn parse_rfc3339(text: &str) -> Option<Self> {
        let parsed = OffsetDateTime::parse(text, &Rfc3339).ok()?;
        Some(Timestamp((parsed.unix_timestamp_nanos() / 1_000_000) as i64))
    }
}

impl Timestamp {
    /// `2026-01-31T11:59:59.123Z`, written digit by digit: every answer shows three of these,
    /// and `write!` with padded fields cost about 2,800 instructions each
    /// (docs/BENCHMARKS.md "Where a read's instructions went"). `None` for a year outside
    /// 0000–9999, which `Display` writes the slow way (years past 9999 are out of `time`'s range).
    fn rfc3339(&self) -> Option<[u8; 24]> {
        let nanos = self.0 as i128 * 1_000_000;
        let at = OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let year = u16::try_from(at.year()).ok().filter(|year| *year <= 9999)?;
        let mut out = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, width: usize, mut value: u16| {
            for index in (at..at + width).rev() {
                out[index] = b'0' + (value % 10) as u8;
                value /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, at.month() as u16);
        put(8, 2, at.day().into());
        put(11, 2, at.hour().into());
        put(14, 2, at.minute().into());
        put(17, 2, at.second().into());
        put(20, 3, at.millisecond());
        Some(out)
    }
}

impl fmt::Display for Timestamp {
    /// `2026-01-31T11:59:59.123Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(text) = self.rfc3339() {
            // Only ASCII digits and separators were written.
            return f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?);
        }
        let nanos = self.0 as i128 * 1_000_000;
        let at = OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            at.year(),
            at.month() as u8,
            at.day(),
            at.hour(),
            at.minute(),
            at.second(),
            at.millisecond()
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.rfc3339() {
            Some(text) => serializer.serialize_str(std::str::from_utf8(&text).map_err(serde::ser::Error::custom)?),
            None => serializer.collect_str(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_with_milliseconds_and_z() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(Timestamp(1_769_860_799_123).to_string(), "2026-01-31T11:59:59.123Z");
        assert_eq!(Timestamp(253_402_300_799_999).to_string(), "9999-12-31T23:59:59.999Z");
        assert_eq!(serde_json::to_string(&Timestamp(1_769_860_799_007)).unwrap(), r#""2026-01-31T11:59:59.007Z""#);
    }

    #[test]
    fn a_year_before_0000_is_written_the_slow_way() {
        assert_eq!(Timestamp(-62_167_219_200_001).to_string(), "-001-12-31T23:59:59.999Z");
        assert_eq!(serde_json::to_string(&Timestamp(-62_167_219_200_001)).unwrap(), r#""-001-12-31T23:59:59.999Z""#);
    }

    #[test]
    fn parses_rfc3339_with_offsets() {
        assert_eq!(Timestamp::parse_rfc3339("2026-01-31T12:59:59.123+01:00"), Some(Timestamp(1_769_860_799_123)));
        assert_eq!(Timestamp::parse_rfc3339("2026-01-31"), None);
    }
}

//! Values in PostgreSQL's binary format, for `COPY`.

use bytes::{BufMut, BytesMut};
use tokio_postgres::types::{IsNull, ToSql, Type};

/// JSON text as `jsonb` (the server parses it; a malformed document fails the copy).
#[derive(Debug)]
pub(super) struct Jsonb(pub(super) String);

impl ToSql for Jsonb {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.put_u8(1); // jsonb binary format version
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    tokio_postgres::types::accepts!(JSONB);
    tokio_postgres::types::to_sql_checked!();
}

/// An amount in cents as `numeric` with two fraction digits.
#[derive(Debug, Clone, Copy)]
pub(super) struct Numeric(pub(super) u64);

impl Numeric {
    /// The binary `numeric`: digit count, weight, sign, display scale, then base-10000 digits.
    pub(super) fn encode(self, out: &mut BytesMut) -> Result<(), Box<dyn std::error::Error + Sync + Send>> {
        let (mut whole, fraction) = (self.0 / 100, self.0 % 100);
        let mut digits = Vec::new();
        while whole > 0 {
            digits.push(i16::try_from(whole % 10_000)?);
            whole /= 10_000;
        }
        digits.reverse();
        // The weight is the power of 10000 of the first digit: -1 when there is no whole part.
        let weight = i16::try_from(digits.len())? - 1;
        digits.push(i16::try_from(fraction * 100)?);
        out.put_i16(i16::try_from(digits.len())?);
        out.put_i16(weight);
        out.put_u16(0x0000); // positive
        out.put_u16(2); // display scale: two fraction digits
        for digit in digits {
            out.put_i16(digit);
        }
        Ok(())
    }
}

impl ToSql for Numeric {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.encode(out)?;
        Ok(IsNull::No)
    }

    tokio_postgres::types::accepts!(NUMERIC);
    tokio_postgres::types::to_sql_checked!();
}

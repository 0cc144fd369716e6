//! `Amount`: an exact decimal amount of money in cents; never binary floating point.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The largest amount a session may carry: 10 000.00.
pub const MAX_CENTS: u64 = 1_000_000;

/// A positive amount of at most 10 000 with at most two fraction digits, held as cents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount(u64);

/// Why a decimal text is not a valid amount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmountError {
    NotANumber,
    NotPositive,
    TooLarge,
    TooManyFractionDigits,
}

impl fmt::Display for AmountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AmountError::NotANumber => "must be a decimal number",
            AmountError::NotPositive => "must be greater than 0",
            AmountError::TooLarge => "must be at most 10000",
            AmountError::TooManyFractionDigits => "must have at most 2 fraction digits",
        })
    }
}

impl Amount {
    /// The amount in cents.
    pub fn cents(self) -> u64 {
        self.0
    }

    /// An amount from cents, checked against the same bounds as parsed text.
    pub fn from_cents(cents: u64) -> Result<Self, AmountError> {
        if cents == 0 {
            Err(AmountError::NotPositive)
        } else if cents > MAX_CENTS {
            Err(AmountError::TooLarge)
        } else {
            Ok(Amount(cents))
        }
    }
}

impl FromStr for Amount {
    type Err = AmountError;

    /// Parses JSON number text exactly: `100`, `100.5`, `100.50`, `1e2`, `-0`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (negative, rest) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exponent) = match rest.find(['e', 'E']) {
            Some(at) => {
                let exp: i32 = rest[at + 1..].trim_start_matches('+').parse().map_err(|_| AmountError::NotANumber)?;
                (&rest[..at], exp)
            }
            None => (rest, 0),
        };
        let (int_part, frac_part) = match mantissa.split_once('.') {
            Some((i, f)) => (i, f),
            None => (mantissa, ""),
        };
        if int_part.is_empty()
            || !int_part.bytes().all(|b| b.is_ascii_digit())
            || !frac_part.bytes().all(|b| b.is_ascii_digit())
            || (mantissa.contains('.') && frac_part.is_empty())
        {
            return Err(AmountError::NotANumber);
        }
        // All digits as one integer with a decimal point `scale` places from the right.
        let digits: String = format!("{int_part}{frac_part}");
        let digits = digits.trim_start_matches('0');
        let scale = frac_part.len() as i64 - exponent as i64;
        // Strip trailing zeros that only widen the scale.
        let mut digits = digits.to_string();
        let mut scale = scale;
        while scale > 0 && digits.ends_with('0') {
            digits.pop();
            scale -= 1;
        }
        if digits.is_empty() {
            return Err(AmountError::NotPositive);
        }
        if negative {
            return Err(AmountError::NotPositive);
        }
        if scale > 2 {
            return Err(AmountError::TooManyFractionDigits);
        }
        // cents = digits * 10^(2 - scale); anything longer than 7 significant digits before
        // scaling is beyond 10000.00 for sure.
        let shift = 2 - scale;
        if digits.len() as i64 + shift > 8 {
            return Err(AmountError::TooLarge);
        }
        let mut cents: u64 = digits.parse().map_err(|_| AmountError::NotANumber)?;
        for _ in 0..shift {
            cents *= 10;
        }
        Amount::from_cents(cents)
    }
}

impl fmt::Display for Amount {
    /// Shortest exact form: `100`, `100.5`, `0.01`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / 100;
        let cents = self.0 % 100;
        match (cents, cents % 10) {
            (0, _) => write!(f, "{whole}"),
            (c, 0) => write!(f, "{whole}.{}", c / 10),
            (c, _) => write!(f, "{whole}.{c:02}"),
        }
    }
}

impl Serialize for Amount {
    /// A JSON number with exactly the decimal digits of the amount.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let number = serde_json::Number::from_str(&self.to_string()).map_err(serde::ser::Error::custom)?;
        number.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let number = serde_json::Number::deserialize(deserializer)?;
        number.to_string().parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(text: &str) -> Result<u64, AmountError> {
        text.parse::<Amount>().map(Amount::cents)
    }

    #[test]
    fn accepts_whole_and_decimal_amounts_exactly() {
        assert_eq!(parse("100"), Ok(10_000));
        assert_eq!(parse("100.5"), Ok(10_050));
        assert_eq!(parse("100.50"), Ok(10_050));
        assert_eq!(parse("0.01"), Ok(1));
        assert_eq!(parse("10000"), Ok(1_000_000));
        assert_eq!(parse("10000.00"), Ok(1_000_000));
        assert_eq!(parse("1e2"), Ok(10_000));
        assert_eq!(parse("1.5E1"), Ok(1_500));
        assert_eq!(parse("12.300"), Ok(1_230));
    }

    #[test]
    fn rejects_amounts_out_of_bounds_or_too_precise() {
        assert_eq!(parse("0"), Err(AmountError::NotPositive));
        assert_eq!(parse("0.00"), Err(AmountError::NotPositive));
        assert_eq!(parse("-5"), Err(AmountError::NotPositive));
        assert_eq!(parse("10000.01"), Err(AmountError::TooLarge));
        assert_eq!(parse("99999999999999999999"), Err(AmountError::TooLarge));
        assert_eq!(parse("0.001"), Err(AmountError::TooManyFractionDigits));
        assert_eq!(parse("1.005"), Err(AmountError::TooManyFractionDigits));
        assert_eq!(parse("1e-3"), Err(AmountError::TooManyFractionDigits));
        assert_eq!(parse("abc"), Err(AmountError::NotANumber));
        assert_eq!(parse("1."), Err(AmountError::NotANumber));
        assert_eq!(parse(".5"), Err(AmountError::NotANumber));
    }

    #[test]
    fn displays_the_shortest_exact_form() {
        assert_eq!(Amount(10_000).to_string(), "100");
        assert_eq!(Amount(10_050).to_string(), "100.5");
        assert_eq!(Amount(1).to_string(), "0.01");
        assert_eq!(Amount(1_000_000).to_string(), "10000");
    }

    #[test]
    fn serialises_as_a_json_number_with_its_exact_digits() {
        let json = serde_json::to_string(&Amount(1_999)).unwrap();
        assert_eq!(json, "19.99");
        let back: Amount = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Amount(1_999));
    }

    proptest! {
        #[test]
        fn every_valid_amount_round_trips_through_its_text(cents in 1u64..=MAX_CENTS) {
            let amount = Amount(cents);
            prop_assert_eq!(amount.to_string().parse::<Amount>(), Ok(amount));
        }

        #[test]
        fn two_digit_text_parses_to_the_same_cents(whole in 0u64..10_000, frac in 0u64..100) {
            let cents = whole * 100 + frac;
            let parsed = format!("{whole}.{frac:02}").parse::<Amount>();
            if cents == 0 {
                prop_assert_eq!(parsed, Err(AmountError::NotPositive));
            } else {
                prop_assert_eq!(parsed.map(Amount::cents), Ok(cents));
            }
        }
    }
}

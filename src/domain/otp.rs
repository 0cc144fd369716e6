//! One-time codes that authenticate a customer on the hosted page: the limits, the keyed hash
//! kept at rest, and the phone numbers codes go to (docs/HOSTED.md). No I/O.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

use super::time::Timestamp;

/// Digits in a code.
pub const CODE_DIGITS: usize = 6;
/// How long a code is accepted.
pub const CODE_TTL_MILLIS: i64 = 5 * 60 * 1000;
/// Wrong entries a code tolerates; the next wrong one (and the right one after it) is refused.
pub const MAX_WRONG: u32 = 5;
/// Codes one session may send.
pub const MAX_CODES: u32 = 3;
/// The least time between two sends.
pub const RESEND_AFTER_MILLIS: i64 = 30 * 1000;

/// The sign-in state of one session, as stored (the code only as a keyed hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtpState {
    /// Where the last code went (E.164).
    pub phone: String,
    /// The keyed hash of the code in force; `None` once it was used or exhausted.
    pub code_hash: Option<[u8; 32]>,
    pub code_expires_on: Timestamp,
    /// Wrong entries of the code in force.
    pub wrong_attempts: u32,
    /// Codes sent for this session.
    pub codes_sent: u32,
    pub last_sent_on: Timestamp,
}

impl OtpState {
    /// Whether a code is in force: sent, not used up, not expired.
    pub fn has_live_code(&self, now: Timestamp) -> bool {
        self.code_hash.is_some() && now < self.code_expires_on && self.wrong_attempts < MAX_WRONG
    }

    /// The state after a new code was sent to `phone`.
    pub fn after_send(previous: Option<&OtpState>, phone: String, code_hash: [u8; 32], now: Timestamp) -> OtpState {
        OtpState {
            phone,
            code_hash: Some(code_hash),
            code_expires_on: Timestamp::from_millis(now.millis() + CODE_TTL_MILLIS),
            wrong_attempts: 0,
            codes_sent: previous.map_or(0, |p| p.codes_sent) + 1,
            last_sent_on: now,
        }
    }
}

/// Why no code may be sent now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendRefusal {
    /// The last code went out less than 30 s ago.
    TooSoon { wait_seconds: i64 },
    /// All codes of this session were sent.
    NoCodesLeft,
}

/// Whether a(nother) code may be sent now.
pub fn may_send(state: Option<&OtpState>, now: Timestamp) -> Result<(), SendRefusal> {
    let Some(state) = state else { return Ok(()) };
    if state.codes_sent >= MAX_CODES {
        return Err(SendRefusal::NoCodesLeft);
    }
    let wait = state.last_sent_on.millis() + RESEND_AFTER_MILLIS - now.millis();
    if wait > 0 {
        return Err(SendRefusal::TooSoon { wait_seconds: (wait + 999) / 1000 });
    }
    Ok(())
}

/// What an entered code comes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeCheck {
    Right,
    /// Wrong; this many entries are left for the code in force.
    Wrong {
        tries_left: u32,
    },
    /// No code was sent, or the one sent was used.
    NoCode,
    Expired,
    /// The code in force had its five wrong entries.
    TooManyTries,
}

/// Checks the hash of an entered code against the code in force.
pub fn check(state: Option<&OtpState>, entered_hash: &[u8; 32], now: Timestamp) -> CodeCheck {
    let Some(state) = state else { return CodeCheck::NoCode };
    let Some(expected) = &state.code_hash else { return CodeCheck::NoCode };
    if state.wrong_attempts >= MAX_WRONG {
        return CodeCheck::TooManyTries;
    }
    if now >= state.code_expires_on {
        return CodeCheck::Expired;
    }
    if constant_time_eq(expected, entered_hash) {
        CodeCheck::Right
    } else {
        CodeCheck::Wrong { tries_left: MAX_WRONG - state.wrong_attempts - 1 }
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh code: six uniformly random digits.
pub fn generate_code() -> std::io::Result<String> {
    // Rejection sampling: 4,294,000,000 is the largest multiple of 10^6 below 2^32.
    const LIMIT: u32 = 4_294_000_000;
    loop {
        let mut bytes = [0u8; 4];
        getrandom::getrandom(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
        let n = u32::from_le_bytes(bytes);
        if n < LIMIT {
            return Ok(format!("{:06}", n % 1_000_000));
        }
    }
}

/// The code as kept at rest: HMAC-SHA256 under the service's code key, bound to the session,
/// so a copy of the database alone does not let anyone try the million codes offline.
pub fn hash_code(key: &[u8; 32], session: Uuid, code: &str) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(session.as_bytes());
    mac.update(code.as_bytes());
    mac.finalize().into_bytes().into()
}

/// The six digits of an entered code (spaces ignored), or `None` when it cannot be one.
pub fn entered_code(text: &str) -> Option<String> {
    let digits: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    (digits.len() == CODE_DIGITS && digits.bytes().all(|b| b.is_ascii_digit())).then_some(digits)
}

/// A phone number as a customer types it, in E.164: international (`+49 151 …`, `0049 151 …`)
/// or national German (`0151 …`). Spaces, dashes, dots, slashes and parentheses are ignored.
pub fn parse_phone(text: &str) -> Option<String> {
    let text = text.trim();
    if text.len() > 40 {
        return None;
    }
    let compact: String = text.chars().filter(|c| !matches!(c, ' ' | '-' | '.' | '/' | '(' | ')' | '\u{a0}')).collect();
    let international = if let Some(rest) = compact.strip_prefix('+') {
        rest.to_owned()
    } else if let Some(rest) = compact.strip_prefix("00") {
        rest.to_owned()
    } else if let Some(rest) = compact.strip_prefix('0') {
        // A German national number: 0 and an area or mobile prefix that does not start with 0.
        format!("49{rest}")
    } else {
        return None;
    };
    let ok = (8..=15).contains(&international.len())
        && international.bytes().all(|b| b.is_ascii_digit())
        && !international.starts_with('0')
        && !international.starts_with("490");
    ok.then(|| format!("+{international}"))
}

/// The phone shown to a customer who did not type it: country code and the last two digits
/// (`+49 •••• ••45`).
pub fn mask_phone(phone: &str) -> String {
    let digits: Vec<char> = phone.chars().filter(char::is_ascii_digit).collect();
    let country: String = digits.iter().take(2).collect();
    let last: String = digits[digits.len().saturating_sub(2)..].iter().collect();
    format!("+{country} •••• ••{last}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_millis(1_700_000_000_000 + seconds * 1000)
    }

    fn sent(code: &str, at_: Timestamp) -> OtpState {
        OtpState::after_send(None, "+4915112345678".into(), hash_code(&KEY, Uuid::nil(), code), at_)
    }

    #[test]
    fn the_right_code_is_right_within_five_minutes_and_expired_after() {
        let state = sent("123456", at(0));
        let right = hash_code(&KEY, Uuid::nil(), "123456");
        assert_eq!(check(Some(&state), &right, at(299)), CodeCheck::Right);
        assert_eq!(check(Some(&state), &right, at(300)), CodeCheck::Expired);
    }

    #[test]
    fn a_code_is_bound_to_its_session() {
        let state = sent("123456", at(0));
        let other_session = hash_code(&KEY, Uuid::max(), "123456");
        assert_eq!(check(Some(&state), &other_session, at(1)), CodeCheck::Wrong { tries_left: 4 });
    }

    #[test]
    fn five_wrong_entries_use_a_code_up_even_for_the_right_code() {
        let mut state = sent("123456", at(0));
        let wrong = hash_code(&KEY, Uuid::nil(), "000000");
        for left in (0..MAX_WRONG).rev() {
            assert_eq!(check(Some(&state), &wrong, at(1)), CodeCheck::Wrong { tries_left: left });
            state.wrong_attempts += 1;
        }
        let right = hash_code(&KEY, Uuid::nil(), "123456");
        assert_eq!(check(Some(&state), &right, at(2)), CodeCheck::TooManyTries);
        assert!(!state.has_live_code(at(2)));
    }

    #[test]
    fn no_code_sent_or_a_used_code_is_no_code() {
        let right = hash_code(&KEY, Uuid::nil(), "123456");
        assert_eq!(check(None, &right, at(0)), CodeCheck::NoCode);
        let mut state = sent("123456", at(0));
        state.code_hash = None;
        assert_eq!(check(Some(&state), &right, at(1)), CodeCheck::NoCode);
    }

    #[test]
    fn codes_are_sent_at_most_three_times_thirty_seconds_apart() {
        assert_eq!(may_send(None, at(0)), Ok(()));
        let first = sent("111111", at(0));
        assert_eq!(may_send(Some(&first), at(10)), Err(SendRefusal::TooSoon { wait_seconds: 20 }));
        assert_eq!(may_send(Some(&first), at(30)), Ok(()));
        let second = OtpState::after_send(Some(&first), first.phone.clone(), [0; 32], at(30));
        let third = OtpState::after_send(Some(&second), first.phone.clone(), [0; 32], at(60));
        assert_eq!(third.codes_sent, 3);
        assert_eq!(may_send(Some(&third), at(1000)), Err(SendRefusal::NoCodesLeft));
    }

    #[test]
    fn generated_codes_are_six_digits() {
        for _ in 0..100 {
            let code = generate_code().unwrap();
            assert_eq!(entered_code(&code), Some(code.clone()));
        }
    }

    #[test]
    fn entered_codes_ignore_spaces_and_refuse_anything_else() {
        assert_eq!(entered_code(" 123 456 "), Some("123456".into()));
        for bad in ["12345", "1234567", "12a456", "", "１２３４５６"] {
            assert_eq!(entered_code(bad), None, "{bad}");
        }
    }

    #[test]
    fn phones_are_read_as_e164_or_national_german() {
        let cases = [
            ("+49 151 12345678", Some("+4915112345678")),
            ("0049 (151) 123-456-78", Some("+4915112345678")),
            ("0151 12345678", Some("+4915112345678")),
            ("030/1234567", Some("+49301234567")),
            ("+43 664 1234567", Some("+436641234567")),
            ("151 12345678", None),
            ("+0151", None),
            ("00", None),
            ("+49 151 abc", None),
            ("+1234567890123456", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_phone(text).as_deref(), expected, "{text}");
        }
    }

    #[test]
    fn a_masked_phone_shows_the_country_code_and_the_last_two_digits() {
        assert_eq!(mask_phone("+4915112345678"), "+49 •••• ••78");
    }
}

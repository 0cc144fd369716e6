//! `Locale`: the language (and region) the hosted page speaks, normalised as docs/API.md says.

use std::fmt;

/// A supported locale: `de-DE` unless the merchant asked for English or German.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Locale(String);

impl Locale {
    /// The default when no locale, or one in an unsupported language, is given.
    pub fn default_locale() -> Self {
        Locale("de-DE".to_owned())
    }

    /// Parses `ll` or `ll-RR` (letters only); a language other than `en`/`de` becomes
    /// `de-DE`. `None` when the text does not have that shape.
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        let letters = |s: &[u8]| s.iter().all(u8::is_ascii_alphabetic);
        let (language, region) = match bytes.len() {
            2 if letters(bytes) => (&text[..2], None),
            5 if letters(&bytes[..2]) && bytes[2] == b'-' && letters(&bytes[3..]) => (&text[..2], Some(&text[3..])),
            _ => return None,
        };
        let language = language.to_ascii_lowercase();
        if language != "en" && language != "de" {
            return Some(Self::default_locale());
        }
        Some(Locale(match region {
            Some(region) => format!("{language}-{}", region.to_ascii_uppercase()),
            None => language,
        }))
    }

    /// The normalised text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The two-letter language, `en` or `de`.
    pub fn language(&self) -> &str {
        &self.0[..2]
    }
}

impl fmt::Display for Locale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalised(text: &str) -> Option<String> {
        Locale::parse(text).map(|l| l.0)
    }

    #[test]
    fn english_and_german_are_normalised_in_case() {
        assert_eq!(normalised("en").as_deref(), Some("en"));
        assert_eq!(normalised("EN-gb").as_deref(), Some("en-GB"));
        assert_eq!(normalised("De-at").as_deref(), Some("de-AT"));
    }

    #[test]
    fn other_languages_become_german_germany() {
        assert_eq!(normalised("fr").as_deref(), Some("de-DE"));
        assert_eq!(normalised("fr-FR").as_deref(), Some("de-DE"));
    }

    #[test]
    fn malformed_locales_are_rejected() {
        for bad in ["", "e", "eng", "en_GB", "en-G", "en-GBR", "1n", "en-1B", "ää"] {
            assert_eq!(normalised(bad), None, "{bad:?}");
        }
    }
}

//! Everything the hosted page says, in German and English. Placeholders in braces (`{merchant}`,
//! `{n}`, `{phone}`) are filled by `fill`; the template escapes the result.

use crate::domain::intent::Purpose;

/// The page's language.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    De,
    En,
}

impl Lang {
    /// The language of a session's locale: English for `en…`, German otherwise.
    pub fn of_locale(locale: &str) -> Lang {
        if locale.get(..2).is_some_and(|l| l.eq_ignore_ascii_case("en")) {
            Lang::En
        } else {
            Lang::De
        }
    }

    /// The language a `lang` switch names.
    pub fn parse(text: &str) -> Option<Lang> {
        match text {
            "de" => Some(Lang::De),
            "en" => Some(Lang::En),
            _ => None,
        }
    }

    /// The `lang` attribute and switch value.
    pub fn code(self) -> &'static str {
        match self {
            Lang::De => "de",
            Lang::En => "en",
        }
    }

    /// The page's texts in this language.
    pub fn texts(self) -> &'static Texts {
        match self {
            Lang::De => &DE,
            Lang::En => &EN,
        }
    }
}

/// One language's texts.
pub struct Texts {
    pub title: &'static str,
    pub with_merchant: &'static str,
    pub amount: &'static str,
    pub time_left: &'static str,
    pub deposit: &'static str,
    pub withdrawal: &'static str,
    pub payment: &'static str,
    pub payout: &'static str,
    pub registration: &'static str,
    pub existing_code: &'static str,
    pub sign_in: &'static str,
    pub phone_label: &'static str,
    pub phone_hint: &'static str,
    pub send_code: &'static str,
    pub code_to_known: &'static str,
    pub code_sent: &'static str,
    pub code_label: &'static str,
    pub verify: &'static str,
    pub resend: &'static str,
    pub wrong_code: &'static str,
    pub code_expired: &'static str,
    pub code_used_up: &'static str,
    pub no_code: &'static str,
    pub too_soon: &'static str,
    pub no_codes_left: &'static str,
    pub send_failed: &'static str,
    pub bad_phone: &'static str,
    pub bad_code: &'static str,
    pub confirm_heading: &'static str,
    pub confirm: &'static str,
    pub your_code: &'static str,
    pub show_code: &'static str,
    pub continue_to: &'static str,
    pub done: &'static str,
    pub abort: &'static str,
    pub cancelled: &'static str,
    pub expired: &'static str,
    pub aborted: &'static str,
    pub completed: &'static str,
    pub back_to: &'static str,
    pub invalid_link: &'static str,
    pub expired_link: &'static str,
    pub start_again: &'static str,
    pub no_session: &'static str,
    pub stale_form: &'static str,
    pub unavailable: &'static str,
    pub other_language: &'static str,
    pub sms: &'static str,
}

static DE: Texts = Texts {
    title: "Sicher bestätigen",
    with_merchant: "bei {merchant}",
    amount: "Betrag",
    time_left: "Noch {n} Min.",
    deposit: "Einzahlung",
    withdrawal: "Auszahlung",
    payment: "Zahlung",
    payout: "Auszahlung",
    registration: "Registrierung",
    existing_code: "Zahlungscode ansehen",
    sign_in: "Wir bestätigen Ihre Identität mit einem Code per SMS.",
    phone_label: "Ihre Mobilnummer",
    phone_hint: "Zum Beispiel 0151\u{a0}23456789 oder +49\u{a0}151\u{a0}23456789",
    send_code: "Code senden",
    code_to_known: "Wir senden einen Code an",
    code_sent: "Wir haben einen Code an {phone} gesendet.",
    code_label: "6-stelliger Code",
    verify: "Bestätigen",
    resend: "Neuen Code senden",
    wrong_code: "Dieser Code stimmt nicht. Noch {n} Versuche.",
    code_expired: "Der Code ist abgelaufen. Bitte fordern Sie einen neuen an.",
    code_used_up: "Zu viele falsche Eingaben. Bitte fordern Sie einen neuen Code an.",
    no_code: "Bitte fordern Sie zuerst einen Code an.",
    too_soon: "Bitte warten Sie noch {n} Sekunden, bevor Sie einen neuen Code anfordern.",
    no_codes_left: "Es wurden bereits drei Codes gesendet. Sie können den Vorgang nur noch abbrechen.",
    send_failed: "Der Code konnte nicht gesendet werden. Bitte versuchen Sie es erneut.",
    bad_phone: "Bitte geben Sie eine gültige Mobilnummer ein.",
    bad_code: "Bitte geben Sie die 6 Ziffern des Codes ein.",
    confirm_heading: "Bitte prüfen Sie die Angaben oben und bestätigen Sie.",
    confirm: "Jetzt bestätigen",
    your_code: "Ihr Zahlungscode",
    show_code: "Zeigen Sie diesen Code an der Kasse vor oder scannen Sie ihn in der App.",
    continue_to: "Weiter zu {merchant}",
    done: "Fertig",
    abort: "Abbrechen und zurück zu {merchant}",
    cancelled: "{merchant} hat diesen Vorgang abgebrochen.",
    expired: "Die Zeit für diesen Vorgang ist abgelaufen.",
    aborted: "Sie haben diesen Vorgang abgebrochen.",
    completed: "Dieser Vorgang ist abgeschlossen.",
    back_to: "Zurück zu {merchant}",
    invalid_link: "Dieser Link ist ungültig.",
    expired_link: "Dieser Link ist abgelaufen.",
    start_again: "Bitte kehren Sie zum Händler zurück und starten Sie den Vorgang erneut.",
    no_session: "Wir konnten Ihren Vorgang nicht finden. Öffnen Sie den Link des Händlers erneut.",
    stale_form: "Diese Seite war veraltet. Bitte versuchen Sie es noch einmal.",
    unavailable: "Der Dienst ist gerade nicht erreichbar. Bitte versuchen Sie es gleich noch einmal.",
    other_language: "English",
    sms: "Ihr Bestätigungscode für {merchant}: {code}. Gültig für 5 Minuten. Geben Sie ihn nicht weiter.",
};

static EN: Texts = Texts {
    title: "Secure confirmation",
    with_merchant: "with {merchant}",
    amount: "Amount",
    time_left: "{n} min left",
    deposit: "Deposit",
    withdrawal: "Withdrawal",
    payment: "Payment",
    payout: "Payout",
    registration: "Registration",
    existing_code: "View your payment code",
    sign_in: "We confirm it's you with a code by text message.",
    phone_label: "Your mobile number",
    phone_hint: "For example +49\u{a0}151\u{a0}23456789",
    send_code: "Send code",
    code_to_known: "We'll send a code to",
    code_sent: "We sent a code to {phone}.",
    code_label: "6-digit code",
    verify: "Verify",
    resend: "Send a new code",
    wrong_code: "That code is not right. {n} tries left.",
    code_expired: "The code has expired. Please ask for a new one.",
    code_used_up: "Too many wrong entries. Please ask for a new code.",
    no_code: "Please ask for a code first.",
    too_soon: "Please wait {n} more seconds before asking for a new code.",
    no_codes_left: "Three codes have been sent already. You can only cancel now.",
    send_failed: "We could not send the code. Please try again.",
    bad_phone: "Please enter a valid mobile number.",
    bad_code: "Please enter the 6 digits of the code.",
    confirm_heading: "Please check the details above and confirm.",
    confirm: "Confirm now",
    your_code: "Your payment code",
    show_code: "Show this code at the till or scan it in the app.",
    continue_to: "Continue to {merchant}",
    done: "Done",
    abort: "Cancel and return to {merchant}",
    cancelled: "{merchant} cancelled this request.",
    expired: "The time for this request has run out.",
    aborted: "You cancelled this request.",
    completed: "This request is complete.",
    back_to: "Back to {merchant}",
    invalid_link: "This link is not valid.",
    expired_link: "This link has expired.",
    start_again: "Please go back to the merchant and start again.",
    no_session: "We could not find your request. Please open the merchant's link again.",
    stale_form: "This page was out of date. Please try again.",
    unavailable: "The service is unavailable right now. Please try again in a moment.",
    other_language: "Deutsch",
    sms: "Your confirmation code for {merchant}: {code}. Valid for 5 minutes. Do not share it.",
};

impl Texts {
    /// The name of what a session is for.
    pub fn purpose(&self, purpose: Purpose) -> &'static str {
        match purpose {
            Purpose::Deposit => self.deposit,
            Purpose::Withdrawal => self.withdrawal,
            Purpose::Payment => self.payment,
            Purpose::Payout => self.payout,
            Purpose::Registration => self.registration,
            Purpose::ExistingPaymentCode => self.existing_code,
        }
    }
}

/// `text` with each `{name}` replaced by its value.
pub fn fill(text: &str, values: &[(&str, &str)]) -> String {
    let mut out = text.to_owned();
    for (name, value) in values {
        out = out.replace(&format!("{{{name}}}"), value);
    }
    out
}

/// An amount in cents as the language writes it: `1.234,50 €` or `€1,234.50`.
pub fn money(cents: u64, lang: Lang) -> String {
    let (units, fraction) = (cents / 100, cents % 100);
    let digits = units.to_string();
    let separator = if lang == Lang::De { '.' } else { ',' };
    let mut grouped = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(separator);
        }
        grouped.push(digit);
    }
    match lang {
        Lang::De => format!("{grouped},{fraction:02}\u{a0}€"),
        Lang::En => format!("€{grouped}.{fraction:02}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_written_as_each_language_writes_them() {
        assert_eq!(money(12345, Lang::De), "123,45\u{a0}€");
        assert_eq!(money(12345, Lang::En), "€123.45");
        assert_eq!(money(123456789, Lang::De), "1.234.567,89\u{a0}€");
        assert_eq!(money(100000, Lang::En), "€1,000.00");
        assert_eq!(money(5, Lang::En), "€0.05");
    }

    #[test]
    fn english_locales_read_english_and_everything_else_german() {
        assert_eq!(Lang::of_locale("en-GB"), Lang::En);
        assert_eq!(Lang::of_locale("en"), Lang::En);
        assert_eq!(Lang::of_locale("de-DE"), Lang::De);
        assert_eq!(Lang::of_locale(""), Lang::De);
    }

    #[test]
    fn placeholders_are_filled_and_unknown_braces_stay() {
        assert_eq!(fill("bei {merchant} ({n})", &[("merchant", "Shop"), ("n", "3")]), "bei Shop (3)");
        assert_eq!(fill("{other}", &[("merchant", "Shop")]), "{other}");
    }

    #[test]
    fn both_languages_use_the_same_placeholders() {
        let pairs = [
            (DE.with_merchant, EN.with_merchant),
            (DE.time_left, EN.time_left),
            (DE.code_sent, EN.code_sent),
            (DE.wrong_code, EN.wrong_code),
            (DE.too_soon, EN.too_soon),
            (DE.abort, EN.abort),
            (DE.cancelled, EN.cancelled),
            (DE.sms, EN.sms),
        ];
        let names = |text: &str| {
            let mut names: Vec<String> =
                text.split('{').skip(1).filter_map(|rest| rest.split('}').next()).map(str::to_owned).collect();
            names.sort();
            names
        };
        for (de, en) in pairs {
            assert_eq!(names(de), names(en), "{de} / {en}");
        }
    }
}

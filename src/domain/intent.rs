//! Transaction intents: what a finished `NewTransactionIntent` session creates, which way its
//! money moves, and the text of its payment QR code. No I/O.

use uuid::Uuid;

use super::request::{Direction, SessionSpec, SessionType, TransactionData, TransactionType};

/// Which way money moves, seen from the customer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// The customer pays in (deposit, payment): `DIR:D`.
    PayIn,
    /// The customer is paid out (withdrawal, payout): `DIR:W`.
    PayOut,
}

impl Flow {
    /// The flow of a session's transaction.
    pub fn of(data: &TransactionData) -> Flow {
        use TransactionType::*;
        match (data.kind, data.direction) {
            (Some(PassthroughDeposit | CustomerToMerchantTransfer | CustomerToMerchantPassthrough), _) => Flow::PayIn,
            (Some(PassthroughWithdrawal | MerchantToCustomerTransfer | MerchantToCustomerPassthrough), _) => {
                Flow::PayOut
            }
            (None, Some(Direction::MerchantToCustomer)) => Flow::PayOut,
            (None, _) => Flow::PayIn,
        }
    }

    /// The name stored with an intent.
    pub fn as_str(self) -> &'static str {
        match self {
            Flow::PayIn => "PayIn",
            Flow::PayOut => "PayOut",
        }
    }

    /// The flow named `text`, as `as_str` writes it.
    pub fn parse(text: &str) -> Option<Flow> {
        [Flow::PayIn, Flow::PayOut].into_iter().find(|f| f.as_str() == text)
    }
}

/// What the customer is asked to agree to, for the page's headline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Deposit,
    Withdrawal,
    Payment,
    Payout,
    Registration,
    ExistingPaymentCode,
}

impl Purpose {
    /// The purpose of a session.
    pub fn of(spec: &SessionSpec) -> Purpose {
        use TransactionType::*;
        match (spec.kind, &spec.transaction_data) {
            (SessionType::NewCustomer, _) => Purpose::Registration,
            (SessionType::ExistingTransactionIntent, _) => Purpose::ExistingPaymentCode,
            (SessionType::NewTransactionIntent, Some(data)) => match data.kind {
                Some(PassthroughDeposit) => Purpose::Deposit,
                Some(PassthroughWithdrawal) => Purpose::Withdrawal,
                _ if Flow::of(data) == Flow::PayIn => Purpose::Payment,
                _ => Purpose::Payout,
            },
            (SessionType::NewTransactionIntent, None) => Purpose::Payment,
        }
    }
}

/// A transaction intent as recorded when a session completes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intent {
    pub id: Uuid,
    pub flow: Flow,
}

/// The text of an intent's payment QR code: `ZASTRPAY:V1/T:TI/ID:<ID-UPPERCASE>/DIR:<D|W>`.
pub fn qr_text(intent: Uuid, flow: Flow) -> String {
    let direction = match flow {
        Flow::PayIn => 'D',
        Flow::PayOut => 'W',
    };
    let id = intent.hyphenated().to_string().to_ascii_uppercase();
    format!("ZASTRPAY:V1/T:TI/ID:{id}/DIR:{direction}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::money::Amount;
    use crate::domain::request::Currency;

    fn data(kind: Option<TransactionType>, direction: Option<Direction>) -> TransactionData {
        TransactionData {
            kind,
            direction,
            amount: Amount::from_cents(100).unwrap(),
            currency: Currency::Eur,
            external_reference: None,
        }
    }

    #[test]
    fn deposits_and_payments_pay_in_withdrawals_and_payouts_pay_out() {
        use TransactionType::*;
        let pay_in = [PassthroughDeposit, CustomerToMerchantTransfer, CustomerToMerchantPassthrough];
        let pay_out = [PassthroughWithdrawal, MerchantToCustomerTransfer, MerchantToCustomerPassthrough];
        for kind in pay_in {
            assert_eq!(Flow::of(&data(Some(kind), None)), Flow::PayIn, "{kind:?}");
        }
        for kind in pay_out {
            assert_eq!(Flow::of(&data(Some(kind), None)), Flow::PayOut, "{kind:?}");
        }
        assert_eq!(Flow::of(&data(None, Some(Direction::CustomerToMerchant))), Flow::PayIn);
        assert_eq!(Flow::of(&data(None, Some(Direction::MerchantToCustomer))), Flow::PayOut);
    }

    #[test]
    fn the_qr_text_names_the_intent_in_upper_case_and_its_direction() {
        let id = Uuid::parse_str("0191c3a4-5b6d-7e8f-9a0b-1c2d3e4f5a6b").unwrap();
        assert_eq!(qr_text(id, Flow::PayIn), "ZASTRPAY:V1/T:TI/ID:0191C3A4-5B6D-7E8F-9A0B-1C2D3E4F5A6B/DIR:D");
        assert!(qr_text(id, Flow::PayOut).ends_with("/DIR:W"));
    }

    #[test]
    fn flows_round_trip_through_their_names() {
        for flow in [Flow::PayIn, Flow::PayOut] {
            assert_eq!(Flow::parse(flow.as_str()), Some(flow));
        }
    }
}

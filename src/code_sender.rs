//! Delivering one-time codes to customers: a log line (development) or a `POST` to the operator's
//! SMS gateway (docs/OPERATIONS.md, "One-time codes").

use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;

use crate::config::OtpSender;

/// How long the gateway may take to accept a code.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// A code on its way to a customer.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outgoing<'a> {
    pub redirect_session_id: Uuid,
    pub phone: &'a str,
    pub code: &'a str,
    pub locale: &'a str,
    /// The text to send, in the customer's language.
    pub message: &'a str,
}

/// The configured sender.
pub struct CodeSender {
    sender: OtpSender,
    client: reqwest::Client,
}

/// Why a code did not go out (for the log; the customer is told only to try again).
#[derive(Debug)]
pub struct SendError(pub String);

impl CodeSender {
    /// The sender the settings name.
    pub fn new(sender: OtpSender) -> std::io::Result<CodeSender> {
        let client = reqwest::Client::builder()
            .timeout(SEND_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(std::io::Error::other)?;
        Ok(CodeSender { sender, client })
    }

    /// Sends one code; `Ok` once the gateway accepted it (any 2xx).
    pub async fn send(&self, outgoing: &Outgoing<'_>) -> Result<(), SendError> {
        match &self.sender {
            OtpSender::Log => {
                // The development sender: the operator reads the code from the log.
                tracing::info!(
                    session.id = %outgoing.redirect_session_id,
                    phone = outgoing.phone,
                    code = outgoing.code,
                    "one-time code issued"
                );
                Ok(())
            }
            OtpSender::Http { url, token } => {
                let mut request = self.client.post(url.clone()).json(outgoing);
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                let response = request.send().await.map_err(|e| SendError(without_url(&e)))?;
                if response.status().is_success() {
                    Ok(())
                } else {
                    Err(SendError(format!("the gateway answered {}", response.status().as_u16())))
                }
            }
        }
    }
}

/// A transport error's description without the URL (it may carry credentials in its query).
fn without_url(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    kind.to_owned()
}

//! The agent's side of the carrier: the WebSocket handshake over a stream the agent opened
//! (TCP, through a proxy or not, then TLS), and a [`Hub`] of its own with the one carrier.

use std::{net::SocketAddr, sync::Arc};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue};

use crate::{Ended, Hub, Limits, SUBPROTOCOL, ws_config};

/// Why a carrier could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL is not a WebSocket URL.
    #[error("{0}")]
    Url(String),
    /// The WebSocket handshake failed (refused, not a WebSocket server, a proxy in the way).
    #[error("the carrier's WebSocket handshake failed: {0}")]
    Handshake(String),
    /// The server is a WebSocket server but not a carrier.
    #[error("the server at {0} answered the upgrade but is not a touchgate carrier")]
    NotACarrier(String),
}

/// An open carrier.
pub struct Carrier {
    /// The socket to put a QUIC endpoint on.
    pub hub: Arc<Hub>,
    /// The gateway, as QUIC on [`Carrier::hub`] knows it.
    pub gateway: SocketAddr,
    /// Ends with the carrier, saying how.
    pub ended: tokio::task::JoinHandle<Ended>,
}

/// Opens a carrier over `stream` to `url` (`wss://host[:port]/path`, or `ws://` over a stream
/// without TLS): the WebSocket handshake, then a hub of its own.
pub async fn open<S>(stream: S, url: &str) -> Result<Carrier, OpenError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut req = url
        .into_client_request()
        .map_err(|e| OpenError::Url(format!("carrier URL {url}: {e}")))?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(SUBPROTOCOL),
    );
    let (ws, resp) = tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config()))
        .await
        .map_err(|e| OpenError::Handshake(e.to_string()))?;
    if resp.headers().get("Sec-WebSocket-Protocol") != Some(&HeaderValue::from_static(SUBPROTOCOL))
    {
        return Err(OpenError::NotACarrier(url.to_owned()));
    }
    let hub = Hub::new();
    let (gateway, run) = hub.attach(ws, Limits::default());
    Ok(Carrier {
        hub,
        gateway,
        ended: tokio::spawn(run),
    })
}

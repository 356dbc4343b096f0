//! The TCP carrier: QUIC's own datagrams, one per binary WebSocket message, over a TCP
//! connection — for networks that drop UDP, HTTP proxies, and front ends that take only HTTP
//! (Cloud Run). Nothing above the socket changes: the QUIC connection, its TLS 1.3 with the
//! client certificate, the session token's `cnf` and the channel binding stay end to end between
//! agent and gateway, whatever terminates the carrier's outer TLS.
//!
//! [`Hub`] is a [`quinn::AsyncUdpSocket`] whose "network" is a set of WebSocket connections:
//! the gateway attaches every carrier it accepts to one hub (each gets an address of its own
//! for QUIC to answer to), the agent attaches its one carrier to a hub of its own. What the
//! carrier accepts is bounded ([`Limits`]): message sizes, a rate of messages, idle time.

pub mod client;
mod hub;
pub mod server;

pub use hub::{Ended, Hub, Limits, is_carrier_addr};

/// The largest QUIC datagram a carrier carries. QUIC over the carrier is not limited by a path
/// MTU (TCP carries it), so endpoints on a carrier use larger datagrams than on UDP: fewer
/// messages, less per-packet work.
pub const MAX_DATAGRAM: usize = 16 * 1024;

/// The smallest message that can be a QUIC packet (a short header, the smallest connection id,
/// a packet number and the 16-byte tag); anything smaller is refused as abuse.
pub const MIN_DATAGRAM: usize = 21;

/// The path of the carrier's WebSocket on the gateway.
pub const PATH: &str = "/touchgate/carrier";

/// The WebSocket subprotocol both ends name, so that no other WebSocket client or server is
/// mistaken for a carrier.
pub const SUBPROTOCOL: &str = "touchgate-quic.v1";

/// The transport settings for a QUIC connection over the carrier: datagrams up to
/// [`MAX_DATAGRAM`] from the start, no path MTU discovery (there is no path MTU to find), and
/// a first congestion window of ten such datagrams (the usual window counts ten datagrams of
/// a UDP path's size, and would not let even the first, padded, packet out).
pub fn tune_transport(t: &mut quinn::TransportConfig) {
    let mut cubic = quinn::congestion::CubicConfig::default();
    cubic.initial_window(10 * MAX_DATAGRAM as u64);
    t.initial_mtu(MAX_DATAGRAM as u16)
        .min_mtu(MAX_DATAGRAM as u16)
        .mtu_discovery_config(None)
        .congestion_controller_factory(std::sync::Arc::new(cubic));
}

/// The WebSocket settings of a carrier: a message, and a frame, is at most a datagram, and
/// the read buffer two of them (the library's 128 KiB default, held by every carrier, would
/// be most of a carrier's memory).
pub fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_DATAGRAM))
        .max_frame_size(Some(MAX_DATAGRAM))
        .read_buffer_size(2 * MAX_DATAGRAM)
}

/// The endpoint settings for an endpoint on a carrier: datagrams up to [`MAX_DATAGRAM`].
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut c = quinn::EndpointConfig::default();
    // Within quinn's bounds (1200..=65527) by construction.
    let _ = c.max_udp_payload_size(MAX_DATAGRAM as u16);
    c
}

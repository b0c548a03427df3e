//! The client IP: the TCP peer, unless the peer is a configured trusted proxy.
//!
//! Only then is `X-Forwarded-For` read, walking from the right and skipping
//! trusted hops; the first untrusted address is the client. An unparseable
//! entry stops the walk at the last trusted hop's peer — never a fallback to
//! the leftmost (attacker-controlled) value. With no trusted proxies (the
//! default) forwarding headers are ignored entirely.

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The client address for a request from `peer`.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    // Several X-Forwarded-For headers are one list, in order.
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.iter().rev() {
        match parse_hop(hop) {
            Some(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            None => break,
        }
    }
    client
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]:80`.
fn parse_hop(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_claims() {
        let peer: IpAddr = "127.0.0.9".parse().unwrap();
        assert_eq!(client_ip(peer, &headers(&["1.2.3.4"]), &[]), peer);
        let trusted: Vec<IpNet> = vec!["127.0.0.10/32".parse().unwrap()];
        assert_eq!(client_ip(peer, &headers(&["1.2.3.4"]), &trusted), peer);
    }

    #[test]
    fn trusted_proxy_gives_rightmost_untrusted_hop() {
        let peer: IpAddr = "127.0.0.10".parse().unwrap();
        let trusted: Vec<IpNet> = vec![
            "127.0.0.10/32".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ];
        assert_eq!(
            client_ip(peer, &headers(&["6.6.6.6, 5.5.5.5, 10.1.1.1"]), &trusted).to_string(),
            "5.5.5.5"
        );
        assert_eq!(
            client_ip(peer, &headers(&["6.6.6.6", "5.5.5.5:1234"]), &trusted).to_string(),
            "5.5.5.5"
        );
        assert_eq!(
            client_ip(peer, &headers(&["[2001:db8::1]:80"]), &trusted).to_string(),
            "2001:db8::1"
        );
        assert_eq!(
            client_ip(peer, &headers(&["6.6.6.6, garbage"]), &trusted),
            peer,
            "garbage never falls back leftwards"
        );
        assert_eq!(client_ip(peer, &headers(&[]), &trusted), peer);
    }
}

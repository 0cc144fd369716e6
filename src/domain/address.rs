//! Whether an address is public: the rule that keeps webhook callbacks (and their resolved
//! addresses) off loopback, private, link-local, CGNAT and other non-public networks. No I/O.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IPv4 networks that are not public unicast (RFC 6890 and friends).
const V4_NON_PUBLIC: &[(Ipv4Addr, u8)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8),       // "this network", incl. unspecified
    (Ipv4Addr::new(10, 0, 0, 0), 8),      // private
    (Ipv4Addr::new(100, 64, 0, 0), 10),   // CGNAT
    (Ipv4Addr::new(127, 0, 0, 0), 8),     // loopback
    (Ipv4Addr::new(169, 254, 0, 0), 16),  // link-local, incl. cloud metadata 169.254.169.254
    (Ipv4Addr::new(172, 16, 0, 0), 12),   // private
    (Ipv4Addr::new(192, 0, 0, 0), 24),    // IETF protocol assignments
    (Ipv4Addr::new(192, 0, 2, 0), 24),    // documentation
    (Ipv4Addr::new(192, 168, 0, 0), 16),  // private
    (Ipv4Addr::new(198, 18, 0, 0), 15),   // benchmarking
    (Ipv4Addr::new(198, 51, 100, 0), 24), // documentation
    (Ipv4Addr::new(203, 0, 113, 0), 24),  // documentation
    (Ipv4Addr::new(224, 0, 0, 0), 4),     // multicast
    (Ipv4Addr::new(240, 0, 0, 0), 4),     // reserved, incl. broadcast 255.255.255.255
];

/// Non-public networks inside 2000::/3, the only IPv6 range handed out for global unicast.
const V6_NON_PUBLIC: &[(Ipv6Addr, u8)] = &[
    (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 23), // IETF protocol assignments: Teredo, benchmarking, ORCHID
    (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32), // documentation
    (Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20), // documentation (RFC 9637)
];

fn in_v4(ip: Ipv4Addr, (net, len): (Ipv4Addr, u8)) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net)
}

fn in_v6(ip: Ipv6Addr, (net, len): (Ipv6Addr, u8)) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    u128::from(ip) & mask == u128::from(net)
}

/// The IPv4 address a packet to `ip` would really reach, for the IPv6 forms that carry one.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(ip);
    let carries_v4_in_low_bits = [
        (Ipv6Addr::UNSPECIFIED, 96),                         // IPv4-compatible (also :: and ::1)
        (Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96),    // IPv4-mapped
        (Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96), // NAT64 well-known prefix
    ];
    if carries_v4_in_low_bits.into_iter().any(|net| in_v6(ip, net)) {
        return Some(Ipv4Addr::from(bits as u32));
    }
    if in_v6(ip, (Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16)) {
        return Some(Ipv4Addr::from((bits >> 80) as u32)); // 6to4: 2002:AABB:CCDD::/48
    }
    None
}

/// Whether `ip` is a public unicast address. IPv6 forms that embed an IPv4 address (mapped,
/// compatible, NAT64 64:ff9b::/96, 6to4) are judged by that address; otherwise IPv6 must lie in
/// 2000::/3 outside 2001::/23 (which holds Teredo) and the documentation ranges, which rules out
/// loopback, unique-local, link-local, multicast and the local-use NAT64 prefix.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !V4_NON_PUBLIC.iter().any(|&net| in_v4(v4, net)),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => is_public(IpAddr::V4(v4)),
            None => {
                in_v6(v6, (Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 0), 3))
                    && !V6_NON_PUBLIC.iter().any(|&net| in_v6(v6, net))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Space-separated so the tables stay readable; one address per class or boundary.
    const NOT_PUBLIC: &str = "127.0.0.1 127.255.0.9 10.1.2.3 172.16.0.1 172.31.255.255 192.168.1.1 169.254.169.254 \
        169.254.0.1 100.64.0.1 100.127.255.255 224.0.0.1 239.255.255.250 255.255.255.255 192.0.2.7 198.51.100.7 \
        203.0.113.7 198.18.0.1 198.19.255.255 0.0.0.0 0.1.2.3 192.0.0.8 240.0.0.1 :: ::1 fe80::1 febf::1 fc00::1 \
        fd12:3456::1 ff02::1 2001:db8::1 2001:0:4136:e378::1 3fff::1 ::ffff:127.0.0.1 ::ffff:10.0.0.1 \
        ::ffff:169.254.169.254 ::127.0.0.1 64:ff9b::a9fe:a9fe 64:ff9b::7f00:1 64:ff9b:1::1 2002:7f00:1::1 \
        2002:c0a8:101:: 100::1";
    const PUBLIC: &str = "1.1.1.1 8.8.8.8 93.184.216.34 100.63.255.255 100.128.0.0 172.15.255.255 172.32.0.0 \
        192.0.1.1 198.17.255.255 198.20.0.0 223.255.255.255 2606:4700::1111 2a00:1450::1 ::ffff:8.8.8.8 \
        64:ff9b::808:808 2002:808:808::1";

    #[test]
    fn is_public_classifies_addresses() {
        for ip in NOT_PUBLIC.split_whitespace() {
            assert!(!is_public(ip.parse().unwrap()), "{ip} should not be public");
        }
        for ip in PUBLIC.split_whitespace() {
            assert!(is_public(ip.parse().unwrap()), "{ip} should be public");
        }
    }
}

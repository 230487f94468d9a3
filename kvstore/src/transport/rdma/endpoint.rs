//! What a grant carries for the RDMA transport, and what a puller says when it connects.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const MAGIC: [u8; 4] = *b"KVRD";
/// The endpoint layout this build writes and reads.
pub const ENDPOINT_VERSION: u8 = 1;
const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;
/// Magic, version, family, port.
const HEAD: usize = 4 + 1 + 1 + 2;
/// rkey, base, length, token.
const TAIL: usize = 4 + 8 + 8 + TOKEN_LEN;

/// Bytes of the connection token.
pub const TOKEN_LEN: usize = 16;

const HELLO_MAGIC: [u8; 4] = *b"KVRC";
const HELLO_VERSION: u8 = 1;
/// Bytes of the private data a puller sends with its connection request; well under the 56
/// bytes that an InfiniBand connection request leaves to the application.
pub(crate) const HELLO_LEN: usize = 4 + 1 + TOKEN_LEN;

/// How a puller reaches a source's arena over RDMA: the source's rdmacm address, its arena's
/// memory region (remote key, base address, length) and the token its listener wants.
///
/// Encoded as `"KVRD" | version u8 | family u8 (4 or 6) | port u16 | ip (4 or 16 bytes) |
/// rkey u32 | base u64 | len u64 | token [16]`, integers little endian.
#[derive(Clone, PartialEq, Eq)]
pub struct RdmaEndpoint {
    /// The source's rdmacm listener.
    pub addr: SocketAddr,
    /// Remote key of the source's arena registration.
    pub rkey: u32,
    /// Address of the source's arena in its own address space (the region's base).
    pub base: u64,
    /// Bytes registered from `base`.
    pub len: u64,
    /// What the listener wants in a connection request.
    pub token: [u8; TOKEN_LEN],
}

impl std::fmt::Debug for RdmaEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The rkey and the token are capabilities: they stay out of logs.
        f.debug_struct("RdmaEndpoint")
            .field("addr", &self.addr)
            .field("base", &format_args!("{:#x}", self.base))
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Why endpoint bytes were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// No bytes: the source offers no RDMA listener.
    #[error("empty: the source serves no RDMA")]
    Empty,
    /// Not an RDMA endpoint (another transport's, or garbage).
    #[error("not an RDMA endpoint (bad magic)")]
    BadMagic,
    /// Written by a version of kvtier this one cannot read.
    #[error("RDMA endpoint version {0}; this build reads version {ENDPOINT_VERSION}")]
    Version(u8),
    /// The address family byte is neither 4 nor 6.
    #[error("address family {0}; expected 4 or 6")]
    Family(u8),
    /// The length does not match the layout.
    #[error("{actual} bytes; this layout has {expected}")]
    Length {
        /// Bytes the layout has.
        expected: usize,
        /// Bytes received.
        actual: usize,
    },
    /// The region wraps around the address space.
    #[error("region {base:#x}+{len} overflows 64-bit addresses")]
    Region {
        /// Its base.
        base: u64,
        /// Its length.
        len: u64,
    },
}

impl RdmaEndpoint {
    /// The bytes carried in a grant.
    pub fn encode(&self) -> Vec<u8> {
        let (family, ip): (u8, Vec<u8>) = match self.addr.ip() {
            IpAddr::V4(v4) => (FAMILY_V4, v4.octets().to_vec()),
            IpAddr::V6(v6) => (FAMILY_V6, v6.octets().to_vec()),
        };
        let mut out = Vec::with_capacity(HEAD + ip.len() + TAIL);
        out.extend_from_slice(&MAGIC);
        out.push(ENDPOINT_VERSION);
        out.push(family);
        out.extend_from_slice(&self.addr.port().to_le_bytes());
        out.extend_from_slice(&ip);
        out.extend_from_slice(&self.rkey.to_le_bytes());
        out.extend_from_slice(&self.base.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.token);
        out
    }

    /// Parses [`Self::encode`]'s bytes, checking magic, version, family and exact length.
    pub fn decode(b: &[u8]) -> Result<Self, EndpointError> {
        if b.is_empty() {
            return Err(EndpointError::Empty);
        }
        if b.len() < MAGIC.len() || b[..MAGIC.len()] != MAGIC {
            return Err(EndpointError::BadMagic);
        }
        let Some(&version) = b.get(4) else {
            return Err(EndpointError::Length {
                expected: HEAD,
                actual: b.len(),
            });
        };
        if version != ENDPOINT_VERSION {
            return Err(EndpointError::Version(version));
        }
        let Some(&family) = b.get(5) else {
            return Err(EndpointError::Length {
                expected: HEAD,
                actual: b.len(),
            });
        };
        let ip_len = match family {
            FAMILY_V4 => 4,
            FAMILY_V6 => 16,
            other => return Err(EndpointError::Family(other)),
        };
        let expected = HEAD + ip_len + TAIL;
        if b.len() != expected {
            return Err(EndpointError::Length {
                expected,
                actual: b.len(),
            });
        }
        let mut r = Reader { b, at: 6 };
        let port = u16::from_le_bytes(r.take());
        let ip = if ip_len == 4 {
            IpAddr::V4(Ipv4Addr::from(r.take::<4>()))
        } else {
            IpAddr::V6(Ipv6Addr::from(r.take::<16>()))
        };
        let rkey = u32::from_le_bytes(r.take());
        let base = u64::from_le_bytes(r.take());
        let len = u64::from_le_bytes(r.take());
        let token = r.take();
        if base.checked_add(len).is_none() {
            return Err(EndpointError::Region { base, len });
        }
        Ok(Self {
            addr: SocketAddr::new(ip, port),
            rkey,
            base,
            len,
            token,
        })
    }

    /// Whether two endpoints name the same registration behind the same listener (a source
    /// that restarted registers anew, so a queue pair made for the old one is stale).
    pub(crate) fn same_registration(&self, other: &Self) -> bool {
        self.addr == other.addr
            && self.rkey == other.rkey
            && self.base == other.base
            && self.len == other.len
            && self.token == other.token
    }
}

/// Reads fixed-size fields from a slice whose length was checked beforehand.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        // `decode` checked the total length, so every field is there; a short read leaves zeros
        // rather than panicking.
        if let Some(src) = self.b.get(self.at..self.at + N) {
            out.copy_from_slice(src);
        }
        self.at += N;
        out
    }
}

/// The private data of a connection request: `"KVRC" | version u8 | token [16]`.
pub(crate) fn hello(token: &[u8; TOKEN_LEN]) -> [u8; HELLO_LEN] {
    let mut out = [0u8; HELLO_LEN];
    out[..4].copy_from_slice(&HELLO_MAGIC);
    out[4] = HELLO_VERSION;
    out[5..].copy_from_slice(token);
    out
}

/// Whether a connection request's private data carries `token`. The transport may pad the data
/// with zeros, so only the prefix counts; the token is compared in constant time.
pub(crate) fn hello_matches(data: &[u8], token: &[u8; TOKEN_LEN]) -> bool {
    let Some(got) = data.get(..HELLO_LEN) else {
        return false;
    };
    if got[..4] != HELLO_MAGIC || got[4] != HELLO_VERSION {
        return false;
    }
    got[5..].iter().zip(token).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

//! The port-forward stream protocol between the shim and the agent.
//!
//! `kubectl port-forward` reaches a pod through containerd, which dials
//! `localhost:<port>` inside the pod's network namespace on the host. The
//! shim listens there and, for each accepted connection, opens a vsock
//! stream to the agent's port-forward listener ([`VSOCK_PORT`]) and sends a
//! [`Request`] naming the guest TCP port and the loopback family the client
//! used. The agent connects to that port on the guest's loopback and
//! answers with one [`Reply`] byte; after [`Reply::Connected`], raw bytes
//! flow both ways until either side closes. Any other reply, or none, ends
//! the stream: the shim then resets the client's connection.
//!
//! This is not ttrpc: one stream per TCP connection, so a slow forwarded
//! connection never holds up the agent's control channel.

/// vsock port of the agent's port-forward listener (below the stdio
/// ports, which start at [`crate::STDIO_PORT_BASE`]).
pub const VSOCK_PORT: u32 = 1025;

/// First byte of every request: rejects a stray peer speaking something else.
pub const MAGIC: u8 = b'P';

/// Length of an encoded [`Request`].
pub const REQUEST_LEN: usize = 4;

/// Which loopback address the guest connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// 127.0.0.1
    V4,
    /// ::1
    V6,
}

/// What the host asks for: a TCP connection to `port` on the guest's
/// loopback of `family`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub family: Family,
    pub port: u16,
}

impl Request {
    /// `MAGIC`, family (4 or 6), port (big endian).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let family = match self.family {
            Family::V4 => 4,
            Family::V6 => 6,
        };
        let [hi, lo] = self.port.to_be_bytes();
        [MAGIC, family, hi, lo]
    }

    /// The request in `b`, or why it is not one. Port 0 is refused.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request, String> {
        if b[0] != MAGIC {
            return Err(format!("bad magic byte {:#04x}", b[0]));
        }
        let family = match b[1] {
            4 => Family::V4,
            6 => Family::V6,
            f => return Err(format!("unknown address family {f}")),
        };
        let port = u16::from_be_bytes([b[2], b[3]]);
        if port == 0 {
            return Err("port 0".into());
        }
        Ok(Request { family, port })
    }
}

/// The agent's one-byte answer to a [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Connected: raw bytes follow in both directions.
    Connected = 0,
    /// Nothing listens on the port in the guest (ECONNREFUSED).
    Refused = 1,
    /// Any other failure (bad request, timeout, unreachable, too many
    /// connections).
    Failed = 2,
}

impl Reply {
    /// The reply a byte encodes; unknown bytes are `None`.
    pub fn from_byte(b: u8) -> Option<Reply> {
        match b {
            0 => Some(Reply::Connected),
            1 => Some(Reply::Refused),
            2 => Some(Reply::Failed),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_refused() {
        for r in [
            Request {
                family: Family::V4,
                port: 8080,
            },
            Request {
                family: Family::V6,
                port: 65535,
            },
        ] {
            assert_eq!(Request::decode(&r.encode()), Ok(r));
        }
        assert!(Request::decode(&[b'X', 4, 0, 80]).is_err());
        assert!(Request::decode(&[MAGIC, 5, 0, 80]).is_err());
        assert!(Request::decode(&[MAGIC, 4, 0, 0]).is_err());
    }

    #[test]
    fn reply_bytes() {
        for r in [Reply::Connected, Reply::Refused, Reply::Failed] {
            assert_eq!(Reply::from_byte(r as u8), Some(r));
        }
        assert_eq!(Reply::from_byte(3), None);
        assert_eq!(Reply::from_byte(0xff), None);
    }
}

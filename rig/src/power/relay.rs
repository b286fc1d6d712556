//! `serial-relay`: USB relay boards of the LCUS family (CH340 + STC MCU, 1/2/4/8
//! channels) on a serial port, 9600 8N1.
//!
//! Byte protocol (every frame 4 bytes, `sum = (0xA0 + channel + op) mod 256`):
//!
//! | frame | meaning | reply |
//! |---|---|---|
//! | `A0 ch 00 sum` | open relay `ch` (power off) | none |
//! | `A0 ch 01 sum` | close relay `ch` (power on) | none |
//! | `A0 ch 02 sum` | query relay `ch` | `A0 ch st sum'`, `st` = 00 open / 01 closed |
//!
//! Channels are 1-based. The driver flushes pending input, sends the command, then
//! queries and expects exactly the 4-byte status frame for the same channel with a
//! correct checksum. Anything else (no reply within the timeout, a wrong channel, a
//! bad checksum, a state byte other than 0/1, extra bytes) is an error: the state is
//! never guessed. Boards without the status query cannot be read back and are not
//! supported by this driver (wire them through `command` with an external sensor).

use super::{PowerBackend, PowerError, PowerState};
use std::time::{Duration, Instant};

/// Frame start byte.
pub const START: u8 = 0xA0;
/// Op: open (off).
pub const OP_OFF: u8 = 0x00;
/// Op: close (on).
pub const OP_ON: u8 = 0x01;
/// Op: query.
pub const OP_QUERY: u8 = 0x02;

/// Encode one frame.
pub fn frame(channel: u8, op: u8) -> [u8; 4] {
    [
        START,
        channel,
        op,
        START.wrapping_add(channel).wrapping_add(op),
    ]
}

/// A relay board's status reply that is not a status for the channel asked. Each
/// variant shows the reply's bytes in hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Not 4 bytes.
    #[error("garbage status reply ({len} bytes, want 4): [{hex}]")]
    Length {
        /// Bytes received.
        len: usize,
        /// The reply.
        hex: String,
    },
    /// Bad start byte or checksum.
    #[error("garbage status reply (bad start or checksum): [{hex}]")]
    Garbage {
        /// The reply.
        hex: String,
    },
    /// The status of another channel.
    #[error("status reply for channel {got} while asking for {want}: [{hex}]")]
    Channel {
        /// The channel in the reply.
        got: u8,
        /// The channel asked.
        want: u8,
        /// The reply.
        hex: String,
    },
    /// A state byte other than 0 or 1.
    #[error("status reply with state byte {state:#04x}: [{hex}]")]
    State {
        /// The state byte.
        state: u8,
        /// The reply.
        hex: String,
    },
}

/// Decode a status reply for `channel`.
pub fn parse_status(channel: u8, reply: &[u8]) -> Result<PowerState, ReplyError> {
    let hex = hilrig_device::oob::hex_string(reply);
    if reply.len() != 4 {
        return Err(ReplyError::Length {
            len: reply.len(),
            hex,
        });
    }
    let sum = START.wrapping_add(reply[1]).wrapping_add(reply[2]);
    if reply[0] != START || reply[3] != sum {
        return Err(ReplyError::Garbage { hex });
    }
    if reply[1] != channel {
        return Err(ReplyError::Channel {
            got: reply[1],
            want: channel,
            hex,
        });
    }
    match reply[2] {
        0 => Ok(PowerState::Off),
        1 => Ok(PowerState::On),
        state => Err(ReplyError::State { state, hex }),
    }
}

/// The relay driver.
pub struct RelayPower {
    port: String,
    channel: u8,
    baud: u32,
    timeout: Duration,
    retries: u32,
}

impl RelayPower {
    /// A relay `channel` (1-based) on serial device `port`.
    pub fn new(port: &str, channel: u8, baud: u32, timeout: Duration, retries: u32) -> RelayPower {
        RelayPower {
            port: port.to_string(),
            channel,
            baud,
            timeout,
            retries,
        }
    }

    fn open(&self) -> Result<Box<dyn serialport::SerialPort>, PowerError> {
        hilrig_device::oob::serial_8n1(&self.port, self.baud, Duration::from_millis(20)).map_err(
            |source| PowerError::OpenPort {
                port: self.port.clone(),
                source,
            },
        )
    }

    fn send(&self, port: &mut dyn serialport::SerialPort, op: u8) -> Result<(), PowerError> {
        let _ = port.clear(serialport::ClearBuffer::Input);
        port.write_all(&frame(self.channel, op))
            .and_then(|_| port.flush())
            .map_err(|source| PowerError::PortIo {
                what: "writing to",
                port: self.port.clone(),
                source,
            })
    }

    fn query(&self, port: &mut dyn serialport::SerialPort) -> Result<PowerState, PowerError> {
        self.send(port, OP_QUERY)?;
        let mut reply = Vec::new();
        let deadline = Instant::now() + self.timeout;
        let mut buf = [0u8; 16];
        // Read until 4 bytes arrived, then keep listening briefly so trailing
        // garbage is seen rather than left for the next exchange.
        let mut quiet_after: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if now >= deadline || quiet_after.is_some_and(|q| now >= q) {
                break;
            }
            match port.read(&mut buf) {
                Ok(0) => {}
                Ok(n) => {
                    reply.extend_from_slice(&buf[..n]);
                    if reply.len() >= 4 && quiet_after.is_none() {
                        quiet_after = Some(Instant::now() + Duration::from_millis(30));
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(source) => {
                    return Err(PowerError::PortIo {
                        what: "reading",
                        port: self.port.clone(),
                        source,
                    })
                }
            }
        }
        if reply.is_empty() {
            return Err(PowerError::NoReply {
                port: self.port.clone(),
                timeout: self.timeout,
            });
        }
        Ok(parse_status(self.channel, &reply)?)
    }
}

impl PowerBackend for RelayPower {
    fn driver(&self) -> &'static str {
        "serial-relay"
    }

    fn set(&mut self, state: PowerState) -> Result<(), PowerError> {
        let mut p = self.open()?;
        let op = match state {
            PowerState::On => OP_ON,
            PowerState::Off => OP_OFF,
        };
        self.send(p.as_mut(), op)
    }

    fn status(&mut self) -> Result<PowerState, PowerError> {
        let mut p = self.open()?;
        self.query(p.as_mut())
    }

    fn settle(&self) -> Duration {
        // The relay switches within milliseconds; a short settle with a readback.
        Duration::from_millis(500)
    }

    fn retries(&self) -> u32 {
        self.retries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_status_replies() {
        assert_eq!(frame(1, OP_ON), [0xA0, 0x01, 0x01, 0xA2]);
        assert_eq!(frame(1, OP_OFF), [0xA0, 0x01, 0x00, 0xA1]);
        assert_eq!(frame(4, OP_QUERY), [0xA0, 0x04, 0x02, 0xA6]);
        assert_eq!(parse_status(2, &[0xA0, 2, 1, 0xA3]), Ok(PowerState::On));
        assert_eq!(parse_status(2, &[0xA0, 2, 0, 0xA2]), Ok(PowerState::Off));
        assert!(parse_status(2, &[0xA0, 3, 0, 0xA3]).is_err());
        assert!(parse_status(2, &[0xA0, 2, 1, 0xA4]).is_err());
        assert!(parse_status(2, &[0xA0, 2, 7, 0xA9]).is_err());
        assert!(parse_status(2, b"OK\r\n\x00").is_err());
    }
}

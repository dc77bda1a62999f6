//! The few protobuf messages of containerd's start protocol that
//! `containerd-shim` 0.11 does not carry, decoded and encoded by field
//! number: `BootstrapParams`/`BootstrapResult` (containerd 2.3+,
//! `api/runtime/bootstrap/v1/bootstrap.proto`) and `runtimeoptions.v1.Options`
//! (the `[options]` table of a CRI runtime handler, containerd 2.0-2.2 and
//! 2.3's bootstrap extensions).
//!
//! Decoding is strict about wire format (a truncated or malformed message
//! is an error) and lenient about content: unknown fields are skipped, so a
//! newer containerd's additions do not break the shim.

use anyhow::{bail, Context};
use protobuf::well_known_types::any::Any;
use protobuf::{CodedInputStream, CodedOutputStream, Message};

/// One field of a protobuf message.
enum Value {
    Varint(u64),
    Bytes(Vec<u8>),
    /// Fixed 32/64-bit fields: no message here has one; skipped.
    Other,
}

/// The fields of a serialized message, in wire order.
fn fields(bytes: &[u8]) -> anyhow::Result<Vec<(u32, Value)>> {
    let mut input = CodedInputStream::from_bytes(bytes);
    let mut out = Vec::new();
    while let Some(tag) = input.read_raw_tag_or_eof()? {
        let number = tag >> 3;
        if number == 0 {
            bail!("field number 0");
        }
        let value = match tag & 7 {
            0 => Value::Varint(input.read_raw_varint64()?),
            2 => Value::Bytes(input.read_bytes()?),
            1 => {
                input.read_raw_little_endian64()?;
                Value::Other
            }
            5 => {
                input.read_raw_little_endian32()?;
                Value::Other
            }
            wire => bail!("wire type {wire} of field {number} is not supported"),
        };
        out.push((number, value));
    }
    Ok(out)
}

fn string(value: Value, what: &str) -> anyhow::Result<String> {
    match value {
        Value::Bytes(b) => String::from_utf8(b).with_context(|| format!("{what} is not UTF-8")),
        _ => bail!("{what} is not a string"),
    }
}

/// `containerd.runtime.bootstrap.v1.BootstrapParams`: what containerd 2.3+
/// writes to `start`'s stdin.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BootstrapParams {
    pub instance_id: String,
    pub namespace: String,
    /// INFO = 0, more verbose is negative (DEBUG = -4, TRACE = -8).
    pub log_level: i32,
    pub containerd_version: String,
    pub containerd_ttrpc_address: String,
    pub containerd_grpc_address: String,
    pub containerd_binary: String,
    /// `Extension.value` of each extension.
    pub extensions: Vec<Any>,
    /// Where the shim puts its socket; absent means containerd's default.
    pub socket_dir: Option<String>,
}

impl BootstrapParams {
    pub fn decode(bytes: &[u8]) -> anyhow::Result<Self> {
        let mut p = BootstrapParams::default();
        for (number, value) in fields(bytes)? {
            match number {
                1 => p.instance_id = string(value, "instance_id")?,
                2 => p.namespace = string(value, "namespace")?,
                3 => match value {
                    // An int32 enum: negative values are 10-byte varints.
                    Value::Varint(v) => p.log_level = v as i64 as i32,
                    _ => bail!("log_level is not a varint"),
                },
                4 => p.containerd_version = string(value, "containerd_version")?,
                5 => p.containerd_ttrpc_address = string(value, "containerd_ttrpc_address")?,
                6 => p.containerd_grpc_address = string(value, "containerd_grpc_address")?,
                7 => p.containerd_binary = string(value, "containerd_binary")?,
                8 => {
                    let Value::Bytes(ext) = value else {
                        bail!("extension is not a message");
                    };
                    for (n, v) in fields(&ext)? {
                        if let (1, Value::Bytes(any)) = (n, v) {
                            p.extensions
                                .push(Any::parse_from_bytes(&any).context("extension value")?);
                        }
                    }
                }
                9 => p.socket_dir = Some(string(value, "socket_dir")?),
                _ => {}
            }
        }
        Ok(p)
    }

    /// Whether containerd asked for debug logs (DEBUG or TRACE).
    pub fn debug(&self) -> bool {
        self.log_level < 0
    }

    /// The runtime handler's options among the extensions, if any.
    pub fn runtime_options(&self) -> Option<anyhow::Result<RuntimeOptions>> {
        self.extensions
            .iter()
            .find(|a| type_name(&a.type_url) == RuntimeOptions::TYPE_NAME)
            .map(|a| RuntimeOptions::decode(&a.value))
    }
}

/// `containerd.runtime.bootstrap.v1.BootstrapResult`: Ember's answer to
/// containerd 2.3+ (protobuf on stdout).
#[derive(Debug, Clone, PartialEq)]
pub struct BootstrapResult {
    /// The task API version served (2: containerd.task.v2.Task).
    pub version: i32,
    pub address: String,
    pub protocol: String,
}

impl BootstrapResult {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut os = CodedOutputStream::vec(&mut out);
        // Writing into a Vec cannot fail.
        let _ = os.write_int32(1, self.version);
        let _ = os.write_string(2, &self.address);
        let _ = os.write_string(3, &self.protocol);
        let _ = os.flush();
        drop(os);
        out
    }

    pub fn decode(bytes: &[u8]) -> anyhow::Result<Self> {
        let mut r = BootstrapResult {
            version: 0,
            address: String::new(),
            protocol: String::new(),
        };
        for (number, value) in fields(bytes)? {
            match (number, value) {
                (1, Value::Varint(v)) => r.version = v as i64 as i32,
                (2, v) => r.address = string(v, "address")?,
                (3, v) => r.protocol = string(v, "protocol")?,
                _ => {}
            }
        }
        Ok(r)
    }
}

/// `runtimeoptions.v1.Options`: the `[options]` table containerd's CRI
/// passes for a runtime that is not runc.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RuntimeOptions {
    pub type_url: String,
    /// `ConfigPath`: a config file for this runtime handler.
    pub config_path: String,
    /// `ConfigBody`: the config itself (TOML).
    pub config_body: Vec<u8>,
}

impl RuntimeOptions {
    pub const TYPE_NAME: &'static str = "runtimeoptions.v1.Options";

    pub fn decode(bytes: &[u8]) -> anyhow::Result<Self> {
        let mut o = RuntimeOptions::default();
        for (number, value) in fields(bytes)? {
            match (number, value) {
                (1, v) => o.type_url = string(v, "TypeUrl")?,
                (2, v) => o.config_path = string(v, "ConfigPath")?,
                (3, Value::Bytes(b)) => o.config_body = b,
                _ => {}
            }
        }
        Ok(o)
    }

    /// Encoded (tests build containerd's stdin with it).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut os = CodedOutputStream::vec(&mut out);
        if !self.type_url.is_empty() {
            let _ = os.write_string(1, &self.type_url);
        }
        if !self.config_path.is_empty() {
            let _ = os.write_string(2, &self.config_path);
        }
        if !self.config_body.is_empty() {
            let _ = os.write_bytes(3, &self.config_body);
        }
        let _ = os.flush();
        drop(os);
        out
    }
}

/// The message name of an `Any` type URL (`types.example.com/a.b.C` → `a.b.C`).
pub fn type_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_round_trips() {
        let r = BootstrapResult {
            version: 2,
            address: "unix:///run/containerd/s/abc".into(),
            protocol: "ttrpc".into(),
        };
        assert_eq!(BootstrapResult::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn truncated_params_are_an_error() {
        // Field 1, length 10, but only 3 bytes follow.
        assert!(BootstrapParams::decode(&[0x0a, 10, b'a', b'b', b'c']).is_err());
    }

    #[test]
    fn negative_log_level_decodes() {
        let mut bytes = Vec::new();
        let mut os = CodedOutputStream::vec(&mut bytes);
        os.write_int32(3, -4).unwrap();
        os.flush().unwrap();
        drop(os);
        let p = BootstrapParams::decode(&bytes).unwrap();
        assert_eq!(p.log_level, -4);
        assert!(p.debug());
    }

    #[test]
    fn runtime_options_round_trip() {
        let o = RuntimeOptions {
            type_url: String::new(),
            config_path: "/etc/ember/2cpu.toml".into(),
            config_body: b"vcpus = 2\n".to_vec(),
        };
        assert_eq!(RuntimeOptions::decode(&o.encode()).unwrap(), o);
    }
}

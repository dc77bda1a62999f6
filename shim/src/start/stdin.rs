//! What containerd wrote to the shim's stdin at `start`, told apart.
//!
//! - containerd 1.6-2.2 with no runtime options: nothing;
//! - 1.6-2.2 with an `[options]` table: an `Any` of `runtimeoptions.v1.Options`
//!   (CRI, non-runc runtimes) or of `containerd.runc.v1.Options`;
//! - 2.3+: a `BootstrapParams` (runtime options, if any, in its extensions).
//!
//! An `Any` and a `BootstrapParams` share field numbers 1 and 2 (both
//! strings), so either parses as the other. As containerd's own shims do,
//! bytes are a `BootstrapParams` only when its id and namespace are the ones
//! on the command line. Nothing here fails: bytes that are none of these
//! are reported as such and `start` goes on with the command line.

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim::oci::Options as RuncOptions;

use super::proto::{type_name, BootstrapParams, RuntimeOptions};

const RUNC_OPTIONS: &str = "containerd.runc.v1.Options";

#[derive(Debug)]
pub enum StartInput {
    Empty,
    Bootstrap(Box<BootstrapParams>),
    RuntimeOptions(RuntimeOptions),
    RuncOptions(Box<RuncOptions>),
    /// An `Any` of a type Ember does not know.
    OtherAny {
        type_url: String,
    },
    /// Neither an `Any` nor `BootstrapParams` of this shim.
    Unrecognized {
        len: usize,
        why: String,
    },
}

impl StartInput {
    /// Classifies `bytes` for the shim started with `-id cli_id -namespace cli_namespace`.
    pub fn classify(bytes: &[u8], cli_id: &str, cli_namespace: &str) -> StartInput {
        if bytes.is_empty() {
            return StartInput::Empty;
        }
        let bootstrap = BootstrapParams::decode(bytes);
        if let Ok(p) = &bootstrap {
            if !p.instance_id.is_empty() && p.instance_id == cli_id && p.namespace == cli_namespace
            {
                return StartInput::Bootstrap(Box::new(p.clone()));
            }
        }
        match Any::parse_from_bytes(bytes) {
            Ok(any) if !any.type_url.is_empty() => match type_name(&any.type_url) {
                RuntimeOptions::TYPE_NAME => match RuntimeOptions::decode(&any.value) {
                    Ok(o) => StartInput::RuntimeOptions(o),
                    Err(e) => StartInput::Unrecognized {
                        len: bytes.len(),
                        why: format!("runtime options: {e:#}"),
                    },
                },
                RUNC_OPTIONS => match RuncOptions::parse_from_bytes(&any.value) {
                    Ok(o) => StartInput::RuncOptions(Box::new(o)),
                    Err(e) => StartInput::Unrecognized {
                        len: bytes.len(),
                        why: format!("runc options: {e}"),
                    },
                },
                _ => StartInput::OtherAny {
                    type_url: any.type_url,
                },
            },
            _ => StartInput::Unrecognized {
                len: bytes.len(),
                why: match bootstrap {
                    Ok(p) => format!(
                        "bootstrap params for {:?} in {:?}, not this shim's",
                        p.instance_id, p.namespace
                    ),
                    Err(e) => format!("{e:#}"),
                },
            },
        }
    }

    /// The runtime handler's options, whichever way they came.
    pub fn runtime_options(&self) -> Option<anyhow::Result<RuntimeOptions>> {
        match self {
            StartInput::RuntimeOptions(o) => Some(Ok(o.clone())),
            StartInput::Bootstrap(p) => p.runtime_options(),
            _ => None,
        }
    }

    /// One line for the log.
    pub fn describe(&self) -> String {
        match self {
            StartInput::Empty => "nothing (containerd 1.6-2.2 without runtime options)".into(),
            StartInput::Bootstrap(p) => format!(
                "BootstrapParams of containerd {} ({} extension(s), socket_dir {:?})",
                if p.containerd_version.is_empty() {
                    "2.3+"
                } else {
                    &p.containerd_version
                },
                p.extensions.len(),
                p.socket_dir
            ),
            StartInput::RuntimeOptions(_) => "runtimeoptions.v1.Options".into(),
            StartInput::RuncOptions(_) => "runc options".into(),
            StartInput::OtherAny { type_url } => format!("an Any of unknown type {type_url:?}"),
            StartInput::Unrecognized { len, why } => {
                format!("{len} bytes Ember does not understand ({why})")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(type_url: &str, value: Vec<u8>) -> Vec<u8> {
        Any {
            type_url: type_url.into(),
            value,
            ..Default::default()
        }
        .write_to_bytes()
        .unwrap()
    }

    #[test]
    fn empty_stdin() {
        assert!(matches!(
            StartInput::classify(b"", "c1", "default"),
            StartInput::Empty
        ));
    }

    #[test]
    fn runtime_options_any() {
        let opts = RuntimeOptions {
            config_path: "/etc/ember/x.toml".into(),
            ..Default::default()
        };
        let bytes = any("runtimeoptions.v1.Options", opts.encode());
        let input = StartInput::classify(&bytes, "c1", "k8s.io");
        let got = input.runtime_options().unwrap().unwrap();
        assert_eq!(got.config_path, "/etc/ember/x.toml");
    }

    #[test]
    fn runc_options_any() {
        let runc = RuncOptions {
            binary_name: "runc".into(),
            ..Default::default()
        };
        let bytes = any("containerd.runc.v1.Options", runc.write_to_bytes().unwrap());
        match StartInput::classify(&bytes, "c1", "default") {
            StartInput::RuncOptions(o) => assert_eq!(o.binary_name, "runc"),
            other => panic!("got {other:?}"),
        }
    }

    #[test]
    fn an_any_whose_type_url_looks_like_an_id_is_still_an_any() {
        // type_url "c1"/value "default" would decode as BootstrapParams of
        // c1 in default: the identity check keeps it a bootstrap only then.
        let bytes = any("types.example.com/foo.Bar", b"x".to_vec());
        assert!(matches!(
            StartInput::classify(&bytes, "c1", "default"),
            StartInput::OtherAny { .. }
        ));
    }

    #[test]
    fn garbage_is_reported_not_fatal() {
        let input = StartInput::classify(b"{\"json\": true}", "c1", "default");
        assert!(
            matches!(input, StartInput::Unrecognized { .. }),
            "{input:?}"
        );
        assert!(input.runtime_options().is_none());
    }
}

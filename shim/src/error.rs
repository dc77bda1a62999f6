//! The shim's error type and how it maps onto the status codes containerd
//! understands.
//!
//! containerd turns a ttrpc status into its own error kinds
//! (`errdefs.FromGRPC`) and acts on them: NOT_FOUND on Delete means "already
//! gone", FAILED_PRECONDITION is shown as "failed precondition", and so on.
//! The codes follow what containerd's runc shim answers for the same
//! situations, so clients behave the same with Ember as with runc.

use ttrpc::Code;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Unknown container, exec or process (also: "process already
    /// finished", as runc's shim answers a kill of an exited process).
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The object is in the wrong state for the request.
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unimplemented(String),
    /// The pod's VM or its agent is gone or not reachable.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The guest agent answered with an error status; its code is kept so
    /// that e.g. the agent's UNIMPLEMENTED reaches ctr as "not implemented".
    #[error("agent {call}: {message}")]
    Agent {
        call: &'static str,
        code: Code,
        message: String,
    },
    /// Anything else: a host-side failure with its context chain.
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

impl Error {
    pub fn not_found(msg: impl Into<String>) -> Self {
        Error::NotFound(msg.into())
    }

    pub fn precondition(msg: impl Into<String>) -> Self {
        Error::FailedPrecondition(msg.into())
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// The ttrpc status code containerd gets for this error.
    pub fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Error::Unimplemented(_) => Code::UNIMPLEMENTED,
            Error::Unavailable(_) => Code::UNAVAILABLE,
            Error::DeadlineExceeded(_) => Code::DEADLINE_EXCEEDED,
            Error::Agent { code, .. } => *code,
            Error::Internal(_) => Code::INTERNAL,
        }
    }

    /// Whether the error means the agent connection is gone (as opposed to
    /// the agent refusing one request).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }

    /// The same error with `context: ` in front of its message, keeping the
    /// code.
    pub fn context(self, context: impl std::fmt::Display) -> Self {
        match self {
            Error::NotFound(m) => Error::NotFound(format!("{context}: {m}")),
            Error::AlreadyExists(m) => Error::AlreadyExists(format!("{context}: {m}")),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(format!("{context}: {m}")),
            Error::InvalidArgument(m) => Error::InvalidArgument(format!("{context}: {m}")),
            Error::Unimplemented(m) => Error::Unimplemented(format!("{context}: {m}")),
            Error::Unavailable(m) => Error::Unavailable(format!("{context}: {m}")),
            Error::DeadlineExceeded(m) => Error::DeadlineExceeded(format!("{context}: {m}")),
            Error::Agent {
                call,
                code,
                message,
            } => Error::Agent {
                call,
                code,
                message: format!("{message} ({context})"),
            },
            Error::Internal(e) => Error::Internal(e.context(context.to_string())),
        }
    }

    /// Converts an error of an agent RPC. A status from the agent keeps its
    /// code; a broken connection is UNAVAILABLE; a client-side deadline is
    /// DEADLINE_EXCEEDED.
    pub fn from_agent(call: &'static str, e: ttrpc::Error) -> Self {
        match e {
            ttrpc::Error::RpcStatus(s) => Error::Agent {
                call,
                code: s.code(),
                message: s.message().to_string(),
            },
            ttrpc::Error::Others(m) if m.contains("timeout") => {
                Error::DeadlineExceeded(format!("agent {call}: {m}"))
            }
            other => Error::Unavailable(format!(
                "agent {call}: the connection to the guest agent is broken: {other}"
            )),
        }
    }
}

/// What containerd is answered. Every error a call returns passes here
/// once, so it is logged here, in the span of the call (its method,
/// container and exec, from `#[tracing::instrument]`): NOT_FOUND at debug,
/// as it is routine (CRI kills every finished exec, containerd deletes
/// after a failed create), anything else as a warning.
impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        match &e {
            Error::NotFound(_) => tracing::debug!("{e}"),
            _ => tracing::warn!("{e}"),
        }
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Internal(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(e: Error) -> (Code, String) {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn codes_match_what_containerd_expects() {
        assert_eq!(
            status(Error::precondition("cannot delete a running task")),
            (
                Code::FAILED_PRECONDITION,
                "cannot delete a running task".to_string()
            )
        );
        assert_eq!(
            status(Error::not_found("process already finished")).0,
            Code::NOT_FOUND
        );
        assert_eq!(
            status(Error::AlreadyExists("x".into())).0,
            Code::ALREADY_EXISTS
        );
        assert_eq!(
            status(Error::Unimplemented("x".into())).0,
            Code::UNIMPLEMENTED
        );
        let internal = Error::Internal(anyhow::anyhow!("EBUSY").context("unmounting /x"));
        assert_eq!(
            status(internal),
            (Code::INTERNAL, "unmounting /x: EBUSY".to_string())
        );
    }

    #[test]
    fn agent_statuses_keep_their_code_and_message() {
        let e = Error::from_agent(
            "CreateContainer",
            ttrpc::Error::RpcStatus(ttrpc::get_status(
                Code::UNIMPLEMENTED,
                "CreateContainer is not implemented yet",
            )),
        );
        let (code, msg) = status(e);
        assert_eq!(code, Code::UNIMPLEMENTED);
        assert_eq!(
            msg,
            "agent CreateContainer: CreateContainer is not implemented yet"
        );

        let e = Error::from_agent("StartContainer", ttrpc::Error::RemoteClosed);
        assert!(e.is_unavailable());
        assert_eq!(e.code(), Code::UNAVAILABLE);

        let e = Error::from_agent(
            "Health",
            ttrpc::Error::Others("Receive packet timeout Elapsed(())".into()),
        );
        assert_eq!(e.code(), Code::DEADLINE_EXCEEDED);
    }

    #[test]
    fn context_keeps_the_code() {
        let e = Error::invalid("bad value").context("annotation io.ember.vcpus");
        assert_eq!(e.code(), Code::INVALID_ARGUMENT);
        assert_eq!(e.to_string(), "annotation io.ember.vcpus: bad value");
    }
}

//! Bounds on what the agent may answer. The agent runs in the guest, which
//! is hostile: every number, count and string in a reply is checked here
//! before the shim acts on it or passes it to containerd, and a reply out
//! of bounds is refused as a whole with an error that names the field.
//!
//! ttrpc itself refuses (and skips, reading 4 KiB at a time) any frame over
//! its fixed 4 MiB limit, so a reply is at most 4 MiB before it is decoded;
//! these checks bound what a reply under that limit may hold.

use ember_proto::agent::*;

/// Highest pid Linux can hand out (`PID_MAX_LIMIT` on 64-bit).
pub const MAX_PID: u32 = 4 * 1024 * 1024;
/// Exit statuses are an exit code (0-255) or 128 + a signal number.
pub const MAX_EXIT_STATUS: u32 = 255;
/// Processes one ListProcesses reply may list (`ctr task ps`, CRI).
pub const MAX_LISTED_PIDS: usize = 65_536;
/// Block devices one StatsContainer reply may report.
pub const MAX_IO_DEVICES: usize = 256;
/// Longest container id (containerd's identifier rule).
pub const MAX_ID_LEN: usize = 76;
/// Latest time accepted in a reply: the end of year 9999 (what protobuf's
/// Timestamp allows).
pub const MAX_TIMESTAMP_SECS: i64 = 253_402_300_799;
/// Bytes of an agent's error message kept (the rest is cut, marked).
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// A reply the shim may act on once [`Checked::check`] passes.
pub trait Checked {
    /// Why the reply cannot be believed, if it cannot.
    fn check(&self) -> Result<(), String>;
}

fn pid(field: &str, pid: u32) -> Result<(), String> {
    if pid > MAX_PID {
        return Err(format!(
            "{field} {pid} is above the highest pid ({MAX_PID})"
        ));
    }
    Ok(())
}

impl Checked for Empty {
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

impl Checked for HealthResponse {
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

impl Checked for CreateContainerResponse {
    fn check(&self) -> Result<(), String> {
        pid("pid", self.pid)
    }
}

impl Checked for StartContainerResponse {
    fn check(&self) -> Result<(), String> {
        pid("pid", self.pid)
    }
}

impl Checked for ExecProcessResponse {
    fn check(&self) -> Result<(), String> {
        pid("pid", self.pid)
    }
}

impl Checked for WaitProcessResponse {
    fn check(&self) -> Result<(), String> {
        pid("pid", self.pid)?;
        if self.exit_status > MAX_EXIT_STATUS {
            return Err(format!(
                "exit status {} is above {MAX_EXIT_STATUS}",
                self.exit_status
            ));
        }
        if let Some(t) = self.exited_at.as_ref() {
            if !(0..=MAX_TIMESTAMP_SECS).contains(&t.seconds)
                || !(0..1_000_000_000).contains(&t.nanos)
            {
                return Err(format!(
                    "exit time {}s {}ns is not a time between 1970 and 9999",
                    t.seconds, t.nanos
                ));
            }
        }
        Ok(())
    }
}

impl Checked for ListProcessesResponse {
    fn check(&self) -> Result<(), String> {
        if self.pids.len() > MAX_LISTED_PIDS {
            return Err(format!(
                "{} pids listed, more than {MAX_LISTED_PIDS}",
                self.pids.len()
            ));
        }
        for &p in &self.pids {
            if p == 0 {
                return Err("pid 0 listed".into());
            }
            pid("listed pid", p)?;
        }
        Ok(())
    }
}

impl Checked for StatsContainerResponse {
    fn check(&self) -> Result<(), String> {
        if self.io.len() > MAX_IO_DEVICES {
            return Err(format!(
                "io stats of {} devices, more than {MAX_IO_DEVICES}",
                self.io.len()
            ));
        }
        Ok(())
    }
}

impl Checked for OOMEvent {
    fn check(&self) -> Result<(), String> {
        let id = &self.container_id;
        if id.is_empty() || id.len() > MAX_ID_LEN {
            return Err(format!(
                "container id of {} bytes (1 to {MAX_ID_LEN} allowed)",
                id.len()
            ));
        }
        Ok(())
    }
}

/// `message` cut to [`MAX_ERROR_MESSAGE`] bytes (at a character boundary).
pub fn bounded_message(message: &str) -> std::borrow::Cow<'_, str> {
    if message.len() <= MAX_ERROR_MESSAGE {
        return message.into();
    }
    let mut end = MAX_ERROR_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}... ({} more bytes cut)",
        &message[..end],
        message.len() - end
    )
    .into()
}

/// An agent error with its message bounded; the code is kept.
pub fn bounded_error(e: ttrpc::Error) -> ttrpc::Error {
    match e {
        ttrpc::Error::RpcStatus(s) if s.message().len() > MAX_ERROR_MESSAGE => {
            let message = bounded_message(s.message()).into_owned();
            ttrpc::Error::RpcStatus(ttrpc::get_status(s.code(), message))
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_bounds_replies_pass() {
        let mut w = WaitProcessResponse::new();
        w.exit_status = 137;
        w.pid = 1234;
        w.exited_at = Some(ember_proto::time::now()).into();
        assert_eq!(w.check(), Ok(()));
        let l = ListProcessesResponse {
            pids: vec![1, 7, MAX_PID],
            ..Default::default()
        };
        assert_eq!(l.check(), Ok(()));
        let o = OOMEvent {
            container_id: "a".repeat(MAX_ID_LEN),
            ..Default::default()
        };
        assert_eq!(o.check(), Ok(()));
    }

    #[test]
    fn each_bound_names_its_field() {
        let mut w = WaitProcessResponse::new();
        w.exit_status = 256;
        assert!(w.check().unwrap_err().contains("exit status 256"));
        w.exit_status = 0;
        let mut t = Timestamp::new();
        t.seconds = -1;
        w.exited_at = Some(t).into();
        assert!(w.check().unwrap_err().contains("exit time"));
        let c = CreateContainerResponse {
            pid: MAX_PID + 1,
            ..Default::default()
        };
        assert!(c.check().unwrap_err().contains("pid"));
        let l = ListProcessesResponse {
            pids: vec![1; MAX_LISTED_PIDS + 1],
            ..Default::default()
        };
        assert!(l.check().unwrap_err().contains("pids listed"));
        let l = ListProcessesResponse {
            pids: vec![0],
            ..Default::default()
        };
        assert!(l.check().is_err());
        let s = StatsContainerResponse {
            io: vec![IoDeviceStats::new(); MAX_IO_DEVICES + 1],
            ..Default::default()
        };
        assert!(s.check().unwrap_err().contains("devices"));
        let o = OOMEvent::new();
        assert!(o.check().is_err());
    }

    #[test]
    fn long_messages_are_cut_at_a_character() {
        let m = "é".repeat(MAX_ERROR_MESSAGE);
        let cut = bounded_message(&m);
        assert!(cut.len() < MAX_ERROR_MESSAGE + 64);
        assert!(cut.ends_with("bytes cut)"));
        assert_eq!(bounded_message("short"), "short");
    }
}

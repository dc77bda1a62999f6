//! What bringing up a pod's VM did and how long each phase took: the
//! pod's log line at start and `ember bench template`'s rows.

use std::time::Duration;

use ember_vmm::timing::fmt_duration;

use crate::sandbox::boot::BootReport;

/// How the VM came to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Booted, templates off or unusable (the reason is logged).
    Cold,
    /// Restored from template `identity`; `created` when this pod booted
    /// the VM the template was made of.
    Restored { identity: String, created: bool },
}

/// How long each phase of bringing up a pod's VM took.
#[derive(Debug, Clone)]
pub struct LaunchReport {
    pub origin: Origin,
    /// Computing the template identity (hashing kernel and initrd unless
    /// their digests are cached).
    pub identity: Option<Duration>,
    /// Waiting for another pod making the same template.
    pub lock_wait: Option<Duration>,
    /// The cold boot, if there was one (the last one, after a fallback).
    pub cold: Option<BootReport>,
    /// Writing the template.
    pub snapshot: Option<Duration>,
    /// Restoring: VMM setup from the template files.
    pub restore: Option<Duration>,
    /// Restore start to the agent answering.
    pub restore_agent: Option<Duration>,
    /// Clock, entropy and hostname.
    pub personalize: Duration,
    /// Everything, from the call to a usable VM.
    pub total: Duration,
}

impl std::fmt::Display for LaunchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = |d: Option<Duration>| fmt_duration(d);
        match &self.origin {
            Origin::Cold => write!(f, "cold boot")?,
            Origin::Restored {
                identity,
                created: false,
            } => write!(f, "restored from template {identity}")?,
            Origin::Restored {
                identity,
                created: true,
            } => write!(f, "booted, made template {identity}, restored")?,
        }
        write!(f, ": total={}", d(Some(self.total)))?;
        if self.identity.is_some() {
            write!(f, " identity={}", d(self.identity))?;
        }
        if self.lock_wait.is_some() {
            write!(f, " template-lock-wait={}", d(self.lock_wait))?;
        }
        if let Some(cold) = &self.cold {
            write!(f, " [boot {cold}]")?;
        }
        if self.snapshot.is_some() {
            write!(f, " snapshot={}", d(self.snapshot))?;
        }
        if self.restore.is_some() {
            write!(
                f,
                " restore={} restore-to-agent={}",
                d(self.restore),
                d(self.restore_agent)
            )?;
        }
        write!(f, " personalize={}", d(Some(self.personalize)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_the_origin_and_phases() {
        let mut r = LaunchReport {
            origin: Origin::Restored {
                identity: "0123abcd".into(),
                created: false,
            },
            identity: Some(Duration::from_millis(80)),
            lock_wait: None,
            cold: None,
            snapshot: None,
            restore: Some(Duration::from_millis(30)),
            restore_agent: Some(Duration::from_millis(700)),
            personalize: Duration::from_millis(40),
            total: Duration::from_millis(850),
        };
        let s = r.to_string();
        assert!(s.starts_with("restored from template 0123abcd"), "{s}");
        assert!(s.contains("restore=") && s.contains("personalize="), "{s}");
        assert!(!s.contains("snapshot="), "{s}");
        r.origin = Origin::Cold;
        r.restore = None;
        assert!(r.to_string().starts_with("cold boot"));
    }
}

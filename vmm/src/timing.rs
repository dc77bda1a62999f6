//! Boot phase timestamps: the VMM marks them (setup, first guest
//! instruction, init, agent) as the guest boots; every boot logs them, tests
//! and the benchmarks print them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The console line the guest kernel prints when it starts init.
pub(crate) const INIT_MARKER: &str = "Run /init as init process";
/// The console line the agent prints as soon as it runs.
pub(crate) const AGENT_STARTED_MARKER: &str = "ember-agent: started";

#[derive(Debug, Default, Clone, Copy)]
pub struct Marks {
    pub setup_started: Option<Instant>,
    pub first_instruction: Option<Instant>,
    pub init_started: Option<Instant>,
    pub agent_started: Option<Instant>,
}

/// Written by the VMM threads, read by whoever reports.
#[derive(Debug, Clone, Default)]
pub struct BootClock(Arc<Mutex<Marks>>);

impl BootClock {
    pub(crate) fn new(setup_started: Instant) -> Self {
        let clock = Self::default();
        clock.update(|m| m.setup_started = Some(setup_started));
        clock
    }

    fn update(&self, f: impl FnOnce(&mut Marks)) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut m);
    }

    pub fn marks(&self) -> Marks {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn mark_first_instruction(&self) {
        self.update(|m| {
            m.first_instruction.get_or_insert_with(Instant::now);
        });
    }

    /// Looks for the boot markers in a console line.
    pub(crate) fn observe_console_line(&self, line: &str) {
        if line.contains(INIT_MARKER) {
            self.update(|m| {
                m.init_started.get_or_insert_with(Instant::now);
            });
        } else if line.contains(AGENT_STARTED_MARKER) {
            self.update(|m| {
                m.agent_started.get_or_insert_with(Instant::now);
            });
        }
    }
}

/// Durations of the boot phases, as printed by tests and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootTimings {
    /// VMM setup (KVM, memory, kernel load, devices) to the first KVM_RUN.
    pub to_first_instruction: Option<Duration>,
    /// First guest instruction to the kernel starting /init.
    pub kernel_to_init: Option<Duration>,
    /// /init started to the agent's first console line.
    pub init_to_agent: Option<Duration>,
}

impl Marks {
    pub fn timings(&self) -> BootTimings {
        let between = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
            (Some(a), Some(b)) => Some(b.saturating_duration_since(a)),
            _ => None,
        };
        BootTimings {
            to_first_instruction: between(self.setup_started, self.first_instruction),
            kernel_to_init: between(self.first_instruction, self.init_started),
            init_to_agent: between(self.init_started, self.agent_started),
        }
    }
}

/// Formats an optional duration for reports: seconds with milliseconds.
pub fn fmt_duration(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:.3}s", d.as_secs_f64()),
        None => "n/a".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_recorded_once() {
        let clock = BootClock::new(Instant::now());
        clock.mark_first_instruction();
        let first = clock.marks().first_instruction;
        clock.mark_first_instruction();
        assert_eq!(clock.marks().first_instruction, first);
        clock.observe_console_line("[  120.1] Run /init as init process");
        clock.observe_console_line("ember-agent: started");
        let t = clock.marks().timings();
        assert!(t.to_first_instruction.is_some());
        assert!(t.kernel_to_init.is_some());
        assert!(t.init_to_agent.is_some());
        assert_eq!(fmt_duration(None), "n/a");
    }
}

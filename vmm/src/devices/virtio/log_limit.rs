//! Rate limiting of warnings a guest (or a host peer) can cause, shared by
//! the virtio devices: at most `PER_SEC` a second, then one summary line of
//! how many were suppressed, so a hostile guest cannot flood the host log.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct LogLimiter {
    window_start: Instant,
    count: u32,
    suppressed: u64,
}

impl LogLimiter {
    const PER_SEC: u32 = 20;

    pub(crate) fn new() -> Self {
        Self {
            window_start: Instant::now(),
            count: 0,
            suppressed: 0,
        }
    }

    /// Whether one more warning may be logged now.
    pub(crate) fn allow(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                tracing::warn!("{} similar device warnings suppressed", self.suppressed);
            }
            self.window_start = now;
            self.count = 0;
            self.suppressed = 0;
        }
        if self.count < Self::PER_SEC {
            self.count += 1;
            true
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            false
        }
    }
}

/// `tracing::warn!` through a [`LogLimiter`].
macro_rules! warn_rl {
    ($lim:expr, $($arg:tt)*) => {
        if $lim.allow() {
            tracing::warn!($($arg)*);
        }
    };
}
pub(crate) use warn_rl;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_per_sec_then_suppressed() {
        let mut lim = LogLimiter::new();
        let allowed = (0..100).filter(|_| lim.allow()).count();
        assert_eq!(allowed, LogLimiter::PER_SEC as usize);
        assert_eq!(lim.suppressed, 100 - u64::from(LogLimiter::PER_SEC));
    }
}

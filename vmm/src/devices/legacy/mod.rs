//! Legacy PC devices: 16550 serial console, i8042 (reset only).

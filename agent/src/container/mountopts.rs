//! mount(8)-style options: flags, propagation and file-system data.

use libc::c_ulong;

/// Parsed mount options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    /// Flags for the mount call (without `MS_BIND`/`MS_REC`).
    pub flags: c_ulong,
    /// Flags cleared explicitly ("rw", "suid", ...), for remounts.
    pub cleared: c_ulong,
    /// "bind" or "rbind" was given.
    pub bind: bool,
    /// "rbind".
    pub recursive: bool,
    /// Propagation flags, each applied with its own mount call.
    pub propagation: Vec<c_ulong>,
    /// Everything else, comma-joined (file-system data).
    pub data: String,
}

const FLAGS: &[(&str, bool, c_ulong)] = &[
    ("ro", false, libc::MS_RDONLY),
    ("rw", true, libc::MS_RDONLY),
    ("nosuid", false, libc::MS_NOSUID),
    ("suid", true, libc::MS_NOSUID),
    ("nodev", false, libc::MS_NODEV),
    ("dev", true, libc::MS_NODEV),
    ("noexec", false, libc::MS_NOEXEC),
    ("exec", true, libc::MS_NOEXEC),
    ("sync", false, libc::MS_SYNCHRONOUS),
    ("async", true, libc::MS_SYNCHRONOUS),
    ("dirsync", false, libc::MS_DIRSYNC),
    ("remount", false, libc::MS_REMOUNT),
    ("mand", false, libc::MS_MANDLOCK),
    ("nomand", true, libc::MS_MANDLOCK),
    ("noatime", false, libc::MS_NOATIME),
    ("atime", true, libc::MS_NOATIME),
    ("nodiratime", false, libc::MS_NODIRATIME),
    ("diratime", true, libc::MS_NODIRATIME),
    ("relatime", false, libc::MS_RELATIME),
    ("norelatime", true, libc::MS_RELATIME),
    ("strictatime", false, libc::MS_STRICTATIME),
    ("nostrictatime", true, libc::MS_STRICTATIME),
    ("silent", false, libc::MS_SILENT),
    ("loud", true, libc::MS_SILENT),
];

const PROPAGATION: &[(&str, c_ulong)] = &[
    ("private", libc::MS_PRIVATE),
    ("rprivate", libc::MS_PRIVATE | libc::MS_REC),
    ("shared", libc::MS_SHARED),
    ("rshared", libc::MS_SHARED | libc::MS_REC),
    ("slave", libc::MS_SLAVE),
    ("rslave", libc::MS_SLAVE | libc::MS_REC),
    ("unbindable", libc::MS_UNBINDABLE),
    ("runbindable", libc::MS_UNBINDABLE | libc::MS_REC),
];

/// Propagation flags of a `rootfsPropagation` value.
pub fn propagation(name: &str) -> Option<c_ulong> {
    PROPAGATION
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
}

/// Parse mount options.
pub fn parse<S: AsRef<str>>(options: &[S]) -> MountOptions {
    let mut o = MountOptions::default();
    let mut data = Vec::new();
    for opt in options {
        let opt = opt.as_ref();
        if opt == "bind" || opt == "rbind" {
            o.bind = true;
            o.recursive |= opt == "rbind";
        } else if let Some((_, clear, flag)) = FLAGS.iter().find(|(n, _, _)| *n == opt) {
            if *clear {
                o.flags &= !flag;
                o.cleared |= flag;
            } else {
                o.flags |= flag;
                o.cleared &= !flag;
            }
        } else if let Some(p) = propagation(opt) {
            o.propagation.push(p);
        } else if !opt.is_empty() {
            data.push(opt);
        }
    }
    o.data = data.join(",");
    o
}

/// Flags that need a second `MS_REMOUNT` call on a bind mount (a bind
/// ignores them on the first call).
pub fn bind_remount_flags(o: &MountOptions) -> Option<c_ulong> {
    let wanted = o.flags & !(libc::MS_REMOUNT);
    if wanted == 0 {
        None
    } else {
        Some(libc::MS_BIND | libc::MS_REMOUNT | wanted | if o.recursive { libc::MS_REC } else { 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags_data_and_propagation() {
        let o = parse(&[
            "nosuid", "noexec", "rbind", "ro", "rprivate", "size=64m", "mode=755",
        ]);
        assert!(o.bind && o.recursive);
        assert_eq!(o.flags, libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_RDONLY);
        assert_eq!(o.propagation, vec![libc::MS_PRIVATE | libc::MS_REC]);
        assert_eq!(o.data, "size=64m,mode=755");
        assert_eq!(
            bind_remount_flags(&o),
            Some(
                libc::MS_BIND
                    | libc::MS_REMOUNT
                    | libc::MS_REC
                    | libc::MS_NOSUID
                    | libc::MS_NOEXEC
                    | libc::MS_RDONLY
            )
        );
        let o = parse(&["ro", "rw"]);
        assert_eq!(o.flags, 0);
        assert_eq!(bind_remount_flags(&o), None);
        assert_eq!(parse::<&str>(&[]).data, "");
    }
}

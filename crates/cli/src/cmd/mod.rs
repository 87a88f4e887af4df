//! The `trellis` subcommands other than `proxy` and `demo`.

pub mod analyze;
pub mod ca;
pub mod certs;
pub mod control;
pub mod ops;
pub mod resources;
pub mod token;

/// "in 3h 20m" / "2d 4h ago" for a Unix time relative to `now`.
pub fn relative(t: u64, now: u64) -> String {
    let (d, future) = if t >= now {
        (t - now, true)
    } else {
        (now - t, false)
    };
    let text = if d >= 86_400 {
        format!("{}d {}h", d / 86_400, (d % 86_400) / 3600)
    } else if d >= 3600 {
        format!("{}h {}m", d / 3600, (d % 3600) / 60)
    } else if d >= 60 {
        format!("{}m {}s", d / 60, d % 60)
    } else {
        format!("{d}s")
    };
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

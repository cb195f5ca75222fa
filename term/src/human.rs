//! Numbers for people: counts with the right plural, byte sizes in binary units, durations
//! rounded to what matters at their scale.

use std::time::Duration;

/// `n` and `noun`, plural unless `n` is 1: "1 request", "3 requests", "0 requests".
pub fn count(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A byte size in binary units with one decimal: "512 B", "1.5 KiB", "513.1 MiB", "15.0 GiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A duration rounded for reading: "850 ms", "3.5 s", "42 s", "2 min 05 s", "1 h 02 min".
pub fn duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{} ms", d.as_millis())
    } else if s < 10.0 {
        format!("{s:.1} s")
    } else if s < 60.0 {
        format!("{s:.0} s")
    } else if s < 3600.0 {
        let s = s.round() as u64;
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        let m = (s / 60.0).round() as u64;
        format!("{} h {:02} min", m / 60, m % 60)
    }
}

/// [`duration`] of a number of seconds (negative and NaN read as 0).
pub fn seconds(s: f64) -> String {
    duration(Duration::from_secs_f64(if s.is_finite() {
        s.max(0.0)
    } else {
        0.0
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_singular_only_for_one() {
        assert_eq!(count(1u32, "request"), "1 request");
        assert_eq!(count(0u32, "request"), "0 requests");
        assert_eq!(count(272u64, "tensor"), "272 tensors");
    }

    #[test]
    fn byte_sizes_use_binary_units_with_one_decimal() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(538_060_032), "513.1 MiB");
        assert_eq!(bytes(16 << 30), "16.0 GiB");
    }

    #[test]
    fn durations_round_to_what_matters_at_their_scale() {
        assert_eq!(duration(Duration::from_millis(850)), "850 ms");
        assert_eq!(seconds(3.516_609_817), "3.5 s");
        assert_eq!(seconds(42.4), "42 s");
        assert_eq!(seconds(125.2), "2 min 05 s");
        assert_eq!(seconds(3725.0), "1 h 02 min");
        assert_eq!(seconds(f64::NAN), "0 ms");
    }
}

//! Link profiles (delay, jitter, loss, rate, queue), outage windows and their string specs.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::LinkSimError;

/// Default queue in front of the rate limiter: a realistic small router buffer.
pub const DEFAULT_QUEUE_BYTES: usize = 64 * 1024;
/// Largest accepted queue, so a typo cannot make the simulator hoard memory.
pub const MAX_QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// Largest accepted one-way delay plus jitter; longer "delays" are outages.
pub const MAX_DELAY_MS: u32 = 60_000;
/// Accepted MTUs: IPv6's minimum up to the largest IP packet.
pub const MTU_MIN: u32 = 1280;
pub const MTU_MAX: u32 = 65_535;
/// Slowest accepted rate; below this a single datagram would occupy the link for minutes.
pub const MIN_RATE_BPS: u64 = 1_000;
/// IP MTU of the field presets: Ethernet's, which 4G, 2G and VSAT modems present.
pub const FIELD_MTU: u32 = 1500;
/// IPv4 and UDP headers: a datagram's payload must fit in the MTU with them.
pub const UDP_IPV4_HEADERS: u32 = 28;
/// Names accepted by [`LinkProfile::preset`].
pub const PRESET_NAMES: &[&str] = &["loopback", "weak4g", "2g", "vsat"];

/// How one direction of the link behaves.
///
/// A datagram larger than the link's MTU is dropped at once (as a router drops a packet too big
/// to forward without fragments); the others first wait in a tail-drop queue for the
/// serialising link (`rate_bps`), then may be lost (`loss`), then propagate for `delay_ms` ±
/// `jitter_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkProfile {
    /// One-way base propagation delay in milliseconds.
    pub delay_ms: u32,
    /// Uniform jitter in milliseconds added to or subtracted from the delay (never below zero).
    pub jitter_ms: u32,
    /// Random loss probability, 0..=1.
    pub loss: f64,
    /// Link rate in bits per second; `None` means unlimited (no queue, no serialisation).
    pub rate_bps: Option<u64>,
    /// Bytes that may wait for the link before new datagrams are tail-dropped.
    pub queue_bytes_max: usize,
    /// If false, jitter never reorders: each delivery is at or after the previous one.
    pub reorder: bool,
    /// Largest IP packet the link carries (UDP payload + 28 bytes of IPv4 and UDP headers);
    /// `None`: any datagram. Path-MTU discovery needs it: without it, a sender on loopback
    /// would find a 6,500-byte "4G" path.
    #[serde(default)]
    pub mtu: Option<u32>,
}

impl Default for LinkProfile {
    fn default() -> Self {
        Self::loopback()
    }
}

impl LinkProfile {
    /// No shaping at all.
    pub fn loopback() -> Self {
        Self {
            delay_ms: 0,
            jitter_ms: 0,
            loss: 0.0,
            rate_bps: None,
            queue_bytes_max: DEFAULT_QUEUE_BYTES,
            reorder: false,
            mtu: None,
        }
    }

    /// Weak 4G: 1 Mbit/s, 100 ms one way (200 ms RTT), 2% loss.
    pub fn weak_4g() -> Self {
        Self {
            delay_ms: 100,
            loss: 0.02,
            rate_bps: Some(1_000_000),
            mtu: Some(FIELD_MTU),
            ..Self::loopback()
        }
    }

    /// 2G/EDGE: 64 kbit/s, 500 ms one way (1 s RTT), no random loss.
    pub fn two_g() -> Self {
        Self {
            delay_ms: 500,
            rate_bps: Some(64_000),
            mtu: Some(FIELD_MTU),
            ..Self::loopback()
        }
    }

    /// Geostationary VSAT: 5 Mbit/s, 300 ms one way.
    pub fn vsat() -> Self {
        Self {
            delay_ms: 300,
            rate_bps: Some(5_000_000),
            mtu: Some(FIELD_MTU),
            ..Self::loopback()
        }
    }

    /// A preset by name (case-insensitive, `-`/`_` ignored): loopback, weak4g, 2g, vsat.
    pub fn preset(name: &str) -> Option<Self> {
        let norm: String = name
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .map(|c| c.to_ascii_lowercase())
            .collect();
        match norm.as_str() {
            "loopback" | "lo" | "none" => Some(Self::loopback()),
            "weak4g" | "4g" => Some(Self::weak_4g()),
            "2g" | "twog" => Some(Self::two_g()),
            "vsat" => Some(Self::vsat()),
            _ => None,
        }
    }

    /// Parses a spec: an optional preset name first, then `key=value` overrides, comma-separated.
    ///
    /// Keys: `rate` (`64kbit`, `1mbit`, `1.5gbit`, plain bit/s, `unlimited`),
    /// `delay`/`jitter` (`100ms`, `0.5s`), `loss` (`2%` or `0.02`),
    /// `queue` (bytes, `64k`, `1m`; binary units), `reorder` (bare flag or `=on|off`),
    /// `mtu` (IP packet bytes, `1500`, or `none`; field presets have 1500).
    /// Example: `weak4g,jitter=20ms` or `rate=1mbit,delay=100ms,loss=2%,queue=64k`.
    pub fn parse(spec: &str) -> Result<Self, LinkSimError> {
        let bad = |reason: String| LinkSimError::Spec(format!("{spec:?}: {reason}"));
        if spec.trim().is_empty() {
            return Err(bad("empty spec".into()));
        }
        let mut profile = Self::loopback();
        for (i, token) in spec.split(',').map(str::trim).enumerate() {
            if token.is_empty() {
                return Err(bad("empty item".into()));
            }
            let Some((key, value)) = token.split_once('=') else {
                if token.eq_ignore_ascii_case("reorder") {
                    profile.reorder = true;
                } else if let Some(p) = Self::preset(token).filter(|_| i == 0) {
                    profile = p;
                } else if i == 0 {
                    return Err(bad(format!(
                        "unknown preset {token:?} (known: {})",
                        PRESET_NAMES.join(", ")
                    )));
                } else {
                    return Err(bad(format!(
                        "expected key=value, got {token:?} (presets only come first)"
                    )));
                }
                continue;
            };
            let value = value.trim();
            match key.trim().to_ascii_lowercase().as_str() {
                "rate" => profile.rate_bps = parse_rate(value).map_err(bad)?,
                "delay" => profile.delay_ms = parse_ms(value).map_err(bad)?,
                "jitter" => profile.jitter_ms = parse_ms(value).map_err(bad)?,
                "loss" => profile.loss = parse_loss(value).map_err(bad)?,
                "queue" => profile.queue_bytes_max = parse_bytes(value).map_err(bad)?,
                "reorder" => profile.reorder = parse_bool(value).map_err(bad)?,
                "mtu" => profile.mtu = parse_mtu(value).map_err(bad)?,
                other => {
                    return Err(bad(format!(
                    "unknown key {other:?} (known: rate, delay, jitter, loss, queue, reorder, mtu)"
                )))
                }
            }
        }
        profile.validate()?;
        Ok(profile)
    }

    /// Checks ranges; fields are public, so the simulator re-checks before use.
    pub fn validate(&self) -> Result<(), LinkSimError> {
        let bad = |s: &str| Err(LinkSimError::Profile(s.to_string()));
        if !self.loss.is_finite() || !(0.0..=1.0).contains(&self.loss) {
            return bad("loss must be between 0 and 1");
        }
        if self.rate_bps.is_some_and(|r| r < MIN_RATE_BPS) {
            return bad("rate must be at least 1kbit");
        }
        if u64::from(self.delay_ms) + u64::from(self.jitter_ms) > u64::from(MAX_DELAY_MS) {
            return bad("delay plus jitter must be at most 60s");
        }
        if self.queue_bytes_max > MAX_QUEUE_BYTES {
            return bad("queue must be at most 64m");
        }
        if self.mtu.is_some_and(|m| !(MTU_MIN..=MTU_MAX).contains(&m)) {
            return bad("mtu must be between 1280 and 65535 bytes");
        }
        Ok(())
    }
}

impl FromStr for LinkProfile {
    type Err = LinkSimError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Prints the canonical spec, which [`LinkProfile::parse`] reads back.
impl fmt::Display for LinkProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rate_bps {
            None => f.write_str("rate=unlimited")?,
            Some(r) if r % 1_000_000_000 == 0 => write!(f, "rate={}gbit", r / 1_000_000_000)?,
            Some(r) if r % 1_000_000 == 0 => write!(f, "rate={}mbit", r / 1_000_000)?,
            Some(r) if r % 1_000 == 0 => write!(f, "rate={}kbit", r / 1_000)?,
            Some(r) => write!(f, "rate={r}bit")?,
        }
        write!(f, ",delay={}ms,jitter={}ms", self.delay_ms, self.jitter_ms)?;
        // Percent reads better, but only when it converts back exactly.
        let pct = self.loss * 100.0;
        if pct / 100.0 == self.loss {
            write!(f, ",loss={pct}%")?;
        } else {
            write!(f, ",loss={}", self.loss)?;
        }
        if self.queue_bytes_max.is_multiple_of(1024) {
            write!(f, ",queue={}k", self.queue_bytes_max / 1024)?;
        } else {
            write!(f, ",queue={}", self.queue_bytes_max)?;
        }
        if self.reorder {
            f.write_str(",reorder")?;
        }
        if let Some(mtu) = self.mtu {
            write!(f, ",mtu={mtu}")?;
        }
        Ok(())
    }
}

/// A window, relative to proxy start, during which every datagram in both directions is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outage {
    pub start: Duration,
    pub duration: Duration,
}

impl Outage {
    /// Whether `elapsed` since proxy start falls inside this window.
    pub fn contains(&self, elapsed: Duration) -> bool {
        elapsed
            .checked_sub(self.start)
            .is_some_and(|into| into < self.duration)
    }
}

/// Parses `START+DURATION`, e.g. `10s+5s`, `1.5s+500ms`, `1h+2d`.
impl FromStr for Outage {
    type Err = LinkSimError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| LinkSimError::Outage(format!("{s:?}: {reason}"));
        let (start, duration) = s
            .split_once('+')
            .ok_or_else(|| bad("expected START+DURATION, e.g. 10s+5s".into()))?;
        Ok(Self {
            start: parse_duration(start.trim()).map_err(bad)?,
            duration: parse_duration(duration.trim()).map_err(bad)?,
        })
    }
}

impl fmt::Display for Outage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}+{:?}", self.start, self.duration)
    }
}

fn parse_mtu(value: &str) -> Result<Option<u32>, String> {
    if value.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|_| format!("mtu {value:?}: expected bytes, e.g. 1500, or none"))
}

/// Splits `1.5mbit` into (`1.5`, `mbit`); the unit is lowercased.
fn split_unit(s: &str) -> (&str, String) {
    let at = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    (&s[..at], s[at..].trim().to_ascii_lowercase())
}

fn parse_number(num: &str, what: &str) -> Result<f64, String> {
    match num.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("bad {what} number {num:?}")),
    }
}

/// Durations need a unit (ms, s, m, h, d) except a bare `0`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = split_unit(s);
    let v = parse_number(num, "duration")?;
    let scale = match unit.as_str() {
        "ms" => 0.001,
        "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3_600.0,
        "d" => 86_400.0,
        "" if v == 0.0 => 0.0,
        "" => return Err(format!("duration {s:?} needs a unit (ms, s, m, h, d)")),
        _ => return Err(format!("unknown duration unit {unit:?} (ms, s, m, h, d)")),
    };
    Duration::try_from_secs_f64(v * scale).map_err(|_| format!("duration {s:?} out of range"))
}

fn parse_ms(s: &str) -> Result<u32, String> {
    let d = parse_duration(s)?;
    // Round to the nearest millisecond rather than silently truncating 0.6ms to 0.
    let ms = d.as_micros().saturating_add(500) / 1000;
    u32::try_from(ms).map_err(|_| format!("duration {s:?} too long"))
}

/// Rates are in bits per second with SI prefixes, like tc's `kbit`/`mbit`.
fn parse_rate(s: &str) -> Result<Option<u64>, String> {
    let lower = s.to_ascii_lowercase();
    if matches!(lower.as_str(), "unlimited" | "none" | "inf") {
        return Ok(None);
    }
    let (num, unit) = split_unit(s);
    let v = parse_number(num, "rate")?;
    let scale = match unit.as_str() {
        "" | "bit" => 1.0,
        "kbit" | "k" => 1e3,
        "mbit" | "m" => 1e6,
        "gbit" | "g" => 1e9,
        _ => {
            return Err(format!(
                "unknown rate unit {unit:?} (bit, kbit, mbit, gbit; bits per second)"
            ))
        }
    };
    let bps = (v * scale).round();
    if bps < 1.0 || bps > u64::MAX as f64 {
        return Err(format!("rate {s:?} out of range"));
    }
    Ok(Some(bps as u64))
}

fn parse_loss(s: &str) -> Result<f64, String> {
    let (num, pct) = match s.strip_suffix('%') {
        Some(n) => (n.trim(), true),
        None => (s, false),
    };
    let v = parse_number(num, "loss")?;
    let v = if pct { v / 100.0 } else { v };
    if v > 1.0 {
        return Err(format!("loss {s:?} above 100%"));
    }
    Ok(v)
}

/// Queue sizes use binary prefixes: `64k` is 65536 bytes.
fn parse_bytes(s: &str) -> Result<usize, String> {
    let (num, unit) = split_unit(s);
    let v = parse_number(num, "size")?;
    let scale = match unit.as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        _ => return Err(format!("unknown size unit {unit:?} (bytes, k, m)")),
    };
    let bytes = (v * scale).round();
    if bytes > MAX_QUEUE_BYTES as f64 {
        return Err(format!("queue {s:?} above 64m"));
    }
    Ok(bytes as usize)
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "yes" | "true" | "1" => Ok(true),
        "off" | "no" | "false" | "0" => Ok(false),
        _ => Err(format!("expected on or off, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_spec() {
        let p: LinkProfile = "rate=1mbit,delay=100ms,jitter=5ms,loss=2%,queue=64k"
            .parse()
            .unwrap();
        assert_eq!(p.rate_bps, Some(1_000_000));
        assert_eq!(p.delay_ms, 100);
        assert_eq!(p.jitter_ms, 5);
        assert!((p.loss - 0.02).abs() < 1e-12);
        assert_eq!(p.queue_bytes_max, 65_536);
        assert!(!p.reorder);
    }

    #[test]
    fn parses_presets_and_overrides() {
        assert_eq!(
            LinkProfile::parse("weak4g").unwrap(),
            LinkProfile::weak_4g()
        );
        assert_eq!(
            LinkProfile::parse("Weak-4G").unwrap(),
            LinkProfile::weak_4g()
        );
        assert_eq!(LinkProfile::parse("2g").unwrap(), LinkProfile::two_g());
        assert_eq!(LinkProfile::parse("vsat").unwrap(), LinkProfile::vsat());
        assert_eq!(
            LinkProfile::parse("loopback").unwrap(),
            LinkProfile::loopback()
        );
        let p = LinkProfile::parse("vsat, loss=0.01, jitter=20ms, reorder").unwrap();
        assert_eq!(p.rate_bps, Some(5_000_000));
        assert_eq!(p.delay_ms, 300);
        assert_eq!(p.jitter_ms, 20);
        assert!(p.reorder);
        let p = LinkProfile::parse("rate=64kbit,delay=0.5s,reorder=off,queue=1500").unwrap();
        assert_eq!(p.rate_bps, Some(64_000));
        assert_eq!(p.delay_ms, 500);
        assert_eq!(p.queue_bytes_max, 1500);
        assert_eq!(
            LinkProfile::parse("weak4g,rate=unlimited")
                .unwrap()
                .rate_bps,
            None
        );
        assert_eq!(LinkProfile::weak_4g().mtu, Some(1500));
        assert_eq!(LinkProfile::parse("2g,mtu=none").unwrap().mtu, None);
        assert_eq!(LinkProfile::parse("mtu=9000").unwrap().mtu, Some(9000));
    }

    #[test]
    fn display_round_trips() {
        for p in [
            LinkProfile::loopback(),
            LinkProfile::weak_4g(),
            LinkProfile::two_g(),
            LinkProfile::vsat(),
            LinkProfile::parse(
                "rate=1234bit,delay=7ms,jitter=3ms,loss=0.1234567,queue=1000,reorder,mtu=9000",
            )
            .unwrap(),
        ] {
            assert_eq!(LinkProfile::parse(&p.to_string()).unwrap(), p, "{p}");
        }
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "",
            "  ",
            "rate=1mbit,,delay=1ms",
            "fast",
            "rate=1mbit,weak4g",
            "rate=abc",
            "rate=1mbps",
            "rate=0",
            "rate=10bit",
            "delay=100",
            "delay=-5ms",
            "delay=5parsecs",
            "delay=2h",
            "jitter=1e400ms",
            "loss=150%",
            "loss=1.5",
            "loss=NaN",
            "loss=-1%",
            "queue=1g",
            "queue=100m",
            "reorder=maybe",
            "mtu=576",
            "mtu=70000",
            "mtu=jumbo",
            "colour=blue",
            "rate",
        ] {
            let err = LinkProfile::parse(bad).expect_err(bad);
            let msg = err.to_string();
            assert!(msg.starts_with("invalid link"), "{bad:?} -> {msg}");
        }
        let msg = LinkProfile::parse("rate=1mbps").unwrap_err().to_string();
        assert!(msg.contains("rate unit"), "{msg}");
    }

    #[test]
    fn validate_catches_hand_built_profiles() {
        let mut p = LinkProfile::loopback();
        p.loss = f64::NAN;
        assert!(p.validate().is_err());
        p.loss = 0.5;
        p.rate_bps = Some(0);
        assert!(p.validate().is_err());
        p.rate_bps = Some(64_000);
        p.delay_ms = u32::MAX;
        p.jitter_ms = u32::MAX;
        assert!(p.validate().is_err());
    }

    #[test]
    fn parses_outages() {
        let o: Outage = "10s+5s".parse().unwrap();
        assert_eq!(o.start, Duration::from_secs(10));
        assert_eq!(o.duration, Duration::from_secs(5));
        let o: Outage = "1.5s + 250ms".parse().unwrap();
        assert_eq!(o.start, Duration::from_millis(1500));
        assert_eq!(o.duration, Duration::from_millis(250));
        let o: Outage = "1h+2d".parse().unwrap();
        assert_eq!(o.duration, Duration::from_secs(2 * 86_400));
        assert!(o.contains(Duration::from_secs(3600)));
        assert!(!o.contains(Duration::from_secs(3599)));
        assert!(!o.contains(Duration::from_secs(3600 + 2 * 86_400)));
        for bad in [
            "10s",
            "10s+",
            "+5s",
            "x+5s",
            "10+5s",
            "10s+5y",
            "1e30d+1s",
            "99999999999999999999d+1s",
        ] {
            let msg = bad.parse::<Outage>().expect_err(bad).to_string();
            assert!(msg.starts_with("invalid outage"), "{bad:?} -> {msg}");
        }
    }
}

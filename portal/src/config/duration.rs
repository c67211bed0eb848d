//! Human durations (`500ms`, `30s`, `1m`, `24h`, `1d`, `1h30m`) as a typed value.
//!
//! May import: nothing outside `config`.

use std::{borrow::Cow, fmt, str::FromStr};

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// The pattern the API server enforces; `FromStr` accepts exactly this language.
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h|d))+$";

/// A duration written as one or more `<number><unit>` parts, unit one of `ms`, `s`, `m`, `h`, `d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn from_millis(ms: u64) -> Self {
        Duration(std::time::Duration::from_millis(ms))
    }
    pub const fn from_secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }
    pub const fn get(self) -> std::time::Duration {
        self.0
    }
    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration; write e.g. 500ms, 30s, 1m, 24h or 1d")]
    Empty,
    #[error("invalid duration {input:?}: {reason}; write e.g. 500ms, 30s, 1m, 24h or 1d")]
    Invalid { input: String, reason: String },
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(DurationError::Empty);
        }
        let invalid = |reason: String| DurationError::Invalid {
            input: s.to_string(),
            reason,
        };
        let bytes = s.as_bytes();
        let mut total: u128 = 0;
        let mut i = 0;
        while i < bytes.len() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            if start == i {
                return Err(invalid(format!(
                    "expected a number at byte {start}, found {:?}",
                    bytes[i] as char
                )));
            }
            let number: u128 = s[start..i]
                .parse()
                .map_err(|_| invalid("number too large".into()))?;
            let unit_start = i;
            while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
                i += 1;
            }
            let millis_per_unit: u128 = match &s[unit_start..i] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                "" if i < bytes.len() => {
                    return Err(invalid(format!(
                        "unexpected {:?} at byte {i} (whole numbers only: write 1500ms, not 1.5s)",
                        bytes[i] as char
                    )))
                }
                "" => {
                    return Err(invalid(format!(
                        "missing unit after {number} (ms, s, m, h or d)"
                    )))
                }
                other => {
                    return Err(invalid(format!(
                        "unknown unit {other:?} (ms, s, m, h or d)"
                    )))
                }
            };
            total = total
                .checked_add(number.saturating_mul(millis_per_unit))
                .ok_or_else(|| invalid("duration too large".into()))?;
        }
        let millis = u64::try_from(total).map_err(|_| invalid("duration too large".into()))?;
        Ok(Duration::from_millis(millis))
    }
}

impl fmt::Display for Duration {
    /// The shortest form that parses back to the same value: `1d`, `1h30m`, `1500ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        if ms % 1_000 != 0 {
            return write!(f, "{ms}ms");
        }
        let mut secs = ms / 1_000;
        for (unit, size) in [("d", 86_400u128), ("h", 3_600), ("m", 60), ("s", 1)] {
            if secs >= size {
                write!(f, "{}{unit}", secs / size)?;
                secs %= size;
            }
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 500ms, 30s, 1m, 24h or 1d")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_combinations() {
        let cases = [
            ("500ms", 500),
            ("30s", 30_000),
            ("1m", 60_000),
            ("24h", 86_400_000),
            ("1d", 86_400_000),
            ("1h30m", 5_400_000),
            ("1s500ms", 1_500),
            ("0s", 0),
        ];
        for (input, ms) in cases {
            let d: Duration = input.parse().unwrap();
            assert_eq!(d.0.as_millis(), ms, "{input}");
        }
    }

    #[test]
    fn refuses_bad_forms_with_the_reason() {
        for (input, needle) in [
            ("", "empty"),
            ("10", "missing unit"),
            ("5x", "unknown unit \"x\""),
            ("s", "expected a number at byte 0"),
            ("1.5s", "unexpected '.' at byte 1"),
            ("-1s", "expected a number at byte 0"),
            ("99999999999999999999999d", "too large"),
        ] {
            let err = input.parse::<Duration>().unwrap_err().to_string();
            assert!(err.contains(needle), "{input:?}: {err}");
        }
    }

    #[test]
    fn display_round_trips() {
        for ms in [
            1u64, 999, 1_000, 1_500, 60_000, 90_000, 3_600_000, 86_400_000, 90_061_000,
        ] {
            let d = Duration::from_millis(ms);
            let back: Duration = d.to_string().parse().unwrap();
            assert_eq!(back, d, "{d}");
        }
        assert_eq!(Duration::from_secs(86_400).to_string(), "1d");
        assert_eq!(Duration::from_secs(5_400).to_string(), "1h30m");
    }
}

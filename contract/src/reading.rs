//! The body of `POST /v1/telemetry`: its shape, its validation rules and its fingerprint.
//!
//! Decoding is split in two steps so that each failure gets the status API.md gives it:
//! a body that is not JSON of the right shape (wrong types, missing or unknown fields)
//! fails in `serde` and is a `400 invalid-json`; a well-formed body that breaks a rule
//! (device id pattern, metric names, timestamps out of bounds) fails in
//! [`ReadingBody::validate`] and is a `422 invalid-reading` listing every broken rule
//! (of the metrics, those of the first [`METRIC_ERRORS_LISTED`], then how many more).

use std::collections::{btree_map::Entry, BTreeMap};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

use crate::timestamp;

/// Longest device id; the id becomes one NATS subject token and part of Redis keys.
pub const DEVICE_ID_MAX_LEN: usize = 64;
/// Most metrics in one reading.
pub const METRICS_MAX: usize = 32;
/// Most metrics whose own errors an invalid reading lists. The errors of the others are
/// counted in one last entry, so that a body of thousands of bad metric names gets a
/// problem of a few KiB, not one of a MiB. A reading within the 32 metrics allowed is
/// never cut short.
pub const METRIC_ERRORS_LISTED: usize = METRICS_MAX;
/// Longest metric name.
pub const METRIC_NAME_MAX_LEN: usize = 64;
/// Longest idempotency key.
pub const IDEMPOTENCY_KEY_MAX_LEN: usize = 128;

/// A reading as it arrives, before any rule is checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadingBody {
    pub device_id: String,
    #[serde(default)]
    pub recorded_at: Option<String>,
    #[serde(deserialize_with = "metrics_named_once")]
    pub metrics: BTreeMap<String, MetricValue>,
}

/// Decodes `json`, which must be a JSON object, as `T` ([`ReadingBody`], [`BatchBody`],
/// [`BatchItem`], the event); the error is the `detail` of an `invalid-json` problem.
/// serde's derived structs also take an array of their fields in order, so that
/// `["sensor-1", null, {"t": 1}]` was stored as a reading, and their message for any
/// other value named the Rust type (`expected struct ReadingBody`). Text that is not
/// JSON at all keeps serde's message, which says where it stops being JSON, cut to
/// [`DETAIL_MAX_CHARS`], its middle left out.
pub fn from_json_object<'a, T: Deserialize<'a>>(json: &'a [u8]) -> Result<T, String> {
    let first = json
        .iter()
        .find(|byte| !matches!(byte, b' ' | b'\t' | b'\n' | b'\r'));
    if first == Some(&b'{') {
        return serde_json::from_slice(json).map_err(|error| bounded_detail(&error.to_string()));
    }
    // Read to the end only to tell which message fits: nothing is kept.
    match serde_json::from_slice::<serde::de::IgnoredAny>(json) {
        Ok(_) => Err(NOT_AN_OBJECT.to_owned()),
        Err(error) => Err(bounded_detail(&error.to_string())),
    }
}

/// The longest `detail` [`from_json_object`] gives, in characters.
pub const DETAIL_MAX_CHARS: usize = 240;

/// serde's `message`, past [`DETAIL_MAX_CHARS`] with its middle left out: its start
/// says what is wrong and its end where (`at line 1 column 60012`). serde quotes what
/// it refuses whole (an unknown field's name, a string where a map belongs), so a body
/// of one 60 KB name had a detail of 60 KB until 2026-12-07, and a batch repeated that
/// for each such item. Characters are kept as they are: JSON escapes control
/// characters in a problem, and the projector escapes line breaks in a dead letter's
/// reason.
fn bounded_detail(message: &str) -> String {
    const TAIL: usize = 60;
    let length = message.chars().count();
    if length <= DETAIL_MAX_CHARS {
        return message.to_owned();
    }
    let marker = " … ";
    let head = DETAIL_MAX_CHARS - TAIL - marker.chars().count();
    message
        .chars()
        .take(head)
        .chain(marker.chars())
        .chain(message.chars().skip(length - TAIL))
        .collect()
}

/// The `detail` for JSON that is not an object ([`from_json_object`]).
pub const NOT_AN_OBJECT: &str = "expected a JSON object";

/// Most readings in one `POST /v1/telemetry/batch`.
pub const BATCH_MAX: usize = 1000;

/// The body of `POST /v1/telemetry/batch`; its items are decoded one by one, so that a
/// malformed item fails alone. Each item stays the slice of the body it was written in
/// until then: no JSON tree is built only to be taken apart again.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody<'a> {
    /// At most [`BATCH_MAX`] + 1 items, which is enough to tell a batch too long: the
    /// rest of a longer array is checked as JSON and not kept.
    #[serde(borrow, deserialize_with = "one_past_batch_max")]
    pub readings: Vec<&'a serde_json::value::RawValue>,
}

/// The items of a batch's `readings` array, keeping none past the first
/// [`BATCH_MAX`] + 1. A 1 MiB body of `0,0,0,…` holds half a million items, and a slice
/// of the body for each took 16 bytes: 8 MiB a request before its length was refused.
fn one_past_batch_max<'de, D>(
    deserializer: D,
) -> Result<Vec<&'de serde_json::value::RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct OnePast;

    impl<'de> serde::de::Visitor<'de> for OnePast {
        type Value = Vec<&'de serde_json::value::RawValue>;

        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("an array of readings")
        }

        fn visit_seq<A>(self, mut items: A) -> Result<Self::Value, A::Error>
        where
            A: serde::de::SeqAccess<'de>,
        {
            let mut kept = Vec::with_capacity(items.size_hint().unwrap_or(0).min(BATCH_MAX + 1));
            while kept.len() <= BATCH_MAX {
                match items.next_element()? {
                    Some(item) => kept.push(item),
                    None => return Ok(kept),
                }
            }
            while items.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(kept)
        }
    }

    deserializer.deserialize_seq(OnePast)
}

/// One item of a batch: a reading with its own idempotency key.
///
/// The key is decoded from any JSON value ([`ItemKey`]), so that an item without one, or
/// with a key that is not a string, is refused as the single POST refuses a missing or
/// malformed header (`missing-idempotency-key`), not as a shape error.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchItem {
    /// `None` when missing or `null`.
    #[serde(default)]
    pub idempotency_key: Option<ItemKey>,
    pub device_id: String,
    #[serde(default)]
    pub recorded_at: Option<String>,
    #[serde(deserialize_with = "metrics_named_once")]
    pub metrics: BTreeMap<String, MetricValue>,
}

impl BatchItem {
    /// The key checked as [`check_idempotency_key`] checks a header (or why it is
    /// missing or malformed), and the reading as a single POST would carry it.
    pub fn into_parts(self) -> (Result<String, String>, ReadingBody) {
        let reading = ReadingBody {
            device_id: self.device_id,
            recorded_at: self.recorded_at,
            metrics: self.metrics,
        };
        let key = match self.idempotency_key {
            None => Err("is required".to_owned()),
            Some(ItemKey::Text(key)) => check_idempotency_key(key.as_bytes()).map(|()| key),
            Some(ItemKey::NotText) => Err("must be a string".to_owned()),
        };
        (key, reading)
    }
}

/// A JSON value as far as a rule needs it: a number, a string, or anything else (`null`,
/// `true`, an array, an object), which is read past and dropped, never built. Decoded as
/// a `serde_json::Value`, a metric of `[0,0,0,…]` filling a 1 MiB batch item became a
/// tree of some 16 MiB before `validate` refused it; a batch item's key the same.
enum Scalar {
    Number(f64),
    Text(String),
    Other,
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarOrOther;

        impl<'de> serde::de::Visitor<'de> for ScalarOrOther {
            type Value = Scalar;

            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("any JSON value")
            }

            fn visit_f64<E>(self, number: f64) -> Result<Scalar, E> {
                Ok(Scalar::Number(number))
            }

            // As `serde_json::Value::as_f64` converts them.
            fn visit_i64<E>(self, number: i64) -> Result<Scalar, E> {
                Ok(Scalar::Number(number as f64))
            }

            fn visit_u64<E>(self, number: u64) -> Result<Scalar, E> {
                Ok(Scalar::Number(number as f64))
            }

            fn visit_str<E>(self, text: &str) -> Result<Scalar, E> {
                Ok(Scalar::Text(text.to_owned()))
            }

            fn visit_string<E>(self, text: String) -> Result<Scalar, E> {
                Ok(Scalar::Text(text))
            }

            fn visit_bool<E>(self, _: bool) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }

            fn visit_unit<E>(self) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, items: A) -> Result<Scalar, A::Error> {
                serde::de::IgnoredAny
                    .visit_seq(items)
                    .map(|_| Scalar::Other)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                entries: A,
            ) -> Result<Scalar, A::Error> {
                serde::de::IgnoredAny
                    .visit_map(entries)
                    .map(|_| Scalar::Other)
            }
        }

        deserializer.deserialize_any(ScalarOrOther)
    }
}

/// A batch item's `idempotency_key` as it arrives: a string, or any other value, read
/// past and dropped, never built.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemKey {
    Text(String),
    NotText,
}

impl<'de> Deserialize<'de> for ItemKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match Scalar::deserialize(deserializer)? {
            Scalar::Text(key) => ItemKey::Text(key),
            Scalar::Number(_) | Scalar::Other => ItemKey::NotText,
        })
    }
}

/// A metric's value as it arrives: the JSON number, or `None` for any other value, which
/// breaks the rule that values are finite numbers (read past and dropped, never
/// built).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricValue(pub Option<f64>);

impl<'de> Deserialize<'de> for MetricValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match Scalar::deserialize(deserializer)? {
            Scalar::Number(number) => MetricValue(Some(number)),
            Scalar::Text(_) | Scalar::Other => MetricValue(None),
        })
    }
}

/// The `metrics` object, refused when it names a metric twice.
///
/// `{"temperature": 21.5, "temperature": 99}` is well-formed JSON, but which value the
/// device meant is anyone's guess: a plain map keeps the last one and drops the other
/// without a word. A top-level field given twice fails decoding (`invalid-json`), so a
/// metric given twice does too, naming it.
fn metrics_named_once<'de, D>(deserializer: D) -> Result<BTreeMap<String, MetricValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct NamedOnce;

    impl<'de> serde::de::Visitor<'de> for NamedOnce {
        type Value = BTreeMap<String, MetricValue>;

        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("an object of metric names and values")
        }

        fn visit_map<A>(self, mut entries: A) -> Result<Self::Value, A::Error>
        where
            A: serde::de::MapAccess<'de>,
        {
            let mut metrics = BTreeMap::new();
            while let Some((name, value)) = entries.next_entry::<String, MetricValue>()? {
                match metrics.entry(name) {
                    Entry::Vacant(entry) => {
                        entry.insert(value);
                    }
                    Entry::Occupied(entry) => {
                        return Err(serde::de::Error::custom(format!(
                            "metric `{}` is given more than once",
                            printable(entry.key())
                        )));
                    }
                }
            }
            Ok(metrics)
        }
    }

    deserializer.deserialize_map(NamedOnce)
}

/// One broken rule, named by the field it concerns (`metrics.temp`, `recorded_at`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// How far from the server's clock a `recorded_at` may be.
#[derive(Debug, Clone, Copy)]
pub struct TimeBounds {
    pub max_future: Duration,
    pub max_age: Duration,
}

/// A reading that passed every rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub device_id: String,
    /// `None` when the device did not say; the server's receive time is used then.
    pub recorded_at: Option<OffsetDateTime>,
    pub metrics: BTreeMap<String, f64>,
}

/// Why a body is not a valid reading: every broken rule and, when the only one broken is
/// the age rule (`recorded_at` older than `max_age`), the reading it would be without it.
///
/// A reading ages while a device waits to retry it, so a retry of one stored while it was
/// young may break the age rule and still be owed the stored answer (API.md §1): ingest
/// looks the key up with [`Invalid::aged`] before refusing it.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub errors: Vec<FieldError>,
    /// How many rules are broken: one for each entry of `errors`, but the entry that
    /// counts the bad metrics past the first [`METRIC_ERRORS_LISTED`] stands for them all.
    pub broken: usize,
    /// The reading, when nothing but its age is wrong with it.
    pub aged: Option<Reading>,
}

impl Invalid {
    /// A body that breaks one rule, told by `error`.
    pub fn one(error: FieldError) -> Self {
        Self {
            errors: vec![error],
            broken: 1,
            aged: None,
        }
    }

    /// The problem's `detail`: how many rules are broken.
    pub fn summary(&self) -> String {
        match self.broken {
            1 => "1 rule broken".to_owned(),
            broken => format!("{broken} rules broken"),
        }
    }
}

impl ReadingBody {
    /// Checks every rule of API.md §1 and reports all broken ones at once; past
    /// [`METRIC_ERRORS_LISTED`] metrics with an error, one last entry counts the rest. A
    /// body that breaks the age rule and no other gives the reading it would be without
    /// that rule ([`Invalid::aged`]), fingerprinted as it was when it was young.
    pub fn validate(self, now: OffsetDateTime, bounds: TimeBounds) -> Result<Reading, Invalid> {
        let mut errors = Vec::new();
        let mut too_old = None;
        if let Err(message) = check_device_id(&self.device_id) {
            errors.push(FieldError::new("device_id", message));
        }
        let recorded_at = match self.recorded_at.as_deref() {
            None => None,
            Some(text) => match timestamp::parse(text) {
                None => {
                    errors.push(FieldError::new(
                        "recorded_at",
                        "must be an RFC 3339 timestamp with an offset, e.g. 2026-11-22T10:15:30.250Z",
                    ));
                    None
                }
                Some(instant) if instant > now + bounds.max_future => {
                    errors.push(FieldError::new(
                        "recorded_at",
                        format!(
                            "is more than {} s in the future",
                            bounds.max_future.whole_seconds()
                        ),
                    ));
                    None
                }
                Some(instant) if instant < now - bounds.max_age => {
                    errors.push(FieldError::new(
                        "recorded_at",
                        format!("is older than {} s", bounds.max_age.whole_seconds()),
                    ));
                    too_old = Some(instant);
                    None
                }
                Some(instant) => Some(instant),
            },
        };
        if self.metrics.is_empty() || self.metrics.len() > METRICS_MAX {
            errors.push(FieldError::new(
                "metrics",
                format!("must hold 1 to {METRICS_MAX} metrics"),
            ));
        }
        let mut metrics = BTreeMap::new();
        let mut metric_errors = 0;
        for (name, value) in self.metrics {
            let error = match check_metric_name(&name) {
                Err(message) => FieldError::new(format!("metrics.{}", printable(&name)), message),
                Ok(()) => match value.0.filter(|number| number.is_finite()) {
                    Some(number) => {
                        // `-0` is the number `0` spelled otherwise: one value, one
                        // fingerprint, and `0` in every figure it reaches.
                        let number = if number == 0.0 { 0.0 } else { number };
                        metrics.insert(name, number);
                        continue;
                    }
                    None => FieldError::new(format!("metrics.{name}"), "must be a finite number"),
                },
            };
            metric_errors += 1;
            if metric_errors <= METRIC_ERRORS_LISTED {
                errors.push(error);
            }
        }
        let broken = errors.len() + metric_errors.saturating_sub(METRIC_ERRORS_LISTED);
        if metric_errors > METRIC_ERRORS_LISTED {
            errors.push(FieldError::new(
                "metrics",
                format!(
                    "{} more metric(s) also break a rule; only the first {METRIC_ERRORS_LISTED} (by name) are listed",
                    metric_errors - METRIC_ERRORS_LISTED
                ),
            ));
        }
        if !errors.is_empty() {
            // The age rule's error is the only one exactly when it is the only entry:
            // every other broken rule adds an entry of its own.
            let aged = too_old
                .filter(|_| errors.len() == 1)
                .map(|instant| Reading {
                    device_id: self.device_id,
                    recorded_at: Some(instant),
                    metrics,
                });
            return Err(Invalid {
                errors,
                broken,
                aged,
            });
        }
        Ok(Reading {
            device_id: self.device_id,
            recorded_at,
            metrics,
        })
    }
}

impl Reading {
    /// SHA-256 of the canonical form of the reading, as the idempotency record keeps it.
    ///
    /// Two requests are "the same request" when they parse to the same reading: key order,
    /// white space, number spelling (`21.5` or `2.15e1`) and the offset a timestamp is
    /// written in do not matter. An absent `recorded_at` is part of the form, so a retry
    /// without one is the same request even though the server stamps each arrival anew.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(b"reading/v1\n");
        hasher.update(self.device_id.as_bytes());
        hasher.update(b"\n");
        match self.recorded_at {
            Some(instant) => hasher.update(instant.unix_timestamp_nanos().to_be_bytes()),
            None => hasher.update(b"-"),
        }
        hasher.update(b"\n");
        for (name, value) in &self.metrics {
            hasher.update(name.as_bytes());
            hasher.update(b"=");
            hasher.update(value.to_bits().to_be_bytes());
            hasher.update(b"\n");
        }
        hasher.finalize().into()
    }
}

/// `^[A-Za-z0-9_-]{1,64}$`: one NATS subject token and a safe part of Redis keys.
pub fn check_device_id(device_id: &str) -> Result<(), String> {
    let allowed = |byte: u8| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-';
    if device_id.is_empty() || device_id.len() > DEVICE_ID_MAX_LEN {
        return Err(format!("must be 1 to {DEVICE_ID_MAX_LEN} characters long"));
    }
    if !device_id.bytes().all(allowed) {
        return Err("may hold only letters A-Z and a-z, digits, '_' and '-'".to_owned());
    }
    Ok(())
}

/// `^[a-z][a-z0-9_]{0,63}$`.
pub fn check_metric_name(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let starts_with_letter = bytes.next().is_some_and(|byte| byte.is_ascii_lowercase());
    let rest_allowed =
        bytes.all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_');
    if !starts_with_letter || !rest_allowed || name.len() > METRIC_NAME_MAX_LEN {
        return Err(format!(
            "metric names start with a-z and hold only a-z, 0-9 and '_', at most {METRIC_NAME_MAX_LEN} characters"
        ));
    }
    Ok(())
}

/// 1 to 128 visible ASCII characters (0x21 to 0x7E).
pub fn check_idempotency_key(key: &[u8]) -> Result<(), String> {
    if key.is_empty() || key.len() > IDEMPOTENCY_KEY_MAX_LEN {
        return Err(format!(
            "must be 1 to {IDEMPOTENCY_KEY_MAX_LEN} characters long"
        ));
    }
    if !key.iter().all(|byte| (0x21..=0x7e).contains(byte)) {
        return Err("may hold only visible ASCII characters (0x21 to 0x7E)".to_owned());
    }
    Ok(())
}

/// A field name safe to echo back: at most 64 visible ASCII characters.
fn printable(name: &str) -> String {
    name.chars()
        .take(METRIC_NAME_MAX_LEN)
        .map(|character| {
            if character.is_ascii_graphic() {
                character
            } else {
                '?'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> TimeBounds {
        TimeBounds {
            max_future: Duration::minutes(5),
            max_age: Duration::days(7),
        }
    }

    fn body(json: &str) -> ReadingBody {
        serde_json::from_str(json).expect("test body is well-formed")
    }

    #[test]
    fn a_batch_keeps_no_item_past_one_over_its_limit() {
        let items = |count: usize| {
            let items = vec![r#"{"device_id":"d"}"#; count].join(",");
            format!(r#"{{"readings":[{items}]}}"#)
        };
        for count in [0, 1, BATCH_MAX, BATCH_MAX + 1] {
            let json = items(count);
            let batch: BatchBody = serde_json::from_str(&json).expect("well-formed");
            assert_eq!(batch.readings.len(), count);
        }
        let json = items(50_000);
        let batch: BatchBody = serde_json::from_str(&json).expect("well-formed");
        assert_eq!(batch.readings.len(), BATCH_MAX + 1);
        // What is not kept is still read as JSON.
        let broken = format!(r#"{{"readings":[{}, {{]}}"#, vec!["0"; 2000].join(","));
        assert!(serde_json::from_str::<BatchBody>(&broken).is_err());
        let unknown = format!(
            r#"{{"readings":[{}],"extra":1}}"#,
            vec!["0"; 2000].join(",")
        );
        assert!(serde_json::from_str::<BatchBody>(&unknown).is_err());
    }

    fn now() -> OffsetDateTime {
        timestamp::parse("2026-11-22T10:20:00Z").expect("valid timestamp")
    }

    #[test]
    fn a_metric_value_is_a_number_or_breaks_the_rule_whatever_else_it_is() {
        let metric = |value: &str| {
            body(&format!(r#"{{"device_id":"d","metrics":{{"t":{value}}}}}"#))
                .validate(now(), bounds())
                .map(|reading| reading.metrics["t"])
        };
        for (value, number) in [
            ("21.5", 21.5),
            ("40", 40.0),
            ("-3", -3.0),
            ("-0", 0.0),
            (
                "18446744073709551615",
                18_446_744_073_709_551_615_u64 as f64,
            ),
            ("1e300", 1e300),
        ] {
            assert_eq!(metric(value).ok(), Some(number), "{value}");
        }
        let nested = format!("{}{}", "[".repeat(100), "]".repeat(100));
        let long = format!("[{}]", vec!["0"; 100_000].join(","));
        for value in [
            r#""21.5""#,
            "null",
            "true",
            "[]",
            "[21.5]",
            r#"{"v":21.5}"#,
            nested.as_str(),
            long.as_str(),
        ] {
            let invalid = metric(value).expect_err(value);
            assert_eq!(invalid.errors.len(), 1, "{value}");
            assert_eq!(invalid.errors[0].field, "metrics.t");
            assert_eq!(invalid.errors[0].message, "must be a finite number");
        }
        // Past f64 is no JSON number serde reads: a shape error (`invalid-json`).
        assert!(
            serde_json::from_str::<ReadingBody>(r#"{"device_id":"d","metrics":{"t":1e400}}"#)
                .is_err()
        );
    }

    #[test]
    fn a_batch_items_key_is_a_string_or_refused_whatever_else_it_is() {
        let key = |written: &str| {
            let item: BatchItem = serde_json::from_str(&format!(
                r#"{{{written}"device_id":"d","metrics":{{"t":1}}}}"#
            ))
            .expect("well-formed item");
            item.into_parts().0
        };
        assert_eq!(key(r#""idempotency_key":"k-1","#), Ok("k-1".to_owned()));
        assert_eq!(
            key(r#""idempotency_key":"k\u002d1","#),
            Ok("k-1".to_owned())
        );
        assert_eq!(key(""), Err("is required".to_owned()));
        assert_eq!(
            key(r#""idempotency_key":null,"#),
            Err("is required".to_owned())
        );
        let long = format!(r#""idempotency_key":[{}],"#, vec!["0"; 100_000].join(","));
        for written in [
            r#""idempotency_key":5,"#,
            r#""idempotency_key":true,"#,
            r#""idempotency_key":{"k":"v"},"#,
            long.as_str(),
        ] {
            assert_eq!(
                key(written),
                Err("must be a string".to_owned()),
                "{written:.40}"
            );
        }
    }

    #[test]
    fn valid_reading_passes_every_rule() {
        let reading = body(r#"{"device_id":"sensor-0042","recorded_at":"2026-11-22T10:15:30.250Z","metrics":{"temperature":21.5,"humidity":40}}"#)
            .validate(now(), bounds())
            .expect("valid");
        assert_eq!(reading.device_id, "sensor-0042");
        assert_eq!(reading.metrics.get("humidity"), Some(&40.0));
    }

    #[test]
    fn every_broken_rule_is_reported_with_its_field() {
        let errors = body(r#"{"device_id":"bad id","recorded_at":"2026-11-22T11:00:00Z","metrics":{"Temp":1,"ok":"x"}}"#)
            .validate(now(), bounds())
            .expect_err("invalid")
            .errors;
        let fields: Vec<&str> = errors.iter().map(|error| error.field.as_str()).collect();
        assert_eq!(
            fields,
            ["device_id", "recorded_at", "metrics.Temp", "metrics.ok"]
        );
    }

    #[test]
    fn recorded_at_bounds_are_enforced() {
        let too_old =
            body(r#"{"device_id":"d","recorded_at":"2026-11-14T10:00:00Z","metrics":{"t":1}}"#);
        assert!(too_old.validate(now(), bounds()).is_err());
        let no_offset =
            body(r#"{"device_id":"d","recorded_at":"2026-11-22T10:00:00","metrics":{"t":1}}"#);
        assert!(no_offset.validate(now(), bounds()).is_err());
    }

    #[test]
    fn metric_count_is_bounded() {
        let empty = body(r#"{"device_id":"d","metrics":{}}"#);
        assert!(empty.validate(now(), bounds()).is_err());
        let names: Vec<String> = (0..33).map(|index| format!("\"m{index}\":1")).collect();
        let too_many = body(&format!(
            r#"{{"device_id":"d","metrics":{{{}}}}}"#,
            names.join(",")
        ));
        assert!(too_many.validate(now(), bounds()).is_err());
    }

    /// A body with `count` distinct metric names that break the name rule.
    fn bad_metric_names(count: usize) -> ReadingBody {
        let names: Vec<String> = (0..count)
            .map(|index| format!("\"Bad_{index:04}\":1"))
            .collect();
        body(&format!(
            r#"{{"device_id":"d","metrics":{{{}}}}}"#,
            names.join(",")
        ))
    }

    #[test]
    fn up_to_32_bad_metrics_are_each_listed_and_nothing_more() {
        let errors = bad_metric_names(METRICS_MAX)
            .validate(now(), bounds())
            .expect_err("invalid")
            .errors;
        assert_eq!(errors.len(), METRICS_MAX);
        assert!(errors
            .iter()
            .all(|error| error.field.starts_with("metrics.Bad_")));
    }

    #[test]
    fn thousands_of_bad_metrics_list_the_first_32_and_then_how_many_more_were_left_out() {
        let errors = bad_metric_names(5_000)
            .validate(now(), bounds())
            .expect_err("invalid")
            .errors;
        assert_eq!(
            errors.len(),
            1 + METRICS_MAX + 1,
            "the count rule, the first {METRICS_MAX} metrics, then how many more"
        );
        assert_eq!(errors[0].field, "metrics", "the count rule comes first");
        let listed: Vec<&str> = errors[1..=METRICS_MAX]
            .iter()
            .map(|error| error.field.as_str())
            .collect();
        let first: Vec<String> = (0..METRICS_MAX)
            .map(|index| format!("metrics.Bad_{index:04}"))
            .collect();
        assert_eq!(listed, first, "the first in name order");
        let last = &errors[METRICS_MAX + 1];
        assert_eq!(last.field, "metrics");
        assert!(
            last.message.contains("4968 more"),
            "the last entry says how many were left out: {}",
            last.message
        );
        let invalid = bad_metric_names(5_000)
            .validate(now(), bounds())
            .expect_err("invalid");
        assert_eq!(
            invalid.summary(),
            "5001 rules broken",
            "the count rule and every bad metric, listed or not"
        );
        let one = bad_metric_names(1)
            .validate(now(), bounds())
            .expect_err("invalid");
        assert_eq!(one.summary(), "1 rule broken");
    }

    #[test]
    fn unknown_fields_fail_decoding() {
        let decoded: Result<ReadingBody, _> =
            serde_json::from_str(r#"{"device_id":"d","metrics":{"t":1},"extra":true}"#);
        assert!(decoded.is_err());
    }

    #[test]
    fn only_a_json_object_decodes_as_a_reading_or_a_batch() {
        let as_array = r#"["sensor-1", null, {"temperature": 21.5}]"#;
        assert!(
            serde_json::from_str::<ReadingBody>(as_array).is_ok(),
            "serde alone takes a struct's fields as an array"
        );
        for json in [as_array, r#""sensor-1""#, "42", " null "] {
            let error = from_json_object::<ReadingBody>(json.as_bytes()).expect_err(json);
            assert_eq!(error, NOT_AN_OBJECT, "{json:?}");
        }
        // Not JSON at all: serde's message, which says where.
        for (json, says) in [
            ("not json", "expected ident at line 1 column 2"),
            ("", "EOF while parsing a value at line 1 column 0"),
            ("[1, 2", "EOF while parsing a list at line 1 column 5"),
        ] {
            let error = from_json_object::<ReadingBody>(json.as_bytes()).expect_err(json);
            assert_eq!(error, says, "{json:?}");
        }
        let item = r#"["k-1", "sensor-1", null, {"t": 1}]"#;
        assert!(serde_json::from_str::<BatchItem>(item).is_ok());
        assert_eq!(
            from_json_object::<BatchItem>(item.as_bytes()).map(drop),
            Err(NOT_AN_OBJECT.to_owned())
        );
        let batch = r#"[[{"idempotency_key": "k-1", "device_id": "d", "metrics": {"t": 1}}]]"#;
        assert!(from_json_object::<BatchBody>(batch.as_bytes()).is_err());
        let reading = from_json_object::<ReadingBody>(
            b" \n\t{\"device_id\": \"sensor-1\", \"metrics\": {\"temperature\": 21.5}}",
        )
        .expect("an object, after white space");
        assert_eq!(reading.device_id, "sensor-1");
    }

    #[test]
    fn what_serde_quotes_of_the_input_is_cut_in_the_detail() {
        let name = "A".repeat(60_000);
        let long_name = format!(r#"{{"device_id":"d","metrics":{{"t":1}},"{name}":1}}"#);
        let long_string = format!(r#"{{"device_id":"d","metrics":"{name}"}}"#);
        let short = r#"{"device_id":"d","metrics":{"t":1},"a\nb":1}"#;
        for (json, starts, ends) in [
            (long_name.as_str(), "unknown field `AAA", "column 60037"),
            (
                long_string.as_str(),
                "invalid type: string \"AAA",
                "column 60029",
            ),
            (short, "unknown field `a\nb`", "column 41"),
        ] {
            let detail = from_json_object::<ReadingBody>(json.as_bytes()).expect_err(starts);
            assert!(detail.chars().count() <= DETAIL_MAX_CHARS, "{detail}");
            assert!(detail.starts_with(starts), "{detail}");
            assert!(detail.ends_with(ends), "{detail}");
        }
        let items =
            format!(r#"{{"idempotency_key":"k","device_id":"d","metrics":{{"t":1}},"{name}":1}}"#);
        let detail = from_json_object::<BatchItem>(items.as_bytes()).expect_err("unknown field");
        assert!(detail.chars().count() <= DETAIL_MAX_CHARS, "{detail}");
    }

    #[test]
    fn a_metric_named_twice_fails_decoding_and_is_named() {
        let error = serde_json::from_str::<ReadingBody>(
            r#"{"device_id":"d","metrics":{"temperature":21.5,"humidity":40,"temperature":99}}"#,
        )
        .expect_err("a metric given twice is refused");
        assert!(
            error
                .to_string()
                .contains("metric `temperature` is given more than once"),
            "{error}"
        );
        let item = serde_json::from_str::<BatchItem>(
            r#"{"idempotency_key":"k","device_id":"d","metrics":{"t":1,"t":1}}"#,
        );
        assert!(item.is_err(), "even with the same value twice");
    }

    #[test]
    fn fingerprint_ignores_spelling_but_not_content() {
        let one = body(
            r#"{"device_id":"d","recorded_at":"2026-11-22T11:15:30+01:00","metrics":{"a":21.5,"b":1,"c":0}}"#,
        );
        let same = body(
            r#"{"metrics":{"c":-0.0,"b":1.0,"a":2.15e1},"recorded_at":"2026-11-22T10:15:30Z","device_id":"d"}"#,
        );
        let other = body(
            r#"{"device_id":"d","recorded_at":"2026-11-22T10:15:30Z","metrics":{"a":21.6,"b":1}}"#,
        );
        let fingerprint =
            |body: ReadingBody| body.validate(now(), bounds()).expect("valid").fingerprint();
        let first = fingerprint(one);
        assert_eq!(first, fingerprint(same));
        assert_ne!(first, fingerprint(other));
    }

    #[test]
    fn a_body_that_breaks_only_the_age_rule_reports_the_reading_it_was_when_young() {
        let json = r#"{"device_id":"d","recorded_at":"2026-11-22T10:15:30.25Z","metrics":{"t":1}}"#;
        let young = body(json).validate(now(), bounds()).expect("valid");
        let a_week_later = now() + Duration::days(7);
        let invalid = body(json)
            .validate(a_week_later, bounds())
            .expect_err("too old now");
        assert_eq!(invalid.errors.len(), 1);
        assert_eq!(invalid.errors[0].field, "recorded_at");
        let aged = invalid.aged.expect("only the age rule is broken");
        assert_eq!(aged, young);
        assert_eq!(aged.fingerprint(), young.fingerprint());
    }

    #[test]
    fn a_body_that_breaks_another_rule_besides_the_age_rule_reports_no_reading() {
        let a_week_later = now() + Duration::days(7);
        for json in [
            r#"{"device_id":"bad id","recorded_at":"2026-11-22T10:15:30Z","metrics":{"t":1}}"#,
            r#"{"device_id":"d","recorded_at":"2026-11-22T10:15:30Z","metrics":{"T":1}}"#,
            r#"{"device_id":"d","recorded_at":"2026-11-22T10:15:30Z","metrics":{}}"#,
        ] {
            let invalid = body(json)
                .validate(a_week_later, bounds())
                .expect_err("invalid");
            assert_eq!(invalid.errors.len(), 2, "{json}");
            assert_eq!(invalid.aged, None, "{json}");
        }
        for json in [
            r#"{"device_id":"bad id","metrics":{"t":1}}"#,
            r#"{"device_id":"d","recorded_at":"2026-11-22T11:15:30Z","metrics":{"t":1}}"#,
        ] {
            let invalid = body(json).validate(now(), bounds()).expect_err("invalid");
            assert_eq!(invalid.aged, None, "not the age rule: {json}");
        }
    }

    #[test]
    fn idempotency_keys_are_visible_ascii() {
        assert!(check_idempotency_key(b"k-1").is_ok());
        assert!(check_idempotency_key(b"").is_err());
        assert!(check_idempotency_key(b"has space").is_err());
        assert!(check_idempotency_key(&[b'a'; 129]).is_err());
        assert!(check_idempotency_key(&[b'a'; 128]).is_ok());
    }
}

//! Reading what a process serves on `/metrics` (the Prometheus text format), so a test
//! can ask for one series by name and labels and compare it before and after an event.

use std::collections::BTreeMap;
use std::time::Duration;

/// A series' labels, by name.
type Labels = BTreeMap<String, String>;

/// One scrape: every sample line, by metric name and label set.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    samples: BTreeMap<String, Vec<(Labels, f64)>>,
}

impl Scrape {
    /// Parses the text exposition format: `# ...` lines are skipped, every other line is
    /// `name[{label="value",...}] value [timestamp]`. A line that is neither fails the
    /// test: a process that serves a malformed exposition has its whole scrape refused
    /// by Prometheus.
    pub fn parse(text: &str) -> Self {
        let mut samples: BTreeMap<String, Vec<(Labels, f64)>> = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((name, labels, value)) = parse_sample(line) else {
                panic!("not a line of the Prometheus text format: {line:?}");
            };
            samples.entry(name).or_default().push((labels, value));
        }
        Self { samples }
    }

    /// The value of the series `name` whose label set is exactly `labels` (in any
    /// order); `None` when the process does not serve it (yet).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: Labels = labels
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        self.samples
            .get(name)?
            .iter()
            .find(|(labels, _)| *labels == wanted)
            .map(|(_, value)| *value)
    }

    /// Like [`Scrape::value`], with a series that is not served read as 0: what a
    /// counter or a histogram's `_count` is before its first event.
    pub fn value_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// The sum of every series called `name`, whatever its labels (0 when none is
    /// served): a counter's total over all its label values.
    pub fn total(&self, name: &str) -> f64 {
        self.samples
            .get(name)
            .map_or(0.0, |series| series.iter().map(|(_, value)| value).sum())
    }

    /// Whether any series called `name` is served, whatever its labels.
    pub fn has(&self, name: &str) -> bool {
        self.samples.contains_key(name)
    }
}

/// The counters of `deploy/prometheus-alerts.yml` whose alert fires on their first
/// increase (`increase(name[...]) > 0`, with no `for:`): a process must serve each at 0
/// from its start, or Prometheus, which sees no increase in a series born at 1, misses
/// that first event.
pub fn alerted_at_first_increase() -> Vec<String> {
    let rules = repository_file("deploy/prometheus-alerts.yml");
    let mut counters = Vec::new();
    for rule in rules.split("- alert:").skip(1) {
        let waits = rule
            .lines()
            .any(|line| line.trim_start().starts_with("for:"));
        let Some(expression) = rule
            .lines()
            .find_map(|line| line.trim_start().strip_prefix("expr:"))
        else {
            continue;
        };
        if waits {
            continue;
        }
        for (start, call) in expression.match_indices("increase(") {
            let rest = &expression[start + call.len()..];
            let name: String = rest
                .chars()
                .take_while(|character| character.is_ascii_alphanumeric() || *character == '_')
                .collect();
            let fires_on_any = rest
                .split_once(')')
                .is_some_and(|(_, comparison)| comparison.trim_start().starts_with("> 0"));
            if fires_on_any && !counters.contains(&name) {
                counters.push(name);
            }
        }
    }
    counters
}

/// The counters (`..._total`) the README's metrics table names for `process`
/// (`ingest`, `relay`, `projector`, `query`), labels cut off, but `http_requests_total`,
/// whose routes and statuses come with the requests.
pub fn readme_counters(process: &str) -> Vec<String> {
    let readme = repository_file("README.md");
    let row_start = format!("| {process} | `");
    let row = readme
        .lines()
        .skip_while(|line| !line.starts_with("| process | metrics |"))
        .take_while(|line| line.starts_with('|'))
        .find(|line| line.starts_with(&row_start))
        .unwrap_or_else(|| panic!("the README's metrics table has a row for {process}"));
    let mut counters = Vec::new();
    for quoted in row.split('`').skip(1).step_by(2) {
        let name = quoted.split('{').next().unwrap_or(quoted).to_owned();
        if name.ends_with("_total") && name != "http_requests_total" && !counters.contains(&name) {
            counters.push(name);
        }
    }
    counters
}

/// Asserts that `scrape`, of `process` just started, serves every counter the README
/// names for it ([`readme_counters`]) and every one of [`alerted_at_first_increase`]
/// under its prefix, and that there is one: Prometheus sees no increase in a series born
/// at 1, so an alert or a dashboard's `increase()` would miss the first events after a
/// start (the relay's duplicate acks after a crash, say).
pub fn assert_counters_served_from_start(scrape: &Scrape, process: &str) {
    let prefix = format!("{process}_");
    let mut counters = readme_counters(process);
    counters.extend(
        alerted_at_first_increase()
            .into_iter()
            .filter(|name| name.starts_with(&prefix)),
    );
    assert!(!counters.is_empty(), "{process} has counters");
    for name in counters {
        assert!(scrape.has(&name), "{process} serves {name} from its start");
    }
}

/// Fetches `url` (a `/metrics` endpoint) and parses it; `None` if it does not answer
/// 200 within 5 s.
pub async fn scrape(http: &reqwest::Client, url: &str) -> Option<Scrape> {
    let response = http
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    assert_eq!(
        crate::content_type(&response),
        "text/plain; version=0.0.4; charset=utf-8",
        "{url} answers in Prometheus's text exposition format"
    );
    Some(Scrape::parse(&response.text().await.ok()?))
}

fn parse_sample(line: &str) -> Option<(String, Labels, f64)> {
    let name_end = line
        .find(|character: char| character == '{' || character.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, after_labels) = parse_labels(after_brace)?;
        labels = parsed;
        rest = after_labels;
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        number => number.parse().ok()?,
    };
    Some((name.to_owned(), labels, value))
}

/// Parses `key="value",...}` (after the opening brace); returns the labels and what
/// follows the closing brace. Values may hold `\\`, `\"` and `\n` escapes.
fn parse_labels(text: &str) -> Option<(Labels, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = text.trim_start();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let equals = rest.find('=')?;
        let key = rest[..equals].trim().to_owned();
        rest = rest[equals + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut characters = rest.char_indices();
        let end = loop {
            let (index, character) = characters.next()?;
            match character {
                '"' => break index,
                '\\' => match characters.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                other => value.push(other),
            }
        };
        labels.insert(key, value);
        rest = rest[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
}

/// A file of the repository, by its path from the repository's root.
fn repository_file(path: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("{} readable: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE http_requests_total counter
http_requests_total{route="/v1/telemetry",status="202"} 3
http_requests_total{status="422",route="/v1/telemetry"} 1
# TYPE relay_outbox_backlog_rows gauge
relay_outbox_backlog_rows 0
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{route="/v1/telemetry",le="0.005"} 4
http_request_duration_seconds_bucket{route="/v1/telemetry",le="+Inf"} 4
http_request_duration_seconds_sum{route="/v1/telemetry"} 0.0123
http_request_duration_seconds_count{route="/v1/telemetry"} 4
odd{note="a \"quoted\", \\ value"} 1.5e3 1700000000000
"#;

    #[test]
    fn finds_a_series_by_name_and_exact_labels_in_any_order() {
        let scrape = Scrape::parse(TEXT);
        let route = ("route", "/v1/telemetry");
        assert_eq!(
            scrape.value("http_requests_total", &[route, ("status", "202")]),
            Some(3.0)
        );
        assert_eq!(
            scrape.value("http_requests_total", &[("status", "422"), route]),
            Some(1.0)
        );
        assert_eq!(scrape.value("http_requests_total", &[route]), None);
        assert_eq!(scrape.value("relay_outbox_backlog_rows", &[]), Some(0.0));
        assert_eq!(
            scrape.value("http_request_duration_seconds_count", &[route]),
            Some(4.0)
        );
        assert_eq!(
            scrape.value(
                "http_request_duration_seconds_bucket",
                &[route, ("le", "+Inf")]
            ),
            Some(4.0)
        );
        assert_eq!(
            scrape.value("odd", &[("note", "a \"quoted\", \\ value")]),
            Some(1500.0)
        );
    }

    #[test]
    #[should_panic(expected = "not a line of the Prometheus text format")]
    fn a_malformed_line_fails_the_scrape() {
        Scrape::parse("requests_total{route=\"/a\" 3\n");
    }

    #[test]
    fn an_absent_series_is_none_or_zero() {
        let scrape = Scrape::parse(TEXT);
        assert_eq!(scrape.value("nope", &[]), None);
        assert_eq!(scrape.value_or_zero("nope", &[]), 0.0);
        assert!(scrape.has("http_requests_total"));
        assert!(!scrape.has("http_requests"));
    }

    #[test]
    fn a_total_sums_every_series_of_a_name_and_nothing_else() {
        let scrape = Scrape::parse(TEXT);
        assert_eq!(scrape.total("http_requests_total"), 4.0);
        assert_eq!(scrape.total("http_request_duration_seconds_count"), 4.0);
        assert_eq!(scrape.total("http_requests"), 0.0);
    }
}

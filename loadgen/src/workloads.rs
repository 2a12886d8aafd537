//! The requests of each HTTP figure: single POSTs, batch POSTs, `/stats` GETs.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::HeaderValue;
use hyper::{Method, Request, StatusCode};
use serde::Deserialize;

use crate::bodies::{batch_json, device_id, idempotency_key, now_rfc3339, reading_json, Rng};
use crate::http::Target;
use crate::load::Workload;

/// `POST /v1/telemetry`, one reading, a fresh `Idempotency-Key`, a random pool device.
#[derive(Debug)]
pub struct SinglePost {
    pub run: String,
    pub device_prefix: String,
    pub devices: u64,
    /// `Authorization` sent with every request (from `LOADGEN_AUTHORIZATION`), to
    /// measure ingest with authentication on.
    pub authorization: Option<HeaderValue>,
}

impl Workload for SinglePost {
    fn request(
        &self,
        target: &Target,
        worker: usize,
        seq: u64,
        rng: &mut Rng,
    ) -> Request<Full<Bytes>> {
        let device = device_id(&self.device_prefix, rng.below(self.devices));
        let body = reading_json(&device, &now_rfc3339(), rng);
        let mut request = target.request(Method::POST, "/v1/telemetry", Some(body.into()));
        let key = idempotency_key(&self.run, worker, seq);
        if let Ok(value) = HeaderValue::from_str(&key) {
            request.headers_mut().insert("idempotency-key", value);
        }
        if let Some(authorization) = &self.authorization {
            request
                .headers_mut()
                .insert("authorization", authorization.clone());
        }
        request
    }

    fn ok_status(&self) -> StatusCode {
        StatusCode::ACCEPTED
    }

    fn readings(&self, _body: &[u8]) -> u64 {
        1
    }
}

/// `POST /v1/telemetry/batch` with `size` readings, each with its own key.
#[derive(Debug)]
pub struct BatchPost {
    pub run: String,
    pub device_prefix: String,
    pub devices: u64,
    pub size: usize,
}

#[derive(Deserialize)]
struct BatchAnswer {
    #[serde(default)]
    accepted: u64,
    #[serde(default)]
    duplicates: u64,
}

impl Workload for BatchPost {
    fn request(
        &self,
        target: &Target,
        worker: usize,
        seq: u64,
        rng: &mut Rng,
    ) -> Request<Full<Bytes>> {
        let first = seq * self.size as u64;
        let body = batch_json(
            &self.run,
            worker,
            first,
            self.size,
            &self.device_prefix,
            self.devices,
            rng,
        );
        target.request(Method::POST, "/v1/telemetry/batch", Some(body.into()))
    }

    fn ok_status(&self) -> StatusCode {
        StatusCode::OK
    }

    fn readings(&self, body: &[u8]) -> u64 {
        serde_json::from_slice::<BatchAnswer>(body)
            .map(|answer| answer.accepted + answer.duplicates)
            .unwrap_or(0)
    }
}

/// `GET /v1/devices/{id}/stats` over the device pool.
#[derive(Debug)]
pub struct StatsGet {
    pub device_prefix: String,
    pub devices: u64,
}

impl Workload for StatsGet {
    fn request(
        &self,
        target: &Target,
        _worker: usize,
        _seq: u64,
        rng: &mut Rng,
    ) -> Request<Full<Bytes>> {
        let device = device_id(&self.device_prefix, rng.below(self.devices));
        target.request(Method::GET, &format!("/v1/devices/{device}/stats"), None)
    }

    fn ok_status(&self) -> StatusCode {
        StatusCode::OK
    }

    fn readings(&self, _body: &[u8]) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_answers_count_accepted_and_duplicates() {
        let workload = BatchPost {
            run: "r".into(),
            device_prefix: "d-".into(),
            devices: 1,
            size: 3,
        };
        let body = br#"{"accepted":2,"duplicates":1,"rejected":0,"results":[]}"#;
        assert_eq!(workload.readings(body), 3);
        assert_eq!(workload.readings(b"not json"), 0);
    }

    #[test]
    fn single_posts_carry_a_unique_key() {
        let workload = SinglePost {
            run: "r".into(),
            device_prefix: "d-".into(),
            devices: 10,
            authorization: None,
        };
        let target = Target::parse("http://127.0.0.1:1").expect("loopback");
        let mut rng = Rng::new(1);
        let first = workload.request(&target, 0, 0, &mut rng);
        let second = workload.request(&target, 0, 1, &mut rng);
        assert_ne!(
            first.headers()["idempotency-key"],
            second.headers()["idempotency-key"]
        );
        assert_eq!(first.uri().path(), "/v1/telemetry");
    }
}

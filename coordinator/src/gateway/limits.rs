//! Each tenant's limits (`TenantLimits`, set by the operator through `PUT
//! /v1/admin/tenants/{tenant}/limits` and kept in the replicated state) as this gateway applies
//! them: requests and tokens per minute and concurrent requests on the inference routes, over
//! with a 429 and `Retry-After`; quotas on files, adapters and concurrent fine-tuning jobs,
//! counted in the state when one is made. Rates and concurrency are this gateway's own count:
//! a tenant that spreads its calls over N coordinators' gateways gets up to N times its rate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::http::StatusCode;
use tandem_proto::contract::TenantLimits;

use super::ApiError;

/// The rates and requests in flight of every tenant this gateway served.
#[derive(Default)]
pub struct Limiter {
    tenants: Mutex<HashMap<String, Usage>>,
}

#[derive(Default)]
struct Usage {
    requests: Bucket,
    tokens: Bucket,
    in_flight: u32,
}

/// A token bucket that holds a minute's allowance and refills it evenly over the minute; a
/// charge may take it below zero (a request's tokens are known only at its end), and then the
/// next request waits until it is back above zero.
#[derive(Default)]
struct Bucket {
    /// What is left, as of `at` (none: full).
    level: Option<(f64, Instant)>,
}

impl Bucket {
    fn level(&self, per_minute: f64, now: Instant) -> f64 {
        match self.level {
            None => per_minute,
            Some((level, at)) => (level + now.duration_since(at).as_secs_f64() * per_minute / 60.0).min(per_minute),
        }
    }

    /// Seconds until at least `amount` is there (0: now).
    fn wait(&self, per_minute: f64, amount: f64, now: Instant) -> f64 {
        let short = amount - self.level(per_minute, now);
        if short <= 0.0 { 0.0 } else { short * 60.0 / per_minute }
    }

    fn take(&mut self, per_minute: f64, amount: f64, now: Instant) {
        self.level = Some((self.level(per_minute, now) - amount, now));
    }
}

/// An admitted request's place: its tenant's count of requests in flight goes down when it is
/// dropped (whole answers at their end, streams when the stream ends).
pub struct Permit {
    limiter: Arc<Limiter>,
    tenant: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Ok(mut tenants) = self.limiter.tenants.lock()
            && let Some(u) = tenants.get_mut(&self.tenant)
        {
            u.in_flight = u.in_flight.saturating_sub(1);
        }
    }
}

fn too_many(code: &'static str, message: String, retry_after: f64) -> ApiError {
    ApiError {
        retry_after: Some(retry_after.ceil().max(1.0) as u64),
        ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message)
    }
}

impl Limiter {
    /// Admits an inference request of `tenant` under `limits`, or refuses it with when to retry.
    pub fn admit(self: &Arc<Self>, tenant: &str, limits: &TenantLimits) -> Result<Permit, ApiError> {
        let now = Instant::now();
        let mut tenants = self.tenants.lock().map_err(|_| ApiError::unavailable("the limiter is poisoned"))?;
        let usage = tenants.entry(tenant.to_string()).or_default();
        if let Some(cap) = limits.concurrent_requests
            && usage.in_flight >= cap
        {
            return Err(too_many(
                "concurrency_limit_exceeded",
                format!("{cap} requests in progress at once at most"),
                1.0,
            ));
        }
        if let Some(rpm) = limits.requests_per_minute.map(f64::from) {
            let wait = usage.requests.wait(rpm, 1.0, now);
            if wait > 0.0 {
                return Err(too_many("rate_limit_exceeded", format!("{rpm} requests per minute at most"), wait));
            }
        }
        if let Some(tpm) = limits.tokens_per_minute.map(|t| t as f64) {
            let wait = usage.tokens.wait(tpm, 0.0, now);
            if wait > 0.0 {
                return Err(too_many("rate_limit_exceeded", format!("{tpm} tokens per minute at most"), wait));
            }
        }
        if let Some(rpm) = limits.requests_per_minute {
            usage.requests.take(f64::from(rpm), 1.0, now);
        }
        usage.in_flight += 1;
        Ok(Permit { limiter: self.clone(), tenant: tenant.to_string() })
    }

    /// Counts `tokens` (prompt and completion) a request of `tenant` used.
    pub fn charge(&self, tenant: &str, limits: &TenantLimits, tokens: u64) {
        let (Some(tpm), Ok(mut tenants)) = (limits.tokens_per_minute, self.tenants.lock()) else { return };
        tenants.entry(tenant.to_string()).or_default().tokens.take(tpm as f64, tokens as f64, Instant::now());
    }
}

/// Refuses a new stored object when the tenant already has `held` of at most `quota`.
pub fn quota(what: &str, held: usize, quota: Option<u32>) -> Result<(), ApiError> {
    match quota {
        Some(q) if held >= q as usize => Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "quota_exceeded",
            format!("{what}: {held} of a quota of {q}; remove some first"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rpm: Option<u32>, tpm: Option<u64>, concurrent: Option<u32>) -> TenantLimits {
        TenantLimits {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            concurrent_requests: concurrent,
            ..TenantLimits::default()
        }
    }

    #[test]
    fn requests_per_minute_refuse_the_one_too_many_and_say_when() {
        let l = Arc::new(Limiter::default());
        let lim = limits(Some(2), None, None);
        let _a = l.admit("t", &lim).unwrap();
        let _b = l.admit("t", &lim).unwrap();
        let e = l.admit("t", &lim).err().unwrap();
        assert_eq!((e.status, e.code), (StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded"));
        // One request comes back every 30 s at 2 per minute.
        assert!(matches!(e.retry_after, Some(29..=30)), "{:?}", e.retry_after);
        assert!(l.admit("other", &lim).is_ok(), "another tenant has its own allowance");
    }

    #[test]
    fn tokens_per_minute_hold_back_the_next_request_once_spent() {
        let l = Arc::new(Limiter::default());
        let lim = limits(None, Some(600), None);
        drop(l.admit("t", &lim).unwrap());
        l.charge("t", &lim, 900);
        let e = l.admit("t", &lim).err().unwrap();
        // 300 tokens short at 10 per second.
        assert!(matches!(e.retry_after, Some(30)), "{:?}", e.retry_after);
    }

    #[test]
    fn concurrency_is_given_back_when_a_permit_drops() {
        let l = Arc::new(Limiter::default());
        let lim = limits(None, None, Some(1));
        let held = l.admit("t", &lim).unwrap();
        assert_eq!(l.admit("t", &lim).err().unwrap().code, "concurrency_limit_exceeded");
        drop(held);
        assert!(l.admit("t", &lim).is_ok());
    }

    #[test]
    fn quotas_refuse_at_the_quota() {
        assert!(quota("files", 2, Some(3)).is_ok() && quota("files", 9, None).is_ok());
        assert_eq!(quota("files", 3, Some(3)).unwrap_err().code, "quota_exceeded");
    }
}

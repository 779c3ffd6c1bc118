//! One request budget per tenant, shared by all its content types: a token bucket (default 2,000
//! requests per minute) plus a "throttled until" instant set when Microsoft answers AF429.
//! Invariant: no request of the tenant starts before both allow it.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The tenant's limiter.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    paused_until: Option<Instant>,
    strikes: u32,
}

impl RateLimiter {
    /// A limiter allowing `per_minute` requests per minute, with a burst of at most a tenth of that.
    pub fn new(per_minute: u32) -> Self {
        let per_minute = per_minute.max(1) as f64;
        let burst = (per_minute / 10.0).clamp(1.0, 100.0);
        Self {
            per_sec: per_minute / 60.0,
            burst,
            state: Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
                paused_until: None,
                strikes: 0,
            }),
        }
    }

    /// Waits until a request may start, and takes its token.
    pub async fn acquire(&self) {
        loop {
            let wait = {
                let mut b = match self.state.lock() {
                    Ok(b) => b,
                    Err(p) => p.into_inner(),
                };
                let now = Instant::now();
                b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.per_sec)
                    .min(self.burst);
                b.at = now;
                match b.paused_until {
                    Some(until) if until > now => until - now,
                    _ if b.tokens >= 1.0 => {
                        b.tokens -= 1.0;
                        return;
                    }
                    _ => Duration::from_secs_f64((1.0 - b.tokens) / self.per_sec),
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Records a throttling answer: every content type of the tenant pauses for `retry_after`, or for an
    /// exponential back-off (2 s doubling to 5 min, with jitter) when Microsoft gave none. Returns the pause.
    pub fn throttled(&self, retry_after: Option<Duration>) -> Duration {
        let mut b = match self.state.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        b.strikes = b.strikes.saturating_add(1);
        let pause = match retry_after {
            Some(d) => d.clamp(Duration::from_secs(1), Duration::from_secs(900)),
            None => {
                let base = 2u64.saturating_pow(b.strikes.min(8)).min(300);
                Duration::from_millis(base * 1000 / 2 + rand::random::<u64>() % (base * 500 + 1))
            }
        };
        let until = Instant::now() + pause;
        b.paused_until = Some(b.paused_until.map_or(until, |u| u.max(until)));
        pause
    }

    /// Records a successful request (resets the throttling back-off).
    pub fn succeeded(&self) {
        if let Ok(mut b) = self.state.lock() {
            b.strikes = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bucket_spaces_requests_and_throttling_pauses_everyone() {
        let l = RateLimiter::new(60); // 1 per second, burst 6
        let t0 = tokio::time::Instant::now();
        for _ in 0..8 {
            l.acquire().await;
        }
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(1900) && took <= Duration::from_millis(2100),
            "{took:?}"
        );
        let pause = l.throttled(Some(Duration::from_secs(30)));
        assert_eq!(pause, Duration::from_secs(30));
        let t1 = tokio::time::Instant::now();
        l.acquire().await;
        assert!(
            t1.elapsed() >= Duration::from_secs(29),
            "{:?}",
            t1.elapsed()
        );
    }
}

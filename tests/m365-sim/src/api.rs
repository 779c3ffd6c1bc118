//! Management Activity API emulation: `subscriptions/start|list|content` and `audit/{contentId}`.

use std::time::Duration as StdDuration;

use serde_json::json;
use time::{Date, Duration, OffsetDateTime, PrimitiveDateTime, Time};

use crate::content::fmt_content_time;
use crate::entra;
use crate::scenario::ALL_CONTENT_TYPES;
use crate::state::{blob_body, State, Sub, TenantState};

/// A computed answer, sent after the mutex is released.
pub(crate) enum Outcome {
    /// Never answer (sleep an hour).
    Hang,
    /// Answer after `delay`.
    Respond {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Body,
        delay: StdDuration,
    },
}

/// A response body, possibly rendered outside the lock.
pub(crate) enum Body {
    Json(String),
    Blob {
        tid: String,
        oversized_bytes: usize,
        blob: Box<crate::state::Blob>,
    },
}

impl Body {
    /// The bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        match self {
            Body::Json(s) => s.into_bytes(),
            Body::Blob {
                tid,
                oversized_bytes,
                blob,
            } => blob_body(&tid, oversized_bytes, &blob),
        }
    }
}

fn af(status: u16, code: &str, message: &str) -> (u16, String) {
    (
        status,
        json!({"error": {"code": code, "message": message}}).to_string(),
    )
}

/// Parses an API time: `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM`, `YYYY-MM-DDTHH:MM:SS`, optionally with
/// fractional seconds and a trailing `Z`; UTC.
pub fn parse_api_time(s: &str) -> Option<OffsetDateTime> {
    let s = s.trim();
    let s = s
        .strip_suffix('Z')
        .or_else(|| s.strip_suffix('z'))
        .unwrap_or(s);
    let (d, t) = match s.split_once(['T', 't']) {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let mut dp = d.split('-');
    let y: i32 = dp.next()?.parse().ok()?;
    let m: u8 = dp.next()?.parse().ok()?;
    let day: u8 = dp.next()?.parse().ok()?;
    if dp.next().is_some() {
        return None;
    }
    let date = Date::from_calendar_date(y, time::Month::try_from(m).ok()?, day).ok()?;
    let time = match t {
        None => Time::MIDNIGHT,
        Some(t) => {
            let mut tp = t.split(':');
            let h: u8 = tp.next()?.parse().ok()?;
            let mi: u8 = tp.next()?.parse().ok()?;
            let (sec, nanos) = match tp.next() {
                None => (0u8, 0u32),
                Some(sec) => {
                    let (whole, frac) = sec.split_once('.').unwrap_or((sec, ""));
                    let whole: u8 = whole.parse().ok()?;
                    if !frac.chars().all(|c| c.is_ascii_digit()) || frac.len() > 9 {
                        return None;
                    }
                    let nanos = if frac.is_empty() {
                        0
                    } else {
                        format!("{frac:0<9}").parse().ok()?
                    };
                    (whole, nanos)
                }
            };
            if tp.next().is_some() {
                return None;
            }
            Time::from_hms_nano(h, mi, sec, nanos).ok()?
        }
    };
    Some(PrimitiveDateTime::new(date, time).assume_utc())
}

/// A refused listing window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowError {
    /// `AF20030` or `AF20055`.
    pub code: &'static str,
    /// The message.
    pub message: String,
}

/// Validates a listing window at `now`: both times or neither (neither: the last 24 h), at most 24 h
/// apart, start not older than 7 days, start < end.
pub fn validate_window(
    start: Option<&str>,
    end: Option<&str>,
    now: OffsetDateTime,
) -> Result<(OffsetDateTime, OffsetDateTime), WindowError> {
    const M30: &str = "Start time and end time must both be specified (or both omitted) and must be less than or equal to 24 hours apart, with the start time no more than 7 days in the past.";
    const M55: &str = "Start time and end time must both be specified (or both omitted) and must be less than or equal to 24 hours apart, with the start time prior to end time.";
    let e30 = || WindowError {
        code: "AF20030",
        message: M30.to_string(),
    };
    match (start, end) {
        (None, None) => Ok((now - Duration::hours(24), now)),
        (Some(s), Some(e)) => {
            let s = parse_api_time(s).ok_or_else(e30)?;
            let e = parse_api_time(e).ok_or_else(e30)?;
            if s >= e {
                return Err(WindowError {
                    code: "AF20055",
                    message: M55.to_string(),
                });
            }
            if e - s > Duration::hours(24) || s < now - Duration::days(7) {
                return Err(e30());
            }
            Ok((s, e))
        }
        _ => Err(e30()),
    }
}

/// A pinned window bound in `NextPageUri`: exact to the nanosecond so no item falls out of the window.
fn fmt_query_time(t: OffsetDateTime) -> String {
    format!("{}.{:09}Z", crate::content::fmt_creation(t), t.nanosecond())
}

/// The (case-insensitive) query parameter `name`.
fn qp<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One API request.
pub(crate) struct ApiRequest {
    pub tenant: String,
    pub rest: String,
    pub method: String,
    pub raw_query: String,
    pub authorization: Option<String>,
    /// `https://127.0.0.1:PORT` of the simulator.
    pub base_url: String,
    /// The request path as sent.
    pub path: String,
}

fn unauthorized(msg: &str) -> Outcome {
    Outcome::Respond {
        status: 401,
        headers: vec![(
            "WWW-Authenticate",
            "Bearer error=\"invalid_token\"".to_string(),
        )],
        body: Body::Json(
            json!({"error": {"code": "InvalidAuthenticationToken", "message": msg}}).to_string(),
        ),
        delay: StdDuration::ZERO,
    }
}

/// Handles one API request against the state.
pub(crate) fn handle(state: &mut State, key: &ring::hmac::Key, req: &ApiRequest) -> Outcome {
    let op = match (req.method.as_str(), req.rest.as_str()) {
        ("POST", "subscriptions/start") => "start",
        ("GET", "subscriptions/list") => "list",
        ("GET", "subscriptions/content") => "content",
        ("GET", r) if r.starts_with("audit/") => "fetch",
        _ => "other",
    };
    let query: Vec<(String, String)> = url::form_urlencoded::parse(req.raw_query.as_bytes())
        .into_owned()
        .collect();
    let Some(tid) = state
        .tenants
        .keys()
        .find(|k| k.eq_ignore_ascii_case(&req.tenant))
        .cloned()
    else {
        return unauthorized("Authentication failed: the tenant in the URL is unknown.");
    };
    let Some(t) = state.tenants.get_mut(&tid) else {
        return unauthorized("Authentication failed.");
    };
    *t.stats.api_requests.entry(op.to_string()).or_default() += 1;
    let pid = qp(&query, "PublisherIdentifier").map(str::to_string);
    if pid.is_none() {
        t.stats.missing_publisher_identifier += 1;
    }
    let now = t.now();
    let token = req
        .authorization
        .as_deref()
        .and_then(|a| {
            a.strip_prefix("Bearer ")
                .or_else(|| a.strip_prefix("bearer "))
        })
        .map(str::trim);
    let claims = match token.and_then(|tok| entra::verify_token(key, tok)) {
        Some(c) => c,
        None => {
            t.stats.unauthorized += 1;
            return unauthorized(
                "Authentication failed. The 'Authorization' header is missing or invalid.",
            );
        }
    };
    if !claims.tid.eq_ignore_ascii_case(&t.spec.tenant_id) {
        t.stats.unauthorized += 1;
        return unauthorized("Authentication failed: the token was issued for another tenant.");
    }
    if claims.exp <= now.unix_timestamp() {
        t.stats.unauthorized += 1;
        return unauthorized("Authentication failed: the token is expired.");
    }
    if claims.aud != format!("https://{}", t.spec.cloud.api_host()) {
        t.stats.unauthorized += 1;
        return unauthorized("Authentication failed: Invalid audience.");
    }
    // Faults that hit every request.
    t.api_counter += 1;
    let n = t.api_counter;
    let f = t.spec.faults.clone();
    let delay = StdDuration::from_millis(f.slow_ms);
    if f.hang_every > 0 && n % f.hang_every == 0 {
        t.stats.hung += 1;
        return Outcome::Hang;
    }
    if f.throttle_every > 0 && n % f.throttle_every == 0 {
        t.stats.throttled += 1;
        t.throttle_counter += 1;
        let method = match op {
            "start" => "StartSubscription",
            "list" => "ListSubscriptions",
            "content" => "ListContent",
            "fetch" => "GetBlob",
            _ => "Unknown",
        };
        let pid = pid
            .clone()
            .unwrap_or_else(|| "00000000-0000-0000-0000-000000000000".into());
        let (_, body) = af(
            0,
            "AF429",
            &format!("Too many requests. Method={method}, PublisherId={pid}"),
        );
        let as_429 = t.throttle_counter % 2 == 0;
        let mut headers = Vec::new();
        if as_429 && f.throttle_retry_after_secs > 0 {
            headers.push(("Retry-After", f.throttle_retry_after_secs.to_string()));
        }
        return Outcome::Respond {
            status: if as_429 { 429 } else { 403 },
            headers,
            body: Body::Json(body),
            delay,
        };
    }
    if f.af50000_every > 0 && n % f.af50000_every == 0 {
        t.stats.af50000 += 1;
        let (s, b) = af(
            500,
            "AF50000",
            "An internal server error occurred. Retry the request.",
        );
        return json_outcome(s, b, delay);
    }
    let (status, headers, body) = operation(t, op, &query, pid.as_deref(), req, now);
    Outcome::Respond {
        status,
        headers,
        body,
        delay,
    }
}

fn json_outcome(status: u16, body: String, delay: StdDuration) -> Outcome {
    Outcome::Respond {
        status,
        headers: Vec::new(),
        body: Body::Json(body),
        delay,
    }
}

type Answer = (u16, Vec<(&'static str, String)>, Body);

fn plain((status, body): (u16, String)) -> Answer {
    (status, Vec::new(), Body::Json(body))
}

fn audit_off(t: &TenantState, op: &str, ct: &str, pid: Option<&str>) -> (u16, String) {
    let tid = &t.spec.tenant_id;
    let corr = uuid::Uuid::new_v4();
    let pid = pid.unwrap_or("00000000-0000-0000-0000-000000000000");
    let opname = match op {
        "start" => "StartSubscription",
        "list" => "ListSubscriptions",
        "content" => "ListContent",
        _ => "GetBlob",
    };
    let code = format!(
        "{opname} [CorrId={corr}][TenantId={tid},ContentType={ct},ApplicationId={},PublisherId={pid}][AppId",
        t.spec.client_id
    );
    let message = format!("{}] failed. Exception: Microsoft.Office.Compliance.Audit.DataServiceException: Tenant {tid} does not exist.\r\n   at Microsoft.Office.Compliance.Audit.API.AuditApiDataService.GetTenantInfo(Guid tenantId)\r\n   at Microsoft.Office.Compliance.Audit.API.StartSubscriptionCommand.Execute()", t.spec.client_id);
    (
        400,
        json!({"error": {"code": code, "message": message}}).to_string(),
    )
}

fn no_permission() -> (u16, String) {
    af(403, "AF10001", "The permission set (ActivityFeed.Read) sent in the request did not include the expected permission.")
}

fn operation(
    t: &mut TenantState,
    op: &str,
    query: &[(String, String)],
    pid: Option<&str>,
    req: &ApiRequest,
    now: OffsetDateTime,
) -> Answer {
    let ct = qp(query, "contentType").unwrap_or("").to_string();
    let blob_idx = if op == "fetch" {
        req.rest
            .strip_prefix("audit/")
            .and_then(|id| t.by_id.get(id).copied())
    } else {
        None
    };
    let ct_for_checks = match blob_idx {
        Some(i) => t.blobs[i].content_type.clone(),
        None => ct.clone(),
    };
    if !t.spec.audit_enabled {
        return plain(audit_off(t, op, &ct_for_checks, pid));
    }
    if !t.spec.consent || (ct_for_checks == "DLP.All" && !t.spec.dlp_permission) {
        return plain(no_permission());
    }
    let known = ALL_CONTENT_TYPES.contains(&ct.as_str());
    match op {
        "start" => {
            if !known {
                return plain(af(
                    400,
                    "AF20020",
                    "The specified content type is not valid.",
                ));
            }
            let calls = t.stats.start_calls.entry(ct.clone()).or_default();
            if let Some(prev) = calls.last().and_then(|p| {
                OffsetDateTime::parse(p, &time::format_description::well_known::Rfc3339).ok()
            }) {
                if now - prev < Duration::minutes(15) {
                    t.stats.start_too_soon += 1;
                }
            }
            let calls = t.stats.start_calls.entry(ct.clone()).or_default();
            calls.push(
                now.format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            );
            if t.subs.get(&ct) == Some(&Sub::Enabled) {
                return plain(af(
                    400,
                    "AF20024",
                    "The subscription is already enabled. No property change.",
                ));
            }
            t.subs.insert(ct.clone(), Sub::Enabled);
            plain((
                200,
                json!({"contentType": ct, "status": "enabled", "webhook": null}).to_string(),
            ))
        }
        "list" => {
            let list: Vec<_> = t
                .subs
                .iter()
                .map(|(ct, s)| {
                    json!({"contentType": ct, "status": if *s == Sub::Enabled {"enabled"} else {"disabled"}, "webhook": null})
                })
                .collect();
            plain((200, serde_json::Value::Array(list).to_string()))
        }
        "content" => list_content(t, query, &ct, req, now),
        "fetch" => {
            let Some(i) = blob_idx else {
                return plain(af(404, "AF20050", "The specified content does not exist."));
            };
            let b = &t.blobs[i];
            if b.available_at > now {
                return plain(af(404, "AF20050", "The specified content does not exist."));
            }
            *t.stats
                .blob_fetches
                .entry(b.content_id.clone())
                .or_default() += 1;
            if b.expiration <= now {
                return plain(af(400, "AF20051", &format!("Content {} has already expired. Content older than 7 days cannot be retrieved.", b.content_id)));
            }
            (
                200,
                Vec::new(),
                Body::Blob {
                    tid: t.spec.tenant_id.clone(),
                    oversized_bytes: t.spec.faults.oversized_bytes,
                    blob: Box::new(b.clone()),
                },
            )
        }
        _ => plain(af(
            404,
            "AF20001",
            "The requested operation does not exist.",
        )),
    }
}

fn list_content(
    t: &mut TenantState,
    query: &[(String, String)],
    ct: &str,
    req: &ApiRequest,
    now: OffsetDateTime,
) -> Answer {
    if !ALL_CONTENT_TYPES.contains(&ct) {
        return plain(af(
            400,
            "AF20020",
            "The specified content type is not valid.",
        ));
    }
    match t.subs.get(ct) {
        None => {
            return plain(af(
                400,
                "AF20022",
                "No subscription found for the specified content type",
            ))
        }
        Some(Sub::Disabled) => return plain(af(400, "AF20023", "The subscription was disabled.")),
        Some(Sub::Enabled) => {}
    }
    let (start, end) = match validate_window(qp(query, "startTime"), qp(query, "endTime"), now) {
        Ok(w) => w,
        Err(e) => {
            t.stats.window_errors += 1;
            return plain(af(400, e.code, &e.message));
        }
    };
    let after = match qp(query, "nextPage") {
        None => None,
        Some(tok) => match parse_page_token(tok) {
            Some(k) => Some(k),
            None => {
                return plain(af(
                    400,
                    "AF20031",
                    &format!("Invalid nextPage Input: {tok}."),
                ))
            }
        },
    };
    let mut items: Vec<&crate::state::Blob> = t
        .blobs
        .iter()
        .filter(|b| {
            b.content_type == ct && b.created >= start && b.created < end && b.available_at <= now
        })
        .filter(|b| after.is_none_or(|k| page_key(b) >= k))
        .collect();
    items.sort_by_key(|b| page_key(b));
    let page = t.spec.page_size.max(1);
    let base = &req.base_url;
    let body: Vec<_> = items
        .iter()
        .take(page)
        .map(|b| {
            json!({
                "contentType": b.content_type,
                "contentId": b.content_id,
                "contentUri": format!("{base}/api/v1.0/{}/activity/feed/audit/{}", t.spec.tenant_id, b.content_id),
                "contentCreated": fmt_content_time(b.created),
                "contentExpiration": fmt_content_time(b.expiration),
            })
        })
        .collect();
    let mut headers = Vec::new();
    let own_url = if req.raw_query.is_empty() {
        format!("{base}{}", req.path)
    } else {
        format!("{base}{}?{}", req.path, req.raw_query)
    };
    let looping = t.spec.faults.nextpage_loop
        && match &t.loop_url {
            Some(u) => *u == own_url,
            None => !body.is_empty(),
        };
    let endless = !body.is_empty() && t.spec.faults.endless_listing.iter().any(|c| c == ct);
    if looping {
        t.loop_url = Some(own_url.clone());
        headers.push(("NextPageUri", own_url));
    } else if endless {
        // The same page again (same nextPage, if any) under a URL never served before.
        t.stats.endless_pages += 1;
        let n = qp(query, "endless")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in query {
            if !k.eq_ignore_ascii_case("endless") {
                q.append_pair(k, v);
            }
        }
        q.append_pair("endless", &(n + 1).to_string());
        headers.push(("NextPageUri", format!("{base}{}?{}", req.path, q.finish())));
    } else if let Some(next) = items.get(page) {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in query {
            if !k.eq_ignore_ascii_case("nextPage")
                && !k.eq_ignore_ascii_case("startTime")
                && !k.eq_ignore_ascii_case("endTime")
            {
                q.append_pair(k, v);
            }
        }
        q.append_pair(
            "startTime",
            &qp(query, "startTime").map_or_else(|| fmt_query_time(start), str::to_string),
        );
        q.append_pair(
            "endTime",
            &qp(query, "endTime").map_or_else(|| fmt_query_time(end), str::to_string),
        );
        let (ms, seq) = page_key(next);
        q.append_pair("nextPage", &format!("{ms:015}R{seq:010}"));
        headers.push(("NextPageUri", format!("{base}{}?{}", req.path, q.finish())));
    }
    (
        200,
        headers,
        Body::Json(serde_json::Value::Array(body).to_string()),
    )
}

fn page_key(b: &crate::state::Blob) -> (i128, u64) {
    (b.available_at.unix_timestamp_nanos() / 1_000_000, b.seq)
}

fn parse_page_token(tok: &str) -> Option<(i128, u64)> {
    let (ms, seq) = tok.split_once('R')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

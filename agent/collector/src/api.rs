//! The Management Activity API client of one tenant. Invariants: every request waits for the tenant's
//! rate limiter, carries `PublisherIdentifier` (blob fetches included) and a bearer token, has connect
//! and total timeouts and a size cap on its body; a 401 refreshes the token once and retries the same
//! request; AF429 is throttling whatever its HTTP status; `NextPageUri` and `contentUri` are followed only
//! on the API's own origin (a token is never sent elsewhere).
//!
//! Listings are read one page at a time ([`ApiClient::list_page`], driven by a [`Listing`]): the caller
//! processes a page's items before it asks for the next, so what one window holds in memory is one page
//! (at most [`MAX_LISTING_PAGE_BYTES`] of body) plus one 8-byte hash per page followed. A listing that does
//! not end (a `NextPageUri` on every page, new items or the same ones, or a URL seen before) is cut at
//! [`MAX_PAGES_PER_WINDOW`] pages, [`MAX_ITEMS_PER_WINDOW`] items or [`MAX_LISTING_BYTES_PER_WINDOW`]
//! bytes, or at the first repeated URL, and the cut is reported ([`ListingCut`]), never silent.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::Method;
use sensor_core::counters::Counters;
use serde::Deserialize;
use time::OffsetDateTime;

use crate::auth::{describe_reqwest, AuthError, TokenProvider};
use crate::ratelimit::RateLimiter;
use crate::window::Window;

/// Most pages listed for one window (its first page and every `NextPageUri` after it). Far above a real
/// listing (a window of at most 24 h; Microsoft's pages hold many items each), low enough that a
/// listing which never ends costs one window at most this many requests per cycle.
pub const MAX_PAGES_PER_WINDOW: u32 = 10_000;
/// Most content items listed for one window (already-done and repeated items count too): 100,000 blobs
/// in at most 24 h of one content type is more than a tenant of 100,000 users makes; a listing past it
/// is hostile or broken, and the cap bounds the blob fetches and done-mark lookups it can cause.
pub const MAX_ITEMS_PER_WINDOW: u64 = 100_000;
/// Most listing bytes received for one window (the bodies of all its pages): 100,000 items of ~500
/// bytes is 50 MB; 256 MiB bounds the traffic a listing without end can demand per window and cycle.
pub const MAX_LISTING_BYTES_PER_WINDOW: u64 = 256 * 1024 * 1024;
/// Cap on one listing page's body, the most a window holds at once: 4 MiB is ~8,000 items of ~500 bytes
/// (a page of Microsoft's holds a few hundred at most).
pub const MAX_LISTING_PAGE_BYTES: u64 = 4 * 1024 * 1024;
/// Throttling answers waited out in place before the error reaches the collector.
pub const THROTTLE_RETRIES: u32 = 8;
/// Transient failures of a listing or subscription call retried in place.
pub const LIST_RETRIES: u32 = 3;
/// Cap on the bodies of the subscription calls (start, list: a few hundred bytes each).
const SMALL_BODY_CAP: u64 = 1024 * 1024;
/// Cap on the body of an error answer (what [`classify`] reads).
const ERROR_BODY_CAP: u64 = 64 * 1024;

/// A listed content blob.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ContentItem {
    /// Content type.
    #[serde(default)]
    pub content_type: String,
    /// Opaque id (contains `$`).
    pub content_id: String,
    /// Where to fetch it.
    pub content_uri: String,
    /// When it was made available.
    #[serde(default)]
    pub content_created: Option<String>,
    /// When it can no longer be fetched.
    #[serde(default)]
    pub content_expiration: Option<String>,
}

impl ContentItem {
    /// When the content can no longer be fetched: `contentExpiration`, else `contentCreated` + 7 days
    /// (Microsoft's retention), else `now` + 7 days. Unreadable times (and a `contentCreated` too late
    /// for 7 days to be added) count as absent.
    pub fn expires_at(&self, now: OffsetDateTime) -> OffsetDateTime {
        let retention = time::Duration::days(7);
        self.content_expiration
            .as_deref()
            .and_then(sensor_core::timefmt::parse_api_time)
            .or_else(|| {
                self.content_created
                    .as_deref()
                    .and_then(sensor_core::timefmt::parse_api_time)
                    .and_then(|c| c.checked_add(retention))
            })
            .unwrap_or(now + retention)
    }
}

/// A subscription as listed.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subscription {
    /// Content type.
    pub content_type: String,
    /// "enabled" or "disabled" (absent means not enabled).
    #[serde(default)]
    pub status: Option<String>,
}

/// A failed API operation, classified by what the collector must do.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ApiError {
    /// No token (credentials, cloud, Entra unreachable).
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// AF429 (as 403 or 429): the tenant pauses.
    #[error("throttled by Microsoft (AF429), pausing {pause:?}: {text}")]
    Throttled {
        /// How long the tenant pauses.
        pause: Duration,
        /// The server's message.
        text: String,
    },
    /// Unified audit logging is off ("Tenant … does not exist").
    #[error("audit logging is not enabled for the tenant: {0}")]
    AuditDisabled(String),
    /// AF20023.
    #[error("the subscription was disabled (AF20023): {0}")]
    SubscriptionDisabled(String),
    /// AF20022.
    #[error("no subscription for the content type (AF20022): {0}")]
    NoSubscription(String),
    /// AF20030 / AF20055.
    #[error("the listing window was rejected ({code}): {text}")]
    WindowRejected {
        /// AF code.
        code: String,
        /// Message.
        text: String,
    },
    /// AF20051.
    #[error("the content expired (AF20051): {0}")]
    ContentExpired(String),
    /// AF20050 / AF20052: the content does not exist.
    #[error("the content does not exist ({code}): {text}")]
    ContentGone {
        /// AF code.
        code: String,
        /// Message.
        text: String,
    },
    /// AF10001, or a 401/403 that persists after a fresh token.
    #[error("permission or consent missing (HTTP {status} {code}): {text}")]
    ConsentMissing {
        /// HTTP status.
        status: u16,
        /// Code.
        code: String,
        /// Message.
        text: String,
    },
    /// The token's audience is not this API (the app lives in another cloud).
    #[error("the API refused the token's audience (wrong cloud): {0}")]
    WrongAudience(String),
    /// 5xx, AF50000: retry later.
    #[error("Microsoft answered HTTP {status} {code}: {text}")]
    Server {
        /// HTTP status.
        status: u16,
        /// Code.
        code: String,
        /// Message.
        text: String,
    },
    /// Another 4xx.
    #[error("Microsoft refused the request with HTTP {status} {code}: {text}")]
    Client {
        /// HTTP status.
        status: u16,
        /// Code.
        code: String,
        /// Message.
        text: String,
    },
    /// Connection, TLS or timeout.
    #[error("Microsoft API unreachable: {0}")]
    Transport(String),
    /// The body exceeded its cap.
    #[error("the response exceeds the {limit}-byte cap")]
    TooLarge {
        /// The cap.
        limit: u64,
    },
    /// The response could not be understood.
    #[error("unexpected response from {what}: {text}")]
    BadResponse {
        /// Which operation.
        what: &'static str,
        /// Details.
        text: String,
    },
}

impl ApiError {
    /// Errors that concern one blob and may pass by retrying later.
    pub fn is_transient(&self) -> bool {
        matches!(self, ApiError::Server { .. } | ApiError::Transport(_))
            || matches!(self, ApiError::Auth(a) if a.is_transient())
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// Classifies a non-success API response by its body first, then its status. The server's text (code
/// and message) reaches the error only through [`sensor_core::status::redact`].
pub fn classify(status: u16, body: &[u8], pause: impl FnOnce() -> Duration) -> ApiError {
    use sensor_core::status::redact;
    let (code, message) = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => (b.error.code, b.error.message),
        Err(_) => (
            String::new(),
            String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned(),
        ),
    };
    let both = format!("{code} {message}");
    let code = redact(&code);
    let text = redact(message.lines().next().unwrap_or("").trim());
    let text = if text.is_empty() {
        format!("HTTP {status}")
    } else {
        text
    };
    if both.contains("DataServiceException") && both.contains("does not exist") {
        let tenant_line = both
            .split("DataServiceException: ")
            .nth(1)
            .and_then(|s| s.lines().next())
            .unwrap_or("Tenant does not exist.")
            .trim()
            .to_string();
        return ApiError::AuditDisabled(format!(
            "Microsoft.Office.Compliance.Audit.DataServiceException: {}",
            redact(&tenant_line)
        ));
    }
    match code.as_str() {
        "AF429" => {
            return ApiError::Throttled {
                pause: pause(),
                text,
            }
        }
        "AF20022" => return ApiError::NoSubscription(text),
        "AF20023" => return ApiError::SubscriptionDisabled(text),
        "AF20030" | "AF20055" => return ApiError::WindowRejected { code, text },
        "AF20051" => return ApiError::ContentExpired(text),
        "AF20050" | "AF20052" => return ApiError::ContentGone { code, text },
        "AF10001" => return ApiError::ConsentMissing { status, code, text },
        _ => {}
    }
    if status == 429 {
        return ApiError::Throttled {
            pause: pause(),
            text,
        };
    }
    if both.to_ascii_lowercase().contains("invalid audience") {
        return ApiError::WrongAudience(text);
    }
    match status {
        401 | 403 => ApiError::ConsentMissing { status, code, text },
        500..=599 => ApiError::Server { status, code, text },
        408 => ApiError::Server { status, code, text },
        _ => ApiError::Client { status, code, text },
    }
}

/// The `Retry-After` of a response (seconds or HTTP date, clamped to [1 s, 15 min]).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()
        .and_then(sensor_core::timefmt::retry_after)
}

/// The client of one tenant's feed.
pub struct ApiClient {
    http: reqwest::Client,
    origin: String,
    root: String,
    publisher: String,
    tokens: Arc<TokenProvider>,
    limiter: Arc<RateLimiter>,
    counters: Arc<Counters>,
    max_blob_bytes: u64,
}

impl ApiClient {
    /// A client for `{api_base}/api/v1.0/{tenant_id}/activity/feed`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        http: reqwest::Client,
        api_base: &str,
        tenant_id: &str,
        publisher: &str,
        tokens: Arc<TokenProvider>,
        limiter: Arc<RateLimiter>,
        counters: Arc<Counters>,
        max_blob_bytes: u64,
    ) -> Self {
        Self {
            http,
            origin: origin_of(api_base).unwrap_or_else(|| api_base.to_string()),
            root: format!("{api_base}/api/v1.0/{tenant_id}/activity/feed"),
            publisher: publisher.to_string(),
            tokens,
            limiter,
            counters,
            max_blob_bytes,
        }
    }

    /// The tenant's token provider.
    pub fn tokens(&self) -> &TokenProvider {
        &self.tokens
    }

    /// The tenant's limiter.
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    fn with_publisher(&self, url: &str) -> String {
        let has = url
            .split_once('?')
            .map(|(_, q)| {
                q.split('&')
                    .any(|kv| kv.to_ascii_lowercase().starts_with("publisheridentifier="))
            })
            .unwrap_or(false);
        if has {
            url.to_string()
        } else {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}PublisherIdentifier={}", self.publisher)
        }
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        cap: u64,
    ) -> Result<(HeaderMap, Vec<u8>), ApiError> {
        if origin_of(url).as_deref() != Some(self.origin.as_str()) {
            return Err(ApiError::BadResponse {
                what: "pagination",
                text: format!(
                    "refusing to follow {url}: not on the API's origin {}",
                    self.origin
                ),
            });
        }
        let url = self.with_publisher(url);
        let mut refreshed = false;
        loop {
            self.limiter.acquire().await;
            let token = self.tokens.token().await?;
            Counters::add(&self.counters.api_requests, 1);
            let mut req = self.http.request(method.clone(), &url).bearer_auth(token);
            if method == Method::POST {
                req = req.header(reqwest::header::CONTENT_LENGTH, "0");
            }
            let mut resp = req
                .send()
                .await
                .map_err(|e| ApiError::Transport(describe_reqwest(&e)))?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let cap = if resp.status().is_success() {
                cap
            } else {
                ERROR_BODY_CAP
            };
            if resp.content_length().is_some_and(|l| l > cap) {
                return Err(ApiError::TooLarge { limit: cap });
            }
            let mut body = Vec::new();
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| ApiError::Transport(describe_reqwest(&e)))?
            {
                if (body.len() + chunk.len()) as u64 > cap {
                    if status < 300 {
                        return Err(ApiError::TooLarge { limit: cap });
                    }
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            if (200..300).contains(&status) {
                self.limiter.succeeded();
                return Ok((headers, body));
            }
            let err = classify(status, &body, || {
                self.limiter.throttled(retry_after(&headers))
            });
            if let ApiError::Throttled { .. } = err {
                Counters::add(&self.counters.api_throttled, 1);
                return Err(err);
            }
            if status == 401 && !refreshed {
                refreshed = true;
                self.tokens.invalidate().await;
                continue;
            }
            return Err(err);
        }
    }

    /// [`Self::send`], retried in place: throttling up to [`THROTTLE_RETRIES`] times (the limiter makes
    /// every request of the tenant wait out the pause), and 5xx or transport errors up to
    /// `transient_retries` times with a jittered back-off of 1 s doubling.
    async fn send_retrying(
        &self,
        method: Method,
        url: &str,
        cap: u64,
        transient_retries: u32,
    ) -> Result<(HeaderMap, Vec<u8>), ApiError> {
        let (mut throttled, mut transient) = (0u32, 0u32);
        loop {
            match self.send(method.clone(), url, cap).await {
                Err(ApiError::Throttled { .. }) if throttled < THROTTLE_RETRIES => throttled += 1,
                Err(e) if e.is_transient() && transient < transient_retries => {
                    transient += 1;
                    let ms = 1000u64 << transient.min(6);
                    tokio::time::sleep(Duration::from_millis(
                        ms / 2 + rand::random::<u64>() % (ms / 2),
                    ))
                    .await;
                }
                other => return other,
            }
        }
    }

    /// Starts the subscription of `content_type` (no webhook). "Already enabled" (AF20024) is success.
    pub async fn start_subscription(&self, content_type: &str) -> Result<(), ApiError> {
        let url = format!(
            "{}/subscriptions/start?contentType={content_type}",
            self.root
        );
        match self
            .send_retrying(Method::POST, &url, SMALL_BODY_CAP, LIST_RETRIES)
            .await
        {
            Ok(_) => Ok(()),
            Err(ApiError::Client { code, .. }) if code == "AF20024" => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Lists the tenant's subscriptions.
    pub async fn list_subscriptions(&self) -> Result<Vec<Subscription>, ApiError> {
        let url = format!("{}/subscriptions/list", self.root);
        let (_, body) = self
            .send_retrying(Method::GET, &url, SMALL_BODY_CAP, LIST_RETRIES)
            .await?;
        serde_json::from_slice(&body).map_err(|e| ApiError::BadResponse {
            what: "subscriptions/list",
            text: e.to_string(),
        })
    }

    /// The URL of the first page of the listing of `content_type` over `window`.
    pub fn content_url(&self, content_type: &str, window: Window) -> String {
        format!(
            "{}/subscriptions/content?contentType={content_type}&startTime={}&endTime={}",
            self.root,
            sensor_core::timefmt::api_time(window.start),
            sensor_core::timefmt::api_time(window.end)
        )
    }

    /// Fetches one page of a content listing: its items (body capped at [`MAX_LISTING_PAGE_BYTES`]) and
    /// its `NextPageUri` (or `NextPageUrl`), if any and not empty.
    pub async fn list_page(&self, url: &str) -> Result<Page, ApiError> {
        let (headers, body) = self
            .send_retrying(Method::GET, url, MAX_LISTING_PAGE_BYTES, LIST_RETRIES)
            .await?;
        let next = headers
            .get("NextPageUri")
            .or_else(|| headers.get("NextPageUrl"))
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_string);
        Ok(Page {
            items: parse_listing(&body)?,
            next,
            bytes: body.len() as u64,
        })
    }

    /// Lists the content of `window` whole, page by page through a [`Listing`] (so within its caps), for
    /// the `doctor` command's count. Collectors use [`Self::list_page`] and process each page before the
    /// next. A cut listing answers the items listed until the cut.
    pub async fn list_content(
        &self,
        content_type: &str,
        window: Window,
    ) -> Result<Vec<ContentItem>, ApiError> {
        let mut listing = Listing::new(self.content_url(content_type, window));
        let mut items = Vec::new();
        while let Some(url) = listing.next_url().map(str::to_string) {
            let page = self.list_page(&url).await?;
            if let Progress::Cut(cut) = listing.accept(&page) {
                log::warn!(target: "collector", content_type; "{}", cut.describe(content_type, window));
            }
            items.extend(page.items);
        }
        Ok(items)
    }

    /// Fetches a content blob, capped at the tenant's `max_blob_bytes`.
    pub async fn fetch_blob(&self, content_uri: &str) -> Result<Vec<u8>, ApiError> {
        self.send_retrying(Method::GET, content_uri, self.max_blob_bytes, 0)
            .await
            .map(|(_, b)| b)
    }
}

/// One page of a content listing.
#[derive(Debug)]
pub struct Page {
    /// The page's items, in the order served.
    pub items: Vec<ContentItem>,
    /// Its `NextPageUri`, when present and not empty.
    pub next: Option<String>,
    /// The size of its body.
    pub bytes: u64,
}

/// The caps of one window's listing (see [`MAX_PAGES_PER_WINDOW`] and the constants beside it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListingCaps {
    /// Most pages.
    pub pages: u32,
    /// Most items.
    pub items: u64,
    /// Most body bytes, all pages together.
    pub bytes: u64,
}

impl Default for ListingCaps {
    fn default() -> Self {
        Self {
            pages: MAX_PAGES_PER_WINDOW,
            items: MAX_ITEMS_PER_WINDOW,
            bytes: MAX_LISTING_BYTES_PER_WINDOW,
        }
    }
}

/// Why a window's listing was cut before Microsoft ended it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutReason {
    /// The page cap was reached with a `NextPageUri` still given.
    Pages,
    /// The item cap was reached with a `NextPageUri` still given.
    Items,
    /// The byte cap was reached with a `NextPageUri` still given.
    Bytes,
    /// A `NextPageUri` named a page already listed in this window (its 1-based number).
    Loop {
        /// The page it repeats.
        repeats_page: u32,
    },
}

/// A listing cut short: what had been listed (and handed to the caller) when it was cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListingCut {
    /// Why.
    pub reason: CutReason,
    /// Pages listed, the first included.
    pub pages: u32,
    /// `NextPageUri`s followed (`pages - 1`).
    pub next_page_uris: u32,
    /// Items listed.
    pub items: u64,
    /// Body bytes listed.
    pub bytes: u64,
    /// The caps in force.
    pub caps: ListingCaps,
}

impl ListingCut {
    /// The status text: the stream, the window, the `NextPageUri` count, the cap and what happens next.
    pub fn describe(&self, content_type: &str, window: Window) -> String {
        let why = match self.reason {
            CutReason::Pages => format!("at the cap of {} pages per window", self.caps.pages),
            CutReason::Items => format!("at the cap of {} items per window", self.caps.items),
            CutReason::Bytes => format!("at the cap of {} bytes per window", self.caps.bytes),
            CutReason::Loop { repeats_page } => {
                format!("its NextPageUri repeats page {repeats_page}")
            }
        };
        format!(
            "the listing of {content_type} for {}..{} did not end: cut after following {} NextPageUri ({} pages, {} items, {} bytes), {why}; the items listed were processed, the rest of the window is listed again next cycle",
            sensor_core::timefmt::api_time(window.start),
            sensor_core::timefmt::api_time(window.end),
            self.next_page_uris,
            self.pages,
            self.items,
            self.bytes
        )
    }
}

/// What a listing does after a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Another page follows ([`Listing::next_url`]).
    More,
    /// The page had no `NextPageUri`: the window is listed whole.
    Complete,
    /// The listing was cut; the window is not listed whole.
    Cut(ListingCut),
}

/// The pagination of one window's listing. Invariants: it hands out at most `caps.pages` URLs, never a
/// URL it handed out before (compared by a keyed 64-bit hash, so what it keeps is 8 bytes a page), and
/// ends either [`Progress::Complete`] (a page without `NextPageUri`) or [`Progress::Cut`]; it never
/// holds items.
#[derive(Debug)]
pub struct Listing {
    next: Option<String>,
    caps: ListingCaps,
    pages: u32,
    items: u64,
    bytes: u64,
    seen: HashMap<u64, u32>,
    hasher: RandomState,
}

impl Listing {
    /// A listing whose first page is at `first_url`, with the default caps.
    pub fn new(first_url: String) -> Self {
        Self::with_caps(first_url, ListingCaps::default())
    }

    /// A listing with other caps (tests).
    pub fn with_caps(first_url: String, caps: ListingCaps) -> Self {
        Self {
            next: Some(first_url),
            caps,
            pages: 0,
            items: 0,
            bytes: 0,
            seen: HashMap::new(),
            hasher: RandomState::new(),
        }
    }

    /// The URL of the page to fetch next; `None` once the listing completed or was cut.
    pub fn next_url(&self) -> Option<&str> {
        self.next.as_deref()
    }

    /// Accounts the page just fetched from [`Self::next_url`] and decides what follows it.
    pub fn accept(&mut self, page: &Page) -> Progress {
        let Some(url) = self.next.take() else {
            return Progress::Complete;
        };
        self.pages = self.pages.saturating_add(1);
        self.items = self.items.saturating_add(page.items.len() as u64);
        self.bytes = self.bytes.saturating_add(page.bytes);
        self.seen.insert(self.hasher.hash_one(&url), self.pages);
        let Some(next) = page.next.as_deref() else {
            return Progress::Complete;
        };
        let reason = if let Some(&repeats_page) = self.seen.get(&self.hasher.hash_one(next)) {
            Some(CutReason::Loop { repeats_page })
        } else if self.pages >= self.caps.pages {
            Some(CutReason::Pages)
        } else if self.items >= self.caps.items {
            Some(CutReason::Items)
        } else if self.bytes >= self.caps.bytes {
            Some(CutReason::Bytes)
        } else {
            None
        };
        match reason {
            Some(reason) => Progress::Cut(ListingCut {
                reason,
                pages: self.pages,
                next_page_uris: self.pages - 1,
                items: self.items,
                bytes: self.bytes,
                caps: self.caps,
            }),
            None => {
                self.next = Some(next.to_string());
                Progress::More
            }
        }
    }
}

/// The longest `contentId` taken (Microsoft's are ~80 bytes): it becomes part of the blob's done-mark key
/// in the spool, whose keys and values must stay a few KiB (sled writes larger pages to files it neither
/// syncs nor misses at recovery).
pub const MAX_CONTENT_ID_BYTES: usize = 1024;

/// Parses one page of a content listing (`subscriptions/content`): a JSON array of [`ContentItem`]s,
/// each a JSON object, whose `contentId` is at most [`MAX_CONTENT_ID_BYTES`] long. A body that is not one is a [`ApiError::BadResponse`] carrying serde's message
/// and the first 200 bytes of the body. An item written as an array (which serde's derive would read
/// positionally, `["type","id","uri"]`) is refused: Microsoft never sends one, and guessing which
/// field a position means could fetch the wrong URI.
pub fn parse_listing(body: &[u8]) -> Result<Vec<ContentItem>, ApiError> {
    let items: Vec<ContentItem> = serde_json::from_slice::<Vec<ObjectOnly<ContentItem>>>(body)
        .map(|items| items.into_iter().map(|ObjectOnly(item)| item).collect())
        .map_err(|e| ApiError::BadResponse {
            what: "subscriptions/content",
            text: format!(
                "{e}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
        })?;
    if let Some((index, item)) = items
        .iter()
        .enumerate()
        .find(|(_, i)| i.content_id.len() > MAX_CONTENT_ID_BYTES)
    {
        return Err(ApiError::BadResponse {
            what: "subscriptions/content",
            text: format!(
                "item {index} has a contentId of {} bytes (at most {MAX_CONTENT_ID_BYTES}): {}...",
                item.content_id.len(),
                &item.content_id.chars().take(80).collect::<String>()
            ),
        });
    }
    Ok(items)
}

/// A `T` read only from a JSON object (a map), never from an array.
struct ObjectOnly<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ObjectOnly<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for MapVisitor<T> {
            type Value = ObjectOnly<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(ObjectOnly)
            }
        }
        deserializer.deserialize_map(MapVisitor(std::marker::PhantomData))
    }
}

/// `scheme://host[:port]` of a URL.
fn origin_of(url: &str) -> Option<String> {
    let u = url::Url::parse(url).ok()?;
    Some(u.origin().ascii_serialization())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(items: usize, bytes: u64, next: Option<&str>) -> Page {
        Page {
            items: (0..items)
                .map(|i| ContentItem {
                    content_type: "Audit.Exchange".into(),
                    content_id: format!("id{i}"),
                    content_uri: format!("https://x/{i}"),
                    content_created: None,
                    content_expiration: None,
                })
                .collect(),
            next: next.map(str::to_string),
            bytes,
        }
    }

    fn caps(pages: u32, items: u64, bytes: u64) -> ListingCaps {
        ListingCaps {
            pages,
            items,
            bytes,
        }
    }

    /// A plain-HTTP server on loopback: Entra's token endpoint answers `token_body`, every other
    /// request gets `page_len` bytes of `[`, announced with a Content-Length or (`announce` false)
    /// delimited by closing the connection. Returns its base URL.
    async fn serve(token_body: Vec<u8>, page_len: usize, announce: bool) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let token_body = token_body.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let body_len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if buf.len() < end + 4 + body_len {
                            continue;
                        }
                        buf.drain(..end + 4 + body_len);
                        let (body, close) = if head.contains("/oauth2/v2.0/token") {
                            (token_body.clone(), false)
                        } else {
                            (vec![b'['; page_len], !announce)
                        };
                        let head = if close {
                            "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_string()
                        } else {
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len())
                        };
                        if s.write_all(head.as_bytes()).await.is_err()
                            || s.write_all(&body).await.is_err()
                            || close
                        {
                            return;
                        }
                    }
                });
            }
        });
        format!("http://{addr}")
    }

    /// An API client of `base` (login and API on the same server), with a client secret.
    fn client_of(base: &str) -> ApiClient {
        let secret =
            std::env::temp_dir().join(format!("collector-api-test-{}", rand::random::<u64>()));
        std::fs::write(&secret, "s").expect("secret file");
        let tenant: sensor_core::config::TenantConfig = serde_json::from_value(serde_json::json!({
            "name": "t",
            "tenant_id": "11111111-2222-4333-8444-555555555555",
            "client_id": "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee",
            "client_secret_file": secret,
            "login_url": base,
            "api_url": base,
        }))
        .expect("tenant");
        let http = reqwest::Client::new();
        let tokens = Arc::new(TokenProvider::new(&tenant, http.clone()).expect("credential"));
        let _ = std::fs::remove_file(&secret);
        ApiClient::new(
            http,
            base,
            &tenant.tenant_id,
            "p",
            tokens,
            Arc::new(RateLimiter::new(60_000)),
            Arc::new(Counters::default()),
            1024,
        )
    }

    const TOKEN: &[u8] = br#"{"token_type":"Bearer","expires_in":3599,"access_token":"t"}"#;

    #[tokio::test]
    async fn a_listing_page_over_its_cap_is_refused_announced_or_not() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let over = MAX_LISTING_PAGE_BYTES as usize + 1;
        for announce in [true, false] {
            let base = serve(TOKEN.to_vec(), over, announce).await;
            let api = client_of(&base);
            let url = format!("{base}/api/v1.0/x/activity/feed/subscriptions/content");
            match api.list_page(&url).await {
                Err(ApiError::TooLarge { limit }) => assert_eq!(limit, MAX_LISTING_PAGE_BYTES),
                other => panic!("announce {announce}: {other:?}"),
            }
        }
        // At the cap the page is read (and then judged on its content).
        let base = serve(TOKEN.to_vec(), MAX_LISTING_PAGE_BYTES as usize, false).await;
        let url = format!("{base}/api/v1.0/x/activity/feed/subscriptions/content");
        assert!(matches!(
            client_of(&base).list_page(&url).await,
            Err(ApiError::BadResponse { .. })
        ));
    }

    #[tokio::test]
    async fn a_token_answer_over_its_cap_is_cut_and_refused() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut huge = br#"{"token_type":"Bearer","expires_in":3599,"access_token":""#.to_vec();
        huge.extend(std::iter::repeat_n(b'a', 1024 * 1024));
        huge.extend_from_slice(br#""}"#);
        let base = serve(huge, 2, true).await;
        let err = client_of(&base)
            .tokens()
            .token()
            .await
            .expect_err("a 1 MiB token answer");
        assert!(
            err.to_string().contains("token response is not valid JSON"),
            "{err}"
        );
    }

    #[test]
    fn a_listing_follows_next_page_uris_until_a_page_has_none() {
        let mut l = Listing::new("https://m/p1".into());
        assert_eq!(l.next_url(), Some("https://m/p1"));
        assert_eq!(
            l.accept(&page(3, 300, Some("https://m/p2"))),
            Progress::More
        );
        assert_eq!(l.next_url(), Some("https://m/p2"));
        assert_eq!(
            l.accept(&page(3, 300, Some("https://m/p3"))),
            Progress::More
        );
        assert_eq!(l.accept(&page(1, 100, None)), Progress::Complete);
        assert_eq!(l.next_url(), None);
    }

    #[test]
    fn a_listing_without_end_is_cut_at_the_page_cap_naming_the_count() {
        let mut l = Listing::with_caps("https://m/0".into(), caps(50, u64::MAX, u64::MAX));
        let mut n = 0u32;
        let cut = loop {
            n += 1;
            match l.accept(&page(2, 10, Some(&format!("https://m/{n}")))) {
                Progress::More => assert_eq!(l.next_url(), Some(format!("https://m/{n}").as_str())),
                Progress::Cut(c) => break c,
                Progress::Complete => {
                    panic!("a listing with a NextPageUri on every page completed")
                }
            }
        };
        assert_eq!(n, 50, "cut at the cap, not before or after");
        assert_eq!(cut.reason, CutReason::Pages);
        assert_eq!(
            (cut.pages, cut.next_page_uris, cut.items, cut.bytes),
            (50, 49, 100, 500)
        );
        assert_eq!(l.next_url(), None, "nothing is fetched after a cut");
        let w = Window {
            start: time::macros::datetime!(2026-06-01 00:00 UTC),
            end: time::macros::datetime!(2026-06-01 01:00 UTC),
        };
        let text = cut.describe("Audit.Exchange", w);
        assert!(text.contains("Audit.Exchange"), "{text}");
        assert!(
            text.contains("cut after following 49 NextPageUri (50 pages, 100 items"),
            "{text}"
        );
        assert!(text.contains("at the cap of 50 pages per window"), "{text}");
        assert!(text.contains("listed again next cycle"), "{text}");
    }

    #[test]
    fn the_default_caps_stop_a_listing_of_endless_new_pages() {
        let mut l = Listing::new("https://m/0".into());
        let mut n = 0u32;
        let cut = loop {
            n += 1;
            match l.accept(&page(0, 2, Some(&format!("https://m/{n}")))) {
                Progress::More => {}
                Progress::Cut(c) => break c,
                Progress::Complete => panic!("completed"),
            }
        };
        assert_eq!(cut.reason, CutReason::Pages);
        assert_eq!(cut.pages, MAX_PAGES_PER_WINDOW);
    }

    #[test]
    fn a_listing_is_cut_at_its_item_and_byte_caps() {
        let mut l = Listing::with_caps("https://m/0".into(), caps(1000, 25, u64::MAX));
        assert_eq!(l.accept(&page(10, 1, Some("https://m/1"))), Progress::More);
        assert_eq!(l.accept(&page(10, 1, Some("https://m/2"))), Progress::More);
        match l.accept(&page(10, 1, Some("https://m/3"))) {
            Progress::Cut(c) => {
                assert_eq!(c.reason, CutReason::Items);
                assert_eq!((c.pages, c.items), (3, 30));
                assert!(c
                    .describe(
                        "DLP.All",
                        Window {
                            start: OffsetDateTime::UNIX_EPOCH,
                            end: OffsetDateTime::UNIX_EPOCH
                        }
                    )
                    .contains("at the cap of 25 items per window"));
            }
            other => panic!("{other:?}"),
        }
        let mut l = Listing::with_caps("https://m/0".into(), caps(1000, u64::MAX, 1000));
        assert_eq!(l.accept(&page(1, 600, Some("https://m/1"))), Progress::More);
        assert!(matches!(
            l.accept(&page(1, 600, Some("https://m/2"))),
            Progress::Cut(ListingCut {
                reason: CutReason::Bytes,
                bytes: 1200,
                ..
            })
        ));
        // The last page may be as large as it likes: a page without NextPageUri completes.
        let mut l = Listing::with_caps("https://m/0".into(), caps(1, 1, 1));
        assert_eq!(l.accept(&page(5, 5000, None)), Progress::Complete);
    }

    #[test]
    fn a_next_page_uri_seen_before_cuts_the_listing_naming_the_page() {
        let mut l = Listing::new("https://m/a".into());
        assert!(matches!(
            l.accept(&page(1, 1, Some("https://m/a"))),
            Progress::Cut(ListingCut {
                reason: CutReason::Loop { repeats_page: 1 },
                pages: 1,
                next_page_uris: 0,
                ..
            })
        ));
        let mut l = Listing::new("https://m/a".into());
        assert_eq!(l.accept(&page(1, 1, Some("https://m/b"))), Progress::More);
        assert_eq!(l.accept(&page(1, 1, Some("https://m/c"))), Progress::More);
        match l.accept(&page(1, 1, Some("https://m/b"))) {
            Progress::Cut(c) => {
                assert_eq!(c.reason, CutReason::Loop { repeats_page: 2 });
                let text = c.describe(
                    "Audit.General",
                    Window {
                        start: OffsetDateTime::UNIX_EPOCH,
                        end: OffsetDateTime::UNIX_EPOCH,
                    },
                );
                assert!(text.contains("its NextPageUri repeats page 2"), "{text}");
                assert!(text.contains("cut after following 2 NextPageUri"), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_listing_item_is_an_object_never_an_array() {
        let items = parse_listing(
            br#"[{"contentType":"Audit.General","contentId":"a$b","contentUri":"https://x/a"}]"#,
        )
        .expect("an object item");
        assert_eq!(items[0].content_id, "a$b");
        assert_eq!(items[0].content_uri, "https://x/a");
        // The fuzzer's find: serde's derive reads a struct from an array by position.
        let err = parse_listing(br#"[["T","ko555","cten"]]"#).expect_err("an array item");
        match err {
            ApiError::BadResponse { what, text } => {
                assert_eq!(what, "subscriptions/content");
                assert!(text.contains("expected a JSON object"), "{text}");
            }
            other => panic!("not a BadResponse: {other:?}"),
        }
    }

    #[test]
    fn a_content_id_longer_than_the_cap_is_refused_naming_its_item() {
        let page = |id: &str| {
            format!(
                r#"[{{"contentId":"a","contentUri":"https://x/a"}},{{"contentId":"{id}","contentUri":"https://x/b"}}]"#
            )
        };
        let longest = "c".repeat(MAX_CONTENT_ID_BYTES);
        let items = parse_listing(page(&longest).as_bytes()).expect("at the cap");
        assert_eq!(items[1].content_id, longest);
        let err = parse_listing(page(&format!("{longest}c")).as_bytes()).expect_err("over the cap");
        match err {
            ApiError::BadResponse { what, text } => {
                assert_eq!(what, "subscriptions/content");
                assert!(
                    text.starts_with("item 1 has a contentId of 1025 bytes"),
                    "{text}"
                );
                assert!(text.len() < 200, "{text}");
            }
            other => panic!("not a BadResponse: {other:?}"),
        }
    }

    #[test]
    fn af429_is_throttling_whatever_the_status() {
        let body = br#"{'error':{'code':'AF429'}}"#;
        assert!(
            matches!(
                classify(403, body, || Duration::ZERO),
                ApiError::ConsentMissing { .. }
            ),
            "not JSON: status decides"
        );
        let body = br#"{"error":{"code":"AF429","message":"Too many requests. Method=GetBlob, PublisherId=x"}}"#;
        assert!(matches!(
            classify(403, body, || Duration::from_secs(3)),
            ApiError::Throttled { .. }
        ));
        assert!(matches!(
            classify(429, body, || Duration::from_secs(3)),
            ApiError::Throttled { .. }
        ));
    }

    #[test]
    fn error_bodies_map_to_their_meaning() {
        let audit = br#"{"error":{"code":"StartSubscription [CorrId=1][TenantId=t,ContentType=Audit.SharePoint][AppId","message":"] failed. Exception: Microsoft.Office.Compliance.Audit.DataServiceException: Tenant t does not exist.\r\n at X"}}"#;
        match classify(400, audit, || Duration::ZERO) {
            ApiError::AuditDisabled(t) => assert!(t.contains("Tenant t does not exist."), "{t}"),
            e => panic!("{e:?}"),
        }
        let c = |code: &str, status| {
            classify(
                status,
                format!(r#"{{"error":{{"code":"{code}","message":"m"}}}}"#).as_bytes(),
                || Duration::ZERO,
            )
        };
        assert!(matches!(c("AF20022", 400), ApiError::NoSubscription(_)));
        assert!(matches!(
            c("AF20023", 400),
            ApiError::SubscriptionDisabled(_)
        ));
        assert!(matches!(c("AF20030", 400), ApiError::WindowRejected { .. }));
        assert!(matches!(c("AF20055", 400), ApiError::WindowRejected { .. }));
        assert!(matches!(c("AF20051", 400), ApiError::ContentExpired(_)));
        assert!(matches!(c("AF10001", 403), ApiError::ConsentMissing { .. }));
        assert!(matches!(c("AF50000", 500), ApiError::Server { .. }));
        assert!(matches!(c("AF20024", 400), ApiError::Client { .. }));
        assert!(matches!(
            classify(502, b"<html>bad gateway</html>", || Duration::ZERO),
            ApiError::Server { .. }
        ));
    }

    #[test]
    fn expiry_follows_expiration_then_creation_and_never_overflows() {
        let now = time::macros::datetime!(2026-06-01 12:00 UTC);
        let item = |created: Option<&str>, expiration: Option<&str>| ContentItem {
            content_type: "Audit.Exchange".into(),
            content_id: "a$b".into(),
            content_uri: "https://manage.office.com/x".into(),
            content_created: created.map(str::to_string),
            content_expiration: expiration.map(str::to_string),
        };
        let at = |s| sensor_core::timefmt::parse_api_time(s).expect("time");
        assert_eq!(
            item(Some("2026-05-30T00:00:00"), Some("2026-06-02T00:00:00")).expires_at(now),
            at("2026-06-02T00:00:00")
        );
        assert_eq!(
            item(Some("2026-05-30T00:00:00"), None).expires_at(now),
            at("2026-06-06T00:00:00")
        );
        assert_eq!(
            item(None, Some("yesterday")).expires_at(now),
            now + time::Duration::days(7)
        );
        // Found by fuzzing (fuzz/fuzz_targets/content_listing.rs): panicked ("resulting value is out
        // of range"), which aborts the agent, and again on every restart while the item is listed.
        assert_eq!(
            item(Some("9999-12-31T23:59:59"), None).expires_at(now),
            now + time::Duration::days(7)
        );
    }

    #[test]
    fn the_servers_text_is_redacted_code_included() {
        // Found by fuzzing (fuzz/fuzz_targets/api_error.rs): the code and the DataServiceException line
        // bypassed the redaction the message gets.
        let body = br#"{"error":{"code":"X access_token=s3cr3t","message":"denied"}}"#;
        let err = classify(400, body, || Duration::ZERO).to_string();
        assert!(!err.contains("s3cr3t"), "{err}");
        let body = br#"{"error":{"code":"","message":"DataServiceException: Tenant access_token=s3cr3t does not exist."}}"#;
        match classify(400, body, || Duration::ZERO) {
            ApiError::AuditDisabled(t) => assert!(!t.contains("s3cr3t"), "{t}"),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "7".parse().expect("value"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let at = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
        h.insert(reqwest::header::RETRY_AFTER, at.parse().expect("value"));
        let d = retry_after(&h).expect("date");
        assert!(
            d <= Duration::from_secs(30) && d >= Duration::from_secs(28),
            "{d:?}"
        );
    }

    #[test]
    fn origins_compare_scheme_host_and_port() {
        assert_eq!(
            origin_of("https://127.0.0.1:8443/api/x?y=1").as_deref(),
            Some("https://127.0.0.1:8443")
        );
        assert_ne!(
            origin_of("https://evil.example/api"),
            origin_of("https://manage.office.com/api")
        );
    }
}

//! The scenario: which tenants exist, how they authenticate, what content they generate and which faults
//! they inject. Loaded from TOML (`deny_unknown_fields` everywhere, so a typo fails loudly).

use serde::{Deserialize, Serialize};

use crate::SimError;

/// The five content types of the Management Activity API.
pub const ALL_CONTENT_TYPES: [&str; 5] = [
    "Audit.AzureActiveDirectory",
    "Audit.Exchange",
    "Audit.SharePoint",
    "Audit.General",
    "DLP.All",
];

/// A whole simulation: explicit tenants plus optionally many generated ones.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Explicitly configured tenants (`[[tenant]]` tables).
    #[serde(default, rename = "tenant")]
    pub tenants: Vec<TenantSpec>,
    /// Generates many similar tenants for scale tests (`[generate_tenants]`).
    #[serde(default)]
    pub generate_tenants: Option<GenerateTenants>,
    /// Whether live blob generation is on at start-up (default true); see `POST /_sim/generation`.
    #[serde(default = "yes")]
    pub generation: bool,
}

/// Generates `count` tenants from a template. Tenant *i* (1-based) gets the tenant id
/// `00000000-0000-4000-8000-{i:012}`, the client id `00000000-0000-4000-9000-{i:012}`, the secret
/// `secret` (in addition to the template's `client_secrets`) and the seed `template.seed + i`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateTenants {
    /// How many tenants to generate.
    pub count: u32,
    /// The client secret every generated tenant accepts.
    pub secret: String,
    /// Every other setting; its `tenant_id` and `client_id` are ignored.
    #[serde(default)]
    pub template: TenantSpec,
}

/// Which Microsoft cloud a tenant lives in; it decides which API host the token scope/resource must name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cloud {
    /// Commercial / Enterprise: `manage.office.com`.
    #[default]
    Commercial,
    /// GCC: `manage-gcc.office.com`.
    Gcc,
    /// GCC High: `manage.office365.us`.
    GccHigh,
    /// DoD: `manage.protection.apps.mil`.
    Dod,
}

impl Cloud {
    /// All clouds.
    pub const ALL: [Cloud; 4] = [Cloud::Commercial, Cloud::Gcc, Cloud::GccHigh, Cloud::Dod];

    /// The Management API host of this cloud (what `scope`/`resource` and the token `aud` name).
    pub fn api_host(self) -> &'static str {
        match self {
            Cloud::Commercial => "manage.office.com",
            Cloud::Gcc => "manage-gcc.office.com",
            Cloud::GccHigh => "manage.office365.us",
            Cloud::Dod => "manage.protection.apps.mil",
        }
    }
}

/// One tenant: identity, credentials, content generation and faults.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantSpec {
    /// The tenant (directory) GUID, as used in the login and API paths.
    pub tenant_id: String,
    /// The application (client) id registered in the tenant.
    pub client_id: String,
    /// Accepted client secret values.
    pub client_secrets: Vec<String>,
    /// Secret values that are recognised but expired (AADSTS7000222).
    pub expired_secrets: Vec<String>,
    /// Path of a PEM certificate (RSA) whose key signs client assertions.
    pub certificate_pem_file: Option<String>,
    /// The same certificate inline (PEM); used when `certificate_pem_file` is absent.
    pub certificate_pem: Option<String>,
    /// The tenant's cloud.
    pub cloud: Cloud,
    /// Lifetime of issued access tokens, seconds.
    pub token_lifetime_secs: u64,
    /// Unified audit logging on; false: every API call gets the "Tenant … does not exist" body (HTTP 400).
    pub audit_enabled: bool,
    /// Admin consent granted (ActivityFeed.Read); false: every API call gets 403 AF10001.
    pub consent: bool,
    /// ActivityFeed.ReadDlp granted; false: `DLP.All` calls get 403 AF10001.
    pub dlp_permission: bool,
    /// Content types that have content.
    pub content_types: Vec<String>,
    /// Subscriptions already enabled at start-up (as if another run had started them).
    pub subscriptions_enabled: Vec<String>,
    /// History: blobs pre-generated with contentCreated spread over the past N hours (up to 192).
    pub history_hours: u32,
    /// History blobs per hour, per content type.
    pub history_blobs_per_hour: u32,
    /// Records per blob (varies by ±20 %, at least 1).
    pub records_per_blob: u32,
    /// While generation is on, one new blob per content type per interval (0 = none).
    pub live_blob_interval_ms: u64,
    /// Live blobs per content type, after which live generation stops by itself.
    pub live_blobs_max: u32,
    /// Content items per listing page; more remaining -> `NextPageUri`.
    pub page_size: usize,
    /// Seed of the deterministic generation.
    pub seed: u64,
    /// Fault injection.
    pub faults: Faults,
}

impl Default for TenantSpec {
    fn default() -> Self {
        Self {
            tenant_id: String::new(),
            client_id: String::new(),
            client_secrets: Vec::new(),
            expired_secrets: Vec::new(),
            certificate_pem_file: None,
            certificate_pem: None,
            cloud: Cloud::Commercial,
            token_lifetime_secs: 3599,
            audit_enabled: true,
            consent: true,
            dlp_permission: true,
            content_types: ALL_CONTENT_TYPES.iter().map(|s| s.to_string()).collect(),
            subscriptions_enabled: Vec::new(),
            history_hours: 24,
            history_blobs_per_hour: 2,
            records_per_blob: 20,
            live_blob_interval_ms: 1000,
            live_blobs_max: 100,
            page_size: 20,
            seed: 1,
            faults: Faults::default(),
        }
    }
}

/// Per-tenant fault injection. Replaced as a whole by `POST /_sim/faults`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Fraction of new blobs whose contentCreated is back-dated by `late_hours` but that become listable
    /// only when generated.
    pub late_fraction: f64,
    /// How far late blobs are back-dated, hours.
    pub late_hours: u32,
    /// Fraction of records re-served in a later blob: same Id, fields re-ordered (different bytes).
    pub duplicate_fraction: f64,
    /// Fraction of new blobs that replay the records of a blob created 5–8 days earlier (same Ids, same or
    /// re-ordered bytes). Needs `history_hours` ≥ 120.
    pub replay_fraction: f64,
    /// Number of listed blobs whose contentExpiration is already past (fetch -> 400 AF20051).
    pub expired_blobs: u32,
    /// Every Nth API request answers AF429, alternately HTTP 403 and 429 (0 = never).
    pub throttle_every: u64,
    /// When > 0, the 429 answers carry `Retry-After: N`.
    pub throttle_retry_after_secs: u64,
    /// Every Nth API request answers 500 AF50000 (0 = never).
    pub af50000_every: u64,
    /// Delay added to every API response, ms.
    pub slow_ms: u64,
    /// Every Nth API request never answers (sleeps an hour) (0 = never).
    pub hang_every: u64,
    /// Number of blobs served malformed, cycling through: truncated JSON, invalid UTF-8, an object
    /// instead of an array, a record whose Id is a number.
    pub malformed_blobs: u32,
    /// Number of blobs whose body exceeds `oversized_bytes`.
    pub oversized_blobs: u32,
    /// Minimum body size of oversized blobs, bytes.
    pub oversized_bytes: usize,
    /// The first non-empty listing (and every later request to the same URL) answers with a
    /// `NextPageUri` equal to its own URL.
    pub nextpage_loop: bool,
    /// Content types whose subscription is (set to) disabled: listing answers AF20023 until `/start`.
    pub subscription_disabled: Vec<String>,
    /// Content types whose listings never end: every page that has items answers them with a
    /// `NextPageUri` to the same page again under a new URL (its `endless` query parameter counts up),
    /// forever. The items are those a correct page holds, so nothing is lost to a collector that handles
    /// each page; one that gathers pages before handling them holds ever more of them.
    pub endless_listing: Vec<String>,
    /// The simulator's clock for this tenant relative to the host's, seconds.
    pub clock_offset_secs: i64,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            late_fraction: 0.0,
            late_hours: 3,
            duplicate_fraction: 0.0,
            replay_fraction: 0.0,
            expired_blobs: 0,
            throttle_every: 0,
            throttle_retry_after_secs: 0,
            af50000_every: 0,
            slow_ms: 0,
            hang_every: 0,
            malformed_blobs: 0,
            oversized_blobs: 0,
            oversized_bytes: 80_000_000,
            nextpage_loop: false,
            subscription_disabled: Vec::new(),
            endless_listing: Vec::new(),
            clock_offset_secs: 0,
        }
    }
}

fn yes() -> bool {
    true
}

/// The deterministic tenant id of generated tenant `index` (1-based).
pub fn generated_tenant_id(index: u32) -> String {
    format!("00000000-0000-4000-8000-{index:012}")
}

/// The deterministic client id of generated tenant `index` (1-based).
pub fn generated_client_id(index: u32) -> String {
    format!("00000000-0000-4000-9000-{index:012}")
}

impl Scenario {
    /// Parses a scenario from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, SimError> {
        toml::from_str(text).map_err(|e| SimError::Scenario(e.to_string()))
    }

    /// Reads and parses a scenario file.
    pub fn load(path: &std::path::Path) -> Result<Self, SimError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SimError::Scenario(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text)
    }

    /// All tenants: the explicit ones followed by the generated ones, validated.
    pub fn expanded_tenants(&self) -> Result<Vec<TenantSpec>, SimError> {
        let mut out = self.tenants.clone();
        if let Some(g) = &self.generate_tenants {
            for i in 1..=g.count {
                let mut t = g.template.clone();
                t.tenant_id = generated_tenant_id(i);
                t.client_id = generated_client_id(i);
                t.client_secrets.push(g.secret.clone());
                t.seed = t.seed.wrapping_add(u64::from(i));
                out.push(t);
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for t in &out {
            if t.tenant_id.is_empty() || t.client_id.is_empty() {
                return Err(SimError::Scenario(
                    "every tenant needs tenant_id and client_id".into(),
                ));
            }
            if !seen.insert(t.tenant_id.to_ascii_lowercase()) {
                return Err(SimError::Scenario(format!(
                    "duplicate tenant {}",
                    t.tenant_id
                )));
            }
            for ct in t.content_types.iter().chain(&t.subscriptions_enabled) {
                if !ALL_CONTENT_TYPES.contains(&ct.as_str()) {
                    return Err(SimError::Scenario(format!("unknown content type {ct}")));
                }
            }
            if t.history_hours > 192 {
                return Err(SimError::Scenario("history_hours must be <= 192".into()));
            }
            if t.page_size == 0 {
                return Err(SimError::Scenario("page_size must be >= 1".into()));
            }
        }
        Ok(out)
    }
}

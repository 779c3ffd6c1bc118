//! The `cloud` setting and everything derived from it. Invariant: authority, token audience and API host
//! are derived together from one value, so a tenant can never ask the commercial authority for a GCC High
//! audience (AADSTS900382) or present a commercial token to a government API (invalid audience).

use serde::{Deserialize, Serialize};

/// A Microsoft 365 cloud (service plan), as named in `sensor.toml`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cloud {
    /// Commercial / Enterprise.
    Commercial,
    /// GCC: public Entra, its own API host.
    Gcc,
    /// GCC High: US Government Entra.
    GccHigh,
    /// DoD: US Government Entra, the DoD API host.
    Dod,
}

impl Cloud {
    /// The Entra authority (token host) base URL, without a trailing slash.
    pub fn authority(self) -> &'static str {
        match self {
            Cloud::Commercial | Cloud::Gcc => "https://login.microsoftonline.com",
            Cloud::GccHigh | Cloud::Dod => "https://login.microsoftonline.us",
        }
    }

    /// The Management Activity API host name.
    pub fn api_host(self) -> &'static str {
        match self {
            Cloud::Commercial => "manage.office.com",
            Cloud::Gcc => "manage-gcc.office.com",
            Cloud::GccHigh => "manage.office365.us",
            Cloud::Dod => "manage.protection.apps.mil",
        }
    }

    /// The API base URL, `https://<api host>`.
    pub fn api_url(self) -> String {
        format!("https://{}", self.api_host())
    }

    /// The v2 token scope: `https://<api host>/.default`. Follows the cloud even when URLs are overridden.
    pub fn scope(self) -> String {
        format!("https://{}/.default", self.api_host())
    }

    /// The v1 token `resource`: `https://<api host>`.
    pub fn resource(self) -> String {
        self.api_url()
    }

    /// The name used in `sensor.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Cloud::Commercial => "commercial",
            Cloud::Gcc => "gcc",
            Cloud::GccHigh => "gcc-high",
            Cloud::Dod => "dod",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cloud_derives_authority_scope_and_host_together() {
        let table = [
            (
                Cloud::Commercial,
                "https://login.microsoftonline.com",
                "manage.office.com",
            ),
            (
                Cloud::Gcc,
                "https://login.microsoftonline.com",
                "manage-gcc.office.com",
            ),
            (
                Cloud::GccHigh,
                "https://login.microsoftonline.us",
                "manage.office365.us",
            ),
            (
                Cloud::Dod,
                "https://login.microsoftonline.us",
                "manage.protection.apps.mil",
            ),
        ];
        for (cloud, authority, host) in table {
            assert_eq!(cloud.authority(), authority, "{cloud:?}");
            assert_eq!(cloud.api_host(), host, "{cloud:?}");
            assert_eq!(
                cloud.scope(),
                format!("https://{host}/.default"),
                "{cloud:?}"
            );
            assert_eq!(cloud.resource(), format!("https://{host}"), "{cloud:?}");
        }
    }

    #[test]
    fn cloud_names_round_trip_through_toml() {
        #[derive(Deserialize)]
        struct W {
            cloud: Cloud,
        }
        for cloud in [Cloud::Commercial, Cloud::Gcc, Cloud::GccHigh, Cloud::Dod] {
            let w: W = toml::from_str(&format!("cloud = \"{}\"", cloud.as_str())).expect("parses");
            assert_eq!(w.cloud, cloud);
        }
        assert!(toml::from_str::<W>("cloud = \"gcchigh\"").is_err());
    }
}

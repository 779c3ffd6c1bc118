//! Hostile configuration files: random and mutated TOML through the strict loader must give a typed
//! error naming the file (or a valid configuration), never a panic.

use std::path::Path;

use proptest::prelude::*;
use sensor_core::config::{Config, ConfigError};

const SAMPLE: &str = r#"state_dir = "/var/lib/m365-sensor"
[backend]
url = "https://ingest.example.net"
token_file = "/etc/m365-sensor/backend.token"
compression = "zstd"
[spool]
max_bytes = 4294967296
[[tenant]]
name = "contoso"
tenant_id = "00000000-0000-0000-0000-000000000000"
client_id = "00000000-0000-0000-0000-000000000000"
client_secret_file = "/etc/m365-sensor/contoso.secret"
cloud = "gcc-high"
content_types = ["Audit.Exchange", "DLP.All"]
backfill_hours = 168
"#;

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn mutated_configs_give_typed_errors(edits in proptest::collection::vec((any::<u16>(), any::<char>(), any::<bool>()), 0..8)) {
        let mut text: Vec<char> = SAMPLE.chars().collect();
        for (pos, c, insert) in edits {
            let i = pos as usize % (text.len() + 1);
            if insert || i == text.len() { text.insert(i, c) } else { text[i] = c }
        }
        let text: String = text.into_iter().collect();
        match Config::from_toml(&text, Path::new("fuzz.toml")) {
            Ok(_) => {}
            Err(e @ (ConfigError::Syntax { .. } | ConfigError::Invalid { .. })) => prop_assert!(e.to_string().starts_with("fuzz.toml")),
            Err(e) => prop_assert!(false, "unexpected error kind: {e}"),
        }
    }
}

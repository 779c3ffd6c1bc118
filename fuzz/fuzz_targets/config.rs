//! `sensor.toml` as an administrator (or a broken deployment tool) may write it:
//! `sensor_core::config::Config::from_toml`, which validates, then `validate()` again. Non-UTF-8 input is
//! skipped (`Config::load` refuses it before parsing). `validate()` opens and stats the files named, so
//! `init` creates the fixtures the seeds name under /tmp/m365-sensor-fuzz (secrets mode 0600).
//!
//! Invariants: nothing panics; a configuration accepted has no problems (`Config`'s header); a refused one
//! names the file, and every problem names its key and reason.
#![no_main]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sensor_core::config::{Config, ConfigError};

const FILE: &str = "fuzz/sensor.toml";
const FIXTURES: &str = "/tmp/m365-sensor-fuzz";

fn fixtures() {
    std::fs::create_dir_all(FIXTURES).expect("fixture directory");
    for (name, mode) in [
        ("backend.token", 0o600),
        ("client.secret", 0o600),
        ("device.key", 0o600),
        ("tenant.key", 0o600),
        ("device.crt", 0o644),
        ("tenant.crt", 0o644),
        ("ca.pem", 0o644),
        ("group-readable.secret", 0o640),
    ] {
        let p = Path::new(FIXTURES).join(name);
        std::fs::write(&p, "x\n").expect("fixture");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
}

fuzz_target!(init: fixtures(), |data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text, Path::new(FILE)) {
        Ok(config) => {
            let problems = config.validate();
            assert!(problems.is_empty(), "accepted with problems: {problems:?}");
        }
        Err(err) => {
            match &err {
                ConfigError::Syntax { file, message } => {
                    assert_eq!(file, Path::new(FILE));
                    assert!(!message.trim().is_empty(), "a syntax error must say what");
                }
                ConfigError::Invalid { file, problems } => {
                    assert_eq!(file, Path::new(FILE));
                    assert!(!problems.is_empty(), "refused without a problem");
                    for p in problems {
                        assert!(!p.field.is_empty() && !p.reason.is_empty(), "{p:?}");
                    }
                }
                ConfigError::Read { .. } => panic!("text was read from a file: {err}"),
            }
            assert!(err.to_string().contains(FILE));
        }
    }
});

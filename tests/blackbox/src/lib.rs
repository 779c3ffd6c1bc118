//! The black-box rig: starts the real `m365-sim`, `backend-receiver` and `m365-sensor` binaries as
//! processes on loopback, over real TLS, and reads the rigs' ground truth through their control APIs.
//!
//! Invariant: every address is 127.0.0.1; every process is killed when its handle drops.

pub mod trap;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The directory holding the workspace's binaries (`target/<profile>`), found from the running
/// executable: a test (`target/<profile>/deps/<test>`) or a bench binary (`target/<profile>/<bin>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(Path::new("."));
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The path of a workspace binary; fails with the fix when it was not built. `SENSOR_BIN` overrides the
/// agent's (benchmarks run the static appliance binary with it).
pub fn bin(name: &str) -> Result<PathBuf> {
    let p = match std::env::var_os("SENSOR_BIN") {
        Some(b) if name == "m365-sensor" => PathBuf::from(b),
        _ => bin_dir().join(name),
    };
    if !p.exists() {
        bail!(
            "{} not found: run `cargo build --workspace --bins` first (`make test` does)",
            p.display()
        );
    }
    Ok(p)
}

/// How long a control answer may take: the ground truths of a multi-gigabyte backlog (millions of
/// records) take minutes to build and send; everything else gets the client's 60 s.
fn answer_timeout(path: &str) -> Duration {
    if path.ends_with("/truth") {
        Duration::from_secs(900)
    } else {
        Duration::from_secs(60)
    }
}

/// Polls `f` every 100 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A blocking HTTPS client trusting only `ca_pem`.
pub fn client(ca_pem: &str) -> Result<reqwest::blocking::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.context("CA PEM")?)?;
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(reqwest::blocking::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(60))
        .build()?)
}

fn read_when_ready(dir: &Path, file: &str, child: &mut Child, what: &str) -> Result<String> {
    wait_for(Duration::from_secs(60), what, || {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(Err(anyhow::anyhow!("{what} exited early: {status}")));
        }
        std::fs::read_to_string(dir.join(file))
            .ok()
            .filter(|s| !s.trim().is_empty())
            .map(|s| Ok(s.trim().to_string()))
    })?
}

/// A running process, killed on drop.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Its stderr log.
    pub log: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: PathBuf) -> Result<Proc> {
        let f = std::fs::File::create(&log)?;
        let child = cmd
            .stdout(Stdio::null())
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .context("spawning")?;
        Ok(Proc { child, log })
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let c = &mut self.child;
        wait_for(timeout, "the process to exit after SIGTERM", || {
            c.try_wait().ok().flatten()
        })
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The Microsoft 365 simulator as a process.
pub struct Sim {
    /// The process.
    pub proc: Proc,
    /// Its base URL.
    pub url: String,
    /// Its CA file.
    pub ca_file: PathBuf,
    http: reqwest::blocking::Client,
}

impl Sim {
    /// Starts the simulator with `scenario` (TOML) in `dir/sim`.
    pub fn start(dir: &Path, scenario: &str) -> Result<Sim> {
        let out = dir.join("sim");
        std::fs::create_dir_all(&out)?;
        let sc = dir.join("scenario.toml");
        std::fs::write(&sc, scenario)?;
        let mut proc = Proc::spawn(
            Command::new(bin("m365-sim")?)
                .args(["--listen", "127.0.0.1:0", "--scenario"])
                .arg(&sc)
                .arg("--out-dir")
                .arg(&out),
            dir.join("sim.log"),
        )?;
        let url = read_when_ready(&out, "url", &mut proc.child, "m365-sim")?;
        let ca_file = out.join("ca.pem");
        let http = client(&std::fs::read_to_string(&ca_file)?)?;
        Ok(Sim {
            proc,
            url,
            ca_file,
            http,
        })
    }

    fn get(&self, path: &str) -> Result<Value> {
        Ok(self
            .http
            .get(format!("{}{path}", self.url))
            .timeout(answer_timeout(path))
            .send()?
            .error_for_status()?
            .json()?)
    }

    fn post(&self, path: &str, body: Value) -> Result<()> {
        self.http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()?
            .error_for_status()?;
        Ok(())
    }

    /// `/_sim/truth`.
    pub fn truth(&self) -> Result<Value> {
        self.get("/_sim/truth")
    }

    /// `/_sim/stats`.
    pub fn stats(&self) -> Result<Value> {
        self.get("/_sim/stats")
    }

    /// Turns live generation on or off.
    pub fn set_generation(&self, enabled: bool) -> Result<()> {
        self.post(
            "/_sim/generation",
            serde_json::json!({ "enabled": enabled }),
        )
    }

    /// Replaces a tenant's faults.
    pub fn set_faults(&self, tenant_id: &str, faults: Value) -> Result<()> {
        self.post(
            "/_sim/faults",
            serde_json::json!({ "tenant_id": tenant_id, "faults": faults }),
        )
    }

    /// Changes a tenant's settings at run time (`/_sim/tenant`).
    pub fn set_tenant(&self, body: Value) -> Result<()> {
        self.post("/_sim/tenant", body)
    }
}

/// The reference backend receiver as a process.
pub struct Receiver {
    /// The process.
    pub proc: Proc,
    /// Ingest base URL.
    pub url: String,
    /// Control base URL.
    pub control_url: String,
    /// Its CA file.
    pub ca_file: PathBuf,
    /// The bearer token file the sensor uses.
    pub token_file: PathBuf,
    http: reqwest::blocking::Client,
}

impl Receiver {
    /// Starts the receiver in `dir/rx` with a bearer token.
    pub fn start(dir: &Path) -> Result<Receiver> {
        Self::start_with(dir, &[])
    }

    /// [`Receiver::start`] with extra command-line arguments (`--enroll-token T`, ...).
    pub fn start_with(dir: &Path, extra: &[&str]) -> Result<Receiver> {
        let out = dir.join("rx");
        std::fs::create_dir_all(&out)?;
        let token_file = dir.join("backend.token");
        std::fs::write(&token_file, format!("tok-{}\n", uuid::Uuid::new_v4()))?;
        set_mode(&token_file, 0o600)?;
        let mut proc = Proc::spawn(
            Command::new(bin("backend-receiver")?)
                .args([
                    "--listen",
                    "127.0.0.1:0",
                    "--control-listen",
                    "127.0.0.1:0",
                    "--out-dir",
                ])
                .arg(&out)
                .arg("--token-file")
                .arg(&token_file)
                .args(extra),
            dir.join("rx.log"),
        )?;
        let url = read_when_ready(&out, "url", &mut proc.child, "backend-receiver")?;
        let control_url = std::fs::read_to_string(out.join("control_url"))?
            .trim()
            .to_string();
        let ca_file = out.join("ca.pem");
        let http = client(&std::fs::read_to_string(&ca_file)?)?;
        Ok(Receiver {
            proc,
            url,
            control_url,
            ca_file,
            token_file,
            http,
        })
    }

    fn get(&self, path: &str) -> Result<Value> {
        Ok(self
            .http
            .get(format!("{}{path}", self.control_url))
            .timeout(answer_timeout(path))
            .send()?
            .error_for_status()?
            .json()?)
    }

    /// Posts to the control API.
    pub fn control(&self, path: &str, body: Value) -> Result<()> {
        self.http
            .post(format!("{}{path}", self.control_url))
            .json(&body)
            .send()?
            .error_for_status()?;
        Ok(())
    }

    /// GET on the control API.
    pub fn get_json(&self, path: &str) -> Result<Value> {
        self.get(path)
    }

    /// Posts to the control API and returns its JSON answer.
    pub fn post_json(&self, path: &str, body: Value) -> Result<Value> {
        Ok(self
            .http
            .post(format!("{}{path}", self.control_url))
            .json(&body)
            .send()?
            .error_for_status()?
            .json()?)
    }

    /// Puts a file the sensor can download from `<url>/v1/files/<name>` (authenticated).
    pub fn put_file(&self, name: &str, bytes: Vec<u8>) -> Result<String> {
        self.http
            .put(format!("{}/_rx/files/{name}", self.control_url))
            .body(bytes)
            .send()?
            .error_for_status()?;
        Ok(format!("{}/v1/files/{name}", self.url))
    }

    /// Queues a command; returns its id.
    pub fn queue_command(&self, kind: &str, args: Value) -> Result<String> {
        let v = self.post_json(
            "/_rx/commands",
            serde_json::json!({"kind": kind, "args": args}),
        )?;
        v["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("no id in {v}"))
    }

    /// The command `id` as the receiver saw it (deliveries, results).
    pub fn command(&self, id: &str) -> Result<Value> {
        let all = self.get("/_rx/commands")?;
        all.as_array()
            .and_then(|a| a.iter().find(|c| c["id"] == id).cloned())
            .ok_or_else(|| anyhow::anyhow!("command {id} unknown to the receiver"))
    }

    /// Waits for the first result of command `id` and returns it.
    pub fn wait_result(&self, id: &str, timeout: Duration) -> Result<Value> {
        wait_for(timeout, &format!("the result of command {id}"), || {
            let c = self.command(id).ok()?;
            c["results"].as_array()?.first().cloned()
        })
    }

    /// `/_rx/summary`.
    pub fn summary(&self) -> Result<Value> {
        self.get("/_rx/summary")
    }

    /// `/_rx/truth`.
    pub fn truth(&self) -> Result<Value> {
        self.get("/_rx/truth")
    }
}

/// Sets a file's mode.
pub fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// A tenant for the sensor's configuration.
#[derive(Clone, Debug)]
pub struct TenantSpec {
    /// Label.
    pub name: String,
    /// Tenant id.
    pub tenant_id: String,
    /// Client id.
    pub client_id: String,
    /// The secret value, or None for a certificate credential.
    pub secret: Option<String>,
    /// Certificate and key files for a certificate credential.
    pub certificate: Option<(PathBuf, PathBuf)>,
    /// Content types.
    pub content_types: Vec<String>,
    /// How far back the first start reaches.
    pub backfill_hours: u32,
    /// Extra TOML lines for the tenant table.
    pub extra: String,
}

impl TenantSpec {
    /// A client-secret tenant collecting `content_types`, with a 24 h backfill.
    pub fn with_secret(
        name: &str,
        tenant_id: &str,
        client_id: &str,
        secret: &str,
        content_types: &[&str],
    ) -> Self {
        TenantSpec {
            name: name.into(),
            tenant_id: tenant_id.into(),
            client_id: client_id.into(),
            secret: Some(secret.into()),
            certificate: None,
            content_types: content_types.iter().map(|s| s.to_string()).collect(),
            backfill_hours: 24,
            extra: String::new(),
        }
    }
}

/// All five content types (the agent's own list).
pub use sensor_core::CONTENT_TYPES as ALL_CONTENT_TYPES;

/// Writes a sensor configuration in `dir/sensor.toml` pointing at `sim` and `rx`.
pub fn write_config(
    dir: &Path,
    sim: &Sim,
    rx: &Receiver,
    tenants: &[TenantSpec],
    extra_backend: &str,
    extra_top: &str,
) -> Result<PathBuf> {
    let linger = if extra_backend.contains("batch_linger_ms") {
        ""
    } else {
        "batch_linger_ms = 200"
    };
    let mut t = format!(
        "state_dir = \"{}\"\n{extra_top}\n[backend]\nurl = \"{}\"\ntoken_file = \"{}\"\nca_file = \"{}\"\n{linger}\n{extra_backend}\n",
        dir.join("state").display(),
        rx.url,
        rx.token_file.display(),
        rx.ca_file.display()
    );
    for s in tenants {
        let cred = match (&s.secret, &s.certificate) {
            (Some(secret), _) => {
                let f = dir.join(format!("{}.secret", s.name));
                std::fs::write(&f, secret)?;
                set_mode(&f, 0o600)?;
                format!("client_secret_file = \"{}\"", f.display())
            }
            (None, Some((c, k))) => format!(
                "certificate_file = \"{}\"\nprivate_key_file = \"{}\"",
                c.display(),
                k.display()
            ),
            (None, None) => bail!("tenant {} has no credential", s.name),
        };
        let cts: Vec<String> = s.content_types.iter().map(|c| format!("\"{c}\"")).collect();
        t.push_str(&format!(
            "\n[[tenant]]\nname = \"{}\"\ntenant_id = \"{}\"\nclient_id = \"{}\"\n{cred}\ncloud = \"commercial\"\ncontent_types = [{}]\nbackfill_hours = {}\npoll_interval_secs = 1\nlogin_url = \"{}\"\napi_url = \"{}\"\nca_file = \"{}\"\nrequest_timeout_secs = 5\n{}\n",
            s.name,
            s.tenant_id,
            s.client_id,
            cts.join(", "),
            s.backfill_hours,
            sim.url,
            sim.url,
            sim.ca_file.display(),
            s.extra
        ));
    }
    let p = dir.join("sensor.toml");
    std::fs::write(&p, t)?;
    Ok(p)
}

/// Starts `m365-sensor run --allow-root --config <config>` (tests run as root without the service user); its stderr goes to `dir/sensor-<n>.log`.
pub fn start_sensor(dir: &Path, config: &Path, n: usize) -> Result<Proc> {
    start_sensor_with_env(dir, config, n, &[])
}

/// [`start_sensor`] with extra environment variables.
pub fn start_sensor_with_env(
    dir: &Path,
    config: &Path,
    n: usize,
    env: &[(&str, &str)],
) -> Result<Proc> {
    Proc::spawn(
        Command::new(bin("m365-sensor")?)
            .args(["run", "--allow-root", "--config"])
            .arg(config)
            .env("M365_SENSOR_LOG", "info")
            .envs(env.iter().copied()),
        dir.join(format!("sensor-{n}.log")),
    )
}

/// Reads the sensor's status document.
pub fn sensor_status(dir: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(dir.join("state/status.json")).ok()?).ok()
}

/// Ground-truth comparison of one run: every expected record delivered exactly once, byte-identical to a
/// variant Microsoft served, and nothing delivered that was not served.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Expected records.
    pub expected: usize,
    /// Delivered distinct records.
    pub delivered: usize,
    /// Expected but not delivered.
    pub missing: Vec<String>,
    /// Delivered more than once.
    pub duplicated: Vec<String>,
    /// Delivered bytes matching no served variant.
    pub altered: Vec<String>,
    /// Delivered but never served.
    pub invented: Vec<String>,
}

impl Verdict {
    /// Whether the run was perfect.
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty()
            && self.duplicated.is_empty()
            && self.altered.is_empty()
            && self.invented.is_empty()
    }
}

/// Compares the simulator's ground truth with what the receiver stored.
pub fn verdict(sim_truth: &Value, rx_truth: &Value) -> Verdict {
    use std::collections::{HashMap, HashSet};
    let mut expected: HashMap<String, HashSet<String>> = HashMap::new();
    let mut undeliverable: HashSet<String> = HashSet::new();
    if let Some(tenants) = sim_truth["tenants"].as_object() {
        for (tid, t) in tenants {
            if let Some(ids) = t["expected"].as_object() {
                for (id, shas) in ids {
                    let variants = shas
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    expected.insert(format!("{tid}/{id}"), variants);
                }
            }
            for id in t["undeliverable_ids"].as_array().into_iter().flatten() {
                if let Some(id) = id.as_str() {
                    undeliverable.insert(format!("{tid}/{id}"));
                }
            }
        }
    }
    let mut v = Verdict {
        expected: expected.len(),
        ..Verdict::default()
    };
    let empty = serde_json::Map::new();
    let records = rx_truth["records"].as_object().unwrap_or(&empty);
    v.delivered = records.len();
    for (key, r) in records {
        match expected.get(key) {
            None => v.invented.push(key.clone()),
            Some(variants) => {
                if r["deliveries"].as_u64().unwrap_or(0) > 1 {
                    v.duplicated.push(key.clone());
                }
                let shas = r["sha256"].as_array().cloned().unwrap_or_default();
                if shas
                    .iter()
                    .any(|s| !s.as_str().is_some_and(|s| variants.contains(s)))
                {
                    v.altered.push(key.clone());
                }
            }
        }
    }
    for key in expected.keys() {
        if !records.contains_key(key) {
            v.missing.push(key.clone());
        }
    }
    let _ = undeliverable;
    v
}

/// Waits until the receiver holds every record the simulator expects (or `timeout`), then returns the
/// verdict.
pub fn wait_for_delivery(sim: &Sim, rx: &Receiver, timeout: Duration) -> Result<Verdict> {
    let deadline = Instant::now() + timeout;
    loop {
        let v = verdict(&sim.truth()?, &rx.truth()?);
        if v.missing.is_empty() && v.expected > 0 {
            // Let in-flight retries and late duplicates land before judging.
            std::thread::sleep(Duration::from_secs(3));
            return Ok(verdict(&sim.truth()?, &rx.truth()?));
        }
        if Instant::now() > deadline {
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A one-line summary of a verdict for assertion messages.
pub fn describe(v: &Verdict) -> String {
    let few = |l: &Vec<String>| l.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    format!(
        "expected {}, delivered {}; missing {} [{}], duplicated {} [{}], altered {} [{}], invented {} [{}]",
        v.expected, v.delivered, v.missing.len(), few(&v.missing), v.duplicated.len(), few(&v.duplicated),
        v.altered.len(), few(&v.altered), v.invented.len(), few(&v.invented)
    )
}

/// A simulator `[[tenant]]` accepting `secret`, collecting `content_types`, followed by `body` (more
/// scenario lines: history, faults, ...).
pub fn sim_tenant(
    tenant_id: &str,
    client_id: &str,
    secret: &str,
    content_types: &[&str],
    body: &str,
) -> String {
    let cts: Vec<String> = content_types.iter().map(|c| format!("\"{c}\"")).collect();
    format!(
        "[[tenant]]\ntenant_id = \"{tenant_id}\"\nclient_id = \"{client_id}\"\nclient_secrets = [\"{secret}\"]\ncontent_types = [{}]\n{body}\n\n",
        cts.join(", ")
    )
}

/// The rig most black-box tests need: a temporary directory, the simulator with one tenant, the
/// receiver, and a sensor configuration naming that tenant. The sensor itself is started by the test.
pub struct Rig {
    /// The test's directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// The simulator.
    pub sim: Sim,
    /// The receiver.
    pub rx: Receiver,
    /// The sensor's configuration file.
    pub config: PathBuf,
}

impl Rig {
    /// Starts the rig for one tenant `name` with the secret `s`; `sim_body` adds scenario lines and
    /// `extra_backend` lines to the sensor's `[backend]`.
    pub fn one_tenant(
        name: &str,
        tenant_id: &str,
        client_id: &str,
        content_types: &[&str],
        sim_body: &str,
        extra_backend: &str,
    ) -> Result<Rig> {
        let dir = tempfile::tempdir()?;
        let sim = Sim::start(
            dir.path(),
            &sim_tenant(tenant_id, client_id, "s", content_types, sim_body),
        )?;
        let rx = Receiver::start(dir.path())?;
        let tenant = TenantSpec::with_secret(name, tenant_id, client_id, "s", content_types);
        let config = write_config(dir.path(), &sim, &rx, &[tenant], extra_backend, "")?;
        Ok(Rig {
            dir,
            sim,
            rx,
            config,
        })
    }

    /// Starts the sensor on the rig's configuration (log `sensor-<n>.log`).
    pub fn start_sensor(&self, n: usize) -> Result<Proc> {
        start_sensor(self.dir.path(), &self.config, n)
    }

    /// The sensor's status document.
    pub fn status(&self) -> Option<Value> {
        sensor_status(self.dir.path())
    }
}

/// Resident memory (VmRSS, bytes) and CPU seconds (utime + stime) of process `pid`, from `/proc`; `None`
/// once it is gone.
pub fn proc_sample(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Some((rss_kb * 1024, ticks / hz))
}

/// Bytes as MiB, for printing.
pub fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// The history every generated tenant of a benchmark gets from the simulator.
pub struct GeneratedHistory {
    /// Hours of history (also the sensor's `backfill_hours`).
    pub hours: u32,
    /// Blobs per hour and content type.
    pub blobs_per_hour: u32,
    /// Records per blob.
    pub records_per_blob: u64,
    /// Content entries per listing page.
    pub page_size: u32,
}

/// The tenant id of generated tenant `i` (`t<i>`).
pub fn generated_tenant_id(i: u32) -> String {
    format!("00000000-0000-4000-8000-{i:012}")
}

/// The rig of the end-to-end benchmarks in `d`: a simulator serving `tenants` generated tenants `t1..tN`
/// (every content type, history `h`, one shared secret), a receiver, and the sensor's configuration
/// naming them all (poll every 30 s, `request_timeout_secs`, `backend_toml` lines in `[backend]`,
/// `spool_toml` lines in `[spool]` after an 8 MiB cache). Returns the simulator, the receiver and the
/// configuration's path.
pub fn generated_tenants_rig(
    d: &Path,
    tenants: u32,
    h: &GeneratedHistory,
    request_timeout_secs: u64,
    backend_toml: &str,
    spool_toml: &str,
) -> Result<(Sim, Receiver, PathBuf)> {
    let cts: Vec<String> = ALL_CONTENT_TYPES
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect();
    let cts = cts.join(", ");
    let scenario = format!(
        "generation = false\n[generate_tenants]\ncount = {tenants}\nsecret = \"bench-secret\"\n[generate_tenants.template]\ncontent_types = [{cts}]\nhistory_hours = {}\nhistory_blobs_per_hour = {}\nrecords_per_blob = {}\npage_size = {}\n",
        h.hours, h.blobs_per_hour, h.records_per_blob, h.page_size
    );
    let sim = Sim::start(d, &scenario)?;
    let rx = Receiver::start(d)?;
    let secret = d.join("bench.secret");
    std::fs::write(&secret, "bench-secret")?;
    set_mode(&secret, 0o600)?;
    let mut cfg = format!(
        "state_dir = \"{}\"\n[management]\nheartbeat_secs = 60\n[backend]\nurl = \"{}\"\ntoken_file = \"{}\"\nca_file = \"{}\"\n{backend_toml}\n[spool]\ncache_bytes = 8388608\n{spool_toml}\n",
        d.join("state").display(),
        rx.url,
        rx.token_file.display(),
        rx.ca_file.display()
    );
    for i in 1..=tenants {
        cfg.push_str(&format!(
            "[[tenant]]\nname = \"t{i}\"\ntenant_id = \"{}\"\nclient_id = \"00000000-0000-4000-9000-{i:012}\"\nclient_secret_file = \"{}\"\ncontent_types = [{cts}]\nbackfill_hours = {}\npoll_interval_secs = 30\nlogin_url = \"{}\"\napi_url = \"{}\"\nca_file = \"{}\"\nrequest_timeout_secs = {request_timeout_secs}\n",
            generated_tenant_id(i),
            secret.display(),
            h.hours,
            sim.url,
            sim.url,
            sim.ca_file.display()
        ));
    }
    let config = d.join("sensor.toml");
    std::fs::write(&config, cfg)?;
    Ok((sim, rx, config))
}

/// Prints the bytes on the wire per delivered record (from the receiver's `summary`) and the verdict:
/// the last lines of an end-to-end benchmark.
pub fn print_wire_and_verdict(summary: &Value, v: &Verdict) {
    let delivered = v.delivered.max(1) as f64;
    println!(
        "  wire bytes per record:        {:.0} (compressed), {:.0} (uncompressed)",
        summary["bytes_compressed"].as_f64().unwrap_or(0.0) / delivered,
        summary["bytes_decompressed"].as_f64().unwrap_or(0.0) / delivered
    );
    println!(
        "  verdict: {}",
        if v.is_exact() {
            "exact".to_string()
        } else {
            describe(v)
        }
    );
}

/// The number in environment variable `name` (a benchmark's size knob), else `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

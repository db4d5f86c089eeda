//! Real backup targets for host tests, each run inside a network namespace of its own: an
//! S3-compatible object store ([`S3Server`], Garage) and an sftp server ([`SftpServer`], Debian's
//! OpenSSH `sshd` with `internal-sftp`). Agents reach them over the test topology with restic, as
//! they would reach a NAS or an object store in production.
//!
//! Both keep their configuration, keys and log in a directory of their own (printed and kept when
//! the test panics), keep their data where the test says (so a test can look at or damage what is
//! stored), and can be [stopped](S3Server::stop) and [started](S3Server::start_again) again with
//! the same data, as a target that goes down and comes back.
//!
//! Each `start` returns [`Missing`] (in its error chain) when the program is not installed, so a
//! test `require!`s it and skips or fails by the one rule; `scripts/deps` installs them.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use shoal_testkit::cmd::run;
use shoal_testkit::skip::{self, Missing};
use tempfile::TempDir;

use crate::netns::{self, Netns};
use crate::process::{dump_logs, Proc, ProcSpec};
use crate::wait::eventually;

/// How long a server may take to answer on its port after (re)starting.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// restic, the backup client the agents run: its path, or [`Missing`] (Debian package `restic`).
pub fn restic() -> Result<PathBuf, Missing> {
    skip::tool("restic", "restic")
}

/// Waits until `addr` accepts TCP connections from inside namespace `ns`, or `proc` exits.
fn wait_listening(ns: &str, proc: &mut Proc, addr: SocketAddr) -> Result<()> {
    eventually(
        START_TIMEOUT,
        &format!("{} to listen on {addr}", proc.name()),
        || {
            if let Err(e) = proc.ensure_running() {
                return Err(crate::abort(format!("{e:#}")));
            }
            netns::enter(ns, || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(500))
            })??;
            Ok(())
        },
    )
    .map(drop)
}

/// A state directory that is kept (and the logs in it printed) when the test panics.
#[derive(Debug)]
struct StateDir {
    dir: Option<TempDir>,
    what: &'static str,
}

impl StateDir {
    fn new(what: &'static str) -> Result<StateDir> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("shoal-{what}-"))
            .tempdir()
            .context("tempdir")?;
        Ok(StateDir {
            dir: Some(dir),
            what,
        })
    }

    fn path(&self) -> &Path {
        self.dir
            .as_ref()
            .map_or(Path::new("/nonexistent"), TempDir::path)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let path = dir.keep();
                eprintln!(
                    "[shoal-tests] {} files kept in {}",
                    self.what,
                    path.display()
                );
            }
        }
    }
}

/// Prints `proc`'s log if the thread is panicking (the server is being dropped by a failed test).
fn dump_if_panicking(proc: &Proc) {
    if std::thread::panicking() {
        dump_logs([(proc.name(), proc.log_path())]);
    }
}

// ---- sftp ----------------------------------------------------------------------------------------

/// The sftp server: `/usr/sbin/sshd -D -e -f <generated config>` in a namespace, with a host key
/// and one client key of its own (root may log in with that key only), serving `internal-sftp`.
#[derive(Debug)]
pub struct SftpServer {
    proc: Proc,
    ns: String,
    addr: Ipv4Addr,
    port: u16,
    root: PathBuf,
    client_key: Vec<u8>,
    known_hosts: String,
    // Last: kept on panic after the process is gone.
    state: StateDir,
}

impl SftpServer {
    /// Starts sshd in `ns` on `addr`:22, serving files under `root` (created if missing). Its
    /// error chain holds [`Missing`] when sshd or ssh-keygen is not installed.
    pub fn start(ns: &Netns, addr: Ipv4Addr, root: &Path) -> Result<SftpServer> {
        Self::start_on(ns, addr, 22, root)
    }

    /// [`SftpServer::start`] on another port.
    pub fn start_on(ns: &Netns, addr: Ipv4Addr, port: u16, root: &Path) -> Result<SftpServer> {
        let sshd = skip::tool("sshd", "openssh-server")?;
        let keygen = skip::tool("ssh-keygen", "openssh-client")?;
        let state = StateDir::new("sftp")?;
        let dir = state.path();
        std::fs::create_dir_all(root)
            .with_context(|| format!("cannot create {}", root.display()))?;
        for key in ["host_key", "client_key"] {
            run(Command::new(&keygen)
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "shoal-test", "-f"])
                .arg(dir.join(key)))?;
        }
        let host_pub = std::fs::read_to_string(dir.join("host_key.pub"))?;
        let mut fields = host_pub.split_whitespace();
        let (Some(kind), Some(key)) = (fields.next(), fields.next()) else {
            bail!("unexpected host key {host_pub:?}");
        };
        let host = if port == 22 {
            addr.to_string()
        } else {
            format!("[{addr}]:{port}")
        };
        let known_hosts = format!("{host} {kind} {key}\n");
        let client_key = std::fs::read(dir.join("client_key"))?;
        let mut config = String::new();
        let d = dir.display();
        writeln!(config, "ListenAddress {addr}:{port}")?;
        writeln!(config, "HostKey {d}/host_key")?;
        writeln!(config, "AuthorizedKeysFile {d}/client_key.pub")?;
        for line in [
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            // The state directory is a tempdir owned by root with mode 0700; sshd would otherwise
            // check every path up to it.
            "StrictModes no",
            "Subsystem sftp internal-sftp",
            "PidFile none",
        ] {
            writeln!(config, "{line}")?;
        }
        std::fs::write(dir.join("sshd_config"), config)?;
        // sshd's privilege separation directory (Debian creates it in its unit file).
        std::fs::create_dir_all("/run/sshd").context("cannot create /run/sshd")?;
        let proc = ProcSpec::new("sshd", &sshd, dir)
            .netns(ns.name())
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .spawn()?;
        let mut server = SftpServer {
            proc,
            ns: ns.name().to_string(),
            addr,
            port,
            root: root.to_path_buf(),
            client_key,
            known_hosts,
            state,
        };
        server.wait()?;
        Ok(server)
    }

    fn wait(&mut self) -> Result<()> {
        let addr = self.addr();
        wait_listening(&self.ns, &mut self.proc, addr)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.addr, self.port))
    }

    /// The directory it serves (the `root` it was started with).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// restic's repository URL for `path` (absolute, under [`SftpServer::root`]):
    /// `sftp:root@ADDR:/path` on port 22, `sftp://root@ADDR:PORT//path` otherwise. With
    /// [`SftpServer::restic_options`] restic runs ssh by the command given there, so the host in
    /// the URL is informational; the path is what counts.
    pub fn url(&self, path: &Path) -> String {
        if self.port == 22 {
            format!("sftp:root@{}:{}", self.addr, path.display())
        } else {
            format!("sftp://root@{}:{}/{}", self.addr, self.port, path.display())
        }
    }

    /// The client's private key (OpenSSH format), as an agent receives it as a secret.
    pub fn client_key(&self) -> &[u8] {
        &self.client_key
    }

    /// The `known_hosts` line of the server's host key (`ADDR ssh-ed25519 AAAA…`, or
    /// `[ADDR]:PORT …` on another port than 22), newline-terminated.
    pub fn known_hosts(&self) -> &str {
        &self.known_hosts
    }

    /// restic's `-o` options for reaching this server with the client key at `key_path` (mode
    /// 0600) and the [`known_hosts`](SftpServer::known_hosts) line at `known_hosts_path`:
    /// `["sftp.command=ssh -i KEY -o UserKnownHostsFile=KH -o StrictHostKeyChecking=yes
    /// -o BatchMode=yes [-p PORT] root@ADDR -s sftp"]`. restic splits the command at spaces
    /// (honouring quotes), so the paths must not contain spaces.
    pub fn restic_options(&self, key_path: &Path, known_hosts_path: &Path) -> Vec<String> {
        let port = if self.port == 22 {
            String::new()
        } else {
            format!("-p {} ", self.port)
        };
        vec![format!(
            "sftp.command=ssh -i {} -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes \
             -o BatchMode=yes {port}root@{} -s sftp",
            key_path.display(),
            known_hosts_path.display(),
            self.addr
        )]
    }

    /// Writes the client key and known_hosts line into `dir` (key mode 0600) and returns
    /// [`SftpServer::restic_options`] for them: what an agent does with the secret it receives.
    pub fn write_client_files(&self, dir: &Path) -> Result<Vec<String>> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        let key = dir.join("sftp_key");
        std::fs::write(&key, &self.client_key)?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        let kh = dir.join("known_hosts");
        std::fs::write(&kh, &self.known_hosts)?;
        Ok(self.restic_options(&key, &kh))
    }

    /// Stops the server (SIGTERM, then SIGKILL): new connections are refused. Sessions already
    /// open keep their own sshd process until they end.
    pub fn stop(&mut self) -> Result<()> {
        self.proc.stop(Duration::from_secs(5)).map(drop)
    }

    /// Starts it again after [`SftpServer::stop`], with the same keys, and waits until it listens.
    pub fn start_again(&mut self) -> Result<()> {
        self.proc.restart()?;
        self.wait()
    }

    /// Its log (`sshd -e`: connections, authentication, errors).
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// Where its configuration, keys and log are.
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }
}

impl Drop for SftpServer {
    fn drop(&mut self) {
        dump_if_panicking(&self.proc);
    }
}

// ---- S3 ------------------------------------------------------------------------------------------

/// The port the S3 API listens on.
pub const S3_PORT: u16 = 3900;

/// The region the S3 server names (restic asks for it; any name works when client and server
/// agree, and restic's default is this one).
pub const S3_REGION: &str = "us-east-1";

/// How to install the S3 server ([`S3Server`]): not packaged by Debian.
pub const GARAGE_INSTALL: &str = "scripts/deps (cargo install garage@2.5.0 --locked --no-default-features --features lmdb,system-libs, with libsodium-dev, libzstd-dev and pkg-config)";

/// The S3-compatible object store: [Garage](https://garagehq.deuxfleurs.fr/) as a single node with
/// replication factor 1, in a namespace, with one access key that may create buckets (so restic's
/// `init` creates the bucket it is pointed at).
///
/// Garage stores objects as content-addressed blocks under [`S3Server::data_dir`] (`xx/yy/HASH`,
/// uncompressed here), and their keys and metadata in its own metadata directory; damaging a block
/// file makes reads of the objects that hold it fail their checksum.
#[derive(Debug)]
pub struct S3Server {
    proc: Proc,
    garage: PathBuf,
    config: PathBuf,
    ns: String,
    addr: Ipv4Addr,
    data_dir: PathBuf,
    access_key: String,
    secret_key: String,
    state: StateDir,
}

/// `n` random bytes as lower-case hex.
fn random_hex(n: usize) -> Result<String> {
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("cannot read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl S3Server {
    /// Starts the object store in `ns`, its S3 API on `addr`:[`S3_PORT`], its blocks under
    /// `data_dir` (created if missing), and waits until its access key works. Its error chain holds
    /// [`Missing`] when `garage` or `curl` is not installed.
    pub fn start(ns: &Netns, addr: Ipv4Addr, data_dir: &Path) -> Result<S3Server> {
        let garage = skip::find_program("garage").ok_or_else(|| {
            Missing::new(format!(
                "`garage` (the S3 server of the backup tests) is missing ({GARAGE_INSTALL}); \
                 run scripts/deps"
            ))
        })?;
        skip::tool("curl", "curl")?;
        let state = StateDir::new("s3")?;
        let dir = state.path();
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create {}", data_dir.display()))?;
        let config = dir.join("garage.toml");
        // RPC stays on the namespace's loopback: a single node talks only to itself (and to the
        // CLI run in the same namespace).
        let text = format!(
            r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "lmdb"
replication_factor = 1
compression_level = "none"
rpc_bind_addr = "127.0.0.1:3901"
rpc_public_addr = "127.0.0.1:3901"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{S3_REGION}"
api_bind_addr = "{addr}:{S3_PORT}"
root_domain = ".s3.shoal.test"
"#,
            meta = dir.join("meta").display(),
            data = data_dir.display(),
            secret = random_hex(32)?,
        );
        std::fs::write(&config, text)?;
        let proc = ProcSpec::new("garage", &garage, dir)
            .netns(ns.name())
            .env("RUST_LOG", "garage=info")
            .arg("-c")
            .arg(&config)
            .arg("server")
            .spawn()?;
        let mut server = S3Server {
            proc,
            garage,
            config,
            ns: ns.name().to_string(),
            addr,
            data_dir: data_dir.to_path_buf(),
            // Garage's formats: "GK" and 12 bytes of hex, and 32 bytes of hex.
            access_key: format!("GK{}", random_hex(12)?),
            secret_key: random_hex(32)?,
            state,
        };
        server.set_up()?;
        server.wait_ready()?;
        Ok(server)
    }

    /// `garage -c CONFIG ARGS…` in the server's namespace; its stdout.
    fn cli(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(&self.garage)
            .arg("-c")
            .arg(&self.config)
            .args(args);
        let out = crate::process::output_with_timeout(&mut cmd, Duration::from_secs(20))?;
        shoal_testkit::cmd::check(&format!("garage {}", args.join(" ")), &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// First start: the cluster layout (this node alone) and the access key.
    fn set_up(&mut self) -> Result<()> {
        let node = eventually(START_TIMEOUT, "garage to answer `node id`", || {
            if let Err(e) = self.proc.ensure_running() {
                return Err(crate::abort(format!("{e:#}")));
            }
            self.cli(&["node", "id", "-q"])
        })?;
        let id = node
            .trim()
            .split('@')
            .next()
            .filter(|id| !id.is_empty())
            .ok_or_else(|| anyhow!("unexpected `garage node id` output {node:?}"))?
            .to_string();
        // `node id` may answer from the key on disk before the server takes RPC calls.
        eventually(START_TIMEOUT, "garage to take the layout", || {
            self.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &id])
        })?;
        self.cli(&["layout", "apply", "--version", "1"])?;
        // Writing the key needs the layout to be in force.
        eventually(START_TIMEOUT, "garage to import the access key", || {
            match self.cli(&[
                "key",
                "import",
                "--yes",
                "-n",
                "shoal-tests",
                &self.access_key,
                &self.secret_key,
            ]) {
                // An earlier attempt that timed out on our side may have gone through.
                Err(e) if format!("{e:#}").contains("already exists") => Ok(String::new()),
                r => r,
            }
        })?;
        self.cli(&["key", "allow", "--create-bucket", &self.access_key])?;
        Ok(())
    }

    /// Waits until the S3 API answers a signed request (ListBuckets) with success.
    fn wait_ready(&mut self) -> Result<()> {
        let addr = SocketAddr::from((self.addr, S3_PORT));
        wait_listening(&self.ns, &mut self.proc, addr)?;
        let user = format!("{}:{}", self.access_key, self.secret_key);
        let url = format!("http://{addr}/");
        let ns = self.ns.clone();
        eventually(START_TIMEOUT, "the S3 API to accept the access key", || {
            if let Err(e) = self.proc.ensure_running() {
                return Err(crate::abort(format!("{e:#}")));
            }
            netns::run_in(
                &ns,
                "curl",
                &[
                    "-sS",
                    "--fail-with-body",
                    // S3 wants the body's hash; this is the SHA-256 of nothing.
                    "-H",
                    "x-amz-content-sha256: \
                     e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                    "--aws-sigv4",
                    &format!("aws:amz:{S3_REGION}:s3"),
                    "--user",
                    &user,
                    &url,
                ],
                Duration::from_secs(5),
            )
        })
        .map(drop)
    }

    /// restic's repository URL for `bucket`, which may go on with a path inside it
    /// (`backups/node-1`): `s3:http://ADDR:3900/BUCKET[/PATH]`. restic's `init` creates the bucket.
    pub fn url(&self, bucket: &str) -> String {
        format!(
            "s3:http://{}:{S3_PORT}/{}",
            self.addr,
            bucket.trim_matches('/')
        )
    }

    /// The environment restic needs besides the URL: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
        ]
    }

    /// Where the S3 API listens.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.addr, S3_PORT))
    }

    /// Where the object data lives (Garage's data blocks).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Stops the server (SIGTERM, then SIGKILL after 5 s): requests get "connection refused".
    pub fn stop(&mut self) -> Result<()> {
        self.proc.stop(Duration::from_secs(5)).map(drop)
    }

    /// Starts it again after [`S3Server::stop`], with its data, key and buckets, and waits until
    /// the key works.
    pub fn start_again(&mut self) -> Result<()> {
        self.proc.restart()?;
        self.wait_ready()
    }

    /// Its log.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// Where its configuration, metadata and log are.
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        dump_if_panicking(&self.proc);
    }
}

// ---- the client ----------------------------------------------------------------------------------

/// restic as a test runs it to look at a repository: inside a namespace (a host of the topology),
/// with the repository, password, environment and `-o` options of one target.
#[derive(Debug, Clone)]
pub struct Restic {
    program: PathBuf,
    ns: String,
    repo: String,
    env: Vec<(String, String)>,
    options: Vec<String>,
    cache_dir: PathBuf,
}

/// How long one restic command may run.
pub const RESTIC_TIMEOUT: Duration = Duration::from_secs(60);

impl Restic {
    /// restic in namespace `ns` for repository `repo` with password `password`; its cache under
    /// `cache_dir`. [`Missing`] when restic is not installed.
    pub fn new(
        ns: &Netns,
        repo: &str,
        password: &str,
        cache_dir: &Path,
    ) -> Result<Restic, Missing> {
        Ok(Restic {
            program: restic()?,
            ns: ns.name().to_string(),
            repo: repo.to_string(),
            env: vec![("RESTIC_PASSWORD".into(), password.into())],
            options: Vec::new(),
            cache_dir: cache_dir.to_path_buf(),
        })
    }

    /// Adds environment variables (e.g. [`S3Server::env`]).
    pub fn envs(mut self, env: impl IntoIterator<Item = (String, String)>) -> Self {
        self.env.extend(env);
        self
    }

    /// Adds `-o` options (e.g. [`SftpServer::restic_options`]).
    pub fn options(mut self, options: impl IntoIterator<Item = String>) -> Self {
        self.options.extend(options);
        self
    }

    /// The repository URL.
    pub fn repo(&self) -> &str {
        &self.repo
    }

    /// Runs `restic -r REPO [-o …] ARGS…`; its output, whatever the exit status.
    pub fn output(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(&self.program)
            .arg("-r")
            .arg(&self.repo)
            .arg("--cache-dir")
            .arg(&self.cache_dir);
        for o in &self.options {
            cmd.arg("-o").arg(o);
        }
        cmd.args(args).envs(self.env.iter().map(|(k, v)| (k, v)));
        crate::process::output_with_timeout(&mut cmd, RESTIC_TIMEOUT)
    }

    /// Runs `restic ARGS…`; its stdout, or an error with its stderr unless it exits 0.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.output(args)?;
        shoal_testkit::cmd::check(&format!("restic {} on {}", args.join(" "), self.repo), &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `restic snapshots --json`, parsed.
    pub fn snapshots(&self) -> Result<Vec<serde_json::Value>> {
        let text = self.run(&["snapshots", "--json"])?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("snapshots JSON: {text}"))?;
        v.as_array()
            .cloned()
            .ok_or_else(|| anyhow!("snapshots JSON is not an array: {text}"))
    }
}

//! A real `bitcoind -regtest` on free ports in a temporary directory, driven with
//! `bitcoin-cli`. Killed on drop — also when a test panics — and, through
//! `PR_SET_PDEATHSIG`, when the process that started it dies without unwinding.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::HarnessError;

pub struct Bitcoind {
    child: Child,
    /// PDEATHSIG fires when the *thread* that forked the child exits, so the child is
    /// spawned from this thread, which lives exactly as long as `Bitcoind`.
    _keeper: std::sync::mpsc::Sender<()>,
    cli: PathBuf,
    pub rpc_port: u16,
    pub rpc_user: String,
    pub rpc_password: String,
    pub datadir: tempfile::TempDir,
}

/// Where the setup script caches its build (see scripts/setup-bitcoind.sh).
pub fn cached_bitcoind() -> PathBuf {
    let cache = std::env::var_os("SATSTREAM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/satstream")
        });
    cache.join("bitcoind-kernel-0.4.1/bin/bitcoind")
}

/// `BITCOIND_EXE`, else the cached build.
pub fn find_bitcoind() -> Result<PathBuf, HarnessError> {
    let exe = std::env::var_os("BITCOIND_EXE")
        .map(PathBuf::from)
        .unwrap_or_else(cached_bitcoind);
    if exe.is_file() {
        Ok(exe)
    } else {
        Err(HarnessError::Setup(format!(
            "no bitcoind at {}: run scripts/setup-bitcoind.sh (or set BITCOIND_EXE)",
            exe.display()
        )))
    }
}

/// A free loopback port for a listener we start next.
///
/// Not `bind(:0)`: that hands out ports from the ephemeral range, which is also where every
/// outgoing connection takes its local port. With several nodes polling bitcoind's RPC, one
/// of those connections can grab the port before our listener binds it (seen in CI as
/// bitcoind's "Unable to start HTTP server"). So we pick a random port below the ephemeral
/// range that is free right now; only another listener picking the same port could race us,
/// and `Bitcoind::start` retries when that happens.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (base, span) = if low > 12_000 {
        (10_000u16, low - 10_000)
    } else {
        // An unusual range: fall back to the OS's choice.
        return bind_any();
    };
    for _ in 0..200 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = base + (h.finish() % u64::from(span)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    bind_any()
}

fn bind_any() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on loopback")
}

impl Bitcoind {
    /// Starts on RPC port `rpc_port`, or (None) on a free one.
    pub fn start(rpc_port: Option<u16>) -> Result<Bitcoind, HarnessError> {
        if let Some(port) = rpc_port {
            return Self::start_once(port).map_err(|e| match e {
                HarnessError::Setup(e) if e.contains("Unable to start HTTP server") => {
                    HarnessError::Setup(format!(
                        "bitcoind cannot listen on RPC port {port}: is another bitcoind running? ({e})"
                    ))
                }
                e => e,
            });
        }
        // A port picked by `free_port` can still be taken by another listener before
        // bitcoind binds it; that is the one start failure worth another try.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once(free_port()) {
                Err(HarnessError::Setup(e))
                    if attempt < 5 && e.contains("Unable to start HTTP server") =>
                {
                    tracing::warn!(
                        attempt,
                        "bitcoind could not bind its RPC port; retrying on another"
                    );
                }
                r => return r,
            }
        }
    }

    fn start_once(rpc_port: u16) -> Result<Bitcoind, HarnessError> {
        let exe = find_bitcoind()?;
        let cli = exe.with_file_name("bitcoin-cli");
        let datadir = tempfile::Builder::new()
            .prefix("satstream-bitcoind-")
            .tempdir()
            .map_err(|e| HarnessError::Setup(format!("temp dir: {e}")))?;
        let p2p_port = free_port();
        let mut cmd = Command::new(&exe);
        cmd.arg("-regtest")
            .arg(format!("-datadir={}", datadir.path().display()))
            .arg(format!("-rpcport={rpc_port}"))
            .arg(format!("-port={p2p_port}"))
            .args([
                "-rpcuser=satstream",
                "-rpcpassword=satstream",
                "-rpcbind=127.0.0.1",
                "-rpcallowip=127.0.0.1",
                "-listen=0",
                "-listenonion=0",
                "-txindex=0",
                "-fallbackfee=0.0002",
                "-server=1",
                "-printtoconsole=0",
                "-rpcworkqueue=64",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let (child, keeper) = spawn_kept(cmd, "bitcoind-keeper")
            .map_err(|e| HarnessError::Setup(format!("starting {}: {e}", exe.display())))?;
        let mut b = Bitcoind {
            child,
            _keeper: keeper,
            cli,
            rpc_port,
            rpc_user: "satstream".into(),
            rpc_password: "satstream".into(),
            datadir,
        };
        b.wait_ready()?;
        Ok(b)
    }

    fn wait_ready(&mut self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return Err(HarnessError::Setup(format!(
                    "bitcoind exited ({status}) at start: {err}"
                )));
            }
            if self.cli(&["getblockchaininfo"]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout("bitcoind RPC to come up"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs one bitcoin-cli command; returns its trimmed stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String, HarnessError> {
        let out = Command::new(&self.cli)
            .arg("-regtest")
            .arg(format!("-datadir={}", self.datadir.path().display()))
            .arg(format!("-rpcport={}", self.rpc_port))
            .arg(format!("-rpcuser={}", self.rpc_user))
            .arg(format!("-rpcpassword={}", self.rpc_password))
            .args(args)
            .output()
            .map_err(|e| HarnessError::Setup(format!("bitcoin-cli: {e}")))?;
        if !out.status.success() {
            return Err(HarnessError::Bitcoind(format!(
                "bitcoin-cli {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub fn height(&self) -> Result<u32, HarnessError> {
        self.cli(&["getblockcount"])?
            .parse()
            .map_err(|e| HarnessError::Bitcoind(format!("getblockcount: {e}")))
    }

    /// Mines `n` blocks paying to `address`; returns the new height.
    pub fn mine_to(&self, n: u32, address: &str) -> Result<u32, HarnessError> {
        self.cli(&["generatetoaddress", &n.to_string(), address])?;
        self.height()
    }

    pub fn mempool_len(&self) -> Result<usize, HarnessError> {
        let v: serde_json::Value = serde_json::from_str(&self.cli(&["getrawmempool"])?)
            .map_err(|e| HarnessError::Bitcoind(format!("getrawmempool: {e}")))?;
        Ok(v.as_array().map(|a| a.len()).unwrap_or(0))
    }

    pub fn datadir(&self) -> &Path {
        self.datadir.path()
    }
}

impl Drop for Bitcoind {
    fn drop(&mut self) {
        // SIGTERM lets it flush; it is a throwaway chain, so do not wait long.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` from a keeper thread that lives until the returned sender is dropped, with
/// PDEATHSIG set: the child is SIGKILLed when that thread (or the whole test process) dies.
pub(crate) fn spawn_kept(
    mut cmd: Command,
    name: &str,
) -> std::io::Result<(Child, std::sync::mpsc::Sender<()>)> {
    die_with_parent(&mut cmd);
    let (child_tx, child_rx) = std::sync::mpsc::channel();
    let (keeper, keeper_rx) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = child_tx.send(cmd.spawn());
            // Returns when the owner (the sender) is dropped.
            let _ = keeper_rx.recv();
        })?;
    let child = child_rx
        .recv()
        .map_err(|_| std::io::Error::other("keeper thread died"))??;
    Ok((child, keeper))
}

/// Asks the kernel to SIGKILL the child when our thread dies, so a crashed or killed test
/// process leaves no bitcoind behind.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

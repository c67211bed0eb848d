//! Real database servers for tests, started from the Debian packages on free loopback ports in
//! private temporary directories, and stopped by PID when dropped: Redis, PostgreSQL (as the
//! `postgres` user when run as root) and MariaDB. Each has its command-line client at hand.
//!
//! The operator's tests and the benchmarks include this file by path, beside `harness.rs`.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::harness::{
    free_port, psql, redis_cli_blocking, run_blocking, wait_until, Proc, TempDir,
};

/// A `redis-server` without persistence.
#[derive(Debug)]
pub struct Redis {
    pub port: u16,
    dir: TempDir,
    proc: Proc,
    extra: Vec<String>,
    /// redis-cli's TLS arguments, for a TLS-only server.
    cli_tls: Vec<String>,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// A replica of the server on `leader_port`.
    pub fn replica_of(leader_port: u16) -> Redis {
        Redis::start_with(&["--replicaof", "127.0.0.1", &leader_port.to_string()])
    }

    pub fn start_with(extra: &[&str]) -> Redis {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        // A few ports: another test may take the free one before the server binds it.
        for _ in 0..5 {
            let dir = TempDir::new("redis");
            let port = free_port();
            let mut redis = Redis {
                port,
                proc: Redis::spawn(port, &dir, &extra),
                dir,
                extra: extra.clone(),
                cli_tls: Vec::new(),
            };
            if redis.ready_unless_exited() {
                return redis;
            }
        }
        panic!("redis-server did not start");
    }

    fn spawn(port: u16, dir: &TempDir, extra: &[String]) -> Proc {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir.path().display().to_string(),
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
            // Replicas load from the socket: no dump.rdb left behind to reload on restart.
            "--repl-diskless-load",
            "swapdb",
        ]);
        cmd.args(extra);
        Proc::spawn(cmd, "TERM")
    }

    fn wait_ready(&self) {
        wait_until("redis-server", Duration::from_secs(10), || self.answers());
    }

    /// PONG, or NOAUTH when a password is required: either way it answers.
    fn answers(&self) -> bool {
        self.try_cli(&["PING"]).is_some_and(|r| !r.is_empty())
    }

    /// Waits for the server to answer (true) or to exit, its port taken (false).
    fn ready_unless_exited(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !self.proc.running() {
                return false;
            }
            if self.answers() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server not ready within 10 s");
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A server that accepts TLS only on its `port` (`--tls-port`, the plaintext port off),
    /// with the certificate, key and CA files given; clients need no certificate. [`Redis::cli`]
    /// talks to it with `--tls --cacert ca`.
    pub fn start_tls(cert: &Path, key: &Path, ca: &Path) -> Redis {
        let dir = TempDir::new("redis");
        let port = free_port();
        let path = |p: &Path| p.display().to_string();
        // `--port 0` after the `--port` that `spawn` puts first: the later one wins.
        let extra: Vec<String> = vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            path(cert),
            "--tls-key-file".into(),
            path(key),
            "--tls-ca-cert-file".into(),
            path(ca),
            "--tls-auth-clients".into(),
            "no".into(),
        ];
        let proc = Redis::spawn(port, &dir, &extra);
        let redis = Redis {
            port,
            dir,
            proc,
            extra,
            cli_tls: vec!["--tls".into(), "--cacert".into(), path(ca)],
        };
        redis.wait_ready();
        redis
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let mut all: Vec<&str> = self.cli_tls.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        let (ok, out, _) = redis_cli_blocking(self.port, &all);
        ok.then_some(out)
    }

    /// Runs a command with redis-cli and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|| panic!("redis-cli {args:?} on port {} failed", self.port))
    }

    /// Crash: SIGKILL.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts again on the same port with the same arguments (and an empty data set).
    pub fn restart(&mut self) {
        self.proc.stop();
        self.proc = Redis::spawn(self.port, &self.dir, &self.extra);
        self.wait_ready();
    }

    /// Starts again on the same port with other arguments.
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.restart();
    }

    pub fn wait_replicating(&self) {
        wait_until("replication link", Duration::from_secs(10), || {
            self.try_cli(&["INFO", "replication"])
                .is_some_and(|i| i.contains("master_link_status:up"))
        });
    }
}

/// Runs `program` as the `postgres` user when we are root (PostgreSQL refuses to run as root).
fn as_postgres(program: &str) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if root {
        // setpriv execs in place, so the PID we hold is the server's own.
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
            program,
        ]);
        cmd
    } else {
        Command::new(program)
    }
}

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL 15 server with SCRAM-SHA-256 authentication; superuser `postgres`.
#[derive(Debug)]
pub struct Postgres {
    pub port: u16,
    pub password: String,
    dir: TempDir,
    proc: Option<Proc>,
}

impl Postgres {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn new_dir() -> TempDir {
        let dir = TempDir::new("postgres");
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres", &dir.path().display().to_string()])
            .status();
        dir
    }

    /// A primary, initialised with `initdb --auth=scram-sha-256`.
    pub fn primary(password: &str) -> Postgres {
        let dir = Postgres::new_dir();
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, password).unwrap();
        let _ = Command::new("chown")
            .args(["postgres:postgres", &pwfile.display().to_string()])
            .status();
        let status = as_postgres(&format!("{PG_BIN}/initdb"))
            .args(["-D", &dir.path().join("data").display().to_string()])
            .args(["-U", "postgres", "--auth=scram-sha-256", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "initdb failed");
        let mut pg = Postgres {
            port: free_port(),
            password: password.into(),
            dir,
            proc: None,
        };
        pg.start();
        pg
    }

    /// A streaming standby of `primary` (`pg_basebackup -R`).
    pub fn standby_of(primary: &Postgres) -> Postgres {
        let dir = Postgres::new_dir();
        let data = dir.path().join("data");
        let status = as_postgres(&format!("{PG_BIN}/pg_basebackup"))
            .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
            .args(["-U", "postgres", "-D", &data.display().to_string(), "-R"])
            .args(["--no-sync", "-X", "stream"])
            .env("PGPASSWORD", &primary.password)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "pg_basebackup failed");
        let mut pg = Postgres {
            port: free_port(),
            password: primary.password.clone(),
            dir,
            proc: None,
        };
        pg.start();
        pg
    }

    pub fn start(&mut self) {
        let mut cmd = as_postgres(&format!("{PG_BIN}/postgres"));
        cmd.args(["-D", &self.data().display().to_string()])
            .args(["-p", &self.port.to_string()])
            .args(["-k", &self.dir.path().display().to_string()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]);
        self.proc = Some(Proc::spawn(cmd, "INT"));
        wait_until("postgres", Duration::from_secs(20), || {
            self.try_psql("postgres", &self.password, "SELECT 1")
                .is_some()
        });
    }

    /// Fast shutdown.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops this former primary and starts it again as a streaming standby of `leader`
    /// (`standby.signal` and `primary_conninfo`), as a cluster manager demotes the old primary
    /// after a failover. It follows the new timeline when it stopped cleanly before the promote.
    pub fn restart_as_standby_of(&mut self, leader: &Postgres) {
        self.stop();
        let data = self.data();
        let signal = data.join("standby.signal");
        std::fs::write(&signal, "").unwrap();
        let auto = data.join("postgresql.auto.conf");
        let mut conf = std::fs::read_to_string(&auto).unwrap_or_default();
        conf.push_str(&format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user=postgres password={}'\n",
            leader.port, leader.password
        ));
        std::fs::write(&auto, conf).unwrap();
        for f in [&signal, &auto] {
            let _ = Command::new("chown")
                .args(["postgres:postgres", &f.display().to_string()])
                .status();
        }
        self.start();
    }

    pub fn promote(&self) {
        let status = as_postgres(&format!("{PG_BIN}/pg_ctl"))
            .args(["promote", "-w", "-D", &self.data().display().to_string()])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "pg_ctl promote failed");
    }

    pub fn try_psql(&self, user: &str, password: &str, sql: &str) -> Option<String> {
        let (ok, out, _) = psql(self.port, user, password)
            .conninfo("connect_timeout=2")
            .run_blocking(&["-XAtq", "-c", sql]);
        ok.then_some(out)
    }

    /// Runs SQL as `postgres`.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql("postgres", &self.password, sql)
            .unwrap_or_else(|| panic!("psql {sql:?} on port {} failed", self.port))
    }

    /// Turns TLS on (`ssl = on`, reloaded) with this certificate and key, copied into the data
    /// directory; with `require`, pg_hba.conf refuses TCP clients that do not use it. The
    /// helper's own psql prefers TLS, so it keeps working either way.
    pub fn enable_tls(&self, cert: &Path, key: &Path, require: bool) {
        let data = self.data();
        for (from, name) in [(cert, "server.crt"), (key, "server.key")] {
            let to = data.join(name);
            std::fs::copy(from, &to).unwrap();
            let to = to.display().to_string();
            let _ = Command::new("chown")
                .args(["postgres:postgres", &to])
                .status();
            let _ = Command::new("chmod").args(["0600", &to]).status();
        }
        self.psql("ALTER SYSTEM SET ssl_cert_file = 'server.crt'");
        self.psql("ALTER SYSTEM SET ssl_key_file = 'server.key'");
        self.psql("ALTER SYSTEM SET ssl = on");
        if require {
            self.hba_first("hostnossl all all 0.0.0.0/0 reject");
        } else {
            self.psql("SELECT pg_reload_conf()");
        }
        wait_until("postgres ssl = on", Duration::from_secs(10), || {
            self.try_psql("postgres", &self.password, "SHOW ssl")
                .is_some_and(|v| v == "on")
        });
    }

    /// Adds a line at the top of pg_hba.conf and reloads.
    pub fn hba_first(&self, line: &str) {
        let path = self.data().join("pg_hba.conf");
        let old = std::fs::read_to_string(&path).unwrap();
        // Written beside and renamed over, so a reload the server is still doing from an earlier
        // call never reads a half-written file.
        let next = self.data().join("pg_hba.conf.next");
        std::fs::write(&next, format!("{line}\n{old}")).unwrap();
        let _ = Command::new("chown")
            .args(["postgres:postgres", &next.display().to_string()])
            .status();
        std::fs::rename(&next, &path).unwrap();
        wait_until("pg_reload_conf", Duration::from_secs(10), || {
            self.try_psql("postgres", &self.password, "SELECT pg_reload_conf()")
                .is_some()
        });
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A MariaDB server with a user that may log in over TCP.
#[derive(Debug)]
pub struct Mariadb {
    pub port: u16,
    pub user: String,
    pub password: String,
    dir: TempDir,
    proc: Proc,
    /// The server requires TLS: the helper's client uses it.
    client_tls: bool,
}

impl Mariadb {
    pub fn start(user: &str, password: &str) -> Mariadb {
        Mariadb::start_with(user, password, None)
    }

    /// A primary that writes a binary log (`server-id` 1) for replicas to follow.
    pub fn primary(user: &str, password: &str) -> Mariadb {
        Mariadb::start_full(user, password, None, &["--log-bin=binlog", "--server-id=1"])
    }

    /// A read-only replica of `primary` (GTID replication as `primary`'s user), running. It
    /// logs what it applies (`--log-slave-updates`), so that it can be promoted and followed.
    pub fn replica_of(primary: &Mariadb, server_id: u32) -> Mariadb {
        let id = format!("--server-id={server_id}");
        let extra = [id.as_str(), "--log-bin=binlog", "--log-slave-updates"];
        let db = Mariadb::start_full(&primary.user, &primary.password, None, &extra);
        db.follow(primary.port);
        db
    }

    /// Replicates (again) from the server on `port`, read-only, from where it stands.
    pub fn follow(&self, port: u16) {
        // Not running on a new server: an error to ignore.
        let _ = self.try_sql("STOP SLAVE");
        self.sql(&format!(
            "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={port}, \
             MASTER_USER='{}', MASTER_PASSWORD='{}', MASTER_USE_GTID=slave_pos, \
             MASTER_CONNECT_RETRY=1; START SLAVE; SET GLOBAL read_only = 1",
            self.user, self.password
        ));
    }

    /// Promotes a replica: replication removed, writable.
    pub fn promote(&self) {
        self.sql("STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0");
    }

    /// Crash: SIGKILL.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// A server with TLS (`ssl_cert`, `ssl_key`, `ssl_ca`) that refuses plaintext clients
    /// (`require_secure_transport = ON`); the helper's own client uses TLS.
    pub fn start_tls(user: &str, password: &str, cert: &Path, key: &Path, ca: &Path) -> Mariadb {
        Mariadb::start_with(user, password, Some((cert, key, ca)))
    }

    fn start_with(user: &str, password: &str, tls: Option<(&Path, &Path, &Path)>) -> Mariadb {
        Mariadb::start_full(user, password, tls, &["--skip-log-bin"])
    }

    fn start_full(
        user: &str,
        password: &str,
        tls: Option<(&Path, &Path, &Path)>,
        extra: &[&str],
    ) -> Mariadb {
        let dir = TempDir::new("mariadb");
        let data = dir.path().join("data");
        // Two tries: on a loaded machine the bootstrap server it runs can fail once.
        let mut failure = String::new();
        for _ in 0..2 {
            let _ = std::fs::remove_dir_all(&data);
            let out = Command::new("mariadb-install-db")
                .args(["--no-defaults", "--user=root", "--skip-test-db"])
                .arg(format!("--datadir={}", data.display()))
                .arg("--auth-root-authentication-method=normal")
                .stdin(Stdio::null())
                .output()
                .unwrap();
            if out.status.success() {
                failure.clear();
                break;
            }
            failure = String::from_utf8_lossy(&out.stderr).into_owned();
        }
        assert!(failure.is_empty(), "mariadb-install-db failed: {failure}");
        let init = dir.path().join("init.sql");
        std::fs::write(
            &init,
            format!(
                "CREATE USER IF NOT EXISTS '{user}'@'%' IDENTIFIED BY '{password}';\n\
                 GRANT ALL PRIVILEGES ON *.* TO '{user}'@'%' WITH GRANT OPTION;\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let mut cmd = Command::new("mariadbd");
        cmd.args(["--no-defaults", "--user=root", "--bind-address=127.0.0.1"])
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--port={port}"))
            .arg(format!("--socket={}", dir.path().join("sock").display()))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .arg(format!("--init-file={}", init.display()))
            .args(extra)
            .arg("--innodb-buffer-pool-size=16M");
        if let Some((cert, key, ca)) = tls {
            cmd.arg(format!("--ssl-cert={}", cert.display()))
                .arg(format!("--ssl-key={}", key.display()))
                .arg(format!("--ssl-ca={}", ca.display()))
                .arg("--require-secure-transport=ON");
        }
        let db = Mariadb {
            port,
            user: user.into(),
            password: password.into(),
            proc: Proc::spawn(cmd, "TERM"),
            dir,
            client_tls: tls.is_some(),
        };
        wait_until("mariadbd", Duration::from_secs(30), || {
            db.try_sql("SELECT 1").is_some()
        });
        db
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn try_sql(&self, sql: &str) -> Option<String> {
        let port = self.port.to_string();
        let password = format!("-p{}", self.password);
        let mut args = vec!["--no-defaults", "-h", "127.0.0.1", "-P", &port];
        args.extend(["-u", &self.user, &password]);
        if self.client_tls {
            args.push("--ssl");
        }
        args.extend(["--connect-timeout=2", "-N", "-B", "-e", sql]);
        let (ok, out, _) = run_blocking("mariadb", &args, &[]);
        ok.then_some(out)
    }

    pub fn sql(&self, sql: &str) -> String {
        self.try_sql(sql)
            .unwrap_or_else(|| panic!("mariadb {sql:?} on port {} failed", self.port))
    }
}

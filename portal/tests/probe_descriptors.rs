//! Every probe releases what it opened when its deadline passes, even against a server that
//! logs the probe in and then never answers: counted in the process's own descriptors, so this
//! file holds one test and runs in a process of its own.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use portal::{
    config::Address,
    health::{
        probe::{probe, ProbeSettings},
        ProbeCredentials,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

fn descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A server on loopback that runs `login` on each connection, then reads until the client
/// closes, answering nothing. Its side of a connection closes when the client's does.
async fn hanging_server<F, Fut>(login: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = std::io::Result<TcpStream>> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let login = Arc::new(login);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let login = login.clone();
            tokio::spawn(async move {
                if let Ok(mut stream) = login(stream).await {
                    let mut sink = [0u8; 1024];
                    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                }
            });
        }
    });
    addr
}

/// PostgreSQL: the startup message is answered with AuthenticationOk and ReadyForQuery (trust).
async fn postgres_login(mut s: TcpStream) -> std::io::Result<TcpStream> {
    let len = s.read_u32().await? as usize;
    let mut rest = vec![0u8; len.saturating_sub(4)];
    s.read_exact(&mut rest).await?;
    s.write_all(b"R\0\0\0\x08\0\0\0\0Z\0\0\0\x05I").await?;
    Ok(s)
}

/// MySQL: a HandshakeV10 greeting (mysql_native_password), the client's response is read and
/// answered with OK, and the first query's answer begins but never ends.
async fn mysql_login(mut s: TcpStream) -> std::io::Result<TcpStream> {
    let mut payload = vec![0x0a];
    payload.extend_from_slice(b"5.7.0-hanging\0");
    payload.extend_from_slice(&1u32.to_le_bytes());
    payload.extend_from_slice(b"abcdefgh\0");
    // LONG_PASSWORD | PROTOCOL_41 | TRANSACTIONS | SECURE_CONNECTION | PLUGIN_AUTH
    let caps: u32 = 0x0000_0001 | 0x0000_0200 | 0x0000_2000 | 0x0000_8000 | 0x0008_0000;
    payload.extend_from_slice(&(caps as u16).to_le_bytes());
    payload.push(0x21);
    payload.extend_from_slice(&2u16.to_le_bytes());
    payload.extend_from_slice(&((caps >> 16) as u16).to_le_bytes());
    payload.push(21);
    payload.extend_from_slice(&[0; 10]);
    payload.extend_from_slice(b"ijklmnopqrst\0");
    payload.extend_from_slice(b"mysql_native_password\0");
    let mut packet = (payload.len() as u32).to_le_bytes()[..3].to_vec();
    packet.push(0);
    packet.extend_from_slice(&payload);
    s.write_all(&packet).await?;
    let mut header = [0u8; 4];
    s.read_exact(&mut header).await?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
    let mut response = vec![0u8; len];
    s.read_exact(&mut response).await?;
    s.write_all(&[7, 0, 0, header[3] + 1, 0, 0, 0, 2, 0, 0, 0])
        .await?;
    // The query's answer starts (a result set of two columns, their definitions) and stops
    // before the first row: a client that drops the connection now has a result set pending.
    s.read_exact(&mut header).await?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
    let mut query = vec![0u8; len];
    s.read_exact(&mut query).await?;
    let mut answer = vec![1, 0, 0, 1, 2];
    for (seq, name) in [(2u8, "a"), (3, "b")] {
        // ColumnDefinition41: catalog, schema, table, org_table, name, org_name, then fixed
        // fields (charset utf8mb4, length, VAR_STRING, flags, decimals, filler).
        let mut def = Vec::new();
        for text in ["def", "", "", "", name, ""] {
            def.push(text.len() as u8);
            def.extend_from_slice(text.as_bytes());
        }
        def.extend_from_slice(&[0x0c, 0x2d, 0, 0, 1, 0, 0, 0xfd, 0, 0, 0, 0, 0]);
        answer.extend_from_slice(&(def.len() as u32).to_le_bytes()[..3]);
        answer.push(seq);
        answer.extend_from_slice(&def);
    }
    // EOF after the column definitions; then no row and no end.
    answer.extend_from_slice(&[5, 0, 0, 4, 0xfe, 0, 0, 2, 0]);
    s.write_all(&answer).await?;
    Ok(s)
}

/// Accepts and never answers (the engines whose probe speaks first).
async fn silent_login(s: TcpStream) -> std::io::Result<TcpStream> {
    Ok(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_probes_release_their_sockets() {
    let postgres = hanging_server(postgres_login).await;
    let mysql = hanging_server(mysql_login).await;
    let silent = hanging_server(silent_login).await;
    let cases = [
        ("postgres", postgres, ""),
        ("mysql", mysql, ""),
        ("redis", silent, ""),
        ("etcd", silent, ""),
        (
            "tcp",
            silent,
            "  steps: [{send: \"PING\\r\\n\", expect: \"+PONG\"}]\n",
        ),
    ];
    for (engine, addr, steps) in cases {
        let yaml = format!(
            "engine: {engine}\nport: 7000\ntls: {{mode: disabled}}\nrouting: {{mode: first}}\n\
             backends:\n  - {{name: n0, address: \"{addr}\"}}\ntimeouts: {{check: 150ms}}\n\
             healthCheck:\n  interval: 1s\n{steps}"
        );
        let config = portal::config::parse_yaml(&yaml)
            .and_then(|s| s.validate())
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let credentials: Option<ProbeCredentials> = Some(ProbeCredentials {
            username: Some("probe".into()),
            password: "pw".into(),
        });
        let settings = ProbeSettings::new(&config, Arc::new(credentials));
        let address: Address = addr.to_string().parse().unwrap();
        // Warm up (runtime threads, the resolver), then count.
        let _ = probe(&settings, &address).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = descriptors();
        const PROBES: usize = 30;
        for _ in 0..PROBES {
            let result = probe(&settings, &address).await;
            assert!(
                result.is_err(),
                "{engine}: a hanging server is no healthy node"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = descriptors();
        eprintln!("{engine}: {before} descriptors before {PROBES} timed-out probes, {after} after");
        assert!(
            after <= before + 2,
            "{engine}: {PROBES} timed-out probes left {} descriptors open",
            after.saturating_sub(before)
        );
    }
}

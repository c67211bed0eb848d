//! Unit tests of `config`: parsing, validation and the errors that name the field.

use super::*;

const MINIMAL: &str = r#"
engine: redis
backends:
  - {name: orders-0, address: "127.0.0.1:6379"}
tls: {mode: disabled}
"#;

#[test]
fn defaults_follow_the_contract() {
    let c = parse_yaml(MINIMAL).unwrap().validate_standalone().unwrap();
    assert_eq!(c.port, 6379);
    assert_eq!(c.routing, RoutingMode::Leader);
    assert!(c.close_sessions_on_leader_change);
    assert_eq!(c.health.interval, std::time::Duration::from_secs(1));
    assert_eq!((c.health.rise, c.health.fall), (2, 3));
    assert_eq!(c.max_connections, 2000);
    assert_eq!(c.max_connections_per_client, 0);
    assert_eq!(c.timeouts.client, std::time::Duration::from_secs(86_400));
    assert_eq!(c.timeouts.server, std::time::Duration::from_secs(86_400));
    assert_eq!(c.timeouts.connect, std::time::Duration::from_secs(60));
    assert_eq!(c.timeouts.check, std::time::Duration::from_secs(2));
    assert!(c.allowed_cidrs.is_empty());
    assert_eq!(c.listen, "0.0.0.0:6379".parse().unwrap());
    assert_eq!(c.admin, "0.0.0.0:8404".parse().unwrap());
    assert_eq!(c.drain_timeout, std::time::Duration::from_secs(30));
    assert_eq!(c.spec.portal.replicas, 2);
    assert_eq!(c.spec.tls.min_version, TlsVersion::V1_2);
    assert!(!c.proxy_protocol.accept && !c.proxy_protocol.send);
    assert!(c.proxy_trusted.is_empty());
    assert_eq!(c.timeouts.handshake, std::time::Duration::from_secs(5));
    assert_eq!(c.max_negotiating, 1000);
    assert_eq!(c.max_negotiating_per_client, 0);
    assert_eq!(c.connection_rate_per_client, 0);
    assert_eq!(
        c.admin_limits,
        AdminLimitValues {
            max_connections: 64,
            max_header_bytes: 16 << 10,
            max_body_bytes: 64 << 10,
            connection_lifetime: std::time::Duration::from_secs(60),
        }
    );
}

#[test]
fn admin_limits_are_read_and_round_trip() {
    let yaml = format!(
        "{MINIMAL}adminLimits: {{maxConnections: 8, maxHeaderBytes: 8Ki, maxBodyBytes: 2048, connectionLifetime: 5s}}\n"
    );
    let spec = parse_yaml(&yaml).unwrap();
    let c = spec.validate_standalone().unwrap();
    assert_eq!(
        c.admin_limits,
        AdminLimitValues {
            max_connections: 8,
            max_header_bytes: 8 << 10,
            max_body_bytes: 2048,
            connection_lifetime: std::time::Duration::from_secs(5),
        }
    );
    let written = serde_norway::to_string(&spec).unwrap();
    assert!(written.contains("maxHeaderBytes: 8Ki"), "{written}");
    assert_eq!(parse_yaml(&written).unwrap(), spec);
    // The defaults are not written out (the operator's ConfigMap stays as it was).
    let minimal = serde_norway::to_string(&parse_yaml(MINIMAL).unwrap()).unwrap();
    assert!(!minimal.contains("adminLimits"), "{minimal}");
}

#[test]
fn engine_defaults() {
    for (engine, port) in [("postgres", 5432), ("mysql", 3306), ("etcd", 2379)] {
        let yaml = MINIMAL.replace("redis", engine);
        let c = parse_yaml(&yaml).unwrap().validate().unwrap();
        assert_eq!(c.port, port, "{engine}");
        assert_eq!(c.routing, RoutingMode::Leader);
    }
    let tcp = parse_yaml(&format!("{}port: 9000\n", MINIMAL.replace("redis", "tcp")))
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!((tcp.port, tcp.routing), (9000, RoutingMode::First));
}

#[test]
fn full_spec_parses_and_round_trips() {
    let yaml = r#"
engine: redis
port: 7000
backends:
  - {name: orders-0, address: "orders-0.orders-db.shop.svc:6379"}
  - {name: orders-1, address: "[::1]:6380"}
routing: {mode: source, closeSessionsOnLeaderChange: false}
healthCheck:
  interval: 500ms
  rise: 1
  fall: 2
  credentialsSecret: orders-probe
  steps:
    - {send: "PING\r\n", expect: "+PONG"}
    - {send: 'INFO replication\r\n', expect: 'role:master'}
limits: {maxConnections: 10, maxConnectionsPerClient: 2}
timeouts: {client: 30s, server: 1h30m, connect: 5s, check: 1s}
allowedCIDRs: ["10.0.0.0/8", "2001:db8::/32", "192.168.1.7", "10.1.2.3/16"]
tls:
  mode: terminate
  issuerRef: {name: letsencrypt, kind: ClusterIssuer}
  dnsNames: [db.example.com, "*.example.org"]
  minVersion: "1.3"
  certFile: /tls/tls.crt
  keyFile: /tls/tls.key
portal: {replicas: 3, image: "dbportal/portal:1", serviceType: LoadBalancer}
proxyProtocol: {accept: true, send: true, trustedCIDRs: ["10.0.0.0/24"]}
listen: "127.0.0.1:7000"
admin: "[::1]:9000"
drainTimeout: 5s
"#;
    let spec = parse_yaml(yaml).unwrap();
    let c = spec.validate_standalone().unwrap();
    assert_eq!(c.backends[1].address.host, "::1");
    assert_eq!(c.routing, RoutingMode::Source);
    assert!(!c.close_sessions_on_leader_change);
    assert_eq!(c.health.steps[0].send, b"PING\r\n");
    assert_eq!(c.health.steps[1].send, b"INFO replication\r\n");
    assert_eq!(c.health.steps[1].expect, b"role:master");
    assert_eq!(c.timeouts.server, std::time::Duration::from_secs(5_400));
    let cidrs: Vec<String> = c.allowed_cidrs.iter().map(ToString::to_string).collect();
    assert_eq!(
        cidrs,
        [
            "10.0.0.0/8",
            "2001:db8::/32",
            "192.168.1.7/32",
            "10.1.0.0/16"
        ]
    );
    assert_eq!(c.listen, "127.0.0.1:7000".parse().unwrap());
    assert_eq!(c.admin, "[::1]:9000".parse().unwrap());
    assert_eq!(c.drain_timeout, std::time::Duration::from_secs(5));
    assert_eq!(c.spec.tls.min_version, TlsVersion::V1_3);

    // What the operator writes into the ConfigMap must read back to the same spec.
    let written = serde_norway::to_string(&spec).unwrap();
    assert_eq!(parse_yaml(&written).unwrap(), spec);
}

#[test]
fn standalone_credentials_inline_or_file() {
    let inline = parse_yaml(&format!(
        "{MINIMAL}healthCheck: {{credentials: {{username: probe, password: s3cret}}}}\n"
    ))
    .unwrap();
    match &inline.health_check.credentials {
        Some(Credentials::Inline { username, password }) => {
            assert_eq!(
                (username.as_deref(), password.as_str()),
                (Some("probe"), "s3cret")
            )
        }
        other => panic!("{other:?}"),
    }
    let file = parse_yaml(&format!(
        "{MINIMAL}healthCheck: {{credentials: /run/secrets/probe.yaml}}\n"
    ))
    .unwrap();
    assert_eq!(
        file.health_check.credentials,
        Some(Credentials::File("/run/secrets/probe.yaml".into()))
    );
    assert!(!format!("{:?}", inline.health_check.credentials).contains("s3cret"));
}

/// Each invalid configuration must be refused with a message naming the field at fault.
#[test]
fn invalid_configurations_name_the_field() {
    let base = |extra: &str| format!("{MINIMAL}{extra}");
    let cases: Vec<(&str, String, &str)> = vec![
        ("bad CIDR", base("allowedCIDRs: [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n"), "allowedCIDRs[1]"),
        ("garbage CIDR", base("allowedCIDRs: [\"everyone\"]\n"), "allowedCIDRs[0]"),
        ("bad duration", base("timeouts: {client: 10 minutes}\n"), "timeouts.client"),
        ("duration without unit", base("healthCheck: {interval: \"10\"}\n"), "healthCheck.interval"),
        ("zero duration", base("timeouts: {connect: 0s}\n"), "timeouts.connect"),
        ("unknown field", base("timeout: {client: 1s}\n"), "timeout"),
        ("unknown nested field", base("limits: {maxConnection: 5}\n"), "limits.maxConnection"),
        ("empty backends", "engine: redis\nbackends: []\ntls: {mode: disabled}\n".into(), "backends"),
        ("missing backends", "engine: redis\ntls: {mode: disabled}\n".into(), "backends"),
        (
            "duplicate names",
            "engine: redis\ntls: {mode: disabled}\nbackends:\n  - {name: a, address: \"h:1\"}\n  - {name: a, address: \"h:2\"}\n".into(),
            "backends[1].name",
        ),
        ("bad backend name", MINIMAL.replace("orders-0", "Orders_0"), "backends[0].name"),
        ("bad address", MINIMAL.replace("127.0.0.1:6379", "127.0.0.1"), "backends[0].address"),
        ("unbracketed IPv6", MINIMAL.replace("127.0.0.1:6379", "::1:6379"), "backends[0].address"),
        ("port 0", base("port: 0\n"), "port"),
        ("port too large", base("port: 70000\n"), "port"),
        ("tcp without port", MINIMAL.replace("redis", "tcp"), "port"),
        ("unknown engine", MINIMAL.replace("redis", "mongodb"), "engine"),
        ("missing engine", MINIMAL.replace("engine: redis\n", ""), "engine"),
        ("unknown routing mode", base("routing: {mode: random}\n"), "routing.mode"),
        ("leader for tcp", format!("{}port: 1\nrouting: {{mode: leader}}\n", MINIMAL.replace("redis", "tcp")), "routing.mode"),
        ("rise 0", base("healthCheck: {rise: 0}\n"), "healthCheck.rise"),
        ("fall negative", base("healthCheck: {fall: -1}\n"), "healthCheck.fall"),
        ("empty probe step", base("healthCheck: {steps: [{}]}\n"), "healthCheck.steps[0]"),
        ("bad escape", base("healthCheck: {steps: [{send: 'PING\\q'}]}\n"), "healthCheck.steps[0].send"),
        ("maxConnections 0", base("limits: {maxConnections: 0}\n"), "limits.maxConnections"),
        ("maxNegotiating 0", base("limits: {maxNegotiating: 0}\n"), "limits.maxNegotiating"),
        ("negative rate", base("limits: {connectionRatePerClient: -1}\n"), "limits.connectionRatePerClient"),
        ("zero handshake", base("timeouts: {handshake: 0s}\n"), "timeouts.handshake"),
        ("PROXY accept without trusted peers", base("proxyProtocol: {accept: true}\n"), "proxyProtocol.trustedCIDRs"),
        ("bad trusted CIDR", base("proxyProtocol: {accept: true, trustedCIDRs: [\"10.0.0.0/8\", \"lb\"]}\n"), "proxyProtocol.trustedCIDRs[1]"),
        ("negative limit", base("limits: {maxConnectionsPerClient: -3}\n"), "limits.maxConnectionsPerClient"),
        ("bad tls mode", MINIMAL.replace("mode: disabled", "mode: sometimes"), "tls.mode"),
        ("bad tls version", MINIMAL.replace("mode: disabled", "mode: disabled, minVersion: \"1.1\""), "tls.minVersion"),
        ("terminate without files", MINIMAL.replace("tls: {mode: disabled}\n", ""), "tls.certFile"),
        ("bad dns name", MINIMAL.replace("mode: disabled", "mode: disabled, dnsNames: [\"bad name\"]"), "tls.dnsNames[0]"),
        ("replicas 9", base("portal: {replicas: 9}\n"), "portal.replicas"),
        ("bad listen", base("listen: \"localhost\"\n"), "listen"),
        ("bad admin", base("admin: \"0.0.0.0:99999\"\n"), "admin"),
        ("bad service type", base("portal: {serviceType: Ingress}\n"), "portal.serviceType"),
        ("admin maxConnections 0", base("adminLimits: {maxConnections: 0}\n"), "adminLimits.maxConnections"),
        ("admin head below 8Ki", base("adminLimits: {maxHeaderBytes: 4Ki}\n"), "adminLimits.maxHeaderBytes"),
        ("admin body over 1Mi", base("adminLimits: {maxBodyBytes: 2Mi}\n"), "adminLimits.maxBodyBytes"),
        ("admin body not a size", base("adminLimits: {maxBodyBytes: lots}\n"), "adminLimits.maxBodyBytes"),
        ("admin lifetime 0", base("adminLimits: {connectionLifetime: 0s}\n"), "adminLimits.connectionLifetime"),
        ("unknown admin limit", base("adminLimits: {maxRequests: 5}\n"), "adminLimits.maxRequests"),
        ("not a map", "- engine: redis\n".into(), "(document)"),
        ("empty file", "".into(), "(document)"),
    ];
    assert!(cases.len() >= 15);
    for (what, yaml, field) in cases {
        let err = parse_yaml(&yaml)
            .and_then(|spec| spec.validate_standalone())
            .expect_err(what);
        let message = err.to_string();
        assert!(
            err.fields().contains(&field),
            "{what}: expected field {field:?} in {:?} ({message})",
            err.fields()
        );
        assert!(message.contains(field), "{what}: {message}");
    }
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let yaml = r#"
engine: redis
backends:
  - {name: a, address: "nohost"}
  - {name: a, address: "h:1"}
allowedCIDRs: [bad]
limits: {maxConnections: 0}
tls: {mode: disabled}
"#;
    let err = parse_yaml(yaml).unwrap().validate().unwrap_err();
    assert_eq!(
        err.fields(),
        [
            "backends[0].address",
            "backends[1].name",
            "limits.maxConnections",
            "allowedCIDRs[0]"
        ]
    );
}

#[test]
fn unescape_handles_every_escape() {
    assert_eq!(unescape(r"a\r\n\t\0\\\x41").unwrap(), b"a\r\n\t\0\\A");
    assert!(unescape(r"\x4").unwrap_err().contains("byte 0"));
    assert!(unescape("abc\\")
        .unwrap_err()
        .contains("lone backslash at byte 3"));
}

#[test]
fn backend_operations_fields_are_checked_and_defaulted() {
    let ok = parse_yaml(
        "engine: redis\ntls: {mode: disabled}\nbackends:\n  - {name: a, address: \"127.0.0.1:1\"}\n  - {name: b, address: \"127.0.0.1:2\", weight: 256, backup: true, maxConnections: 5, slowStart: 30s, state: drain}\n",
    )
    .unwrap()
    .validate()
    .unwrap();
    let (a, b) = (&ok.backends[0], &ok.backends[1]);
    assert_eq!((a.weight, a.backup, a.max_connections), (1, false, 0));
    assert_eq!(a.state, BackendState::Ready);
    assert!(a.slow_start.is_zero());
    assert_eq!((b.weight, b.backup, b.max_connections), (256, true, 5));
    assert_eq!(b.state, BackendState::Drain);
    assert_eq!(b.slow_start, std::time::Duration::from_secs(30));
    assert!(ok.access_log);
    // Defaults are not written back: a spec without the fields serialises as before.
    let yaml = serde_norway::to_string(&ok.spec.backends[0]).unwrap();
    assert_eq!(yaml.trim(), "name: a\naddress: 127.0.0.1:1");

    for (weight, field) in [("0", "backends[0].weight"), ("257", "backends[0].weight")] {
        let err = parse_yaml(&format!(
            "engine: redis\ntls: {{mode: disabled}}\nbackends: [{{name: a, address: \"127.0.0.1:1\", weight: {weight}}}]\n"
        ))
        .unwrap()
        .validate()
        .unwrap_err();
        assert_eq!(err.fields(), [field], "{weight}");
    }
    let err = parse_yaml(
        "engine: redis\ntls: {mode: disabled}\nbackends: [{name: a, address: \"127.0.0.1:1\", state: paused}]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("paused"), "{err}");
    let err = parse_yaml(
        "engine: redis\ntls: {mode: disabled}\nadminTokenForReads: true\nbackends: [{name: a, address: \"127.0.0.1:1\"}]\n",
    )
    .unwrap()
    .validate()
    .unwrap_err();
    assert_eq!(err.fields(), ["adminTokenForReads"]);
}

#[test]
fn read_only_defaults_and_errors_name_the_field() {
    let c = parse_yaml(&format!("{MINIMAL}readOnly: {{}}\n"))
        .unwrap()
        .validate()
        .unwrap();
    let ro = c.read_only.clone().expect("on when the block is present");
    assert_eq!(ro.port, 6380, "port + 1");
    assert_eq!(ro.listen, "0.0.0.0:6380".parse().unwrap());
    assert_eq!(ro.routing, RoutingMode::Roundrobin);
    assert_eq!(ro.max_lag, std::time::Duration::from_secs(10));
    assert!(ro.fallback_to_leader);
    let reads = c.for_reads().unwrap();
    assert!(reads.serves_reads && !c.serves_reads);
    assert_eq!((reads.routing, reads.port), (RoutingMode::Roundrobin, 6380));

    let off = parse_yaml(&format!("{MINIMAL}readOnly: {{enabled: false}}\n"))
        .unwrap()
        .validate()
        .unwrap();
    assert!(off.read_only.is_none() && off.for_reads().is_none());
    let lc = parse_yaml(&format!(
        "{MINIMAL}readOnly: {{routing: leastconn, maxLag: 500ms, port: 7000, fallbackToLeader: false}}\n"
    ))
    .unwrap()
    .validate()
    .unwrap()
    .read_only
    .unwrap();
    assert_eq!(lc.routing, RoutingMode::Leastconn);
    assert_eq!(lc.max_lag, std::time::Duration::from_millis(500));
    assert_eq!(lc.port, 7000);
    assert!(!lc.fallback_to_leader);

    let refused = |extra: &str| {
        parse_yaml(&format!("{MINIMAL}{extra}"))
            .map_err(|e| e.to_string())
            .and_then(|s| s.validate().map_err(|e| e.to_string()))
            .unwrap_err()
    };
    let e = refused("readOnly: {port: 6379}\n");
    assert!(
        e.contains("readOnly.port") && e.contains("main listener"),
        "{e}"
    );
    let e = refused("port: 65535\nreadOnly: {}\n");
    assert!(
        e.contains("readOnly.port") && e.contains("past 65535"),
        "{e}"
    );
    let e = refused("readOnly: {routing: leader}\n");
    assert!(
        e.contains("readOnly.routing") || e.contains("routing"),
        "{e}"
    );
    let e = refused("readOnly: {port: 8404}\n");
    assert!(e.contains("readOnly.port") && e.contains("admin"), "{e}");
    let e = refused("readOnly: {listen: nowhere}\n");
    assert!(e.contains("readOnly.listen"), "{e}");
    let e = refused("readOnly: {maxLag: soon}\n");
    assert!(e.contains("readOnly.maxLag") || e.contains("maxLag"), "{e}");
    let tcp = "engine: tcp\nport: 9000\ntls: {mode: disabled}\nbackends:\n  - {name: a, address: \"127.0.0.1:1\"}\nreadOnly: {}\n";
    let e = parse_yaml(tcp).unwrap().validate().unwrap_err().to_string();
    assert!(e.contains("readOnly") && e.contains("replicas"), "{e}");
}

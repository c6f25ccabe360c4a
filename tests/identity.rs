//! Mutual TLS: identities, foreign and missing certificates, revocation without restart.

use std::time::{Duration, Instant};

use crate::harness::{Env, Run, accounts_csv, raw_with, two_nodes, words};

#[test]
fn certificate_names_the_caller() {
    let env = Env::new();
    let server = env.serve(&[]);
    let out = env.cli(&server, "acme", &["whoami"]).ok();
    assert_eq!(out.stdout.trim(), "partner=acme user=admin role=admin");
    let out = env.cli(&server, "globex", &["whoami"]).ok();
    assert!(out.stdout.contains("partner=globex"));
}

#[test]
fn no_certificate_gets_no_api_data() {
    let env = Env::new();
    let server = env.serve(&[]);
    // A client with the right CA but no client certificate (a browser on the console)
    // completes the handshake, and gets nothing from the API without a console session.
    let r = crate::console::Browser::new(&env, &server).get("/v1/datasets");
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.code(), "unauthenticated");
    env.cli(&server, "acme", &["whoami"]).ok();
}

#[test]
fn certificate_from_another_ca_is_refused() {
    let env = Env::new();
    let alien = Env::new(); // its own CA, its own "acme"
    let server = env.serve(&[]);
    let mixed = env.tmp.path().join("mixed");
    std::fs::create_dir_all(&mixed).expect("dir");
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(alien.bundle("acme").join(f), mixed.join(f)).expect("copy");
    }
    std::fs::copy(env.bundle("acme").join("ca.pem"), mixed.join("ca.pem")).expect("copy");
    let mut cmd_env = std::process::Command::new(crate::harness::BIN);
    cmd_env
        .args(["whoami"])
        .env("ESCROW_IDENTITY", &mixed)
        .env("ESCROW_SERVER", &server.url);
    let out = cmd_env.output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot talk to escrow"), "{err}");
    env.cli(&server, "acme", &["whoami"]).ok();
}

#[test]
fn revocation_applies_without_restart() {
    let env = Env::new();
    let server = env.serve(&[]);
    let csv = env.file("g.csv", accounts_csv(10, "g").as_bytes());
    env.upload(&server, "globex", &csv, "accounts", &[]).ok();
    let out = env.op(&["partner", "revoke", "globex"]).ok();
    assert!(out.stdout.contains("revoked"));
    // Refused at the TLS handshake by a node whose revocation list the operator's command
    // wrote; on two nodes, the other one (a directory of its own) writes its list from the
    // catalog within a second and refuses each request until then.
    let refused = |run: Run| {
        if two_nodes() && !run.stderr.contains("cannot talk to escrow") {
            run.fails_with("(unauthenticated): the identity is not registered or was revoked");
        } else {
            run.fails_with("cannot talk to escrow");
        }
    };
    refused(env.cli(&server, "globex", &["whoami"]));
    refused(env.upload(&server, "globex", &csv, "more", &[]));
    env.cli(&server, "acme", &["whoami"]).ok();
    server.wait_log("revocation list changed");
    // operator errors are one line too
    env.op(&["partner", "revoke", "globex"])
        .fails_with("already revoked");
    env.op(&["partner", "revoke", "nobody"])
        .fails_with("no partner named nobody");
    env.op(&["partner", "add", "acme"])
        .fails_with("already exists");
    env.op(&["partner", "add", "Not Valid"])
        .fails_with("partner name must match");
}

#[test]
fn a_node_writes_its_revocation_list_from_the_catalog() {
    // Revocations live in the catalog; the list a node's handshakes check is derived from
    // it. A node whose copy of the list is stale (a host that missed the operator's write)
    // writes the catalog's at startup, and again whenever the catalog's moves.
    let env = Env::new();
    let crl = env.data.join("ca/crl.pem");
    let stale = std::fs::read(&crl).expect("crl");
    env.op(&["partner", "revoke", "globex"]).ok();
    std::fs::write(&crl, &stale).expect("stale crl");
    let server = env.serve(&[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read(&crl).expect("crl") == stale {
        assert!(Instant::now() < deadline, "the node kept the stale list");
        std::thread::sleep(Duration::from_millis(50));
    }
    env.cli(&server, "globex", &["whoami"])
        .fails_with("cannot talk to escrow");
    server.wait_log("revocation list changed");
    env.cli(&server, "acme", &["whoami"]).ok();
}

#[test]
fn init_is_idempotent_and_keeps_keys() {
    let env = Env::new();
    let kek = std::fs::read(env.data.join("keys/kek")).expect("kek");
    let ca = std::fs::read(env.data.join("ca/ca.key")).expect("ca key");
    let out = env.op(&["init"]).ok();
    assert!(out.stdout.contains("already initialised"), "{}", out.stdout);
    assert_eq!(std::fs::read(env.data.join("keys/kek")).expect("kek"), kek);
    assert_eq!(std::fs::read(env.data.join("ca/ca.key")).expect("ca"), ca);
    use std::os::unix::fs::PermissionsExt;
    for f in [
        "keys/kek",
        "ca/ca.key",
        "tls/server.key",
        "identities/acme/admin/key.pem",
    ] {
        let mode = std::fs::metadata(env.data.join(f))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
}

/// GET /v1/whoami at `https://NAME:PORT` as acme's admin, with NAME resolved to 127.0.0.1
/// (as a client whose DNS names the escrow's host would): the status, or the error.
fn whoami_at(env: &Env, name: &str, port: u16) -> Result<u16, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let (status, _, _) = raw_with(
        &env.bundle("acme"),
        |c| c.resolve(name, addr),
        |http| http.get(format!("https://{name}:{port}/v1/whoami")),
    )?;
    Ok(status)
}

#[test]
fn init_hostname_names_the_server_for_its_clients() {
    let env = Env::new();
    let cert = || std::fs::read(env.data.join("tls/server.pem")).expect("server cert");
    let before = cert();
    // A name that is neither a DNS name nor an address is refused, and nothing changes.
    env.op(&["init", "--hostname", "bad name!"])
        .fails_with("neither a DNS name nor an IP address");
    assert_eq!(cert(), before);

    let out = env
        .op(&[
            "init",
            "--hostname",
            "escrow.test",
            "--hostname",
            "10.0.0.7",
        ])
        .ok();
    assert!(
        out.stdout
            .contains("server certificate names: 10.0.0.7, 127.0.0.1, ::1, escrow.test, localhost"),
        "{}",
        out.stdout
    );
    let issued = cert();
    assert_ne!(issued, before, "issued again for the new names");
    // The same names again (in capitals, fully qualified), or none: the certificate stays.
    env.op(&[
        "init",
        "--hostname",
        "ESCROW.test.",
        "--hostname",
        "10.0.0.7",
    ])
    .ok();
    env.op(&["init"]).ok();
    assert_eq!(cert(), issued);
    // A key that is not the certificate's (a replacement cut short between the two files):
    // the next init issues the certificate again, for the names it had.
    std::fs::copy(
        env.bundle("acme").join("key.pem"),
        env.data.join("tls/server.key"),
    )
    .expect("another key");
    env.op(&["init"]).ok();
    assert_ne!(cert(), issued, "issued again for its key");
    let out = env.op(&[
        "init",
        "--hostname",
        "escrow.test",
        "--hostname",
        "10.0.0.7",
    ]);
    assert!(out.stdout.contains("nothing changed"), "{}", out.stdout);

    let server = env.serve(&[]);
    assert_eq!(whoami_at(&env, "escrow.test", server.port()), Ok(200));
    // A name the certificate does not carry fails the handshake.
    let e = whoami_at(&env, "other.test", server.port()).expect_err("not its name");
    assert!(
        e.contains("NotValidForName") || e.contains("certificate"),
        "{e}"
    );
    env.cli(&server, "acme", &["whoami"]).ok();
}

/// A CA of the operator's own and a server certificate it issued for localhost and
/// 127.0.0.1, written into the test's directory as TAG-ca.pem, TAG-cert.pem (chain) and
/// TAG-key.pem; their paths.
fn operator_certificate(env: &Env, tag: &str) -> [std::path::PathBuf; 3] {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).expect("ca").pem();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let cert = params.signed_by(&key, &issuer).expect("server cert");
    [
        env.file(&format!("{tag}-ca.pem"), ca_pem.as_bytes()),
        env.file(
            &format!("{tag}-cert.pem"),
            format!("{}{ca_pem}", cert.pem()).as_bytes(),
        ),
        env.file(&format!("{tag}-key.pem"), key.serialize_pem().as_bytes()),
    ]
}

#[test]
fn serve_tls_cert_is_served_and_reloaded() {
    let env = Env::new();
    let [ca, cert, key] = operator_certificate(&env, "first");
    let path = |p: &std::path::Path| p.to_str().expect("utf-8").to_string();
    let (cert_arg, key_arg) = (path(&cert), path(&key));

    // A key that does not match the certificate: the server does not start, and says why.
    let [_, _, other_key] = operator_certificate(&env, "unmatched");
    let (_, log) = env
        .serve_env(
            &[],
            &["--tls-cert", &cert_arg, "--tls-key", &path(&other_key)],
        )
        .err()
        .expect("refused");
    assert!(log.contains("server certificate"), "{log}");

    let server = env.serve(&["--tls-cert", &cert_arg, "--tls-key", &key_arg]);
    // Served: a client that trusts the operator's CA gets in with its escrow identity; one
    // that expects the escrow CA's server certificate does not.
    let whoami =
        |ca: &std::path::Path| env.cli(&server, "acme", &["whoami", "--server-ca", &path(ca)]);
    whoami(&ca).ok();
    env.cli(&server, "acme", &["whoami"])
        .fails_with("cannot talk to escrow");

    // Renewed from another CA, key first then certificate (as a renewal writes them): the
    // next connections get the new certificate, without a restart.
    let [new_ca, new_cert, new_key] = operator_certificate(&env, "renewed");
    std::fs::rename(&new_key, &key).expect("new key");
    std::fs::rename(&new_cert, &cert).expect("new cert");
    let deadline = Instant::now() + Duration::from_secs(10);
    while whoami(&new_ca).code != Some(0) {
        assert!(Instant::now() < deadline, "renewed certificate not served");
        std::thread::sleep(Duration::from_millis(100));
    }
    whoami(&ca).fails_with("cannot talk to escrow");
}

#[test]
fn sigterm_stops_gracefully() {
    let env = Env::new();
    let mut server = env.serve(&[]);
    env.cli(&server, "acme", &["whoami"]).ok();
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
    server.wait_log("SIGTERM received");
}

/// A question asked again on one open connection is answered from what its node kept (the
/// caller's identity and the catalog's generations, the ledger and the kept answer, assumed
/// and confirmed with the question's audit record), and follows every change at once, made
/// on whichever node: a grant taken back refuses it, given again answers it (nothing spent),
/// and the caller revoked gets 401 on its open connection, with no answer recorded after.
#[test]
fn a_repeated_question_on_an_open_connection_follows_every_change_at_once() {
    let env = Env::new();
    let server = env.serve(&[]);
    env.customers_shared(&server);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let url = format!("{}/v1/overlaps", server.url);
    // One client (one kept-alive connection) per user; `send` posts a body to the overlaps.
    let connect = |user: &str, role: &str| {
        let bundle = env.add_user("acme", user, role);
        let config = escrow::server::tls::client_config(&bundle).expect("tls config");
        (reqwest::Client::builder().tls_backend_preconfigured(config))
            .build()
            .expect("client")
    };
    let send = |http: &reqwest::Client, body: &str| -> (u16, serde_json::Value) {
        rt.block_on(async {
            let resp = (http.post(&url))
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .expect("send");
            let status = resp.status().as_u16();
            (status, resp.json().await.expect("json"))
        })
    };
    let ana = connect("ana", "analyst");
    let ask = || send(&ana, r#"{"with": "globex"}"#);
    let (status, first) = ask();
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["repeated"], false, "{first}");
    for _ in 0..3 {
        let (status, again) = ask();
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["rows"], first["rows"]);
        assert_eq!(again["repeated"], true, "{again}");
    }
    let revoke = words("policy revoke accounts --to acme --usage overlap");
    env.cli(&server, "globex", &revoke).ok();
    let (status, refused) = ask();
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["error"]["code"], "QUERY_REFUSED", "{refused}");
    env.cli(
        &server,
        "globex",
        &words("policy grant accounts --to acme --usage overlap"),
    )
    .ok();
    for _ in 0..3 {
        let (status, back) = ask();
        assert_eq!(status, 200, "{back}");
        assert_eq!(back["rows"], first["rows"]);
        assert_eq!(back["epsilon_spent"], 0.0, "{back}");
    }
    // A user whose role may not ask: refused (and audited) while active, 401 once revoked.
    let uma = connect("uma", "uploader");
    for _ in 0..2 {
        let (status, refused) = send(&uma, r#"{"with": "globex"}"#);
        assert_eq!(status, 403, "{refused}");
    }
    env.op(&["user", "revoke", "acme", "uma"]).ok();
    let (status, gone) = send(&uma, r#"{"with": "globex"}"#);
    assert_eq!(status, 401, "{gone}");
    // Revoked: a bad request and a good one on ana's open connection alike get 401.
    env.op(&["user", "revoke", "acme", "ana"]).ok();
    let (status, gone) = send(&ana, r#"{"with": 7}"#);
    assert_eq!(status, 401, "{gone}");
    let (status, gone) = ask();
    assert_eq!(status, 401, "{gone}");
    assert_eq!(gone["error"]["code"], "unauthenticated", "{gone}");
    let records = env.audit_records();
    for (user, kind, before) in [("ana", "overlap", 8), ("uma", "access", 2)] {
        let revoked = (records.iter())
            .position(|r| r["kind"] == "user_revoke" && r["detail"]["user"] == user)
            .unwrap_or_else(|| panic!("{user}'s revocation recorded: {records:?}"));
        let by = |r: &&serde_json::Value| r["actor"]["user"] == user;
        assert_eq!(
            (records[..revoked].iter().filter(by))
                .filter(|r| r["kind"] == kind)
                .count(),
            before,
            "{user}: every answer and refusal recorded"
        );
        assert!(
            !records[revoked..].iter().any(|r| by(&r)),
            "nothing of {user}'s after the revocation: {:?}",
            &records[revoked..]
        );
    }
}

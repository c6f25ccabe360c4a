//! Enrollment: partners and users make their own keys. An invitation's token is single-use,
//! expires, is bound to its identity and audited; `escrow renew` replaces a certificate
//! before it ends; the operator's data directory never holds an enrolled key.

use std::path::{Path, PathBuf};

use crate::harness::{Env, Run, Server, raw};

/// `escrow enroll` on "another machine": no data directory, no identity in the environment.
fn enroll(server: &Server, token: &str, out: &Path) -> Run {
    enroll_at(&server.url, token, out)
}

fn enroll_at(url: &str, token: &str, out: &Path) -> Run {
    let mut cmd = std::process::Command::new(crate::harness::BIN);
    cmd.args(["enroll", "--server", url, "--token", token, "--out"])
        .arg(out)
        .env_remove("ESCROW_DATA_DIR")
        .env_remove("ESCROW_IDENTITY")
        .env_remove("ESCROW_SERVER");
    crate::harness::run(cmd)
}

/// The token an invitation printed: its only stdout line.
fn token_of(run: Run) -> String {
    let run = run.ok();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{run:?}");
    assert!(lines[0].starts_with("escrow1."), "{run:?}");
    assert!(run.stderr.contains("works once"), "{run:?}");
    lines[0].to_string()
}

/// Every file under `dir` holding a PEM private key.
fn private_keys(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if std::fs::read(&p)
                .map(|b| String::from_utf8_lossy(&b).contains("PRIVATE KEY-----"))
                .unwrap_or(false)
            {
                found.push(p);
            }
        }
    }
    found.sort();
    found
}

fn serial_of(bundle: &Path) -> String {
    let pem = std::fs::read(bundle.join("cert.pem")).expect("cert");
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("pem");
    let cert = pem.parse_x509().expect("cert");
    hex::encode(cert.raw_serial())
}

fn kinds(env: &Env, kind: &str) -> Vec<serde_json::Value> {
    env.audit_records()
        .into_iter()
        .filter(|r| r["kind"] == kind)
        .collect()
}

#[test]
fn a_partner_enrolls_its_own_key_invites_a_user_renews_and_is_revoked() {
    let env = Env::new();
    let server = env.serve(&[]);
    let keys_before = private_keys(&env.data);
    let token = token_of(env.op(&["partner", "invite", "initech"]));
    assert!(token.starts_with("escrow1.initech.admin."), "{token}");

    // On the partner's machine: a directory of its own.
    let away = tempfile::tempdir().expect("tempdir");
    let admin = away.path().join("initech-admin");
    let out = enroll(&server, &token, &admin).ok();
    assert!(
        out.stdout
            .contains("enrolled as initech/admin (role admin)"),
        "{out:?}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(admin.join("key.pem"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "key.pem is private");
    let who = env.cli_as(&server, &admin, &["whoami"]).ok();
    assert_eq!(who.stdout.trim(), "partner=initech user=admin role=admin");
    assert!(!who.stderr.contains("warning"), "90 days: {}", who.stderr);

    // The admin invites a user through the API; the user enrolls on its own machine.
    let token = token_of(env.cli_as(
        &server,
        &admin,
        &[
            "user",
            "invite",
            "initech",
            "ana",
            "--role",
            "analyst",
            "--identity",
            admin.to_str().expect("utf-8"),
            "--server",
            &server.url,
        ],
    ));
    // Open invitations are visible to the partner's admins and the operator (never a token).
    let admin_args = [
        "--identity",
        admin.to_str().expect("utf-8"),
        "--server",
        &server.url,
    ];
    let invitations = || {
        env.cli_as(
            &server,
            &admin,
            &[&["user", "invitations"][..], &admin_args].concat(),
        )
        .ok()
        .stdout
    };
    let listed = invitations();
    assert!(
        listed.contains("ana") && listed.contains("initech/admin"),
        "{listed}"
    );
    assert!(!listed.contains(token.split('.').nth(3).expect("secret")));
    let listed = env.op(&["user", "invitations"]).ok().stdout;
    assert!(listed.contains("initech/ana"), "{listed}");
    let ana = away.path().join("ana");
    enroll(&server, &token, &ana).ok();
    let listed = invitations();
    assert!(listed.contains("no open invitations"), "{listed}");
    let who = env.cli_as(&server, &ana, &["whoami"]).ok();
    assert_eq!(who.stdout.trim(), "partner=initech user=ana role=analyst");

    // Neither key is anywhere in the operator's data directory.
    assert_eq!(private_keys(&env.data), keys_before);
    for bundle in [&admin, &ana] {
        let key = std::fs::read_to_string(bundle.join("key.pem")).expect("key");
        let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
        for f in private_keys(&env.data) {
            let text = std::fs::read_to_string(&f).expect("read");
            assert!(!text.replace('\n', "").contains(&body), "{}", f.display());
        }
    }

    // Renewal: a new key and serial; the old certificate is accepted for a grace day (a
    // renewal whose answer was lost) but cannot renew again, and an identity renews at most
    // once an hour.
    let old = away.path().join("ana-old");
    std::fs::create_dir(&old).expect("dir");
    for f in ["cert.pem", "key.pem", "ca.pem"] {
        std::fs::copy(ana.join(f), old.join(f)).expect("copy");
    }
    let old_key = std::fs::read(ana.join("key.pem")).expect("key");
    let out = env.cli_as(&server, &ana, &["renew"]).ok();
    assert!(out.stdout.contains("renewed initech/ana"), "{out:?}");
    assert_ne!(serial_of(&ana), serial_of(&old));
    assert_ne!(std::fs::read(ana.join("key.pem")).expect("key"), old_key);
    assert!(!ana.join("key.pem.new").exists() && !ana.join("cert.pem.new").exists());
    env.cli_as(&server, &ana, &["whoami"]).ok();
    env.cli_as(&server, &old, &["whoami"]).ok();
    env.cli_as(&server, &old, &["renew"])
        .fails_with("renewed already");
    env.cli_as(&server, &ana, &["renew"])
        .fails_with("less than an hour ago");
    assert!(!ana.join("key.pem.new").exists());
    env.cli_as(&server, &ana, &["whoami"]).ok();
    let (status, _, users) = raw(&admin, |c| c.get(format!("{}/v1/users", server.url)));
    assert_eq!(status, 200, "{users}");
    let users: serde_json::Value = serde_json::from_str(&users).expect("json");
    let listed: Vec<&serde_json::Value> = users["users"]
        .as_array()
        .expect("users")
        .iter()
        .filter(|u| u["user"] == "ana")
        .collect();
    assert_eq!(
        listed.len(),
        1,
        "a renewed identity is listed once: {users}"
    );

    // Revocation ends every certificate of the identity, the renewed one and the old.
    env.op(&["user", "revoke", "initech", "ana"]).ok();
    for bundle in [&ana, &old] {
        let run = env.cli_as(&server, bundle, &["whoami"]);
        assert_ne!(run.code, Some(0), "{run:?}");
    }
    env.cli_as(&server, &admin, &["whoami"]).ok();

    // Audited: the invitations, the enrollments (by the identity, via its token), the renewal.
    assert_eq!(kinds(&env, "user_invite").len(), 2);
    let enrolled = kinds(&env, "enroll");
    assert_eq!(enrolled.len(), 2, "{enrolled:?}");
    assert!(enrolled.iter().all(|r| r["outcome"] == "ok"));
    assert_eq!(enrolled[1]["actor"]["via"], "enrollment");
    let renewed = kinds(&env, "renew");
    let outcomes: Vec<_> = renewed.iter().map(|r| r["outcome"].clone()).collect();
    assert_eq!(outcomes, ["ok", "refused", "refused"], "{renewed:?}");
    assert_eq!(renewed[0]["detail"]["serial"], serial_of(&ana));
    // The audit log never holds a token.
    let all = serde_json::to_string(&env.audit_records()).expect("json");
    assert!(!all.contains(token.split('.').nth(3).expect("secret")));
}

#[test]
fn a_token_is_single_use_expires_is_bound_to_its_identity_and_names_its_ca() {
    let env = Env::new();
    let server = env.serve(&[]);
    let away = tempfile::tempdir().expect("tempdir");
    let dir = |n: &str| away.path().join(n);

    // Used once; the second use is refused, and audited.
    let token = token_of(env.op(&["user", "invite", "acme", "ana", "--role", "analyst"]));
    enroll(&server, &token, &dir("ana")).ok();
    for _ in 0..5 {
        enroll(&server, &token, &dir("ana-again")).fails_with("used already");
        assert!(!dir("ana-again").join("key.pem").exists());
    }
    // Only over TLS: a token never goes out in clear text.
    let plain = server.url.replacen("https://", "http://", 1);
    enroll_at(&plain, &token, &dir("plain")).fails_with("must start with https://");

    // Expired.
    let token = token_of(env.op(&[
        "user",
        "invite",
        "acme",
        "bob",
        "--role",
        "analyst",
        "--valid-for",
        "1s",
    ]));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    enroll(&server, &token, &dir("bob")).fails_with("expired");

    // A newer invitation for the same identity withdraws the older one.
    let older = token_of(env.op(&["user", "invite", "acme", "bob", "--role", "analyst"]));
    let newer = token_of(env.op(&["user", "invite", "acme", "bob", "--role", "analyst"]));
    enroll(&server, &older, &dir("bob-1")).fails_with("withdrawn");

    // A signing request for another identity than the token's is refused, and does not
    // use the token up.
    let (csr, _key) = escrow::pki::new_request("acme", "admin").expect("csr");
    let body = serde_json::json!({ "token": newer, "csr_pem": csr });
    let ca = std::fs::read(env.data.join("ca/ca.pem")).expect("ca");
    let (status, body) = anonymous_post(&server, &ca, "v1/enrollments", &body);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("bad_csr"), "{body}");
    // A token whose names were changed is not a token the escrow knows.
    let forged = newer.replacen(".bob.", ".admin.", 1);
    enroll(&server, &forged, &dir("forged")).fails_with("not valid");
    enroll(&server, &newer, &dir("bob-2")).ok();
    let who = env.cli_as(&server, &dir("bob-2"), &["whoami"]).ok();
    assert_eq!(who.stdout.trim(), "partner=acme user=bob role=analyst");

    // The token names the escrow's CA: a server with another CA gets nothing.
    let other = Env::new();
    let other_server = other.serve(&[]);
    let token = token_of(env.op(&["user", "invite", "acme", "cy", "--role", "analyst"]));
    enroll(&other_server, &token, &dir("cy")).fails_with("not the escrow that invited you");
    enroll(&server, &token, &dir("cy")).ok();

    // Garbage is refused before anything is sent.
    enroll(&server, "escrow1.acme", &dir("junk")).fails_with("not an enrollment token");

    // Refusals of a known token are audited; guesses are not.
    let enrolls = kinds(&env, "enroll");
    let refused: Vec<_> = enrolls
        .iter()
        .filter(|r| r["outcome"] == "refused")
        .collect();
    // ana's spent token 3 times (of 5: the rest only logged), expired, withdrawn, bad CSR
    assert_eq!(refused.len(), 6, "{enrolls:?}");
    let spent = &enrolls[0]["detail"]["invitation"];
    assert_eq!(
        refused
            .iter()
            .filter(|r| r["detail"]["invitation"] == *spent)
            .count(),
        3
    );
    assert!(refused.iter().any(|r| r["code"] == "bad_csr"));
}

#[test]
fn whoami_warns_when_the_certificate_ends_soon_and_lifetimes_are_checked() {
    let env = Env::new();
    let server = env.serve(&[]);
    env.op(&[
        "user",
        "add",
        "acme",
        "dee",
        "--role",
        "analyst",
        "--cert-days",
        "10",
    ])
    .ok();
    let bundle = env.data.join("identities/acme/dee");
    let out = env.cli_as(&server, &bundle, &["whoami"]).ok();
    assert!(out.stderr.contains("run `escrow renew`"), "{out:?}");
    // An admin's token through the API lives a week at most.
    let (status, _, body) = raw(&env.bundle("acme"), |c| {
        c.post(format!("{}/v1/users/invitations", server.url)).json(
            &serde_json::json!({"name": "fay", "role": "analyst", "valid_for_secs": 8 * 86400}),
        )
    });
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("bad_validity"), "{body}");
    // Renewed with the server's lifetime (90 days): no warning any more.
    env.cli_as(&server, &bundle, &["renew"]).ok();
    let out = env.cli_as(&server, &bundle, &["whoami"]).ok();
    assert!(!out.stderr.contains("warning"), "{out:?}");
    env.op(&[
        "user",
        "invite",
        "acme",
        "eve",
        "--role",
        "analyst",
        "--cert-days",
        "0",
    ])
    .fails_with("1 to 825 days");
    env.op(&["user", "invite", "acme", "eve", "--role", "boss"])
        .fails_with("role");
    env.op(&["user", "invite", "acme", "dee", "--role", "analyst"])
        .fails_with("already has a user dee");
    env.op(&["partner", "invite", "acme"])
        .fails_with("already exists");
}

/// POST `body` to `path` without a client certificate, trusting `ca`.
fn anonymous_post(
    server: &Server,
    ca: &[u8],
    path: &str,
    body: &serde_json::Value,
) -> (u16, String) {
    let config = escrow::server::tls::client_config_without_identity(ca).expect("tls");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(config)
            .build()
            .expect("client");
        let resp = http
            .post(format!("{}/{path}", server.url))
            .json(body)
            .send()
            .await
            .expect("send");
        (resp.status().as_u16(), resp.text().await.expect("body"))
    })
}

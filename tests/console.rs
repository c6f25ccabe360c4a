//! The web console's way in: sign-in links minted over mutual TLS, browser sessions without
//! a certificate, CSRF, logout, expiry and revocation. (The pages themselves are driven in
//! a real browser by tests/console/.)

use crate::harness::{Env, Server};

/// A client like a browser: trusts the escrow's CA, has no client certificate, follows no
/// redirects, and sends the session cookie it was given.
pub struct Browser {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    base: String,
    cookie: Option<String>,
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

impl Browser {
    pub fn new(env: &Env, server: &Server) -> Browser {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_file_iter(env.bundle("acme").join("ca.pem"))
            .expect("ca")
        {
            roots.add(c.expect("cert")).expect("add");
        }
        let config = rustls::ClientConfig::builder_with_provider(escrow::server::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(config)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        Browser {
            rt: tokio::runtime::Runtime::new().expect("rt"),
            http,
            base: server.url.clone(),
            cookie: None,
        }
    }

    fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        let url = if path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        let mut req = self
            .http
            .request(method.parse().expect("method"), url)
            .body(body.to_string());
        if let Some(c) = &self.cookie {
            req = req.header("cookie", c);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.rt.block_on(async {
            let r = req
                .send()
                .await
                .expect("the server answers a client without a certificate");
            Reply {
                status: r.status().as_u16(),
                headers: r.headers().clone(),
                body: r.text().await.expect("body"),
            }
        })
    }

    pub fn get(&self, path: &str) -> Reply {
        self.send("GET", path, &[], "")
    }

    /// Open a sign-in link and sign in on its page (a same-origin POST); keeps the session
    /// cookie it sets. Opening the link alone signs in nobody.
    fn open_link(&mut self, url: &str) -> Reply {
        let page = self.get(url);
        if page.status != 200 {
            return page;
        }
        assert!(page.body.contains("<form method=\"post\""), "{}", page.body);
        assert!(
            page.headers.get("set-cookie").is_none(),
            "opening is not signing in"
        );
        let origin = self.base.trim_end_matches('/').to_string();
        let r = self.send(
            "POST",
            url,
            &[("origin", &origin), ("sec-fetch-site", "same-origin")],
            "",
        );
        if let Some(set) = r.headers.get("set-cookie") {
            let set = set.to_str().expect("cookie text");
            self.cookie = Some(set.split(';').next().expect("pair").to_string());
        }
        r
    }
}

fn link(env: &Env, server: &Server, partner: &str) -> String {
    let out = env.cli(server, partner, &["console", "--print"]).ok();
    let url = out.stdout.trim().to_string();
    assert!(url.starts_with(&server.url), "{url}");
    assert!(url.contains("/login/"), "{url}");
    url
}

#[test]
fn a_sign_in_link_gives_one_browser_a_session_until_logout() {
    let env = Env::new();
    let server = env.serve(&[]);
    let mut browser = Browser::new(&env, &server);

    // Without certificate or session: the console's page, but no API data.
    let page = browser.get("/");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("escrow console"), "{}", page.body);
    let csp = page.headers["content-security-policy"]
        .to_str()
        .expect("csp");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    for path in [
        "/v1/whoami",
        "/v1/datasets",
        "/v1/audit",
        "/v1/console/session",
    ] {
        let r = browser.get(path);
        assert_eq!(
            (r.status, r.code().as_str()),
            (401, "unauthenticated"),
            "{path}"
        );
    }
    let r = browser.send("POST", "/v1/console/links", &[], "");
    assert_eq!(r.status, 401, "a link needs a certificate");

    let url = link(&env, &server, "acme");
    // Another site can make a browser open the link or post to it: opening signs in
    // nobody and uses nothing; a cross-site post is refused and uses nothing either.
    let page = browser.get(&url);
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("admin</strong> of <strong>acme"),
        "{}",
        page.body
    );
    for site in [
        vec![("origin", "https://evil.example")],
        vec![("sec-fetch-site", "cross-site")],
    ] {
        let r = browser.send("POST", &url, &site, "");
        assert_eq!(
            (r.status, r.code().as_str()),
            (403, "forbidden"),
            "{site:?}"
        );
        assert!(r.headers.get("set-cookie").is_none());
    }
    let r = browser.open_link(&url);
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.headers["location"], "/");
    let set = r.headers["set-cookie"].to_str().expect("cookie");
    for attr in [
        "__Host-escrow_session=",
        "HttpOnly",
        "Secure",
        "SameSite=Strict",
        "Path=/",
    ] {
        assert!(set.contains(attr), "{attr} missing: {set}");
    }
    assert_eq!(r.headers["referrer-policy"], "no-referrer");

    let who = browser.get("/v1/whoami").json();
    assert_eq!(who["partner"], "acme");
    assert_eq!(who["via"], "console");
    let session = browser.get("/v1/console/session").json();
    let csrf = session["csrf"].as_str().expect("csrf").to_string();

    // The link worked once.
    let mut other = Browser::new(&env, &server);
    let r = other.open_link(&url);
    assert_eq!(r.status, 403);
    assert!(r.body.contains("used already"), "{}", r.body);
    assert!(other.cookie.is_none());

    // A session cannot mint links (it would outlive its own expiry).
    let r = browser.send("POST", "/v1/console/links", &[("x-csrf-token", &csrf)], "");
    assert_eq!((r.status, r.code().as_str()), (403, "forbidden"));

    // A cross-site form post carries the cookie at best, never the CSRF token: refused,
    // nothing changed.
    let form = "dataset=accounts&to=globex&usage=join&column=website";
    let before = env.cli(&server, "acme", &["policy", "list"]).ok().stdout;
    let r = browser.send(
        "POST",
        "/v1/policies/grants",
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("origin", "https://evil.example"),
        ],
        form,
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (403, "forbidden"),
        "{}",
        r.body
    );
    assert!(r.body.contains("CSRF"), "{}", r.body);
    assert_eq!(
        env.cli(&server, "acme", &["policy", "list"]).ok().stdout,
        before
    );

    // Logout needs the token too, then ends the session.
    let r = browser.send("POST", "/v1/console/logout", &[], "");
    assert_eq!(r.status, 403);
    let r = browser.send("POST", "/v1/console/logout", &[("x-csrf-token", &csrf)], "");
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(
        r.headers["set-cookie"]
            .to_str()
            .expect("cookie")
            .contains("Max-Age=0")
    );
    let r = browser.get("/v1/whoami");
    assert_eq!((r.status, r.code().as_str()), (401, "unauthenticated"));

    // The audit log says which actions came from the console.
    let records = env.audit_records();
    let via = |kind: &str| {
        records
            .iter()
            .find(|r| r["kind"] == kind)
            .map(|r| r["actor"]["via"].clone())
    };
    assert_eq!(via("console_link"), Some(serde_json::Value::Null));
    assert_eq!(via("console_login"), Some("console".into()));
    assert_eq!(via("console_logout"), Some("console".into()));
}

#[test]
fn expired_links_and_revoked_identities_end_there() {
    let env = Env::new();
    let server = env.serve(&["--console-link-secs", "1"]);
    let url = link(&env, &server, "globex");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let mut browser = Browser::new(&env, &server);
    let r = browser.open_link(&url);
    assert_eq!(r.status, 403, "an expired link");
    assert!(browser.cookie.is_none());

    // A session ends when its identity is revoked.
    let url = link(&env, &server, "globex");
    assert_eq!(browser.open_link(&url).status, 303);
    assert_eq!(browser.get("/v1/whoami").json()["partner"], "globex");
    env.op(&["partner", "revoke", "globex"]).ok();
    let r = browser.get("/v1/whoami");
    assert_eq!((r.status, r.code().as_str()), (401, "unauthenticated"));
    // Others keep working.
    env.cli(&server, "acme", &["whoami"]).ok();
}

/// Links and sessions are kept in the catalog: a restarted server (or another node on the
/// same catalog) knows them; logout on it ends the session for all.
#[test]
fn sessions_and_links_outlive_a_restart_of_the_server() {
    let env = Env::new();
    let mut server = env.serve(&[]);
    let mut browser = Browser::new(&env, &server);
    let r = browser.open_link(&link(&env, &server, "acme"));
    assert_eq!(r.status, 303, "{}", r.body);
    let pending = link(&env, &server, "globex");
    let csrf = browser.get("/v1/console/session").json()["csrf"]
        .as_str()
        .expect("csrf")
        .to_string();
    server.terminate();

    let server = env.serve(&[]);
    browser.base = server.url.clone();
    let who = browser.get("/v1/whoami").json();
    assert_eq!(
        (who["partner"].as_str(), who["via"].as_str()),
        (Some("acme"), Some("console"))
    );
    assert_eq!(
        browser.get("/v1/console/session").json()["csrf"],
        csrf.as_str()
    );
    // The link minted before the restart works once, on the new server.
    let pending = pending.replace(
        pending.split("/login/").next().expect("base"),
        server.url.trim_end_matches('/'),
    );
    let mut other = Browser::new(&env, &server);
    assert_eq!(other.open_link(&pending).status, 303);
    assert_eq!(other.get("/v1/whoami").json()["partner"], "globex");
    assert_eq!(other.open_link(&pending).status, 403, "used already");

    let r = browser.send("POST", "/v1/console/logout", &[("x-csrf-token", &csrf)], "");
    assert_eq!(r.status, 204, "{}", r.body);
    let r = browser.get("/v1/whoami");
    assert_eq!((r.status, r.code().as_str()), (401, "unauthenticated"));
}
